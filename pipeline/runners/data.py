"""The data stages' runners: the data version, validate, clean and split (and the demo data)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
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


def require_raw(raw: Path, images: bool = False) -> None:
    """A DataError naming what is wrong when the raw data is missing, or is not data files
    (CSV or Parquet; with `images`, a folder of them or a manifest)."""
    if not raw.exists():
        demo = "d2d data demo --kind images --out DIR" if images else "d2d data demo"
        raise DataError(f"raw data not found: {raw} (run `{demo}` for the demo dataset, or `dvc pull`)")
    if not (images and raw.is_dir()):
        io.data_parts(raw)  # a folder without parts, or a file of another type, is named here


def read_data_version(raw: Path, declared: str, images: bool = False) -> DataVersion:
    """The raw file's (or folder's) md5, as DVC records it, and whether it matches the committed
    .dvc file; `declared` is data.raw as params give it."""
    require_raw(raw, images)
    md5 = io.dvc_md5(raw)
    recorded = io.dvc_recorded_md5(raw)
    return DataVersion(str(declared), md5, recorded, recorded == md5)


def data_version(params: Params, files: StageFiles) -> DataVersion:
    """The data version, and the raw file cached and pushed to the DVC remote when it is the
    version DVC records; otherwise what to run to version it."""
    from dataclasses import replace

    from pipeline.versioning import push_tracked

    version = read_data_version(files[RAW], params.data.raw, params.data.images is not None)
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


def progress(stage: str, rows: int, started: float, batch: int, unit: str = "rows") -> None:
    """One line per batch on stderr when the data spans several: long stages show they are
    moving (a dataset of one batch stays quiet, so an error is its only line)."""
    if rows <= batch:
        return
    seconds = time.perf_counter() - started
    print(f"{stage}: {rows:,} {unit} in {seconds:.1f} s ({rows / max(seconds, 1e-9):,.0f} {unit}/s)", file=sys.stderr,
          flush=True)


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


def data_engine(params: Params) -> str:
    """Where validate, clean and split run: data.engine, with auto meaning ray when a cluster is configured."""
    import os

    engine = params.data.engine
    if engine == "auto":
        return "ray" if params.train.ray_address or os.environ.get("RAY_ADDRESS") else "local"
    return engine


def validate(params: Params, files: StageFiles) -> Validated:
    """The raw data, batch by batch through one GX suite: valid rows and quarantined rows (with
    reasons) written as they come, the gate decided on the exact totals. On Ray
    (`data_engine`), actors check the raw part files side by side and the driver adds up
    their totals."""
    from pipeline.data.validate import SuiteRunner, require_columns

    raw = files[RAW]
    schema = schema_from_params(params.data)
    if schema.images is not None:
        from pipeline.runners import image_data  # it builds on this module's helpers

        return image_data.validate(params, files)
    require_raw(raw)
    head = io.column_types(raw)
    require_columns(head.columns if head is not None else pd.Index([]), schema)
    docs = files["data_docs"] if params.validate_.data_docs else None
    # A fresh folder each run: GX adds pages to an existing site, and DVC records this one as
    # an output, so it must hold this run's docs only (or a note that they are off).
    io.fresh_dir(files["data_docs"])
    if docs is None:
        io.write_text("<p>Data Docs are off (validate.data_docs: false).</p>\n", files["data_docs"] / "index.html")
    # With Ray, the driver's writers only own the folders: the actors write the parts into them.
    on_ray = data_engine(params) == "ray"
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="d2d-gx") as pool:
        # GX's import, context and suite (about 3 s of Python) are built beside the md5, the ids'
        # pass and the first batch's read, which spend their time in hashlib and pyarrow
        suite = None if on_ray else pool.submit(SuiteRunner, schema, docs)
        return _validate(params, files, (raw, schema, head, docs), suite)


def _validate(params: Params, files: StageFiles, dataset: tuple[Path, Schema, pd.DataFrame, Path | None],
              suite: Future[Any] | None) -> Validated:
    """`validate` once its input is known to have the columns: `suite`, the GX suite being built
    on another thread (None on Ray, where each actor builds its own)."""
    from pipeline.data.keys import occurrences
    from pipeline.data.validate import Validator, dataset_summary

    raw, schema, head, docs = dataset
    rows = params.data.batch_rows
    on_ray = data_engine(params) == "ray"
    version = read_data_version(raw, params.data.raw)
    repeats, hashes = _raw_identity(raw, schema, rows)
    keys = occurrences(hashes) if hashes is not None else None
    valid = io.PartsWriter(files["valid"], _types(schema, "valid", head), keep_empty=not on_ray)
    quarantine = io.PartsWriter(files["quarantine"], schema.arrow_types("raw"), keep_empty=not on_ray)
    try:
        if on_ray:
            tally, expectations = _check_on_ray(raw, schema, params, docs, repeats, (hashes, keys), valid, quarantine)
        else:
            validator = Validator(schema, params.validate_, docs, repeats, suite)
            _check_batches(validator, io.coalesced(io.read_batches(raw, rows), rows), 0, (hashes, keys), valid,
                           quarantine, rows)
            tally, expectations = validator.tally, validator.expectations
        gate, report = dataset_summary(tally, expectations, schema, params.validate_)
        return finish_validation(gate, report, version, docs, files, (valid, quarantine))
    finally:
        valid.discard()
        quarantine.discard()


def finish_validation(gate: Any, report: dict[str, Any], version: DataVersion, docs: Path | None, files: StageFiles,
                      writers: tuple[io.PartsWriter, io.PartsWriter]) -> Validated:
    """The quarantine kept whatever the gate says, the report written (with the data version
    and the Data Docs), then the gate: the valid rows are installed only when it passed."""
    valid, quarantine = writers
    quarantine.commit()
    summary = {**report, "data_md5": version.md5, "data_path": version.path}
    if docs:
        summary["data_docs"] = str((docs / "index.html").relative_to(files.root))
    io.write_json(summary, files["validate_report"])
    if not gate.passed:
        raise DataError("validation failed: " + "; ".join(gate.reasons))
    valid.commit()
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
        progress("validate", done, started, rows)


@contextmanager
def _part_writers(index: int, folders: tuple[Path, ...], types: tuple[dict[str, Any], ...]) -> Iterator[list[io.PartsWriter]]:
    """An actor's writers for the index-th part file: its parts go into the driver's folders
    (which the driver installs), named so they sort as the part files do, so the outputs keep
    the input's row order. Part 0 writes an empty part when it has no rows, so that an output
    with no rows still has its columns."""
    writers = [io.PartsWriter(folder, kinds, into=folder, prefix=f"p{index:05d}-", keep_empty=index == 0)
               for folder, kinds in zip(folders, types)]
    try:
        yield writers
        for w in writers:
            w.commit()
    finally:
        for w in writers:
            w.discard()


class PartChecker:
    """A Ray actor's work for the validate stage: one Validator (one GX context and suite,
    built once per actor) checking whole raw part files."""

    def __init__(self, schema: Schema, params: Params, repeats: np.ndarray, docs: Path | None) -> None:
        from pipeline.data.validate import Validator

        self.rows = params.data.batch_rows
        self.validator = Validator(schema, params.validate_, docs, repeats)

    def run(self, index: int, part: Path, first: int, identity: tuple[np.ndarray | None, np.ndarray | None],
            folders: tuple[Path, Path], types: tuple[dict[str, Any], dict[str, Any]]) -> None:
        with _part_writers(index, folders, types) as (valid, quarantine):
            _check_batches(self.validator, io.read_batches(part, self.rows), first, identity, valid, quarantine, self.rows)

    def totals(self) -> tuple[Any, int]:
        return self.validator.tally, self.validator.expectations


def _part_rows(part: Path, rows: int) -> int:
    """A part file's rows: a Parquet footer, or a count over a CSV's first column."""
    if part.suffix == ".parquet":
        return io.parquet_rows(part)
    head = next(io.read_batches(part, 1), None)
    columns = [] if head is None else [head.columns[0]]
    return sum(len(b) for b in io.read_batches(part, rows, columns or None))


def _part_starts(parts: list[Path], rows: int) -> tuple[list[int], list[int]]:
    """Each part file's first row in the dataset, and its rows."""
    sizes = [_part_rows(p, rows) for p in parts]
    return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist(), sizes


