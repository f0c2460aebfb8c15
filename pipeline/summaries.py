"""What each stage returns: a small frozen record, read by attribute by the flow's artifacts,
the CLI's summary, the tracking tags and the tests.

A stage writes its full report (a DVC metric, e.g. reports/split.json) and returns the
summary built from it with `from_report`, so a stage that DVC reports as up to date hands
back the same summary from the file without running.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any, ClassVar, Self


class Summary:
    """`from_report` picks the fields by name; a list in the report becomes a tuple."""

    SPREAD: ClassVar[tuple[str, ...]] = ()  # mappings of numbers that a one-line summary spreads out

    @classmethod
    def from_report(cls, report: Mapping[str, Any]) -> Self:
        values = {}
        for f in fields(cls):  # type: ignore[arg-type]
            if f.name in report:
                value = report[f.name]
                values[f.name] = tuple(value) if isinstance(value, list) else value
            elif f.default is MISSING:
                raise KeyError(f"{cls.__name__}: the report has no '{f.name}'")
        return cls(**values)

    def shown(self) -> dict[str, Any]:
        """The fields a one-line summary prints: the set ones, with the SPREAD mappings (the
        metrics, the split sizes) spread into their entries; lists and other mappings left out."""
        out: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if f.name in self.SPREAD:
                out |= dict(value)
            elif value is not None and not isinstance(value, (Mapping, list, tuple)):
                out[f.name] = value
        return out


@dataclass(frozen=True)
class DataVersion(Summary):
    """The raw file's md5, DVC's record of it, and what happened when it was pushed."""

    path: str
    md5: str
    dvc_md5: str | None
    matches_dvc: bool
    dvc: str = ""  # the push's outcome, in words


@dataclass(frozen=True)
class Validated(Summary):
    passed: bool
    reasons: tuple[str, ...]
    rows_in: int
    rows_valid: int
    rows_quarantined: int
    bad_row_fraction: float
    expectations: int
    expectations_failed: int
    data_md5: str
    data_path: str
    data_docs: str | None = None  # the Data Docs index, relative to the project; None when off


@dataclass(frozen=True)
class Cleaned(Summary):
    rows_in: int
    rows_out: int
    removed: int


@dataclass(frozen=True)
class SplitSizes(Summary):
    SPREAD = ("sizes",)

    sizes: Mapping[str, int]
    strategy: str
    seed: int
    leaked_rows: int
    model_inputs: int


@dataclass(frozen=True)
class Trained(Summary):
    epochs_run: int
    best_epoch: int
    best_val_loss: float
    train_seconds: float
    num_workers: int
    best_val_accuracy: float | None = None  # classification
    best_val_rmse: float | None = None  # regression
    tuned: Mapping[str, Any] | None = None  # the tuned config, when tune.enabled
    init_from: str | None = None  # the warm start, when train.init_from is set
    init_from_version: str | None = None
    transferred_tensors: int | None = None
    fresh_tensors: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Evaluated(Summary):
    """Val and test metrics, the MLflow run and the logged raw-row model."""

    SPREAD = ("metrics",)

    metrics: Mapping[str, float]
    mlflow_run_id: str
    model_uri: str

    @classmethod
    def from_report(cls, report: Mapping[str, Any]) -> Self:
        metrics = {k: float(v) for k, v in report.items() if k.startswith(("val_", "test_"))}
        return cls(metrics, report["mlflow_run_id"], report["model_uri"])

    def test(self) -> dict[str, float]:
        """The test metrics without their `test_` prefix."""
        return {k.removeprefix("test_"): v for k, v in self.metrics.items() if k.startswith("test_")}


@dataclass(frozen=True)
class Registered(Summary):
    """The promotion gate's decision: the new version, whether it became champion, and why."""

    model_name: str
    version: int
    promoted: bool
    champion: int | None
    reasons: tuple[str, ...]
    champion_metrics: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class TrainingRun:
    """Every stage's summary of one training run, in order."""

    data_version: DataVersion
    validate: Validated
    clean: Cleaned
    split: SplitSizes
    train: Trained
    evaluate: Evaluated
    register: Registered
