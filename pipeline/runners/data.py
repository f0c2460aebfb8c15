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


def validate_engine(params: Params) -> str:
    """Where the GX checks run: validate.engine, with auto meaning ray when a cluster is configured."""
    import os

    engine = params.validate_.engine
    if engine == "auto":
        return "ray" if params.train.ray_address or os.environ.get("RAY_ADDRESS") else "local"
    return engine


def validate(params: Params, files: StageFiles) -> Validated:
    """The raw data, batch by batch through one GX suite: valid rows and quarantined rows (with
    reasons) written as they come, the gate decided on the exact totals. On Ray
    (`validate_engine`), actors check the raw part files side by side and the driver adds up
    their totals."""
    from pipeline.data.keys import occurrences
    from pipeline.data.validate import Validator, dataset_summary, require_columns

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
    keys = occurrences(hashes) if hashes is not None else None
    # With Ray, the driver's writers only own the folders: the actors write the parts into them.
    on_ray = validate_engine(params) == "ray"
    valid = io.PartsWriter(files["valid"], _types(schema, "valid", head), keep_empty=not on_ray)
    quarantine = io.PartsWriter(files["quarantine"], schema.arrow_types("raw"), keep_empty=not on_ray)
    try:
        if on_ray:
            tally, expectations = _check_on_ray(raw, schema, params, docs, repeats, (hashes, keys), valid, quarantine)
        else:
            validator = Validator(schema, params.validate_, docs, repeats)
            _check_batches(validator, io.read_batches(raw, rows), 0, (hashes, keys), valid, quarantine, rows)
            tally, expectations = validator.tally, validator.expectations
        gate, report = dataset_summary(tally, expectations, schema, params.validate_)
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


def _check_batches(validator: Any, batches: Any, first: int, identity: tuple[np.ndarray | None, np.ndarray | None],
                   valid: io.PartsWriter, quarantine: io.PartsWriter, rows: int) -> None:
    """Batches that start at row `first` of the dataset through the validator, into the
    writers; `identity`, these rows' content hashes and occurrences (counted over the whole
    dataset) when d2d derives the row key."""
    from pipeline.data.keys import format_keys

    hashes, keys = identity
    started, done = time.perf_counter(), 0
    for batch in io.prefetched(batches):
        if hashes is not None and keys is not None:
            batch = batch.assign(**{ROW_KEY: format_keys(hashes[done:done + len(batch)], keys[done:done + len(batch)])})
        ok, bad = validator.check(batch, first + done)
        valid.write(ok)
        quarantine.write(bad)
        done += len(batch)
        _progress("validate", done, started, rows)


class PartChecker:
    """A Ray actor's work for the validate stage: one Validator (one GX context and suite,
    built once per actor) checking whole raw part files, writing their valid and quarantined
    rows into the driver's folders as parts named by the part file they come from."""

    def __init__(self, schema: Schema, params: Params, docs: Path | None, repeats: np.ndarray) -> None:
        from pipeline.data.validate import Validator

        self.params = params
        self.validator = Validator(schema, params.validate_, docs, repeats)

    def check(self, index: int, part: Path, first: int, identity: tuple[np.ndarray | None, np.ndarray | None],
              folders: tuple[Path, Path], types: tuple[dict[str, Any], dict[str, Any]]) -> int:
        rows = self.params.data.batch_rows
        # names sort as the parts do, so the outputs keep the raw data's row order
        writers = [io.PartsWriter(folder, kinds, into=folder, prefix=f"p{index:05d}-", keep_empty=index == 0)
                   for folder, kinds in zip(folders, types)]
        try:
            _check_batches(self.validator, io.read_batches(part, rows), first, identity, *writers, rows)
            for w in writers:
                w.commit()
        finally:
            for w in writers:
                w.discard()
        return index

    def tally(self) -> Any:
        return self.validator.tally

    def expectations(self) -> int:
        return self.validator.expectations


def _part_rows(part: Path, rows: int) -> int:
    """A part file's rows: a Parquet footer, or a count over a CSV's first column."""
    if part.suffix == ".parquet":
        return io.parquet_rows(part)
    head = next(io.read_batches(part, 1), None)
    columns = [] if head is None else [head.columns[0]]
    return sum(len(b) for b in io.read_batches(part, rows, columns or None))


def _check_on_ray(raw: Path, schema: Schema, params: Params, docs: Path | None, repeats: np.ndarray,
                  identity: tuple[np.ndarray | None, np.ndarray | None], valid: io.PartsWriter,
                  quarantine: io.PartsWriter) -> tuple[Any, int]:
    """The raw part files checked by Ray actors side by side (one CPU each, as many as the
    cluster has CPUs for, at most one per part), with their totals added up. The folders
    must be where every node sees them (a shared path), as data.raw must be."""
    import ray
    from ray.util import ActorPool

    from pipeline.ray_runtime import ray_session

    parts = io.data_parts(raw)
    sizes = [_part_rows(p, params.data.batch_rows) for p in parts]
    firsts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist()
    hashes, keys = identity
    with ray_session(params.train, cpus_needed=1):
        count = max(1, min(len(parts), int(ray.available_resources().get("CPU", 1))))
        actor = ray.remote(num_cpus=1)(PartChecker)
        # each actor writes its Data Docs site in its own folder; index.html links them
        sites = [docs / f"worker-{i}" if docs else None for i in range(count)]
        actors = [actor.remote(schema, params, site, repeats) for site in sites]
        folders, types = (valid.folder, quarantine.folder), (valid.types, quarantine.types)
        jobs = []
        for i, (part, first, size) in enumerate(zip(parts, firsts, sizes)):
            ids = (None, None) if hashes is None or keys is None else (hashes[first:first + size], keys[first:first + size])
            jobs.append((i, part, first, ids, folders, types))
        try:
            for done, _ in enumerate(ActorPool(actors).map_unordered(lambda a, job: a.check.remote(*job), jobs), 1):
                print(f"validate: {done}/{len(parts)} part file(s) checked on Ray", file=sys.stderr, flush=True)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, DataError):  # bad data found on an actor: its one line, not a remote traceback
                raise DataError(str(e.cause)) from None
            raise
        tallies = ray.get([a.tally.remote() for a in actors])
        expectations = ray.get(actors[0].expectations.remote())
    total = tallies[0]
    for t in tallies[1:]:
        total.merge(t)
    if docs:
        links = "".join(f'<li><a href="worker-{i}/index.html">worker {i}</a></li>' for i in range(count))
        io.write_text(f"<h1>Data Docs</h1><p>The raw parts were checked by {count} Ray actor(s), each with its "
                      f"own site:</p><ul>{links}</ul>\n", docs / "index.html")
    return total, expectations


def clean(params: Params, files: StageFiles) -> Cleaned:
    """The cleaning rules, batch by batch: repeats are found first over every row's hashes, and
    IQR fences fitted on a bounded sample (every row, up to IQR_SAMPLE)."""
    from pipeline.data.clean import Cleaner, Repeats, iqr_rows, outlier_bounds, repeat_hashes

    schema = schema_from_params(params.data)
    rules, rows, source = params.clean, params.data.batch_rows, files["valid"]
    if not source.exists():
        raise DataError(f"{source} not found: run the stage that writes it first")
    repeats = bounds = None
    if rules.drop_duplicates:
        full, features = [], []
        for b in io.read_batches(source, rows, [*schema.feature_names, schema.target]):
            pair = repeat_hashes(b, schema)
            full.append(pair[0])
            features.append(pair[1])
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
