"""The data stages' runners: the data version, validate, clean and split (and the demo data)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipeline.config import Params
from pipeline.data import io
from pipeline.data.keys import ROW_KEY
from pipeline.data.schema import Schema, schema_from_params
from pipeline.data.split import SPLITS
from pipeline.errors import DataError
from pipeline.project import RAW, raw_path
from pipeline.summaries import Cleaned, DataVersion, SplitSizes, Validated

if TYPE_CHECKING:
    from pipeline.stages import StageFiles


def read_data_version(raw: Path, declared: str) -> DataVersion:
    """The raw file's (or folder's) md5, as DVC records it, and whether it matches the committed
    .dvc file; `declared` is data.raw as params give it."""
    if not raw.exists():
        raise DataError(f"raw data not found: {raw} (run `d2d data demo` for the demo dataset, or `dvc pull`)")
    io.data_parts(raw)  # a folder without parts, or a file of another type, is named here
    md5 = io.dvc_md5(raw)
    recorded = io.dvc_recorded_md5(raw)
    return DataVersion(str(declared), md5, recorded, recorded == md5)


def data_version(params: Params, files: StageFiles) -> DataVersion:
    """The data version, and the raw file cached and pushed to the DVC remote when it is the
    version DVC records; otherwise what to run to version it."""
    from dataclasses import replace

    from pipeline.versioning import push_tracked

    version = read_data_version(files[RAW], params.data.raw)
    if version.dvc_md5 is None:
        outcome = f"not tracked: run `dvc add {version.path}` to version it"
    elif not version.matches_dvc:
        outcome = f"differs from the DVC record: run `dvc add {version.path}` to version it"
    else:
        outcome = push_tracked(files[RAW], files.root)
    return replace(version, dvc=outcome)


def make_demo(params: Params, root: Path) -> dict[str, Any]:
    """Write the corrupted digits CSV to data.raw; deterministic, so a fresh clone gets the recorded md5."""
    from pipeline.data.demo import corrupt, digits_frame

    schema = schema_from_params(params.data)
    digits = digits_frame(schema).head(params.data.demo.rows)
    df, manifest = corrupt(digits, schema, params.data.demo.corrupt_fraction, params.data.demo.seed)
    out = io.write_csv(df, raw_path(params, root))
    return {"path": str(out), "rows": len(df), "md5": io.file_md5(out), "corrupted": manifest}


def _progress(stage: str, rows: int, started: float, batch: int) -> None:
    """One line per batch on stderr when the data spans several: long stages show they are
    moving (a dataset of one batch stays quiet, so an error is its only line)."""
    if rows <= batch:
        return
    seconds = time.perf_counter() - started
    print(f"{stage}: {rows:,} rows in {seconds:.1f} s ({rows / max(seconds, 1e-9):,.0f} rows/s)", file=sys.stderr, flush=True)


def _types(schema: Schema, stage: str, head: pd.DataFrame) -> dict[str, Any]:
    """The schema's column types for a stage's output (Schema.arrow_types), keeping float32
    where the input holds float32: doubling the data on disk buys nothing."""
    import pyarrow as pa

    types = schema.arrow_types(stage)
    return types | {name: pa.float32() for name, t in types.items()
                    if t == pa.float64() and name in head.columns and head[name].dtype == "float32"}


def _raw_identity(raw: Path, schema: Schema, rows: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Before validation, one pass over what identifies rows: the hashes of ids that repeat
    anywhere in the dataset (GX's uniqueness rule sees one batch), or, with no id column, every
    row's content hash, from which its derived key's occurrence number is counted."""
    from pipeline.data.keys import dataset_content_hashes
    from pipeline.data.validate import id_hashes, repeated

    if schema.derived_key:
        return np.empty(0, dtype="uint64"), dataset_content_hashes(raw, schema, rows)
    ids = [id_hashes(b[schema.id_column]) for b in io.read_batches(raw, rows, [schema.id_column])]
    return repeated(np.concatenate(ids) if ids else np.empty(0, dtype="uint64")), None


