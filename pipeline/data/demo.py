"""The embedded demo dataset: scikit-learn's handwritten digits, with a seeded, documented
share of rows corrupted so that validation and cleaning have real work to do."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.data.schema import Schema

CORRUPTIONS = ("missing_pixel", "out_of_range", "duplicate", "unknown_label")


def digits_frame(schema: Schema) -> pd.DataFrame:
    """The 1,797 digits as one row each: a stable `id`, 64 pixel columns (0..16), `label`."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    if len(schema.features) != bunch.data.shape[1]:
        raise ValueError(f"the digits have {bunch.data.shape[1]} pixels; the schema lists {len(schema.features)}")
    df = pd.DataFrame(bunch.data.astype("int64"), columns=schema.feature_names)
    if not schema.derived_key:  # with data.id_column null, d2d derives the rows' keys itself
        df.insert(0, schema.id_column, np.arange(len(df), dtype="int64"))
    df[schema.target] = bunch.target.astype("int64")
    return df


def corrupt(df: pd.DataFrame, schema: Schema, fraction: float, seed: int) -> tuple[pd.DataFrame, dict[str, list[int]]]:
    """Corrupt round(fraction × rows) distinct rows, split evenly across CORRUPTIONS.

    Returns the corrupted copy (pixels become nullable Int64 so a missing value stays an
    integer column in the CSV) and the ids corrupted per kind.
    """
    rng = np.random.default_rng(seed)
    out = df.copy()
    pixels = schema.feature_names
    out[pixels] = out[pixels].astype("Int64")
    n_bad = round(fraction * len(df))
    rows = rng.choice(len(df), size=n_bad, replace=False)
    clean_rows = np.setdiff1d(np.arange(len(df)), rows)
    manifest: dict[str, list[int]] = {}
    col = {name: out.columns.get_loc(name) for name in [*pixels, schema.target]}
    for kind, chunk in zip(CORRUPTIONS, np.array_split(rows, len(CORRUPTIONS))):
        for r in chunk:
            if kind == "missing_pixel":
                for p in rng.choice(pixels, size=rng.integers(1, 4), replace=False):
                    out.iat[r, col[p]] = pd.NA
            elif kind == "out_of_range":
                p = rng.choice(pixels)
                out.iat[r, col[p]] = int(rng.choice([-3, -1, 17, 32, 255]))
            elif kind == "duplicate":
                src = int(rng.choice(clean_rows))
                for name in [*pixels, schema.target]:
                    out.iat[r, col[name]] = out.iat[src, col[name]]
            else:  # unknown_label: a class the schema does not know
                out.iat[r, col[schema.target]] = 10
        # the ids, or the row numbers when there is no id column
        ids = out[schema.id_column].iloc[chunk] if not schema.derived_key else chunk
        manifest[kind] = sorted(int(i) for i in ids)
    return out, manifest
