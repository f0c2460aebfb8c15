"""The stage table: every stage of the pipeline, declared once.

Each stage names its runner (pipeline/runners/: read the inputs, call the pure step, write the
outputs), the files it reads and writes, the params sections it takes, the code it depends
on and the summary it returns. Everything else derives from this table: the paths every
module uses (`path`), the DVC bookkeeping (`dvc.yaml` must declare exactly these deps, params,
outs, metrics and plots: tests/unit/test_stage_table.py checks it), the monitor's paths, the
training flow's tasks (flows/training.py) and `d2d stage NAME`.

Read it like Kedro's `pipeline.py`: the wiring, without opening the functions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import summaries
from pipeline.config import Params
from pipeline.errors import ConfigError
from pipeline.project import RAW, raw_path
from pipeline.runners import data, evaluation, registration, training

# RAW ("raw") is the one file not in the catalog: params' data.raw (dvc.yaml: ${data.raw})

# Every file or folder a stage reads or writes, by name, relative to the project root.
CATALOG: Mapping[str, str] = {
    # validate
    "valid": "data/validated/valid.parquet",
    "quarantine": "data/quarantine/validate.parquet",
    "data_docs": "reports/data_docs",
    "validate_report": "reports/validate.json",
    # clean
    "clean": "data/clean/clean.parquet",
    "removed": "data/quarantine/clean.parquet",
    "clean_report": "reports/clean.json",
    # split
    "train": "data/split/train.parquet",
    "val": "data/split/val.parquet",
    "test": "data/split/test.parquet",
    "preprocess": "data/split/preprocess.json",
    "leaked": "data/quarantine/split.parquet",  # near-duplicate images across splits
    "split_report": "reports/split.json",
    # train
    "model": "models/model.pt",
    "history": "reports/history.csv",
    "train_report": "reports/train.json",
    "tune_report": "reports/tune.json",
    "tune_trials": "reports/tune_trials.csv",
    "ray_storage": "artifacts/ray",  # Ray Train's checkpoints: scratch, not versioned
    # evaluate
    "metrics": "reports/metrics.json",
    "test_predictions": "reports/test_predictions.png",
    "learning_curves": "reports/learning_curves.png",
    "per_class_f1": "reports/per_class_f1.png",
    "roc_curves": "reports/roc_curves.png",
    "attributions": "reports/attributions.png",
    "per_class": "reports/per_class.csv",
    "slices": "reports/slices.csv",
    # register
    "register_report": "reports/register.json",
    # the flow's and the monitor's own files
    "timings": "reports/timings.json",
    "monitor_reports": "reports/monitor",
    "monitor_quarantine": "data/quarantine/monitor",
    "run_lock": ".d2d/run.lock",
}


@dataclass(frozen=True)
class Stage:
    """One stage. File fields hold catalog names (or RAW); DVC's kinds of output are kept
    apart: `outs` are cached by DVC, `uncached` are outs kept in Git, `metrics` and `plots`
    are what `dvc metrics` and `dvc plots` show."""

    name: str
    run: Callable[[Params, StageFiles], summaries.Summary]
    summary: type[summaries.Summary]
    report: str  # the file the summary is written to (and read back from when reused)
    params: tuple[str, ...] = ()  # params.yaml sections (or section.key) it takes
    reads: tuple[str, ...] = ()
    outs: tuple[str, ...] = ()
    uncached: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()
    plots: tuple[str, ...] = ()
    scratch: tuple[str, ...] = ()  # working folders, not versioned
    code: tuple[str, ...] = ()  # the modules it depends on (DVC deps)
    service: bool = False  # it talks to a service (DVC remote, Ray, MLflow): the flow retries it
    dvc: bool = True  # a stage of dvc.yaml (the data version is the flow's own step)

    @property
    def writes(self) -> tuple[str, ...]:
        return (*self.outs, *self.uncached, *self.metrics, *self.plots)


STAGES: tuple[Stage, ...] = (
    Stage(
        "data-version", data.data_version, summaries.DataVersion, report="",
        reads=(RAW,), service=True, dvc=False,
    ),
    Stage(
        "validate", data.validate, summaries.Validated, report="validate_report",
        params=("data", "validate"),
        reads=(RAW,),
        outs=("valid", "quarantine", "data_docs"),
        metrics=("validate_report",),
        # keys: the derived row key valid.parquet carries when there is no id column
        code=("pipeline/runners/data.py", "pipeline/data/validate.py", "pipeline/data/schema.py", "pipeline/data/keys.py",
              "pipeline/runners/image_data.py", "pipeline/data/images.py"),
    ),
    Stage(
        "clean", data.clean, summaries.Cleaned, report="clean_report",
        params=("data", "clean"),
        reads=("valid",),
        outs=("clean", "removed"),
        metrics=("clean_report",),
        code=("pipeline/runners/data.py", "pipeline/data/clean.py", "pipeline/runners/image_data.py", "pipeline/data/images.py"),
    ),
    Stage(
        "split", data.split, summaries.SplitSizes, report="split_report",
        params=("data", "clean.missing", "split", "preprocess"),
        reads=("clean",),
        outs=("train", "val", "test", "preprocess", "leaked"),
        metrics=("split_report",),
        code=("pipeline/runners/data.py", "pipeline/data/split.py", "pipeline/preprocess.py",
              "pipeline/runners/image_data.py", "pipeline/data/images.py", "pipeline/image_transforms.py"),
    ),
    Stage(
        "train", training.train, summaries.Trained, report="train_report",
        params=("data", "train", "tune"),
        reads=("train", "val", "preprocess"),
        outs=("model",),
        uncached=("tune_trials",),
        metrics=("train_report", "tune_report"),
        plots=("history",),
        scratch=("ray_storage",),
        # tracking: a warm start reads train.init_from's weights
        code=("pipeline/runners/training.py", "pipeline/train", "pipeline/ray_runtime.py", "pipeline/preprocess.py",
              "pipeline/tracking.py"),
        service=True,
    ),
    Stage(
        "evaluate", evaluation.evaluate, summaries.Evaluated, report="metrics",
        params=("data", "tune", "evaluate"),
        reads=("model", "history", "train_report", "tune_report", "tune_trials", "validate_report", "clean_report",
               "split_report", "valid", "train", "val", "test", "preprocess", "data_docs"),
        metrics=("metrics",),
        plots=("test_predictions", "learning_curves", "per_class_f1", "roc_curves", "attributions", "per_class",
               "slices"),
        # preprocess, trainer: the network's inputs for scoring (features_and_labels)
        code=("pipeline/runners/evaluation.py", "pipeline/evaluate.py", "pipeline/metric_totals.py", "pipeline/preprocess.py",
              "pipeline/train/trainer.py", "pipeline/tracking.py", "pipeline/raw_model.py"),
        service=True,
    ),
    Stage(
        "register", registration.register, summaries.Registered, report="register_report",
        params=("data", "evaluate", "register"),  # evaluate: sample_rows, the champion scored as the challenger was
        reads=("metrics", "test"),  # the champion is re-scored on the test split
        uncached=("register_report",),
        # scoring: the champion's re-score; summaries: register.json is the Registered record
        code=("pipeline/runners/registration.py", "pipeline/registry.py", "pipeline/scoring.py", "pipeline/summaries.py",
              "pipeline/evaluate.py", "pipeline/metric_totals.py", "pipeline/tracking.py"),
        service=True,
    ),
)

DVC_STAGES: tuple[Stage, ...] = tuple(s for s in STAGES if s.dvc)


def stage(name: str) -> Stage:
    """The stage called `name`; a ConfigError naming the choices otherwise."""
    for s in STAGES:
        if s.name == name:
            return s
    raise ConfigError(f"unknown stage '{name}'; choose one of: {', '.join(s.name for s in DVC_STAGES)}")


def path(name: str, root: Path) -> Path:
    """A catalog file's place in the project at `root`."""
    return root / CATALOG[name]