def validate(params: Params, files: StageFiles) -> Validated:
    """The raw data, batch by batch through one GX suite: valid rows and quarantined rows (with
    reasons) written as they come, the gate decided on the exact totals."""
    from pipeline.data.keys import format_keys, occurrences
    from pipeline.data.validate import Validator, require_columns

    raw = files[RAW]
    version = read_data_version(raw, params.data.raw)
    schema = schema_from_params(params.data)
    rows = params.data.batch_rows
    head = next(io.read_batches(raw, 1), None)
    require_columns(head.columns if head is not None else pd.Index([]), schema)
    repeats, hashes = _raw_identity(raw, schema, rows)
    docs = files["data_docs"] if params.validate_.data_docs else None
    # A fresh folder each run: GX adds pages to an existing site, and DVC records this one as
    # an output, so it must hold this run's docs only (or a note that they are off).
    io.fresh_dir(files["data_docs"])
    if docs is None:
        io.write_text("<p>Data Docs are off (validate.data_docs: false).</p>\n", files["data_docs"] / "index.html")
    validator = Validator(schema, params.validate_, docs, repeats)
    valid = io.PartsWriter(files["valid"], _types(schema, "valid", head))
    quarantine = io.PartsWriter(files["quarantine"], schema.arrow_types("raw"))
    keys = occurrences(hashes) if hashes is not None else None
    started, done = time.perf_counter(), 0
    try:
        for batch in io.prefetched(io.read_batches(raw, rows)):
            if keys is not None:  # the derived key, counted over the whole dataset
                batch = batch.assign(**{ROW_KEY: format_keys(hashes[done:done + len(batch)], keys[done:done + len(batch)])})
            ok, bad = validator.check(batch)
            valid.write(ok)
            quarantine.write(bad)
            done += len(batch)
            _progress("validate", done, started, rows)
        gate, report = validator.summary()
        quarantine.commit()
        summary = {**report, "data_md5": version.md5, "data_path": version.path}
        if docs:
            summary["data_docs"] = str((docs / "index.html").relative_to(files.root))
        io.write_json(summary, files["validate_report"])
        if not gate.passed:
            raise DataError("validation failed: " + "; ".join(gate.reasons))
        valid.commit()
    finally:
        valid.discard()
        quarantine.discard()
    return Validated.from_report(summary)


def clean(params: Params, files: StageFiles) -> Cleaned:
    """The cleaning rules, batch by batch: repeats are found first over every row's hashes, and
    IQR fences fitted on a bounded sample (every row, up to IQR_SAMPLE)."""
    from pipeline.data.clean import Cleaner, Repeats, iqr_rows, outlier_bounds, row_hashes

    schema = schema_from_params(params.data)
    rules, rows, source = params.clean, params.data.batch_rows, files["valid"]
    if not source.exists():
        raise DataError(f"{source} not found: run the stage that writes it first")
    repeats = bounds = None
    if rules.drop_duplicates:
        full, features = [], []
        for b in io.read_batches(source, rows, [*schema.feature_names, schema.target]):
            full.append(row_hashes(b, [*schema.feature_names, schema.target]))
            features.append(row_hashes(b, schema.feature_names))
        repeats = Repeats.find(np.concatenate(full), np.concatenate(features))
        del full, features
    if rules.outliers.method == "iqr" and schema.numeric:
        sample = io.parquet_sample(source, IQR_SAMPLE, seed=0, positions=True)
        bounds = outlier_bounds(iqr_rows(sample, schema, rules, repeats), schema, "iqr", rules.outliers.iqr_k)
    cleaner = Cleaner(schema, rules, repeats, bounds)
    types = _types(schema, "clean", io.parquet_head(source, 1))
    kept = io.PartsWriter(files["clean"], types)
    removed = io.PartsWriter(files["removed"], types)
    started = time.perf_counter()
    try:
        for batch in io.prefetched(io.read_batches(source, rows)):
            good, gone = cleaner.apply(batch)
            kept.write(good)
            removed.write(gone)
            _progress("clean", cleaner.rows_in, started, rows)
        kept.commit()
        removed.commit()
    finally:
        kept.discard()
        removed.discard()
    report = cleaner.report()
    io.write_json(report, files["clean_report"])
    return Cleaned.from_report(report)


