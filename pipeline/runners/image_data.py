"""The data stages for image files (issue 17): validate, clean and split, as the table's
stages are for rows, on the same outputs.

A dataset of images is a table of one row per file: its path (the id column, relative to the
image folder or the manifest's folder), its label and any extra columns of the manifest.
- validate: the table through the same Great Expectations suite as any table (the path
  present and unique, the label one of the classes, the extras in range), then every file
  read and decoded once (`pipeline.data.images`): the valid rows carry each image's facts
  (size, mode, hashes, brightness, contrast, sharpness), and the quarantine every refused
  row with its reason. `reports/validate.json` adds the image table.
- clean: exact duplicates by content hash (the copy whose path sorts first is kept) and one image under two
  labels (no copy is kept) into `data/quarantine/clean.parquet`, each with its reason.
- split: the 70/15/15 split (stratified by class), then every val or test image whose
  perceptual hash lies within `data.images.near_duplicate_distance` bits of an image in an
  earlier split is leakage: it leaves its split for `data/quarantine/split.parquet`, with
  the image it repeats.

A user's folder is only ever read.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipeline.config import Params
from pipeline.data import images, io
from pipeline.data.schema import Schema, schema_from_params
from pipeline.errors import DataError
from pipeline.preprocess import fit, preprocess_spec
from pipeline.project import RAW
from pipeline.runners.data import finish_validation, progress, read_data_version, require_raw
from pipeline.summaries import Cleaned, SplitSizes, Validated

if TYPE_CHECKING:
    from pipeline.stages import StageFiles

FILE_CHECK = "file check (pipeline.data.images)"  # a quarantined row's failed_expectations for a file
# Images the channel statistics are fitted on, at most: a mean and a standard deviation per
# channel settle long before this, and each image is a decode.
FIT_IMAGES = 5_000
BATCH = 256  # rows of image bytes the stages hold at a time
LISTING_SEED = 0  # the rows' order (see `listing`)


def checks_of(schema: Schema) -> images.ImageChecks:
    p = schema.images
    assert p is not None
    return images.ImageChecks(p.mode, tuple(p.convert), p.min_side, p.max_aspect, p.max_pixels, p.max_bytes)


def image_root(raw: Path) -> Path:
    """Where the rows' paths start: the image folder, or the manifest's folder."""
    return raw if raw.is_dir() else raw.parent


def listing(raw: Path, schema: Schema) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The dataset as a table in the schema's column names (the path column, the target, a
    manifest's extras), in a fixed random order, and the files that cannot be rows, with their
    reasons. The order is random because every later stage keeps it: a folder lists class by
    class, so its train split's row groups would each hold one class, and a worker's local
    shuffle buffer (a few row groups of large images) would serve batches of one class."""
    require_raw(raw, images=True)
    if raw.is_dir():
        rows, refused = images.list_folder(raw)
    else:
        rows, refused = images.read_manifest(raw, schema.id_column, schema.target)
    rows = rows.iloc[np.random.default_rng(LISTING_SEED).permutation(len(rows))].reset_index(drop=True)
    names = {images.PATH: schema.id_column, images.LABEL: schema.target}
    return rows.rename(columns=names), refused.rename(columns=names)


def as_labels(values: pd.Series, schema: Schema) -> pd.Series:
    """Labels typed as the classes are: a class folder's name is text, so classes written as
    numbers (0..9) take the folder `3` as 3; and a manifest's label column that CSV read as
    numbers matches classes written as text ("3")."""
    whole = pd.to_numeric(values, errors="coerce")
    whole = whole.where(whole.notna() & (whole == whole.round()))
    if schema.classes and all(isinstance(c, int) for c in schema.classes):
        return values.where(whole.isna(), whole.astype("Int64").astype(object))
    if schema.classes and all(isinstance(c, str) for c in schema.classes) and values.dtype.kind in "iuf":
        return values.astype(object).where(values.isna(), whole.astype("Int64").astype(str).where(whole.notna(), values.astype(str)))
    return values