def _on_actors(params: Params, stage: str, worker: type, shared: tuple[Any, ...],
               own: Callable[[int], tuple[Any, ...]], jobs: list[tuple[Any, ...]],
               collect: str | None = None) -> tuple[list[Any], list[Any]]:
    """`jobs` (one part file each) run by Ray actors of class `worker`, one CPU each, as many
    as the cluster has CPUs for and at most one per job; actor i is built with `shared` (put
    in the object store once, so a large array is not copied per actor) and `own(i)`. Returns
    each job's `run` result in job order, and each actor's `collect` method's answer. Every
    path must be where every node sees it (a shared path), as data.raw must be."""
    import ray
    from ray.util import ActorPool

    from pipeline.ray_runtime import ray_session

    with ray_session(params.train, cpus_needed=1):
        count = max(1, min(len(jobs), int(ray.available_resources().get("CPU", 1))))
        refs = [ray.put(arg) for arg in shared]
        actor = ray.remote(num_cpus=1)(worker)
        actors = [actor.remote(*refs, *own(i)) for i in range(count)]
        results = []
        try:
            for done, result in enumerate(ActorPool(actors).map(lambda a, job: a.run.remote(*job), jobs), 1):
                results.append(result)
                print(f"{stage}: {done}/{len(jobs)} part file(s) done on Ray", file=sys.stderr, flush=True)
            collected = ray.get([getattr(a, collect).remote() for a in actors]) if collect else []
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, DataError):  # bad data found on an actor: its one line, not a remote traceback
                raise DataError(str(e.cause)) from None
            raise
    return results, collected


