"""Simulated drift batches: valid pixels, labels kept, each kind measurably changes the
images (and `none` does not), and the drift statistics see the difference."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import DriftParams
from pipeline.data.demo import digits_frame
from pipeline.data.simulate import KINDS, simulate_batch
from pipeline.drift import drift_report


@pytest.fixture(scope="module")
def digits(repo_params_module):
    from pipeline.data.schema import schema_from_params

    schema = schema_from_params(repo_params_module.data)
    return schema, digits_frame(schema)


@pytest.fixture(scope="module")
def repo_params_module():
    from pipeline.config import load_params
    from tests.conftest import REPO

    return load_params(REPO / "params.yaml")


@pytest.mark.parametrize("kind", KINDS)
def test_batches_are_valid_labelled_pixels_with_new_ids(digits, kind):
    schema, df = digits
    batch = simulate_batch(df, schema, kind, 0.5, 200, seed=1, first_id=10_000)
    pixels = batch[schema.feature_names].to_numpy()
    assert batch.shape == (200, 66) and pixels.min() >= 0 and pixels.max() <= 16
    assert batch["id"].tolist() == list(range(10_000, 10_200)) and set(batch["label"]) <= set(range(10))
    assert str(batch[schema.feature_names[0]].dtype) == "int64"


def test_none_is_the_same_distribution_and_every_change_is_drift(digits):
    schema, df = digits
    reference = df.sample(900, random_state=0)
    verdicts = {}
    for kind in KINDS:
        batch = simulate_batch(df, schema, kind, 0.6, 600, seed=2, first_id=0)
        verdicts[kind] = drift_report(reference, batch, schema, DriftParams()).drifted
    assert verdicts.pop("none") is False
    assert all(verdicts.values()), verdicts


def test_unknown_kinds_are_named(digits):
    schema, df = digits
    with pytest.raises(ValueError, match="unknown drift kind 'blur'"):
        simulate_batch(df, schema, "blur", 0.5, 10, seed=0, first_id=0)
