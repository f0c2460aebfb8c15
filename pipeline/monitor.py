"""The drift monitor's steps, between the inbox and the retrain decision.

A batch is a CSV or Parquet file in the inbox. It is processed once: the ledger
(`<monitor.state>/ledger.json`) records every batch by content md5, so re-running the
monitor, or a file copied in twice, never counts a batch again. Each batch is validated with
the pipeline's own expectations (bad rows go to a quarantine file with their reasons),
compared with the reference (the train split the champion was trained on) and scored by the
champion. A batch that drifted joins the raw dataset as a new DVC version: a new part file,
with every existing byte left as it was, so DVC caches only the new part. A single raw file
becomes, on its first append, a folder of the same name whose first part is that file
(`io.install_part`).

Appending is a recorded transaction (write-ahead): the new part is built beside the dataset,
the ledger records the intent (the md5 before and after), the part is moved in, versioned,
and the entry is completed. A run killed in between leaves a `pending` entry that the next
run finishes, once: it never appends the rows a second time.

The inbox is read only as regular files that are really in it: a symbolic link, or anything
that resolves outside the inbox, is refused with the reason and left untouched. Quarantined
rows and the monitor's state are readable by their owner only.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal

import pandas as pd
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError, model_validator

from pipeline import drift, lock, registry, scoring, stages
from pipeline.config import Params
from pipeline.data import io
from pipeline.data.keys import KnownRows
from pipeline.data.schema import Schema, schema_from_params
from pipeline.errors import D2DError, DataError
from pipeline.project import raw_path

BATCH_SUFFIXES = (".csv", ".parquet")
REASON = "reason"


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def state_dir(params: Params, root: Path) -> Path:
    return root / params.monitor.state


LEDGER = "ledger.json"
PENDING, COMPLETE = "pending", "complete"
FAULT_DRILL = "D2D_FAULT_DRILL"  # `monitor-after-append`: exit hard right after the new part is moved in


def ledger_path(params: Params, root: Path) -> Path:
    return state_dir(params, root) / LEDGER


def _aware(value: str) -> str:
    if datetime.fromisoformat(value).tzinfo is None:
        raise ValueError("a time without a time zone")
    return value


class _Append(BaseModel):
    """The intent of an append: what a later run needs to finish it."""

    model_config = ConfigDict(extra="allow", strict=True)
    staged: str
    md5_before: str
    md5_after: str


class _Entry(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    file: str
    state: Literal["pending", "complete"] = COMPLETE  # ledgers before write-ahead had only complete entries
    action: str | None = None
    retrain: bool | None = None
    reasons: list[str] | None = None
    append: _Append | None = None
    # flow mode: "pending" from the decision until the training flow returns, so a retrain
    # that was killed or refused (another run held the lock) is run by the next monitor run
    retrain_state: Literal["pending", "done"] | None = None

    @model_validator(mode="after")
    def _resumable(self) -> _Entry:
        if self.state == PENDING and (self.action is None or self.retrain is None or self.reasons is None):
            raise ValueError("a pending entry needs its action, retrain and reasons to be finished")
        return self


class _Retrain(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    at: Annotated[str, AfterValidator(_aware)]


class _Ledger(BaseModel):
    """The shape the monitor relies on; anything else is a corrupt ledger, not a fresh one."""

    model_config = ConfigDict(extra="allow", strict=True)
    batches: dict[str, _Entry]
    retrains: list[_Retrain]
    log_parts: list[str] = []


def _recover(path: Path, inbox: str) -> str:
    return (f"to recover, repair it and move it back to {path}, or delete it to start an empty ledger: every "
            f"batch still in {inbox} is then read again, rows already in the dataset are quarantined rather than "
            "appended twice, and the retrain cooldown starts afresh")


def read_ledger(params: Params, root: Path) -> dict[str, Any]:
    """The ledger, checked. A corrupt one is set aside (ledger.json.corrupt-<UTC time>) and the
    run stops: starting an empty ledger silently would count old batches again."""
    path = ledger_path(params, root)
    if not path.is_file():
        aside = sorted(path.parent.glob(f"{LEDGER}.corrupt-*")) if path.parent.is_dir() else []
        if aside:  # the run that set it aside said so; until someone decides, do not start afresh
            raise D2DError(f"the monitor's ledger was set aside as corrupt ({aside[-1]}) and not replaced; "
                           + _recover(aside[-1], params.monitor.inbox))
        return {"batches": {}, "retrains": [], "log_parts": []}
    try:
        ledger = io.read_json(path)
        _Ledger.model_validate(ledger)
        return ledger
    except ValidationError as e:
        first = e.errors()[0]
        problem = f"{'.'.join(str(p) for p in first['loc']) or 'the whole file'}: {first['msg']}"
    except (ValueError, UnicodeDecodeError) as e:  # not JSON: truncated, binary, empty
        problem = f"not valid JSON ({str(e).splitlines()[0][:120]})"
    except RecursionError:  # nesting deeper than the parser goes
        problem = "not valid JSON (nested too deeply)"
    aside = path.with_name(f"{LEDGER}.corrupt-{utc_now():%Y%m%dT%H%M%S%fZ}")
    io.move(path, aside)
    raise D2DError(f"the monitor's ledger {path} is corrupt ({problem}); it was moved to {aside.name}; "
                   + _recover(aside, params.monitor.inbox))


def write_ledger(ledger: dict[str, Any], params: Params, root: Path) -> None:
    """Atomically (a new file, flushed, renamed over the old), readable by the owner only."""
    io.write_json(ledger, ledger_path(params, root), private=True)


def retrain_times(ledger: dict[str, Any]) -> list[datetime]:
    return [datetime.fromisoformat(r["at"]) for r in ledger["retrains"]]


@contextmanager
def exclusive(params: Params, root: Path) -> Iterator[None]:
    """One monitor run at a time per project: two at once could append the same batch twice."""
    folder = io.private_dir(state_dir(params, root))
    with lock.exclusive(folder / "monitor.lock", "a drift-monitor run"):
        yield


@dataclass(frozen=True)
class Batch:
    """New data to inspect: an inbox file, or the inference log's unseen part files."""

    name: str
    md5: str  # the ledger's key: the file's content, or the list of log parts
    paths: tuple[Path, ...]
    log_parts: tuple[str, ...] = ()  # inference-log parts it consumes, relative to the project
    refused: str = ""  # why the file is not read at all: a link, not a regular file, outside the inbox

    @property
    def key(self) -> str:
        name = Path(self.name)  # a file's name without its suffix; a folder's (images) whole
        return f"{name.stem if name.suffix in BATCH_SUFFIXES else name.name}-{self.md5[:8]}"