def _check_on_ray(raw: Path, schema: Schema, params: Params, docs: Path | None, repeats: np.ndarray,
                  identity: tuple[np.ndarray | None, np.ndarray | None], valid: io.PartsWriter,
                  quarantine: io.PartsWriter) -> tuple[Any, int]:
    """The raw part files checked by Ray actors side by side, one GX context each, with their
    totals added up; each actor writes its Data Docs site in its own folder, which index.html links."""
    parts = io.data_parts(raw)
    firsts, sizes = _part_starts(parts, params.data.batch_rows)
    hashes, keys = identity
    folders, types = (valid.folder, quarantine.folder), (valid.types, quarantine.types)
    jobs = []
    for i, (part, first, size) in enumerate(zip(parts, firsts, sizes)):
        ids = (None, None) if hashes is None or keys is None else (hashes[first:first + size], keys[first:first + size])
        jobs.append((i, part, first, ids, folders, types))
    _, totals = _on_actors(params, "validate", PartChecker, (schema, params, repeats),
                           lambda i: (docs / f"worker-{i}" if docs else None,), jobs, collect="totals")
    tally, expectations = totals[0]
    for t, _ in totals[1:]:
        tally.merge(t)
    if docs:
        links = "".join(f'<li><a href="worker-{i}/index.html">worker {i}</a></li>' for i in range(len(totals)))
        io.write_text(f"<h1>Data Docs</h1><p>The raw parts were checked by {len(totals)} Ray actor(s), each with its "
                      f"own site:</p><ul>{links}</ul>\n", docs / "index.html")
    return tally, expectations


def clean(params: Params, files: StageFiles) -> Cleaned:
    """The cleaning rules, batch by batch: repeats are found first over every row's hashes, and
    IQR fences fitted on a bounded sample (every row, up to IQR_SAMPLE). On Ray (`data_engine`),
    actors clean the validated part files side by side with those same repeats and fences."""
    from pipeline.data.clean import Cleaner, Repeats, iqr_rows, outlier_bounds, repeat_hashes

    schema = schema_from_params(params.data)
    if schema.images is not None:
        from pipeline.runners import image_data  # it builds on this module's helpers

        return image_data.clean(params, files)
    rules, rows, source = params.clean, params.data.batch_rows, files["valid"]
    if not source.exists():
        raise DataError(f"{source} not found: run the stage that writes it first")
    repeats = bounds = None
    if rules.drop_duplicates:
        full, features = [], []
        for b in io.read_batches(source, rows, [*schema.feature_names, schema.target]):
            pair, alone = repeat_hashes(b, schema)
            full.append(pair)
            features.append(alone)
        repeats = Repeats.find(np.concatenate(full), np.concatenate(features))
        del full, features
    if rules.outliers.method == "iqr" and schema.numeric:
        sample = io.parquet_sample(source, IQR_SAMPLE, seed=0, positions=True)
        bounds = outlier_bounds(iqr_rows(sample, schema, rules, repeats), schema, "iqr", rules.outliers.iqr_k)
    types = _types(schema, "clean", io.column_types(source))
    on_ray = data_engine(params) == "ray"
    kept = io.PartsWriter(files["clean"], types, keep_empty=not on_ray)
    removed = io.PartsWriter(files["removed"], types, keep_empty=not on_ray)
    try:
        if on_ray:
            report = _clean_on_ray(source, schema, params, (repeats, bounds), kept, removed)
        else:
            cleaner = Cleaner(schema, rules, repeats, bounds)
            _clean_batches(cleaner, io.read_batches(source, rows), kept, removed, rows)
            report = cleaner.report()
        kept.commit()
        removed.commit()
    finally:
        kept.discard()
        removed.discard()
    io.write_json(report, files["clean_report"])
    return Cleaned.from_report(report)