def _file_rule(reason: str) -> str:
    """A file reason's rule, for the report's counts: its words before the details."""
    return reason.split(":")[0].strip()


def validate(params: Params, files: StageFiles) -> Validated:
    """The table through the GX suite, then each file checked once; the gate on the totals."""
    from pipeline.data.validate import EXPECTATIONS, REASON, Validator, dataset_summary, id_hashes, repeated

    raw, schema = files[RAW], schema_from_params(params.data)
    table, refused = listing(raw, schema)
    table[schema.target] = as_labels(table[schema.target], schema)
    docs = files["data_docs"] if params.validate_.data_docs else None
    io.fresh_dir(files["data_docs"])
    if docs is None:
        io.write_text("<p>Data Docs are off (validate.data_docs: false).</p>\n", files["data_docs"] / "index.html")
    version = read_data_version(raw, params.data.raw, images=True)
    validator = Validator(schema, params.validate_, docs, repeated(id_hashes(table[schema.id_column])))
    raw_types = schema.arrow_types("raw")
    valid_out = io.PartsWriter(files["valid"], {schema.id_column: _string(), **_fact_types(), images.IMAGE: _binary()})
    quarantine = io.PartsWriter(files["quarantine"], {**raw_types, REASON: _string(), EXPECTATIONS: _string()})
    columns = [*schema.columns, REASON, EXPECTATIONS]  # every quarantined row in the same columns
    kept_facts: list[pd.DataFrame] = []
    started, done = time.perf_counter(), 0
    try:
        if len(refused):  # files the listing refused: no label, or a link out of the folder
            quarantine.write(refused.assign(**{EXPECTATIONS: FILE_CHECK}).reindex(columns=columns))
            validator.tally.rules["not a row of the image folder"] = len(refused)
            validator.tally.expectations_failed.add("image files")
        step = params.data.batch_rows
        for start in range(0, len(table), step):
            valid, bad = validator.check(table.iloc[start:start + step], start)
            quarantine.write(bad.reindex(columns=columns))
            for checked in images.inspect_files(valid.rename(columns={schema.id_column: images.PATH}),
                                                image_root(raw), checks_of(schema), keep_bytes=True):
                checked = checked.rename(columns={images.PATH: schema.id_column})
                failed = checked[images.REASON].notna()
                quarantine.write(checked[failed].drop(columns=[images.IMAGE]).assign(**{EXPECTATIONS: FILE_CHECK}).reindex(columns=columns))
                good = checked[~failed].drop(columns=[REASON])
                valid_out.write(good)
                kept_facts.append(good[[schema.target, *images.FACTS]])
                _count_file_failures(validator.tally, checked[images.REASON][failed])
                done += len(checked)
                if done % 4096 < BATCH:  # about every 4k images: long checks show they are moving
                    progress("validate", done, started, 4095, "images")
        tally = validator.tally
        tally.rows_in += len(refused)
        facts = pd.concat(kept_facts, ignore_index=True) if kept_facts else pd.DataFrame(columns=[schema.target, *images.FACTS])
        tally.labels = set(facts[schema.target].dropna().unique().tolist())
        gate, report = dataset_summary(tally, validator.expectations, schema, params.validate_)
        report["expectations"] += 1  # the file checks
        report["images"] = images.image_table(facts.rename(columns={schema.target: images.LABEL}))
        return finish_validation(gate, report, version, docs, files, (valid_out, quarantine))
    finally:
        valid_out.discard()
        quarantine.discard()


def _count_file_failures(tally: Any, reasons: pd.Series) -> None:
    """The rows the file checks quarantined leave the tally's valid rows, counted by rule."""
    tally.rows_valid -= len(reasons)
    for rule, n in reasons.map(_file_rule).value_counts().items():
        tally.rules[rule] = tally.rules.get(rule, 0) + int(n)
    if len(reasons):
        tally.expectations_failed.add("image files")


def _string() -> Any:
    import pyarrow as pa

    return pa.string()