def refusal(path: Path, inbox: Path) -> str:
    """Why an inbox entry must not be read, or "" when it is a regular file (or, for images, a
    folder) really in the inbox. A link could make the monitor copy any file it can read into
    the quarantine."""
    mode = path.lstat().st_mode
    if stat.S_ISLNK(mode):
        return f"{path.name} is a symbolic link (to {os.readlink(path)}); the monitor reads only regular files in the inbox"
    if path.resolve().parent != inbox.resolve():
        return f"{path.name} resolves outside the inbox ({path.resolve()})"
    if stat.S_ISDIR(mode):  # an image batch; the links inside it are refused file by file (images.list_folder)
        return ""
    if not stat.S_ISREG(mode):
        return f"{path.name} is not a regular file; the monitor reads only regular files in the inbox"
    if path.lstat().st_nlink > 1:  # a hard link is another name for a file that may live anywhere
        return f"{path.name} has other hard links; copy the batch into the inbox instead of linking it"
    return ""


def pending_batches(params: Params, root: Path, ledger: dict[str, Any]) -> list[Batch]:
    """The inbox's batches the ledger has not seen (by content), oldest first, then the
    inference log's unseen rows as one unlabelled batch. An entry that is refused (see
    `refusal`) is a batch too, keyed by its name and link, so its reason is recorded once."""
    from pipeline.image_monitor import is_batch_folder

    inbox = root / params.monitor.inbox
    images = params.data.images is not None  # a batch of images is a folder; of rows, a file

    def batch(p: Path) -> bool:
        return is_batch_folder(p) if images else p.suffix in BATCH_SUFFIXES and not p.is_dir()

    entries = sorted((p for p in inbox.iterdir() if batch(p)),
                     key=lambda p: (p.lstat().st_mtime, p.name)) if inbox.is_dir() else []
    seen = set(ledger["batches"])
    pending = []
    for path in entries:
        refused = refusal(path, inbox)
        if refused:  # never opened: only its name and, for a link, where it points are used
            target = os.readlink(path) if path.is_symlink() else ""
            md5 = hashlib.md5(f"refused\0{path.name}\0{target}".encode(errors="surrogateescape")).hexdigest()
        else:  # a folder's md5 is DVC's: of its listing of (md5, path)
            md5 = io.dvc_md5(path)
        if md5 not in seen:
            seen.add(md5)  # the same bytes under two names are one batch
            pending.append(Batch(path.name, md5, (path,), refused=refused))
    logged = inference_log_batch(params, root, ledger)
    return pending + ([logged] if logged else [])


