"""The data stages' runners: the data version, validate, clean and split (and the demo data)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import Params
from pipeline.data import io
from pipeline.data.keys import with_row_key
from pipeline.data.schema import schema_from_params
from pipeline.data.split import SPLITS
from pipeline.errors import DataError
from pipeline.project import RAW, raw_path
from pipeline.summaries import Cleaned, DataVersion, SplitSizes, Validated

if TYPE_CHECKING:
    from pipeline.stages import StageFiles


def read_data_version(raw: Path, declared: str) -> DataVersion:
    """The raw file's md5 (what DVC records) and whether it matches the committed .dvc file;
    `declared` is data.raw as params give it."""
    if not raw.is_file():
        raise DataError(f"raw data not found: {raw} (run `d2d data demo` for the demo dataset, or `dvc pull`)")
    md5 = io.file_md5(raw)
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


def validate(params: Params, files: StageFiles) -> Validated:
    from pipeline.data.validate import validate as check

    version = read_data_version(files[RAW], params.data.raw)
    schema = schema_from_params(params.data)
    # with no id column, each row gets its derived key here, once, from the raw values
    raw = with_row_key(io.read_table(files[RAW]), schema)
    docs = files["data_docs"] if params.validate_.data_docs else None
    # A fresh folder each run: GX adds pages to an existing site, and DVC records this one as
    # an output, so it must hold this run's docs only (or a note that they are off).
    io.fresh_dir(files["data_docs"])
    if docs is None:
        io.write_text("<p>Data Docs are off (validate.data_docs: false).</p>\n", files["data_docs"] / "index.html")
    report = check(raw, schema, params.validate_, docs)
    io.write_parquet(report.quarantine, files["quarantine"])
    summary = {**report.summary, "data_md5": version.md5, "data_path": version.path}
    if docs:
        summary["data_docs"] = str((docs / "index.html").relative_to(files.root))
    io.write_json(summary, files["validate_report"])
    if not report.passed:
        raise DataError("validation failed: " + "; ".join(report.reasons))
    io.write_parquet(report.valid, files["valid"])
    return Validated.from_report(summary)


def clean(params: Params, files: StageFiles) -> Cleaned:
    from pipeline.data.clean import clean as apply_rules

    result = apply_rules(io.read_table(files["valid"]), schema_from_params(params.data), params.clean)
    io.write_parquet(result.clean, files["clean"])
    io.write_parquet(result.removed, files["removed"])
    io.write_json(result.report, files["clean_report"])
    return Cleaned.from_report(result.report)


def split(params: Params, files: StageFiles) -> SplitSizes:
    """Split, check for leakage, and fit the preprocessing on the train split only."""
    from pipeline import preprocess
    from pipeline.data.split import leaked_ids, leaked_rows, split as assign

    schema = schema_from_params(params.data)
    splits = assign(io.read_table(files["clean"]), schema.target, schema.id_column, params.split, schema.regression)
    leaked = leaked_rows(splits, schema.feature_names)
    if leaked:
        shown = ", ".join(leaked_ids(splits, schema.feature_names, schema.id_column)[:3])
        raise DataError(
            f"{leaked} rows share their exact features with a row in another split ({schema.id_label} {shown}, ...); "
            "set clean.drop_duplicates: true so identical examples are removed before splitting"
        )
    for name in SPLITS:
        io.write_parquet(getattr(splits, name), files[name])
    state = preprocess.fit(splits.train, preprocess.preprocess_spec(schema, params.clean, params.preprocess))
    io.write_json(state, files["preprocess"])
    per_class = {} if schema.regression else {
        name: getattr(splits, name)[schema.target].astype(str).value_counts().sort_index().to_dict() for name in SPLITS
    }
    report = {
        "sizes": splits.sizes(),
        "strategy": params.split.strategy,
        "seed": params.split.seed,
        "per_class": per_class,
        "leaked_rows": leaked,
        "model_inputs": len(state["outputs"]),
    }
    io.write_json(report, files["split_report"])
    return SplitSizes.from_report(report)
