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


def row_hashes(df: pd.DataFrame, cols: list[str]) -> np.ndarray:
    """A 64-bit hash of each row's values in `cols` (one vectorised pass). Rows are compared by
    it across batches: at 20M rows the chance that two different rows share one is about 1e-5."""
    return pd.util.hash_pandas_object(df[cols], index=False).to_numpy()


def repeat_hashes(df: pd.DataFrame, schema: Schema) -> tuple[np.ndarray, np.ndarray]:
    """Each row's hash of its features and label, and of its features alone. The first is the
    hash of (features' hash, label): one pass over the feature columns, not two (hashing was
    half of clean's time at 6M rows)."""
    features = row_hashes(df, schema.feature_names)
    pair = pd.DataFrame({"features": features, "label": df[schema.target].reset_index(drop=True)})
    return pd.util.hash_pandas_object(pair, index=False).to_numpy(), features


def first_of(hashes: np.ndarray) -> np.ndarray:
    """Each row's position of the first row with its hash (itself when it is the first)."""
    codes, _ = pd.factorize(hashes)  # codes number the hashes in order of first appearance,
    if not len(codes):
        return np.zeros(0, dtype=np.int64)
    # so a row is a first exactly where its code exceeds every earlier one
    new = np.concatenate([[True], codes[1:] > np.maximum.accumulate(codes)[:-1]])
    return np.flatnonzero(new)[codes]


@dataclass
class Repeats:
    """Over the whole dataset, by position: the first row a row duplicates (same features and
    label), else the first row whose features it repeats under another label; -1 for neither.
    The first row is kept in both cases, and it is never itself a repeat, so one pass over the
    rows in order removes exactly what removing duplicates, then conflicts, would."""

    duplicate_of: np.ndarray
    conflict_of: np.ndarray

    @classmethod
    def find(cls, full: np.ndarray, features: np.ndarray) -> Repeats:
        here = np.arange(len(full))
        first_full, first_features = first_of(full), first_of(features)
        duplicate = np.where(first_full != here, first_full, -1)
        conflict = np.where((duplicate < 0) & (first_features != here), first_features, -1)
        return cls(duplicate, conflict)

    def referenced(self) -> np.ndarray:
        """The positions some repeat names (their ids go into the reasons), sorted."""
        return np.unique(np.concatenate([self.duplicate_of[self.duplicate_of >= 0], self.conflict_of[self.conflict_of >= 0]]))


def _nothing_removed(df: pd.DataFrame) -> pd.DataFrame:
    return df.iloc[0:0].assign(**{REASON: pd.Series(dtype=str)})


def _split_off(df: pd.DataFrame, mask: np.ndarray, reason: pd.Series | str) -> tuple[pd.DataFrame, pd.DataFrame]:
    removed = df[mask].assign(**{REASON: reason})
    return df[~mask].reset_index(drop=True), removed.reset_index(drop=True)