def inference_log_batch(params: Params, root: Path, ledger: dict[str, Any]) -> Batch | None:
    """The serving log's part files not read before, once they hold validate.min_rows rows.
    Each part is written once and renamed into place, so a part is read exactly once."""
    import hashlib

    import pyarrow.parquet as pq

    folder = root / params.serve.log_dir
    if not (params.monitor.read_inference_log and params.serve.log_dir and folder.is_dir()):
        return None
    if params.data.images is not None:  # the log keeps each image's hash and size, not the image
        return None
    seen = set(ledger.get("log_parts", []))
    parts = sorted(p for p in folder.glob("date=*/part-*.parquet") if str(p.relative_to(root)) not in seen)
    if sum(pq.ParquetFile(p).metadata.num_rows for p in parts) < max(params.validate_.min_rows, 1):
        return None  # too few rows to test yet; they wait for the next run
    names = tuple(str(p.relative_to(root)) for p in parts)
    return Batch("inference-log", hashlib.md5("\n".join(names).encode()).hexdigest(), tuple(parts), names)


def read_batch(batch: Batch, schema: Schema) -> pd.DataFrame:
    """The batch's rows; for the inference log, the request's columns only (not the outputs)."""
    for path in batch.paths if not batch.log_parts else ():
        problem = refusal(path, path.parent)  # again, as late as possible: it may have changed since it was listed
        if problem:
            raise DataError(problem)
    frame = pd.concat([io.read_table(p) for p in batch.paths], ignore_index=True)
    if batch.log_parts:
        frame = frame[[c for c in schema.feature_names + [schema.target] if c in frame.columns]]
        # Requests may repeat a row or carry no id; these rows are only measured, never
        # appended, so a running number stands in for the id the expectations require.
        frame.insert(0, schema.id_column, range(len(frame)))
    return frame


@dataclass
class Reference:
    """What a batch is compared with: the champion and the data it learned from (for images,
    the test split, and the champion's embeddings of it)."""

    champion: dict[str, Any]
    model: Any
    frame: pd.DataFrame
    predictions: pd.DataFrame
    notes: list[str]
    embeddings: Any = None  # images: the champion's penultimate-layer embeddings of `frame`


def load_reference(params: Params, root: Path) -> Reference:
    """The champion (pinned to its version), a sample of the train split (monitor.reference_rows:
    memory stays flat as the data grows), and the champion's outputs on it."""
    import mlflow

    from pipeline import tracking

    schema = schema_from_params(params.data)
    tracking.configure(root)
    tracking.reachable(tracking.ping)
    metric = registry.compare_metric(params.data.task, params.register_)
    champion = tracking.reachable(lambda: registry.champion_card(params.register_.model_name, metric))
    if champion is None:
        raise D2DError(f"no champion for {params.register_.model_name} yet: run `d2d run` first, then the monitor")
    images = schema.images is not None
    # images: test images, which the champion has not learned, with their bytes (for the
    # embeddings): at most as many as the domain classifier takes
    frame = (io.parquet_sample(stages.path("test", root), min(params.monitor.reference_rows, params.drift.domain_max_rows))
             if images else io.parquet_sample(stages.path("train", root), params.monitor.reference_rows))
    notes = []
    validated = stages.path("validate_report", root)
    split_md5 = io.read_json(validated).get("data_md5") if validated.is_file() else None
    if champion["data_md5"] and split_md5 and split_md5 != champion["data_md5"]:
        # the champion kept its alias through a retrain that was rejected: the train split is newer
        notes.append(f"the reference is the current train split (raw md5 {split_md5[:8]}); the champion "
                     f"(version {champion['version']}) was trained on raw md5 {champion['data_md5'][:8]}")
    model = tracking.reachable(lambda: mlflow.pyfunc.load_model(champion["uri"]))
    embedded = None
    if images:
        from pipeline.image_monitor import embeddings

        notes.append(f"the reference is {len(frame):,} images of the test split, which the champion was not trained on")
        embedded = embeddings(scoring.python_model_of(model), frame)
    return Reference(champion, model, frame, scoring.predict_raw(model, frame, schema), notes, embedded)


