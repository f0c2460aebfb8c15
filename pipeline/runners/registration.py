"""The register stage's runner: a new version, gated against the champion."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.config import Params
from pipeline.data import io
from pipeline.data.schema import schema_from_params
from pipeline.summaries import Evaluated, Registered

if TYPE_CHECKING:
    from pipeline.stages import StageFiles


def register(params: Params, files: StageFiles) -> Registered:
    """Register the evaluated model and gate it against the champion on the current test split."""
    from dataclasses import asdict

    from pipeline import registry, tracking

    evaluated = Evaluated.from_report(io.read_json(files["metrics"]))
    tracking.configure(files.root)
    tracking.reachable(tracking.ping)
    decision = tracking.reachable(lambda: registry.register_and_gate(
        evaluated, params.register_, params.data.task, files["test"], schema_from_params(params.data),
        params.evaluate.sample_rows))
    io.write_json(asdict(decision), files["register_report"])
    return decision
