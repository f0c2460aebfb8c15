"""Cleaning: drop exact duplicates (kept aside with a reason), scale features to [0, 1]."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from pipeline.config import CleanParams
from pipeline.data.schema import Schema
from pipeline.data.validate import REASON


@dataclass
class CleanResult:
    clean: pd.DataFrame
    removed: pd.DataFrame
    report: dict[str, Any]


def drop_duplicates(df: pd.DataFrame, schema: Schema) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rows whose features and label repeat an earlier row's; the first one is kept.

    The id is left out of the comparison: a re-ingested record gets a new id but is the
    same example, and counting it twice would leak it across splits.
    """
    content = [*schema.feature_names, schema.target]
    dup = df.duplicated(subset=content, keep="first")
    first_id = df.groupby(content, sort=False, dropna=False)[schema.id_column].transform("first")
    removed = df[dup].assign(**{REASON: "duplicate of id " + first_id[dup].astype(str)})
    return df[~dup].reset_index(drop=True), removed.reset_index(drop=True)


def scale_features(df: pd.DataFrame, schema: Schema) -> pd.DataFrame:
    """Map each feature from its declared [min, max] to [0, 1] as float32."""
    lo = pd.Series({f.name: f.min for f in schema.features})
    span = pd.Series({f.name: f.max - f.min for f in schema.features})
    out = df.copy()
    out[schema.feature_names] = ((df[schema.feature_names] - lo) / span).astype("float32")
    return out


def clean(valid: pd.DataFrame, schema: Schema, params: CleanParams) -> CleanResult:
    """Apply the cleaning rules in order; the report counts rows in and out per rule."""
    rules: list[dict[str, Any]] = []
    df, removed = valid, valid.iloc[0:0].assign(**{REASON: pd.Series(dtype=str)})
    if params.drop_duplicates:
        rows_in = len(df)
        df, removed = drop_duplicates(df, schema)
        rules.append({"rule": "drop_duplicates", "rows_in": rows_in, "rows_out": len(df), "removed": len(removed)})
    if params.scale == "range":
        df = scale_features(df, schema)
        rules.append({"rule": "scale_to_unit_range", "rows_in": len(df), "rows_out": len(df), "removed": 0})
    report = {"rows_in": len(valid), "rows_out": len(df), "rules": rules}
    return CleanResult(df, removed, report)