@dataclass
class Screened:
    """A batch after validation: rows fit to compare and append, and the rest with reasons."""

    rows: int
    valid: pd.DataFrame  # coerced values, for the statistics
    raw_valid: pd.DataFrame  # the same rows as they were read, for appending
    quarantine: pd.DataFrame
    labelled: bool
    rejected: list[str]  # why the whole batch was turned away; empty when it was not


def _labelled(batch: pd.DataFrame, schema: Schema) -> bool:
    return schema.target in batch.columns and bool(batch[schema.target].notna().any())


def screen_batch(batch: pd.DataFrame, schema: Schema, params: Params, known_ids: KnownRows) -> Screened:
    """The dataset's expectations on the batch, plus one the batch alone cannot show: its ids
    must be new to the dataset (a batch delivered twice under another name is not new data)."""
    from pipeline.data.keys import row_ids, with_row_key
    from pipeline.data.validate import EXPECTATIONS, validate

    # with no id column, the derived key (content and occurrence) is the identity known_ids holds
    raw_batch = batch.reset_index(drop=True)
    batch = with_row_key(raw_batch, schema)
    labelled = _labelled(batch, schema)
    checked = batch
    if not labelled:
        # Unlabelled rows (production traffic) are checked on their features: a placeholder
        # label satisfies the target's rules and is dropped again below.
        placeholder = 0.0 if schema.regression else schema.classes[0]
        checked = batch.assign(**{schema.target: placeholder})
    try:
        report = validate(checked, schema, params.validate_)
    except DataError as e:
        return Screened(len(batch), batch.iloc[:0], batch.iloc[:0], batch.assign(**{REASON: str(e)}), labelled, [str(e)])
    ids = row_ids(batch, schema)
    valid_ids = set(row_ids(report.valid, schema))
    # only labelled rows can join the dataset, so only they must bring new ids
    seen = known_ids.isin(ids) & ids.isin(valid_ids).to_numpy() & labelled
    quarantine = report.quarantine
    if seen.any():
        what = "the same row is" if schema.derived_key else f"{schema.id_column}"
        quarantine = pd.concat([quarantine, batch[seen].assign(**{REASON: f"{what} already in the dataset",
                                                                     EXPECTATIONS: "new_id"})], ignore_index=True)
    keep_ids = valid_ids - set(ids[seen])
    valid = report.valid[row_ids(report.valid, schema).isin(keep_ids)].reset_index(drop=True)
    raw_valid = raw_batch[ids.isin(keep_ids)].reset_index(drop=True)  # as read: the key is not a raw column
    if not labelled:
        valid = valid.drop(columns=[schema.target])
        quarantine = quarantine.drop(columns=[schema.target], errors="ignore")
    # the placeholder label cannot make a batch learnable or not: that rule is for labelled data
    rejected = [r for r in report.reasons if labelled or not r.startswith(f"target '{schema.target}'")]
    if not rejected and len(valid) < params.validate_.min_rows:
        rejected.append(f"{len(valid)} rows left after quarantine, under validate.min_rows={params.validate_.min_rows}")
    if rejected:  # nothing of a rejected batch is used: every row is kept in quarantine
        why = "batch rejected: " + "; ".join(rejected)
        quarantine = pd.concat([quarantine, raw_valid.assign(**{REASON: why})], ignore_index=True)
        valid, raw_valid = valid.iloc[:0], raw_valid.iloc[:0]
    return Screened(len(batch), valid, raw_valid, quarantine, labelled, rejected)


