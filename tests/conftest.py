from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import settings

# Property tests run the same examples on every run (a seed derived from each test), so CI is
# repeatable; a new search is one `--hypothesis-seed=N` or HYPOTHESIS_PROFILE=explore away.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

from pipeline.config import DataParams, Params, load_params
from pipeline.data.schema import Schema, schema_from_params

REPO = Path(__file__).resolve().parents[1]

# No analytics calls from the tools under test: the machine has no internet.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


@pytest.fixture
def tiny_data_params() -> DataParams:
    """Four features in 0..10, three classes: small enough to reason about row by row."""
    return DataParams(
        raw=Path("data/raw/tiny.csv"),
        classes=[0, 1, 2],
        features=[{"prefix": "f", "count": 4, "min": 0, "max": 10, "dtype": "int"}],
    )


@pytest.fixture
def tiny_schema(tiny_data_params: DataParams) -> Schema:
    return schema_from_params(tiny_data_params)


def make_frame(schema: Schema, n: int, seed: int = 0) -> pd.DataFrame:
    """n valid rows: ids 0..n-1, features in range, classes cycling so every class is present."""
    import numpy as np

    rng = np.random.default_rng(seed)
    df = pd.DataFrame(rng.integers(0, 11, size=(n, len(schema.features))), columns=schema.feature_names)
    df.insert(0, schema.id_column, range(n))
    df[schema.target] = [schema.classes[i % len(schema.classes)] for i in range(n)]
    return df


@pytest.fixture
def repo_params() -> Params:
    return load_params(REPO / "params.yaml")