def _binary() -> Any:
    import pyarrow as pa

    return pa.binary()


def _fact_types() -> dict[str, Any]:
    import pyarrow as pa

    text = {name: pa.string() for name in ("sha256", "format", "mode", "phash")}
    return text | {name: pa.int64() for name in ("bytes", "width", "height")} | {
        name: pa.float64() for name in ("brightness", "contrast", "sharpness")}


def _positions(source: Path, columns: list[str]) -> pd.DataFrame:
    """The columns a dataset-wide decision needs (ids, labels, hashes), without the image bytes."""
    return pd.concat(list(io.read_batches(source, BATCH * 64, columns)), ignore_index=True)


def _route(source: Path, where: np.ndarray, writers: list[io.PartsWriter], extra: list[pd.DataFrame | None]) -> None:
    """Every row of `source`, in order and a batch of bytes at a time, to `writers[where[i]]`
    (-1: nowhere), with `extra[k]`'s columns (by row position) added for writer k."""
    done = 0
    for batch in io.read_batches(source, BATCH):
        here = where[done:done + len(batch)]
        for k, writer in enumerate(writers):
            chosen = np.flatnonzero(here == k)
            rows = batch.iloc[chosen]
            if extra[k] is not None:
                rows = rows.assign(**{c: extra[k][c].to_numpy()[done + chosen] for c in extra[k].columns})
            writer.write(rows.reset_index(drop=True))
        done += len(batch)


def clean(params: Params, files: StageFiles) -> Cleaned:
    """Exact duplicates (the copy whose path sorts first kept) and one image under two labels (no copy kept)
    leave the dataset for the clean stage's quarantine, each with its reason."""
    schema, source = schema_from_params(params.data), files["valid"]
    if not source.exists():
        raise DataError(f"{source} not found: run the stage that writes it first")
    table = _positions(source, [schema.id_column, schema.target, "sha256"])
    internal = table.rename(columns={schema.id_column: images.PATH, schema.target: images.LABEL})
    reasons = images.duplicate_reasons(internal.assign(**{images.REASON: pd.Series(pd.NA, index=table.index, dtype="string")}))
    gone = reasons.notna().to_numpy()
    kept, removed = io.PartsWriter(files["clean"]), io.PartsWriter(files["removed"])
    try:
        _route(source, gone.astype("int64"), [kept, removed], [None, pd.DataFrame({"reason": reasons.astype(object)})])
        kept.commit()
        removed.commit()
    finally:
        kept.discard()
        removed.discard()
    rules = reasons[gone].map(lambda r: "the same image under two labels" if r.startswith("the same image")
                              else "an exact duplicate").value_counts()
    report = {"rows_in": len(table), "rows_out": int((~gone).sum()), "removed": int(gone.sum()),
              "rules": {str(k): int(v) for k, v in rules.items()}}
    io.write_json(report, files["clean_report"])
    return Cleaned.from_report(report)


def leaked(table: pd.DataFrame, where: np.ndarray, distance: int) -> pd.Series:
    """Why each val or test image leaves its split (null for the rest): its perceptual hash
    lies within `distance` bits of an image in an earlier split (train for val; train or the
    val images kept for test). The reason names the nearest such image."""
    from pipeline.data.split import SPLITS

    reasons = pd.Series(pd.NA, index=table.index, dtype="object")
    ids, hashes = table.iloc[:, 0].astype(str).to_numpy(), table["phash"].to_numpy()
    earlier = np.flatnonzero(where == SPLITS.index("train"))
    for name in ("val", "test"):
        here = np.flatnonzero(where == SPLITS.index(name))
        nearest: dict[int, tuple[int, int]] = {}
        for i, j, d in images.near_duplicates(hashes[here], hashes[earlier], distance):
            if i not in nearest or d < nearest[i][1]:
                nearest[i] = (j, d)
        for i, (j, d) in nearest.items():
            reasons.iloc[here[i]] = (f"a near duplicate ({d} of 64 perceptual-hash bits apart) of {ids[earlier[j]]}, "
                                     f"in an earlier split: leakage")
        kept_here = np.setdiff1d(here, here[list(nearest)] if nearest else [])
        earlier = np.concatenate([earlier, kept_here])
    return reasons


