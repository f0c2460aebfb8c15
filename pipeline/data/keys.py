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

from pathlib import Path
from typing import TYPE_CHECKING, Any

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


def dataset_content_hashes(raw: Path, schema: Schema, rows: int) -> np.ndarray:
    """Every row's content hash over a whole dataset, read in batches: a derived key counts
    identical rows over the whole file, so the hashes come first and the keys after."""
    from pipeline.data import io

    return np.concatenate([content_hash(b, key_columns(schema, b)) for b in io.read_batches(raw, rows, schema.columns)]
                          or [np.empty(0, "uint64")])


def identity_hashes(ids: pd.Series) -> np.ndarray:
    """A 64-bit hash of each row identity's text (`row_ids`): what the known-row index holds."""
    return pd.util.hash_pandas_object(ids.astype(str), index=False).to_numpy()


class KnownRows:
    """The identity of every row of a raw dataset, as sorted 64-bit hashes (8 bytes a row, not
    the rows), kept in `index` beside the monitor's ledger with the size and mtime of each raw
    file it was built from. It is rebuilt, in one pass of batches, whenever those differ: a
    crash between an append and the index update costs a rebuild, never a wrong answer."""

    def __init__(self, hashes: np.ndarray) -> None:
        self.hashes = np.unique(hashes)

    def __len__(self) -> int:
        return len(self.hashes)

    def isin(self, ids: pd.Series) -> np.ndarray:
        """Which of `ids` (row identities as `row_ids` gives them) the dataset already holds."""
        h = identity_hashes(ids)
        at = np.minimum(np.searchsorted(self.hashes, h), max(len(self.hashes) - 1, 0))
        return (self.hashes[at] == h) if len(self.hashes) else np.zeros(len(h), dtype=bool)

    @staticmethod
    def stamp(raw: Path) -> list[list[Any]]:
        from pipeline.data import io

        # a single file under the name it keeps as the first part of the folder it becomes on its
        # first append (a hard link: same size and time), so that index is extended, not rebuilt
        return [[p.relative_to(raw).as_posix() if raw.is_dir() else io.first_part_name(raw), p.stat().st_size,
                 p.stat().st_mtime_ns] for p in io.data_parts(raw)]

    @staticmethod
    def _id_hashes(paths: list[Path], schema: Schema, rows: int) -> np.ndarray:
        """The identity hashes of every row of these files or folders, read by the id column only."""
        from pipeline.data import io

        return np.concatenate([identity_hashes(b[schema.id_column]) for path in paths
                               for b in io.read_batches(path, rows, [schema.id_column])] or [np.empty(0, "uint64")])

    @classmethod
    def build(cls, raw: Path, schema: Schema, rows: int) -> KnownRows:
        """Every row's identity hash, from one pass of batches over the raw data."""
        if not schema.derived_key:
            return cls(cls._id_hashes([raw], schema, rows))
        content = dataset_content_hashes(raw, schema, rows)
        keys = format_keys(content, occurrences(content))
        return cls(identity_hashes(pd.Series(keys)))

    @classmethod
    def load(cls, raw: Path, schema: Schema, index: Path, rows: int) -> KnownRows:
        """The index at `index` when it matches the raw files; otherwise rebuilt and saved there."""
        import json

        import pyarrow as pa
        import pyarrow.parquet as pq

        from pipeline.data import io

        parts = cls.stamp(raw)
        stamp = json.dumps(parts)
        known = None
        if index.is_file():
            table = pq.read_table(index)
            built = json.loads((table.schema.metadata or {}).get(b"d2d_raw", b"[]"))
            if built == parts:
                known = cls.__new__(cls)
                known.hashes = table.column("hash").to_numpy()
                return known
            if raw.is_dir() and not schema.derived_key and built and built == parts[:len(built)]:
                # only new part files since (the monitor's appends): read just those
                new = cls._id_hashes([raw / name for name, _, _ in parts[len(built):]], schema, rows)
                known = cls(np.concatenate([table.column("hash").to_numpy(), new]))
        known = known if known is not None else cls.build(raw, schema, rows)
        table = pa.table({"hash": known.hashes}).replace_schema_metadata({"d2d_raw": stamp})
        with io.atomic(index, private=True) as tmp:
            pq.write_table(table, tmp)
        return known
