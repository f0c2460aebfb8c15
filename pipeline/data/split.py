"""Train/validation/test split: stratified (seeded, per-class ratios), random (seeded) or
hash (by id, or the derived row key when there is no id column: a row's split never changes
when data is appended). Vectorised throughout."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.config import SplitParams
from pipeline.errors import DataError

SPLITS = ("train", "val", "test")


@dataclass
class Splits:
    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame

    def sizes(self) -> dict[str, int]:
        return {name: len(getattr(self, name)) for name in SPLITS}


def _assign_by_rank(rank: np.ndarray, n: np.ndarray, params: SplitParams) -> np.ndarray:
    """0/1/2 for train/val/test from each row's rank within its group of size n."""
    train_end = np.rint(n * params.train)
    val_end = np.rint(n * (params.train + params.val))
    return np.where(rank < train_end, 0, np.where(rank < val_end, 1, 2))


def stratified_assignment(y: pd.Series, params: SplitParams) -> np.ndarray:
    """Each class cut at round(n·train) and round(n·(train+val)) in a seeded random order,
    so every split holds each class within one row of its ratio."""
    key = pd.Series(np.random.default_rng(params.seed).random(len(y)), index=y.index)
    rank = key.groupby(y, sort=False).rank(method="first").to_numpy() - 1
    n = y.groupby(y, sort=False).transform("size").to_numpy()
    return _assign_by_rank(rank, n, params)


def random_assignment(n_rows: int, params: SplitParams) -> np.ndarray:
    rank = np.argsort(np.random.default_rng(params.seed).random(n_rows), kind="stable").argsort()
    return _assign_by_rank(rank, np.full(n_rows, n_rows), params)


def hash_assignment(ids: pd.Series, params: SplitParams) -> np.ndarray:
    """A fixed bucket per id, from a keyed hash of the id: independent of the other rows."""
    key = f"{params.seed:016d}"[-16:]
    h = pd.util.hash_pandas_object(ids.astype(str), index=False, hash_key=key).to_numpy()
    u = (h >> np.uint64(11)).astype("float64") / float(1 << 53)  # uniform in [0, 1)
    return np.where(u < params.train, 0, np.where(u < params.train + params.val, 1, 2))


def _leak_mask(splits: Splits, features: list[str]) -> np.ndarray:
    """Over the splits in order, rows whose exact feature values also appear in another split."""
    frames = [getattr(splits, s) for s in SPLITS]
    hashes = np.concatenate([pd.util.hash_pandas_object(f[features], index=False).to_numpy() for f in frames])
    return leak_mask(hashes, np.repeat(np.arange(3), [len(f) for f in frames]))


def leaked_rows(splits: Splits, features: list[str]) -> int:
    """How many rows share their exact features with a row in another split."""
    return int(_leak_mask(splits, features).sum())


def leaked_ids(splits: Splits, features: list[str], id_column: str) -> list[str]:
    """The ids (or derived row keys) of those rows, to name them in the error."""
    ids = pd.concat([getattr(splits, s)[id_column].astype(str) for s in SPLITS], ignore_index=True)
    return ids[_leak_mask(splits, features)].tolist()


def assign(target: pd.Series, ids: pd.Series | None, params: SplitParams, regression: bool = False,
           hashed: np.ndarray | None = None) -> np.ndarray:
    """Each row's split (0/1/2 for train/val/test) by the strategy and ratios in params, over
    the whole dataset's target column (and ids, for the hash strategy; or their buckets already
    computed batch by batch, `hashed`). A regression target is stratified by its deciles, so
    every split sees the whole range. Too few rows for a class or a split: a DataError."""
    strata = target
    if regression:
        strata = pd.qcut(target.rank(method="first"), q=min(10, max(1, len(target) // 20)), labels=False)
    if params.strategy == "stratified":
        part = stratified_assignment(strata, params)
    elif params.strategy == "hash":
        part = hashed if hashed is not None else hash_assignment(ids, params)
    else:
        part = random_assignment(len(target), params)
    if params.strategy == "stratified":
        counts = pd.crosstab(strata, part).reindex(columns=range(3), fill_value=0)
        short = counts[(counts == 0).any(axis=1)]
        if len(short):
            c = short.index[0]
            raise DataError(
                f"class {c} has {int(counts.loc[c].sum())} rows: too few to stratify into "
                f"{params.train:g}/{params.val:g}/{params.test:g} (every split needs one)"
            )
    sizes = np.bincount(part, minlength=3)
    empty = [name for name, size in zip(SPLITS, sizes) if size == 0]
    if empty:
        raise DataError(f"{len(target)} rows are too few to make the three splits ({', '.join(empty)} would be empty)")
    return part.astype("int8")


def split(df: pd.DataFrame, target: str, id_column: str, params: SplitParams, regression: bool = False) -> Splits:
    """Cut an in-memory `df` into train/val/test (see `assign`)."""
    part = assign(df[target], df[id_column] if params.strategy == "hash" else None, params, regression)
    return Splits(*(df[part == i].reset_index(drop=True) for i in range(3)))


def leak_mask(hashes: np.ndarray, part: np.ndarray) -> np.ndarray:
    """Rows whose feature hash (`row_hashes` of the features) also occurs in another split."""
    codes = pd.factorize(hashes)[0]
    # the distinct (hash, split) pairs, counted per hash: one hash-table pass, not a groupby
    pairs = pd.unique(codes * 3 + np.asarray(part, dtype=np.int64))
    return np.bincount(pairs // 3, minlength=codes.max() + 1 if len(codes) else 0)[codes] > 1