def split(params: Params, files: StageFiles) -> SplitSizes:
    """The clean images into train, val and test (stratified by class, as tables are); near
    duplicates across splits leave val and test (`leaked`) for `data/quarantine/split.parquet`.
    The preprocessing fitted on train is its channels' mean and standard deviation at the
    training size (`pipeline.image_transforms`)."""
    from pipeline.data.split import SPLITS, assign

    schema, source = schema_from_params(params.data), files["clean"]
    if not source.exists():
        raise DataError(f"{source} not found: run the stage that writes it first")
    table = _positions(source, [schema.id_column, schema.target, "phash"])
    where = assign(table[schema.target], None, params.split, schema.regression)
    distance = schema.images.near_duplicate_distance if schema.images else 0
    reasons = leaked(table, where, distance)
    gone = reasons.notna().to_numpy()
    named = pd.Series(np.asarray(SPLITS, dtype=object)[where])
    routed = np.where(gone, len(SPLITS), where)  # leaked rows go to the last writer
    writers = [io.PartsWriter(files[name]) for name in SPLITS] + [io.PartsWriter(files["leaked"])]
    try:
        _route(source, routed, writers, [None, None, None, pd.DataFrame({"split": named, "reason": reasons})])
        for w in writers:
            w.commit()
    finally:
        for w in writers:
            w.discard()
    state = fit_preprocess(files["train"], schema, min(params.preprocess.fit_rows, FIT_IMAGES), params.split.seed)
    if schema.features:  # a manifest's extra columns are model inputs, preprocessed as a table's
        spec = {**preprocess_spec(schema, params.clean, params.preprocess), "id": None, "target": None}
        sample = io.parquet_sample(files["train"], params.preprocess.fit_rows, columns=schema.feature_names)
        state["table"] = fit(sample, spec)
    io.write_json(state, files["preprocess"])
    kept = pd.Series(routed)
    report = {
        "sizes": {name: int((kept == i).sum()) for i, name in enumerate(SPLITS)},
        "strategy": params.split.strategy,
        "seed": params.split.seed,
        "per_class": {name: {str(k): int(v) for k, v in table[schema.target][routed == i].astype(str).value_counts()
                             .sort_index().items()} for i, name in enumerate(SPLITS)},
        "leaked_rows": int(gone.sum()),
        "model_inputs": int(np.prod(schema.input_shape or (0,))),
        "preprocess_fit_rows": state["fit_images"],
    }
    io.write_json(report, files["split_report"])
    return SplitSizes.from_report(report)


def fit_preprocess(train: Path, schema: Schema, limit: int, seed: int = 0) -> dict[str, Any]:
    """The image preprocessing's fitted state: the training size and mode, and each channel's
    mean and standard deviation over a uniform sample of `limit` train images at that size."""
    from pipeline.image_transforms import ChannelStats, decode

    p = schema.images
    assert p is not None
    rows = io.parquet_rows(train)
    chosen = np.zeros(rows, dtype=bool)
    chosen[np.random.default_rng(seed).choice(rows, size=min(limit, rows), replace=False)] = True
    stats, done = ChannelStats(), 0
    for batch in io.read_batches(train, BATCH, [images.IMAGE]):
        for data in batch[images.IMAGE].to_numpy()[chosen[done:done + len(batch)]]:
            stats.update(decode(data, p.size, p.mode)[None])  # as the network's inputs are decoded
        done += len(batch)
    mean, std = stats.result()
    # the limits travel with the model: serving refuses what validation would have quarantined
    return {"kind": "images", "size": p.size, "mode": p.mode, "mean": mean, "std": std,
            "fit_images": int(chosen.sum()), "outputs": [], "max_bytes": p.max_bytes, "max_pixels": p.max_pixels}
