"""Row identity. A dataset names its id column, or has none: then d2d derives a stable row key
from the row's content and its occurrence number among identical rows. Quarantine, duplicates,
the hash split and the monitor's known-row check all go through `row_ids`, so one rule decides
what "the same row" is.

The key is `<16 hex digits>-<n>`: a 64-bit hash of the row's canonical content (the schema's
feature and target columns, in the schema's order) and n, how many identical rows come before
it. Appending rows never changes an earlier row's key, and the same file read by pandas,
pyarrow or polars gives the same keys: each cell is reduced to what it means, not to how a
reader typed it (5, 5.0 and "5" are one value; a null is a null whether NaN, None or NA).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:  # schema.py imports ROW_KEY from here
    from pipeline.data.schema import Schema

ROW_KEY = "_d2d_row_key"  # the derived key's column, reserved: no feature or target may use it
SIGNIFICANT = 12  # digits kept of a non-integral number: a 1-ulp difference between readers vanishes
_NULL = np.uint64(0x9E3779B97F4A7C15)
_EXACT, _INF = 1000, 2000  # exponent tags: an exact integer; ±infinity
_TEXT_KEY = "d2d-row-key-text"  # text cells hash under their own key, apart from numbers


# Text that pandas' CSV reader reads as a missing value: pyarrow and polars keep some of it
# as text in string columns, so a key treats it as the null it means in a CSV.
NULL_TEXT = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                       "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})


def _numbers(col: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Each cell as float64 (NaN where it is null or not a number) and a mask of null cells."""
    null = col.isna().to_numpy()
    if col.dtype.kind in "biuf":
        return col.astype("float64").to_numpy(na_value=np.nan), null
    if isinstance(col.dtype, pd.CategoricalDtype):
        col = col.astype(object)
    null = null | col.isin(NULL_TEXT).to_numpy()
    values = pd.to_numeric(col.astype(object).where(~null, None), errors="coerce")
    return values.astype("float64").to_numpy(na_value=np.nan), null


def _decimal(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Finite numbers as (mantissa, exponent): integers below 1e15 exactly, others rounded to
    SIGNIFICANT digits, so the pair is the same for every reader's parse of the same text."""
    mant = np.zeros(len(x), dtype="int64")
    expo = np.full(len(x), _EXACT, dtype="int64")
    exact = (x == np.floor(x)) & (np.abs(x) < 1e15)
    mant[exact] = x[exact].astype("int64")
    rest = ~exact
    if rest.any():
        v = x[rest]
        e = np.floor(np.log10(np.abs(v))).astype("int64")
        s = SIGNIFICANT - 1 - e
        half = s // 2  # two steps: 10**s alone overflows for the tiniest doubles
        m = np.rint(v * np.power(10.0, half) * np.power(10.0, s - half))
        over = np.abs(m) >= 10.0**SIGNIFICANT  # log10 rounded up across a power of ten
        m[over], e[over] = np.rint(m[over] / 10), e[over] + 1
        mant[rest], expo[rest] = m.astype("int64"), e
    return mant, expo


def _pair_hash(mant: np.ndarray, expo: np.ndarray) -> np.ndarray:
    """(mantissa, exponent) → uint64: an odd multiplier is a bijection mod 2**64, and the
    exponent is mixed in before one vectorised hash pass."""
    with np.errstate(over="ignore"):
        mixed = mant.astype("uint64") * _NULL ^ expo.astype("uint64")
    return pd.util.hash_array(mixed)


def cell_hashes(col: pd.Series) -> np.ndarray:
    """One uint64 per cell, equal for cells that mean the same value."""
    nums, null = _numbers(col)
    out = np.full(len(col), _NULL, dtype="uint64")
    finite = np.isfinite(nums)
    if finite.any():
        out[finite] = _pair_hash(*_decimal(nums[finite]))
    inf = np.isinf(nums)
    if inf.any():
        out[inf] = _pair_hash(np.sign(nums[inf]).astype("int64"), np.full(int(inf.sum()), _INF, dtype="int64"))
    text = ~null & np.isnan(nums)
    if text.any():
        words = col[text].astype(str).astype(object)
        out[text] = pd.util.hash_pandas_object(words, index=False, hash_key=_TEXT_KEY).to_numpy()
    return out


def content_hash(df: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """A 64-bit hash of each row's canonical content in `columns` (vectorised)."""
    cells = pd.DataFrame({i: cell_hashes(df[c]) for i, c in enumerate(columns)}, index=range(len(df)))
    return pd.util.hash_pandas_object(cells, index=False).to_numpy()


def occurrences(hashes: np.ndarray) -> np.ndarray:
    """Each row's count of earlier rows with its content hash."""
    return pd.Series(hashes).groupby(hashes, sort=False).cumcount().to_numpy()


def format_keys(hashes: np.ndarray, occurrence: np.ndarray) -> np.ndarray:
    """`<content hash>-<occurrence>` as text."""
    return (pd.Series(hashes).map("{:016x}".format) + "-" + pd.Series(occurrence).astype(str)).to_numpy()


def row_keys(df: pd.DataFrame, columns: list[str]) -> pd.Series:
    """`<content hash>-<occurrence>` per row: unique within the frame, stable under appends."""
    h = content_hash(df, columns)
    return pd.Series(format_keys(h, occurrences(h)), index=df.index)


def key_columns(schema: Schema, df: pd.DataFrame) -> list[str]:
    """The columns a derived key covers: features and target, those the frame has (an
    unlabelled batch has no target)."""
    return [c for c in [*schema.feature_names, schema.target] if c in df.columns]


def with_row_key(df: pd.DataFrame, schema: Schema) -> pd.DataFrame:
    """`df` with the derived key column when the schema has no id column; else `df` itself."""
    if not schema.derived_key:
        return df
    return df.assign(**{ROW_KEY: row_keys(df, key_columns(schema, df)).to_numpy()})


def row_ids(df: pd.DataFrame, schema: Schema) -> pd.Series:
    """Each row's identity as text: its id, or its derived key (computed when absent)."""
    if schema.derived_key and ROW_KEY not in df.columns:
        return row_keys(df, key_columns(schema, df))
    return df[schema.id_column].astype(str)
