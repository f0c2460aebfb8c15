"""What a person reads after a run: a markdown summary (validation, splits, test metrics,
the promotion decision, where to look next) and the per-class metrics as table rows.
Pure formatting of what the stages wrote; the flow publishes it as Prefect artifacts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.data import io
from pipeline.stages import CATALOG
from pipeline.summaries import TrainingRun


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def run_summary(result: TrainingRun, root: Path, tracking_uri: str) -> str:
    data, val, clean, split = result.data_version, result.validate, result.clean, result.split
    evaluated, reg = result.evaluate, result.register
    lines = [
        "# d2d training run",
        "",
        f"**Data**: `{data.path}`, md5 `{data.md5}` ({data.dvc})",
        "",
        "## Validation",
        f"- {'passed' if val.passed else 'FAILED'}: {val.expectations - val.expectations_failed}"
        f"/{val.expectations} expectations met",
        f"- rows: {val.rows_in} in, {val.rows_quarantined} quarantined "
        f"(`{CATALOG['quarantine']}`, with reasons), {clean.removed} removed by cleaning",
        f"- Data Docs: `{root / val.data_docs}`" if val.data_docs else "- Data Docs: off",
        "",
        "## Splits",
        "| split | rows |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in split.sizes.items()],
        "",
        "## Test metrics",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {_fmt(v)} |" for k, v in evaluated.test().items()],
        "",
        "## Promotion",
        f"**{reg.model_name} version {reg.version}**: "
        + ("promoted to champion" if reg.promoted else f"not promoted (champion: version {reg.champion})"),
        "",
        *[f"- {reason}" for reason in reg.reasons],
        "",
        "## Where to look",
        f"- MLflow run `{evaluated.mlflow_run_id}` on `{tracking_uri}`",
        f"- model `models:/{reg.model_name}/{reg.version}`",
        f"- reports: `{root / 'reports'}`",
    ]
    return "\n".join(lines)


def per_class_rows(path: Path) -> list[dict[str, Any]]:
    """The per-class metrics table (empty for regression)."""
    if not path.is_file():
        return []
    table = io.read_csv(path, dtype={"class": str})  # labels stay labels: "9", not 9
    return [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()} for row in table.to_dict("records")]