def _clean_batches(cleaner: Any, batches: Any, kept: io.PartsWriter, removed: io.PartsWriter, rows: int) -> None:
    started = time.perf_counter()
    for batch in io.prefetched(batches):
        good, gone = cleaner.apply(batch)
        kept.write(good)
        removed.write(gone)
        progress("clean", cleaner.rows_in, started, rows)


class PartCleaner:
    """A Ray actor's work for the clean stage: the validated part files cleaned with the
    repeats and fences found over the whole dataset, each part by a Cleaner that starts at the
    part's first row and knows the ids every repeat names."""

    def __init__(self, schema: Schema, params: Params, found: tuple[Any, pd.DataFrame | None], names: dict[int, Any]) -> None:
        self.schema, self.params, self.found, self.names = schema, params, found, names

    def run(self, index: int, part: Path, first: int, folders: tuple[Path, Path],
            types: tuple[dict[str, Any], dict[str, Any]]) -> dict[str, Any]:
        from pipeline.data.clean import Cleaner

        repeats, bounds = self.found
        cleaner = Cleaner(self.schema, self.params.clean, repeats, bounds, self.names, first)
        rows = self.params.data.batch_rows
        with _part_writers(index, folders, types) as (kept, removed):
            _clean_batches(cleaner, io.read_batches(part, rows), kept, removed, rows)
        return cleaner.report()


def _clean_on_ray(source: Path, schema: Schema, params: Params, found: tuple[Any, pd.DataFrame | None],
                  kept: io.PartsWriter, removed: io.PartsWriter) -> dict[str, Any]:
    """The validated part files cleaned by Ray actors side by side; their reports added up."""
    from pipeline.data.clean import merge_reports

    rows, repeats = params.data.batch_rows, found[0]
    parts = io.data_parts(source)
    firsts, _ = _part_starts(parts, rows)
    named = repeats.referenced() if repeats is not None else np.empty(0, dtype="int64")
    names = dict(zip(named.tolist(), _values_at(source, schema.id_column, rows, named)))
    folders, types = (kept.folder, removed.folder), (kept.types, removed.types)
    jobs = [(i, part, first, folders, types) for i, (part, first) in enumerate(zip(parts, firsts))]
    reports, _ = _on_actors(params, "clean", PartCleaner, (schema, params, found, names), lambda i: (), jobs)
    return merge_reports(reports)


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


def _values_at(source: Path, column: str, rows: int, positions: np.ndarray) -> list[Any]:
    """A column's values at sorted row positions, read batch by batch."""
    found: list[Any] = []
    start = 0
    for b in io.read_batches(source, rows, [column]):
        if len(found) == len(positions):
            break
        here = positions[(positions >= start) & (positions < start + len(b))] - start
        found += b[column].to_numpy()[here].tolist()
        start += len(b)
    return found


PerClass = dict[str, pd.Series]


def _split_batches(batches: Any, part: np.ndarray, schema: Schema, writers: dict[str, io.PartsWriter],
                   rows: int) -> tuple[np.ndarray, PerClass]:
    """Batches into the three splits' writers, by `part` (these rows' splits): the rows'
    feature hashes (for the leakage check) and each split's class counts."""
    from pipeline.data.clean import row_hashes

    per_class: PerClass = {name: pd.Series(dtype="int64") for name in SPLITS}
    hashes, done, started = [], 0, time.perf_counter()
    for batch in io.prefetched(batches):
        where = part[done:done + len(batch)]
        hashes.append(row_hashes(batch, schema.feature_names))
        for i, name in enumerate(SPLITS):
            rows_here = batch[where == i]
            writers[name].write(rows_here)
            if not schema.regression:
                counts = rows_here[schema.target].astype(str).value_counts()
                per_class[name] = per_class[name].add(counts, fill_value=0)
        done += len(batch)
        progress("split", done, started, rows)
    return (np.concatenate(hashes) if hashes else np.empty(0, dtype="uint64")), per_class