def screen(batch: Batch, schema: Schema, params: Params, known: KnownRows | frozenset[str]) -> Screened:
    """A batch read and screened: a file of rows by the dataset's expectations, a folder of
    images by the file checks (pipeline.image_monitor)."""
    if schema.images is not None:
        from pipeline.image_monitor import screen_folder

        problem = refusal(batch.paths[0], batch.paths[0].parent)  # again, as late as possible
        if problem:
            raise DataError(problem)
        assert isinstance(known, frozenset)
        return screen_folder(batch.paths[0], schema, params, known)
    assert isinstance(known, KnownRows)
    return screen_batch(read_batch(batch, schema), schema, params, known)


def logged_rows(screened: Screened) -> pd.DataFrame:
    """The batch's rows as the monitoring run's MLflow dataset: an image's facts, not its bytes."""
    from pipeline.preprocess import IMAGE_COLUMN

    return screened.valid.drop(columns=[IMAGE_COLUMN], errors="ignore")


@dataclass(frozen=True)
class Inspection:
    """A screened batch measured against the reference."""

    drift: drift.DriftReport
    prediction: drift.PredictionDrift  # the champion's outputs on the batch against the reference's
    performance: drift.PerformanceDrift | None  # with labels: its metric on the batch against its test metric


def inspect_batch(screened: Screened, reference: Reference, params: Params) -> Inspection:
    """Data drift against the reference, the champion's prediction drift and, with labels,
    its performance on the batch against its own test metric."""
    schema = schema_from_params(params.data)
    if schema.images is not None:
        from pipeline.image_monitor import embeddings, image_drift

        current = embeddings(scoring.python_model_of(reference.model), screened.valid)
        report = image_drift(reference.frame, reference.embeddings, screened.valid, current, params.drift)
    else:
        report = drift.drift_report(reference.frame, screened.valid, schema, params.drift)
    out = scoring.predict_raw(reference.model, screened.valid, schema)
    column = "prediction" if schema.regression else "label"
    prediction = drift.prediction_drift(reference.predictions[column].astype(str) if not schema.regression
                                        else reference.predictions[column], out[column] if schema.regression
                                        else out[column].astype(str), params.drift, numeric=schema.regression)
    performance = None
    champion = reference.champion
    if screened.labelled and champion["test_metric"] is not None:
        batch_metric = scoring.prediction_metrics(out, screened.valid, schema)[champion["metric"]]
        performance = drift.performance_drift(batch_metric, champion["test_metric"], params.monitor.performance_tolerance,
                                              champion["metric"].removeprefix("test_"))
    return Inspection(report, prediction, performance)


def write_reports(key: str, inspection: Inspection, reference: Reference, screened: Screened,
                  root: Path, extra: dict[str, Any]) -> tuple[Path, Path]:
    """reports/monitor/<batch>/drift.html and drift.json."""
    report = inspection.drift
    folder = stages.path("monitor_reports", root) / key
    html = folder / "drift.html"
    ref, cur, examples = reference.frame, screened.valid, None
    if reference.embeddings is not None:  # images: the properties' histograms, and example images
        from pipeline import image_monitor

        ref, cur = image_monitor.properties(ref), image_monitor.properties(cur)
        examples = image_monitor.examples(reference.frame, screened.valid)
    io.write_text(drift.report_html(report, ref, cur, prediction=inspection.prediction, performance=inspection.performance,
                                    notes=reference.notes, examples=examples), html)
    summary = {**report.summary(), "prediction_drift": asdict(inspection.prediction),
               "performance": asdict(inspection.performance) if inspection.performance else None, "features": report.features.to_dict("records"),
               "reference_notes": reference.notes, **extra}
    return html, io.write_json(summary, folder / "drift.json")


def drift_metrics(inspection: Inspection, screened: Screened) -> dict[str, float]:
    """The batch's figures as MLflow metrics of its monitoring run."""
    report = inspection.drift
    metrics = {"drift_share": report.share, "drifted_features": float(report.features["drifted"].sum()),
               "prediction_drift_score": inspection.prediction.score, "prediction_psi": inspection.prediction.psi,
               "rows": float(screened.rows), "rows_quarantined": float(len(screened.quarantine))}
    if report.multivariate:
        metrics["domain_auc"] = report.multivariate["roc_auc"]
    if inspection.performance:
        metrics[f"batch_{inspection.performance.metric}"] = inspection.performance.batch
    return metrics