@dataclass(frozen=True)
class StageFiles:
    """The files one stage may touch, resolved in the project at `root`. Asking for a file the
    stage does not declare is an error: the table stays the truth about what a stage reads
    and writes. `lineage` adds to the MLflow run's tags (the flow passes its run id)."""

    stage: Stage
    params: Params
    root: Path
    lineage: Mapping[str, str] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Path:
        if name not in (*self.stage.reads, *self.stage.writes, *self.stage.scratch):
            raise KeyError(f"stage {self.stage.name} does not declare '{name}' in pipeline/stages.py")
        return raw_path(self.params, self.root) if name == RAW else path(name, self.root)


def run(name: str, params: Params, root: Path, lineage: Mapping[str, str] | None = None) -> summaries.Summary:
    """Run one stage in the project at `root` (what `d2d stage NAME` and the flow's tasks call)."""
    s = stage(name)
    try:
        return s.run(params, StageFiles(s, params, root, dict(lineage or {})))
    finally:
        release_freed_memory()


def release_freed_memory() -> None:
    """Give the memory a stage has freed back to the OS. With the system allocator (see
    pipeline/__init__) glibc keeps freed heap for reuse, and `d2d run` runs every stage in
    one process: what validate freed would still be counted while training runs."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = getattr(libc, "malloc_trim", None)  # glibc only; elsewhere there is nothing to do
    except OSError:
        return
    if trim is not None:
        trim(0)


def describe() -> list[dict[str, str]]:
    """The table in words, one row per stage (what `d2d stages` prints)."""

    def shown(names: tuple[str, ...]) -> str:
        return ", ".join("${data.raw}" if n == RAW else CATALOG[n] for n in names) or "—"

    return [{"stage": s.name, "runner": f"{s.run.__module__.removeprefix('pipeline.')}.{s.run.__name__}",
             "params": ", ".join(s.params) or "—", "reads": shown(s.reads), "writes": shown(s.writes),
             "returns": s.summary.__name__} for s in STAGES]
