"""Cleaning rules, in order: duplicates, conflicting labels, missing values (drop), outliers,
type coercion. Removed rows are kept aside with a reason; the report counts rows per rule.
Imputation is not done here: it is fitted on the train split (pipeline.preprocess)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import CleanParams, MissingParams
from pipeline.data.schema import Schema
from pipeline.data.validate import REASON


@dataclass
class CleanResult:
    clean: pd.DataFrame
    removed: pd.DataFrame
    report: dict[str, Any]


def repeats(df: pd.DataFrame, cols: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose values in `cols` repeat an earlier row's, and the position of that first row.

    Rows are compared by a 64-bit hash (one vectorised pass, ~5× faster than comparing all
    columns), then each candidate is checked column by column, so a collision never drops a row.
    """
    codes, _ = pd.factorize(pd.util.hash_pandas_object(df[cols], index=False))
    first = pd.Series(np.arange(len(df))).groupby(codes).transform("first").to_numpy()
    cand = np.flatnonzero(first != np.arange(len(df)))
    left = df.iloc[cand][cols].reset_index(drop=True)
    right = df.iloc[first[cand]][cols].reset_index(drop=True)
    same = ((left == right) | (left.isna() & right.isna())).all(axis=1).to_numpy()
    mask = np.zeros(len(df), dtype=bool)
    mask[cand[same]] = True
    return mask, first


def _nothing_removed(df: pd.DataFrame) -> pd.DataFrame:
    return df.iloc[0:0].assign(**{REASON: pd.Series(dtype=str)})


def _split_off(df: pd.DataFrame, mask: np.ndarray, reason: pd.Series | str) -> tuple[pd.DataFrame, pd.DataFrame]:
    removed = df[mask].assign(**{REASON: reason})
    return df[~mask].reset_index(drop=True), removed.reset_index(drop=True)


def drop_duplicates(df: pd.DataFrame, schema: Schema) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rows whose features and label repeat an earlier row's; the first one is kept.

    The id is left out of the comparison: a re-ingested record gets a new id but is the
    same example, and counting it twice would leak it across splits.
    """
    dup, first = repeats(df, [*schema.feature_names, schema.target])
    ids = df[schema.id_column].to_numpy()[first[dup]]
    return _split_off(df, dup, pd.Series(ids, index=df.index[dup]).map(f"duplicate of {schema.id_label} {{}}".format))


def drop_conflicting_labels(df: pd.DataFrame, schema: Schema) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rows whose features repeat an earlier row's under another label: the same input in two
    splits with two answers is leakage and noise, so only the first is kept."""
    conflict, first = repeats(df, schema.feature_names)
    ids = df[schema.id_column].to_numpy()[first[conflict]]
    reason = pd.Series(ids, index=df.index[conflict]).map(f"same features as {schema.id_label} {{}} with another label".format)
    return _split_off(df, conflict, reason)


def drop_missing(df: pd.DataFrame, schema: Schema, missing: MissingParams) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rows with a null in a column whose policy is `drop`."""
    cols = [f.name for f in schema.features if f.nullable and missing.imputation(f.name, f.kind) == "drop"]
    if not cols:
        return df, _nothing_removed(df)
    nulls = df[cols].isna()
    hit = nulls.any(axis=1).to_numpy()
    first_null = nulls[hit].idxmax(axis=1)  # vectorised; the row's other nulls are in the quarantined row itself
    return _split_off(df, hit, first_null + " is null (clean.missing: drop)")


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
    if o.method == "none" or not schema.numeric:
        return df, _nothing_removed(df), 0
    b = outlier_bounds(df, schema, o.method, o.iqr_k)
    names = list(b.index)
    x = df[names]
    outside = x.lt(b["lo"], axis=1) | x.gt(b["hi"], axis=1)
    if o.action == "clip":
        out = df.copy()
        out[names] = x.clip(lower=b["lo"], upper=b["hi"], axis=1)
        return out, _nothing_removed(df), int(outside.to_numpy().sum())
    hit = outside.any(axis=1).to_numpy()
    first = outside[hit].idxmax(axis=1)
    kept, removed = _split_off(df, hit, first + f" is an outlier (clean.outliers: {o.method})")
    return kept, removed, 0


def coerce_types(df: pd.DataFrame, schema: Schema) -> pd.DataFrame:
    """Declared types: int columns with no nulls back to int64, categorical text to strings.
    Only columns whose type differs are cast (a copy of a wide frame costs seconds)."""
    target: dict[str, str] = {}
    for f in schema.features:
        if f.kind == "numeric":
            want = "int64" if f.dtype == "int" and not df[f.name].isna().any() else "float64"
        elif f.dtype == "str":
            want = "string"
        else:
            continue
        if str(df[f.name].dtype) != want:
            target[f.name] = want
    return df.astype(target) if target else df


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
    removed_all = pd.concat(removed_parts, ignore_index=True)  # missing_drop and outliers always record
    report = {"rows_in": len(valid), "rows_out": len(df), "removed": len(removed_all), "rules": rules}
    return CleanResult(df, removed_all, report)