@dataclass(frozen=True)
class BatchDecision:
    """What the monitor does with one batch, and why. `action`: retrain, append (labelled rows
    join the dataset), alert (drift without labels), none, rejected (it failed the checks) or
    refused (it was never read). `alarm`: drift or decay was found, so the event is emitted and
    labelled rows are appended."""

    action: str
    retrain: bool
    reasons: tuple[str, ...]
    alarm: bool = False
    drift_share: float | None = None
    domain_auc: float | None = None
    measured: bool = False  # drift was measured: drift_share and domain_auc are recorded

    def record(self) -> dict[str, Any]:
        """The decision's fields in a ledger entry (and in drift.json)."""
        fields = {"action": self.action, "retrain": self.retrain, "reasons": list(self.reasons)}
        if self.measured:
            fields |= {"drift_share": self.drift_share, "domain_auc": self.domain_auc}
        return fields

    @classmethod
    def from_entry(cls, entry: dict[str, Any]) -> BatchDecision:
        """The decision a ledger entry records ("act" is the ledger's name for `alarm`)."""
        return cls(entry["action"], entry["retrain"], tuple(entry["reasons"]), bool(entry.get("act")),
                   entry.get("drift_share"), entry.get("domain_auc"), True)


def turned_away(action: str, reasons: list[str]) -> BatchDecision:
    """A batch that was refused unread, or rejected by the checks: nothing of it is used."""
    return BatchDecision(action, False, tuple(reasons))


def decide(inspection: Inspection, screened: Screened, retrains: list[datetime], now: datetime, params: Params,
           mode: str) -> BatchDecision:
    """The monitor's action on a measured batch: the retrain decision (drift.retrain_decision),
    held back when retraining is off, and what follows from it for labelled or unlabelled rows."""
    learnable = screened.labelled and appendable(params)
    alarm, retrain, reasons = drift.retrain_decision(inspection.drift, inspection.prediction, inspection.performance,
                                                     learnable, retrains, now, params.monitor)
    if screened.labelled and not learnable:
        reasons = [*reasons, f"not appended: the dataset is the manifest {params.data.raw}; add the batch's images "
                             "to it to learn from them"]
    retrain = retrain and mode != "off"
    if alarm and learnable:
        action = "retrain" if retrain else "append"
    else:
        action = "alert" if alarm else "none"
    return BatchDecision(action, retrain, tuple(reasons), alarm, inspection.drift.share,
                         (inspection.drift.multivariate or {}).get("roc_auc"), True)


@dataclass(frozen=True)
class BatchOutcome:
    """What `d2d monitor` reports for one batch."""

    batch: str
    decision: BatchDecision
    warnings: tuple[str, ...] = ()
    register: Any = None  # the retrain's promotion decision (pipeline.summaries.Registered), in flow mode


@dataclass(frozen=True)
class MonitorRun:
    batches: tuple[BatchOutcome, ...]
    retrains: int
    mode: str


def appendable(params: Params) -> bool:
    """Whether a labelled batch can join the raw dataset: rows always; images into an image
    folder, not a manifest (the user's file)."""
    from pipeline.image_monitor import appendable as folder

    return params.data.images is None or folder(Path(params.data.raw))


def write_quarantine(key: str, quarantine: pd.DataFrame, params: Params, root: Path) -> Path | None:
    if quarantine.empty:
        return None
    # raw values may mix numbers and text in one column; Parquet needs one type per column.
    # Someone else's rows: readable by the owner only, in a folder only the owner can enter.
    return io.write_parquet(quarantine.astype(str), stages.path("monitor_quarantine", root) / f"{key}.parquet",
                            private=True)