class PartSplitter:
    """A Ray actor's work for the split stage: clean part files into the three splits, by the
    assignment the driver made over every row."""

    def __init__(self, schema: Schema, rows: int) -> None:
        self.schema, self.rows = schema, rows

    def run(self, index: int, part: Path, where: np.ndarray, folders: tuple[Path, ...],
            types: tuple[dict[str, Any], ...]) -> tuple[np.ndarray, PerClass, list[int]]:
        with _part_writers(index, folders, types) as writers:
            hashes, per_class = _split_batches(io.read_batches(part, self.rows), where, self.schema,
                                               dict(zip(SPLITS, writers)), self.rows)
        return hashes, per_class, [w.rows for w in writers]


def _split_on_ray(source: Path, schema: Schema, params: Params, part: np.ndarray,
                  writers: dict[str, io.PartsWriter]) -> tuple[np.ndarray, PerClass, dict[str, int]]:
    """The clean part files split by Ray actors side by side: their hashes in row order, and
    their class counts and sizes added up."""
    rows = params.data.batch_rows
    parts = io.data_parts(source)
    firsts, sizes = _part_starts(parts, rows)
    folders, types = tuple(w.folder for w in writers.values()), tuple(w.types for w in writers.values())
    jobs = [(i, p, part[first:first + size], folders, types) for i, (p, first, size) in enumerate(zip(parts, firsts, sizes))]
    results, _ = _on_actors(params, "split", PartSplitter, (schema, rows), lambda i: (), jobs)
    per_class: PerClass = {name: pd.Series(dtype="int64") for name in SPLITS}
    for _, counts, _ in results:
        per_class = {name: per_class[name].add(counts[name], fill_value=0) for name in SPLITS}
    hashes = np.concatenate([h for h, _, _ in results]) if results else np.empty(0, dtype="uint64")
    totals = {name: sum(r[2][i] for r in results) for i, name in enumerate(SPLITS)}
    return hashes, per_class, totals


def split(params: Params, files: StageFiles) -> SplitSizes:
    """Split batch by batch into three Parquet datasets, check for leakage over every row's
    feature hash, and fit the preprocessing on (a bounded sample of) the train split only. On
    Ray (`data_engine`), actors split the clean part files side by side."""
    from pipeline import preprocess
    from pipeline.data.split import leak_mask

    schema = schema_from_params(params.data)
    if schema.images is not None:
        from pipeline.runners import image_data  # it builds on this module's helpers

        return image_data.split(params, files)
    source, rows = files["clean"], params.data.batch_rows
    if not source.exists():
        raise DataError(f"{source} not found: run the stage that writes it first")
    part = _assignment(source, schema, params)
    types = _types(schema, "clean", io.column_types(source))
    on_ray = data_engine(params) == "ray"
    writers = {name: io.PartsWriter(files[name], types, keep_empty=not on_ray) for name in SPLITS}
    try:
        if on_ray:
            hashes, per_class, sizes = _split_on_ray(source, schema, params, part, writers)
        else:
            hashes, per_class = _split_batches(io.read_batches(source, rows), part, schema, writers, rows)
            sizes = {name: writers[name].rows for name in SPLITS}
        leaked = leak_mask(hashes, part)
        if leaked.any():
            first = ", ".join(map(str, _values_at(source, schema.id_column, rows, np.flatnonzero(leaked)[:3])))
            raise DataError(
                f"{int(leaked.sum())} rows share their exact features with a row in another split ({schema.id_label} "
                f"{first}, ...); set clean.drop_duplicates: true so identical examples are removed "
                "before splitting"
            )
        for w in writers.values():
            w.commit()
    finally:
        for w in writers.values():
            w.discard()
    # a table's near duplicates are exact ones, which fail the split above: none leave it
    io.write_parquet(pd.DataFrame({schema.id_column: [], "split": [], "reason": []}, dtype="string"), files["leaked"])
    train = io.parquet_sample(files["train"], params.preprocess.fit_rows)
    state = preprocess.fit(train, preprocess.preprocess_spec(schema, params.clean, params.preprocess))
    io.write_json(state, files["preprocess"])
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