# Rows IQR fences are fitted on: every row up to this many, else a uniform sample of them.
IQR_SAMPLE = 1_000_000


def _assignment(source: Path, schema: Schema, params: Params) -> np.ndarray:
    """Every clean row's split, from one pass over the target (and ids, for the hash strategy)."""
    from pipeline.data.split import assign, hash_assignment

    rows, split = params.data.batch_rows, params.split
    hashed = split.strategy == "hash"
    targets, buckets = [], []
    for b in io.read_batches(source, rows, [schema.target, *([schema.id_column] if hashed else [])]):
        targets.append(b[schema.target])
        if hashed:
            buckets.append(hash_assignment(b[schema.id_column], split))
    target = pd.concat(targets, ignore_index=True) if targets else pd.Series(dtype="float64")
    return assign(target, None, split, schema.regression, np.concatenate(buckets) if hashed else None)


def _first_ids(source: Path, schema: Schema, rows: int, positions: np.ndarray) -> list[str]:
    """The ids at a few sorted row positions, read batch by batch (the error names them)."""
    found, start = [], 0
    for b in io.read_batches(source, rows, [schema.id_column]):
        here = positions[(positions >= start) & (positions < start + len(b))] - start
        found += b[schema.id_column].astype(str).to_numpy()[here].tolist()
        start += len(b)
        if len(found) == len(positions):
            break
    return found


def split(params: Params, files: StageFiles) -> SplitSizes:
    """Split batch by batch into three Parquet datasets, check for leakage over every row's
    feature hash, and fit the preprocessing on (a bounded sample of) the train split only."""
    from pipeline import preprocess
    from pipeline.data.clean import row_hashes
    from pipeline.data.split import leak_mask

    schema = schema_from_params(params.data)
    source, rows = files["clean"], params.data.batch_rows
    if not source.exists():
        raise DataError(f"{source} not found: run the stage that writes it first")
    part = _assignment(source, schema, params)
    types = _types(schema, "clean", io.parquet_head(source, 1))
    writers = {name: io.PartsWriter(files[name], types) for name in SPLITS}
    per_class: dict[str, pd.Series] = {name: pd.Series(dtype="int64") for name in SPLITS}
    hashes, done, started = [], 0, time.perf_counter()
    try:
        for batch in io.prefetched(io.read_batches(source, rows)):
            where = part[done:done + len(batch)]
            hashes.append(row_hashes(batch, schema.feature_names))
            for i, name in enumerate(SPLITS):
                rows_here = batch[where == i]
                writers[name].write(rows_here)
                if not schema.regression:
                    counts = rows_here[schema.target].astype(str).value_counts()
                    per_class[name] = per_class[name].add(counts, fill_value=0)
            done += len(batch)
            _progress("split", done, started, rows)
        leaked = leak_mask(np.concatenate(hashes) if hashes else np.empty(0, dtype="uint64"), part)
        if leaked.any():
            raise DataError(
                f"{int(leaked.sum())} rows share their exact features with a row in another split ({schema.id_label} "
                f"{', '.join(_first_ids(source, schema, rows, np.flatnonzero(leaked)[:3]))}, ...); set clean.drop_duplicates: true so identical examples are removed "
                "before splitting"
            )
        for w in writers.values():
            w.commit()
    finally:
        for w in writers.values():
            w.discard()
    train = io.parquet_sample(files["train"], params.preprocess.fit_rows)
    state = preprocess.fit(train, preprocess.preprocess_spec(schema, params.clean, params.preprocess))
    io.write_json(state, files["preprocess"])
    sizes = {name: writers[name].rows for name in SPLITS}
    report = {
        "sizes": sizes,
        "strategy": params.split.strategy,
        "seed": params.split.seed,
        "per_class": {} if schema.regression else {
            name: {k: int(v) for k, v in per_class[name].sort_index().items()} for name in SPLITS},
        "leaked_rows": 0,
        "model_inputs": len(state["outputs"]),
        "preprocess_fit_rows": len(train),
    }
    io.write_json(report, files["split_report"])
    return SplitSizes.from_report(report)