def stage_append(rows: pd.DataFrame, params: Params, root: Path, batch: Batch | None = None) -> dict[str, Any]:
    """Step 1 of appending: the raw dataset's new part file (for an image folder, the batch's
    files), built beside it but not moved in, and what the ledger records before the move (the
    intent). The version being added to is first cached and pushed by DVC, so it stays restorable."""
    from pipeline import image_monitor, versioning

    raw = raw_path(params, root)
    before = io.dvc_md5(raw)
    recorded = io.dvc_recorded_md5(raw)
    pushed = versioning.push_tracked(raw, root) if recorded is not None and recorded == before else None
    if params.data.images is not None:  # the files, under <label>/<batch key>/ in the image folder
        assert batch is not None, "an image batch's files are copied from its folder"
        staged = image_monitor.stage_files(rows, batch.paths[0], raw, batch.key, params.data.id_column or "")
        after, part, files = image_monitor.md5_with_files(raw, staged), None, True
    else:
        staged, part = io.stage_part(rows, raw)
        after, files = io.dvc_md5_with(raw, staged, part), False
    return {"path": str(params.data.raw), "rows": len(rows), "md5_before": before, "md5_after": after,
            "staged": staged.name, "part": part, "files": files, "tracked": recorded is not None, "pushed_before": pushed}


def install_append(intent: dict[str, Any], params: Params, root: Path) -> dict[str, Any]:
    """Step 2, after the intent is in the ledger: move the new part in (unless a run that was
    killed already did), then `dvc add`, push and commit its .dvc record. Safe to repeat."""
    from pipeline import versioning

    raw = raw_path(params, root)
    staged = raw.with_name(intent["staged"])
    current = io.dvc_md5(raw) if raw.exists() else None  # None: killed while a file became a folder
    if intent.get("files"):  # images: a run killed while moving them in leaves some in place
        from pipeline.image_monitor import install_files

        if current != intent["md5_after"]:
            if not staged.is_dir():
                raise D2DError(f"{raw} changed while a batch was being appended to it, and the batch's staged files "
                               f"({staged.name}) are gone; restore it with `dvc checkout` and run the monitor again")
            install_files(staged, raw)
    elif current == intent["md5_before"] or (current is None and io.building_folder(staged).is_dir()):
        if intent.get("part"):
            io.install_part(staged, raw, intent["part"])
        else:  # a ledger written before appends became part files: the file's whole next version
            io.move(staged, raw)
    elif current != intent["md5_after"]:
        raise D2DError(f"{raw} changed while a batch was being appended to it (md5 {(current or 'missing')[:8]}, "
                       f"expected {intent['md5_before'][:8]} or {intent['md5_after'][:8]}); restore it with "
                       f"`dvc checkout` and run the monitor again")
    if os.environ.get(FAULT_DRILL) == "monitor-after-append":
        os._exit(137)  # the fault drill: the rows are in, nothing after them is recorded yet
    tracked = intent["tracked"]
    dvc = versioning.add_version(raw, root) if tracked else f"not tracked: run `dvc add {params.data.raw}` to version it"
    git = (versioning.commit_dvc_file(raw, root, f"d2d monitor: {intent['rows']} new rows in {params.data.raw}")
           if tracked else "not committed")
    return {"path": intent["path"], "md5_before": intent["md5_before"], "md5_after": intent["md5_after"],
            "dvc": dvc, "git": git}


def append_abandoned(intent: dict[str, Any], params: Params, root: Path) -> bool:
    """Whether a recorded append never happened and never can: the raw dataset is still the
    version before it, and the part its run built is gone."""
    raw = raw_path(params, root)
    staged = raw.with_name(intent["staged"])
    built = staged.exists() or (io.building_folder(staged) / (intent.get("part") or "")).is_file()
    return raw.exists() and io.dvc_md5(raw) == intent["md5_before"] and not built


def discard_stale_stages(ledger: dict[str, Any], params: Params, root: Path) -> None:
    """Parts (and a single file's folder being built) that a killed run left but never
    recorded: nothing refers to them."""
    raw = raw_path(params, root)
    wanted = {e["append"]["staged"] for e in ledger["batches"].values() if e.get("state") == PENDING and e.get("append")}
    for stale in raw.parent.glob(f".{raw.name}.*.next"):
        if stale.name not in wanted:
            io.remove(stale)
    for stale in raw.parent.glob(f".{raw.name}.*.dir"):
        if stale.with_suffix(".next").name not in wanted and raw.exists():
            io.remove(stale)


