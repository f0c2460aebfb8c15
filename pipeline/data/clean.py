"""Cleaning rules, in order: duplicates, conflicting labels, missing values (drop), outliers,
type coercion. Removed rows are kept aside with a reason; the report counts rows per rule.
Imputation is not done here: it is fitted on the train split (pipeline.preprocess)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import CleanParams, MissingParams, PreprocessParams
from pipeline.data.schema import Column, Schema
from pipeline.data.validate import REASON


@dataclass
class CleanResult:
    clean: pd.DataFrame
    removed: pd.DataFrame
    report: dict[str, Any]


def _first_id(df: pd.DataFrame, by: list[str], id_column: str) -> pd.Series:
    return df.groupby(by, sort=False, dropna=False)[id_column].transform("first")


def drop_duplicates(df: pd.DataFrame, schema: Schema) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rows whose features and label repeat an earlier row's; the first one is kept.

    The id is left out of the comparison: a re-ingested record gets a new id but is the
    same example, and counting it twice would leak it across splits.
    """
    content = [*schema.feature_names, schema.target]
    dup = df.duplicated(subset=content, keep="first")
    reason = "duplicate of id " + _first_id(df, content, schema.id_column)[dup].astype(str)
    return df[~dup].reset_index(drop=True), df[dup].assign(**{REASON: reason}).reset_index(drop=True)


def drop_conflicting_labels(df: pd.DataFrame, schema: Schema) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rows whose features repeat an earlier row's under another label: the same input in two
    splits with two answers is leakage and noise, so only the first is kept."""
    conflict = df.duplicated(subset=schema.feature_names, keep="first")
    reason = "same features as id " + _first_id(df, schema.feature_names, schema.id_column)[conflict].astype(str) + " with another label"
    return df[~conflict].reset_index(drop=True), df[conflict].assign(**{REASON: reason}).reset_index(drop=True)


def imputation(column: Column, missing: MissingParams) -> str:
    return missing.columns.get(column.name) or (missing.numeric if column.kind == "numeric" else missing.categorical)


def drop_missing(df: pd.DataFrame, schema: Schema, missing: MissingParams) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rows with a null in a column whose policy is `drop`."""
    cols = [f.name for f in schema.features if f.nullable and imputation(f, missing) == "drop"]
    if not cols:
        return df, df.iloc[0:0].assign(**{REASON: pd.Series(dtype=str)})
    nulls = df[cols].isna()
    hit = nulls.any(axis=1)
    reason = nulls[hit].apply(lambda r: "; ".join(f"{c} is null (clean.missing: drop)" for c in r.index[r]), axis=1) if hit.any() else pd.Series(dtype=str)
    return df[~hit].reset_index(drop=True), df[hit].assign(**{REASON: reason}).reset_index(drop=True)


def outlier_bounds(df: pd.DataFrame, schema: Schema, method: str, k: float) -> pd.DataFrame:
    """Per numeric column lower/upper bounds: the schema's range, or Tukey's fences (IQR × k)."""
    names = [f.name for f in schema.numeric]
    if method == "range":
        return pd.DataFrame(
            {"lo": [-np.inf if f.min is None else f.min for f in schema.numeric],
             "hi": [np.inf if f.max is None else f.max for f in schema.numeric]},
            index=names,
        )
    q1, q3 = df[names].quantile(0.25), df[names].quantile(0.75)
    return pd.DataFrame({"lo": q1 - k * (q3 - q1), "hi": q3 + k * (q3 - q1)})


def handle_outliers(df: pd.DataFrame, schema: Schema, params: CleanParams) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """Clip or drop values outside the bounds; returns the frame, removed rows and clipped cells."""
    o = params.outliers
    empty = df.iloc[0:0].assign(**{REASON: pd.Series(dtype=str)})
    if o.method == "none" or not schema.numeric:
        return df, empty, 0
    b = outlier_bounds(df, schema, o.method, o.iqr_k)
    names = list(b.index)
    x = df[names]
    outside = x.lt(b["lo"], axis=1) | x.gt(b["hi"], axis=1)
    if o.action == "clip":
        out = df.copy()
        out[names] = x.clip(lower=b["lo"], upper=b["hi"], axis=1)
        return out, empty, int(outside.to_numpy().sum())
    hit = outside.any(axis=1)
    first = outside[hit].idxmax(axis=1)
    removed = df[hit].assign(**{REASON: first + f" is an outlier (clean.outliers: {o.method})"})
    return df[~hit].reset_index(drop=True), removed.reset_index(drop=True), 0


def coerce_types(df: pd.DataFrame, schema: Schema) -> pd.DataFrame:
    """Declared types: int columns with no nulls back to int64, categorical text to strings."""
    out = df.copy()
    for f in schema.features:
        if f.kind == "numeric":
            whole = f.dtype == "int" and not out[f.name].isna().any()
            out[f.name] = out[f.name].astype("int64" if whole else "float64")
        elif f.dtype == "str":
            out[f.name] = out[f.name].astype("string")
    return out


def clean(valid: pd.DataFrame, schema: Schema, params: CleanParams) -> CleanResult:
    """Apply the cleaning rules in order; the report counts rows in and out per rule."""
    rules: list[dict[str, Any]] = []
    removed_parts: list[pd.DataFrame] = []
    df = valid

    def record(rule: str, before: int, removed: pd.DataFrame, **extra: Any) -> None:
        rules.append({"rule": rule, "rows_in": before, "rows_out": before - len(removed), "removed": len(removed), **extra})
        removed_parts.append(removed.assign(rule=rule))

    if params.drop_duplicates:
        n = len(df)
        df, removed = drop_duplicates(df, schema)
        record("drop_duplicates", n, removed)
        n = len(df)
        df, removed = drop_conflicting_labels(df, schema)
        record("drop_conflicting_labels", n, removed)
    n = len(df)
    df, removed = drop_missing(df, schema, params.missing)
    record("missing_drop", n, removed)
    n = len(df)
    df, removed, clipped = handle_outliers(df, schema, params)
    record(f"outliers_{params.outliers.method}_{params.outliers.action}", n, removed, cells_clipped=clipped)
    df = coerce_types(df, schema)
    rules.append({"rule": "coerce_types", "rows_in": len(df), "rows_out": len(df), "removed": 0})
    removed_all = pd.concat(removed_parts, ignore_index=True) if removed_parts else valid.iloc[0:0]
    report = {"rows_in": len(valid), "rows_out": len(df), "removed": len(removed_all), "rules": rules}
    return CleanResult(df, removed_all, report)


def preprocess_spec(schema: Schema, clean: CleanParams, preprocess: PreprocessParams) -> dict[str, Any]:
    """What pipeline.preprocess.fit needs, from the schema and params (it cannot import them)."""
    def entry(f: Column) -> dict[str, Any]:
        return {"name": f.name, "min": f.min, "max": f.max, "impute": imputation(f, clean.missing) if f.nullable else None}

    return {
        "numeric": [entry(f) for f in schema.numeric],
        "categorical": [entry(f) for f in schema.categorical],
        "scale": preprocess.scale,
        "fill_value": clean.missing.fill_value,
        "max_categories": preprocess.max_categories,
    }
