"""Train/validation/test split: seeded and, by default, stratified by the target."""

from __future__ import annotations

from dataclasses import dataclass

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


def split(df: pd.DataFrame, target: str, params: SplitParams) -> Splits:
    """Cut `df` into train/val/test by the ratios in params, stratified on `target` if asked."""
    from sklearn.model_selection import train_test_split

    counts = df[target].value_counts()
    if params.stratify and (counts < 3).any():
        small = ", ".join(str(c) for c in counts[counts < 3].index[:5])
        raise DataError(f"class(es) {small} have fewer than 3 rows: too few to stratify into three splits")
    if len(df) < 3:
        raise DataError(f"{len(df)} rows: too few to make three splits")
    strat = df[target] if params.stratify else None
    try:
        train, rest = train_test_split(
            df, train_size=params.train, random_state=params.seed, stratify=strat, shuffle=True
        )
        rest_strat = rest[target] if params.stratify else None
        val, test = train_test_split(
            rest,
            test_size=params.test / (params.val + params.test),
            random_state=params.seed,
            stratify=rest_strat,
            shuffle=True,
        )
    except ValueError as e:
        raise DataError(f"cannot split {len(df)} rows by {params.train}/{params.val}/{params.test}: {e}") from None
    return Splits(*(part.reset_index(drop=True) for part in (train, val, test)))