def unfinished(ledger: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Batches whose append a killed run recorded as intended but did not complete."""
    return [(md5, e) for md5, e in ledger["batches"].items() if e.get("state") == PENDING]


def retrains_pending(ledger: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Completed batches whose in-process retrain was decided but never finished (killed, or
    refused because another training run held the project's lock)."""
    return [(md5, e) for md5, e in ledger["batches"].items()
            if e.get("state") == COMPLETE and e.get("retrain_state") == PENDING]


def push_warnings(appended: dict[str, Any] | None, intent: dict[str, Any] | None) -> list[str]:
    """A DVC push that failed, in words: the data is safe in the local cache, the remote is behind."""
    from pipeline.versioning import push_failed

    outcomes = [(intent or {}).get("pushed_before"), (appended or {}).get("dvc")]
    return [f"{text}: the version is in the local DVC cache only; run `dvc push` once the remote is reachable"
            for text in outcomes if text and push_failed(text)]


def known_ids(params: Params, root: Path) -> KnownRows | frozenset[str]:
    """The identity of every row in the raw dataset (its id, or its derived row key), from the
    index kept beside the ledger: rebuilt in batches only when the raw files changed. For
    images, the content hashes of the validated images."""
    if params.data.images is not None:
        from pipeline.image_monitor import known_images

        return known_images(params, root)
    schema = schema_from_params(params.data)
    return KnownRows.load(raw_path(params, root), schema, state_dir(params, root) / "row_keys.parquet",
                          params.data.batch_rows)


def retrain_mode(params: Params, api_url: str | None) -> str:
    """`auto`: with a Prefect server (PREFECT_API_URL, from the environment or the profile) the
    automation retrains on a worker; without one (embedded mode) the flow retrains in-process."""
    if params.monitor.retrain != "auto":
        return params.monitor.retrain
    return "event" if api_url else "flow"


def ledger_entry(batch: Batch, screened: Screened, decision: BatchDecision, report: Path | None,
                 appended: dict[str, str] | None, quarantine: Path | None, root: Path) -> dict[str, Any]:
    return {"file": batch.name, "state": COMPLETE, "log_parts": len(batch.log_parts),
            "processed_at": utc_now().isoformat(timespec="seconds"), "rows": screened.rows,
            "rows_valid": len(screened.valid), "rows_quarantined": len(screened.quarantine),
            "labelled": screened.labelled, "rejected": screened.rejected, **decision.record(),
            "report": str(report.relative_to(root)) if report else None,
            "quarantine": str(quarantine.relative_to(root)) if quarantine else None, "appended": appended}


# --- the ledger's transitions: what the flow records at each step of a batch's transaction ---


def open_entry(batch: Batch, screened: Screened, decision: BatchDecision, report: Path, quarantine: Path | None,
               params: Params, root: Path) -> dict[str, Any]:
    """A measured batch's entry, written ahead of what its decision entails: pending when it
    raised an alarm (the event, the retrain and, for labelled rows, the raw dataset's new
    part, built here but not moved in yet), complete otherwise. "act" is `alarm`."""
    entry = ledger_entry(batch, screened, decision, report, None, quarantine, root)
    entry |= {"key": batch.key, "act": decision.alarm, "state": PENDING if decision.alarm else COMPLETE}
    if decision.alarm and screened.labelled and appendable(params):
        entry["append"] = stage_append(screened.raw_valid, params, root, batch)
    return entry


def retrain_by(decision: BatchDecision, mode: str) -> str:
    """Who retrains, as the drift event's `d2d.retrain` label: `automation` is what the training
    deployment's trigger matches; `in-process` and `no` are for the event feed only."""
    if not decision.retrain:
        return "no"
    return "automation" if mode == "event" else "in-process"


def close_entry(ledger: dict[str, Any], entry: dict[str, Any], decision: BatchDecision, warnings: list[str],
                mode: str) -> None:
    """The batch's transaction is done: a retrain takes its place in the rate limit, and in
    flow mode stays `pending` until the training flow has returned."""
    if decision.retrain:
        ledger["retrains"].append({"at": utc_now().isoformat(timespec="seconds"),
                                   "batch": entry.get("key") or entry["file"], "by": mode})
    entry |= {"state": COMPLETE, "warnings": warnings,
              **({"retrain_state": PENDING} if decision.retrain and mode == "flow" else {})}


def retrain_done(ledger: dict[str, Any], md5: str) -> None:
    ledger["batches"][md5]["retrain_state"] = "done"