def _drop_repeats(df: pd.DataFrame, of: np.ndarray, ids: dict[int, Any], template: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rows whose `of` names an earlier row: removed, each naming that row's id."""
    hit = of >= 0
    reason = pd.Series([template.format(ids[i]) for i in of[hit]], index=df.index[hit], dtype=object)
    return _split_off(df, hit, reason)


def _drop_later(df: pd.DataFrame, cols: list[str], schema: Schema, template: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Within one frame: rows whose values in `cols` repeat an earlier row's, each naming it."""
    first = first_of(row_hashes(df, cols))
    of = np.where(first != np.arange(len(df)), first, -1)
    return _drop_repeats(df, of, dict(enumerate(df[schema.id_column].tolist())), template)


def drop_duplicates(df: pd.DataFrame, schema: Schema) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rows whose features and label repeat an earlier row's; the first one is kept.

    The id is left out of the comparison: a re-ingested record gets a new id but is the
    same example, and counting it twice would leak it across splits.
    """
    return _drop_later(df, [*schema.feature_names, schema.target], schema, f"duplicate of {schema.id_label} {{}}")


def drop_conflicting_labels(df: pd.DataFrame, schema: Schema) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rows whose features repeat an earlier row's under another label: the same input in two
    splits with two answers is leakage and noise, so only the first is kept."""
    return _drop_later(df, schema.feature_names, schema, f"same features as {schema.id_label} {{}} with another label")


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


def handle_outliers(df: pd.DataFrame, schema: Schema, params: CleanParams,
                    bounds: pd.DataFrame | None = None) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """Clip or drop values outside the bounds (IQR fences fitted on the whole dataset beforehand,
    or on `df`); returns the frame, removed rows and clipped cells."""
    o = params.outliers
    if o.method == "none" or not schema.numeric:
        return df, _nothing_removed(df), 0
    b = bounds if bounds is not None else outlier_bounds(df, schema, o.method, o.iqr_k)
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
            if want == "float64" and df[f.name].dtype.kind == "f":
                continue  # float32 data stays float32: a float64 copy doubles it for nothing
        elif f.dtype == "str":
            want = "string"
        else:
            continue
        if str(df[f.name].dtype) != want:
            target[f.name] = want
    return df.astype(target) if target else df


class Cleaner:
    """The rules, batch by batch, over a dataset whose repeats were found beforehand
    (`Repeats.find` over all rows) and, for IQR fences, whose bounds were fitted beforehand:
    each batch's rows are kept or removed with a reason, and the report sums them."""

    def __init__(self, schema: Schema, params: CleanParams, repeats: Repeats | None, bounds: pd.DataFrame | None,
                 names: dict[int, Any] | None = None, position: int = 0) -> None:
        """`names` and `position`, for a cleaner that starts inside the dataset (a part file on
        a Ray actor): the ids of every row a repeat names (`Repeats.referenced`), and the
        dataset position of its first row."""
        self.schema, self.params, self.repeats, self.bounds = schema, params, repeats, bounds
        self.names: dict[int, Any] = dict(names or {})  # position → id, for the rows a later repeat names
        # the positions whose ids to note as batches pass; none when `names` has them all already
        # (a cleaner per part file: `referenced` sorts every repeat, which need not be done per part)
        self.wanted = repeats.referenced() if repeats is not None and names is None else np.empty(0, dtype="int64")
        self.rules: dict[str, dict[str, Any]] = {}
        self.rows_in = self.rows_out = 0
        self.position = position

    def _record(self, rule: str, before: int, removed: pd.DataFrame, parts: list[pd.DataFrame], **extra: int) -> None:
        entry = self.rules.setdefault(rule, {"rule": rule, "rows_in": 0, "rows_out": 0, "removed": 0, **dict.fromkeys(extra, 0)})
        entry["rows_in"] += before
        entry["rows_out"] += before - len(removed)
        entry["removed"] += len(removed)
        for k, v in extra.items():
            entry[k] += v
        parts.append(removed.assign(rule=rule))

    def apply(self, batch: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
        """One batch (the next rows in order): its clean rows and its removed rows."""
        schema, params = self.schema, self.params
        start, df = self.position, batch.reset_index(drop=True)
        self.position += len(df)
        self.rows_in += len(df)
        parts: list[pd.DataFrame] = []
        if self.repeats is not None:
            lo, hi = np.searchsorted(self.wanted, [start, start + len(df)])
            ids = df[schema.id_column].to_numpy()
            self.names.update(zip(self.wanted[lo:hi].tolist(), ids[self.wanted[lo:hi] - start].tolist()))
            dup, conflict = self.repeats.duplicate_of[start:start + len(df)], self.repeats.conflict_of[start:start + len(df)]
            n = len(df)
            df, removed = _drop_repeats(df, dup, self.names, f"duplicate of {schema.id_label} {{}}")
            self._record("drop_duplicates", n, removed, parts)
            n = len(df)
            df, removed = _drop_repeats(df, conflict[dup < 0], self.names, f"same features as {schema.id_label} {{}} with another label")
            self._record("drop_conflicting_labels", n, removed, parts)
        n = len(df)
        df, removed = drop_missing(df, schema, params.missing)
        self._record("missing_drop", n, removed, parts)
        n = len(df)
        df, removed, clipped = handle_outliers(df, schema, params, self.bounds)
        self._record(f"outliers_{params.outliers.method}_{params.outliers.action}", n, removed, parts, cells_clipped=clipped)
        df = coerce_types(df, schema)
        self._record("coerce_types", len(df), df.iloc[:0].assign(**{REASON: pd.Series(dtype=str)}), [])
        self.rows_out += len(df)
        return df, pd.concat(parts, ignore_index=True)

    def report(self) -> dict[str, Any]:
        return {"rows_in": self.rows_in, "rows_out": self.rows_out, "removed": self.rows_in - self.rows_out,
                "rules": list(self.rules.values())}


def merge_reports(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Cleaners' reports over consecutive parts of one dataset, as one cleaner's over all of it."""
    rules: dict[str, dict[str, Any]] = {}
    for report in reports:
        for entry in report["rules"]:
            total = rules.setdefault(entry["rule"], dict.fromkeys(entry, 0) | {"rule": entry["rule"]})
            for k, v in entry.items():
                if k != "rule":
                    total[k] += v
    rows_in, rows_out = sum(r["rows_in"] for r in reports), sum(r["rows_out"] for r in reports)
    return {"rows_in": rows_in, "rows_out": rows_out, "removed": rows_in - rows_out, "rules": list(rules.values())}


def repeats_of(df: pd.DataFrame, schema: Schema) -> Repeats:
    """The repeats among a frame's rows (for one batch, or the hashes of all)."""
    return Repeats.find(*repeat_hashes(df, schema))


def iqr_rows(df: pd.DataFrame, schema: Schema, params: CleanParams, repeats: Repeats | None) -> pd.DataFrame:
    """The rows IQR fences are fitted on: those the earlier rules keep (`df`'s rows are at the
    positions `df.index` names in the dataset)."""
    if repeats is not None:
        at = df.index.to_numpy()
        df = df[(repeats.duplicate_of[at] < 0) & (repeats.conflict_of[at] < 0)]
    return drop_missing(df, schema, params.missing)[0]


def clean(valid: pd.DataFrame, schema: Schema, params: CleanParams) -> CleanResult:
    """Apply the cleaning rules in order to an in-memory frame (one batch); the report counts
    rows in and out per rule."""
    valid = valid.reset_index(drop=True)
    repeats = repeats_of(valid, schema) if params.drop_duplicates else None
    bounds = None
    if params.outliers.method == "iqr" and schema.numeric:
        bounds = outlier_bounds(iqr_rows(valid, schema, params, repeats), schema, "iqr", params.outliers.iqr_k)
    cleaner = Cleaner(schema, params, repeats, bounds)
    df, removed = cleaner.apply(valid)
    return CleanResult(df, removed, cleaner.report())
