"""Ray Train on a real local Ray instance: a fault drill, determinism, 2-worker DDP, every
model in the zoo, and a clear error for GPUs the cluster does not have."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.config import TrainParams
from pipeline.data.schema import Schema, schema_from_params
from pipeline.errors import D2DError
from pipeline.train.trainer import train
from tests.conftest import REPO

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray for the module (4 logical CPUs: two 1-CPU workers and the driver)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def digits() -> tuple[Schema, pd.DataFrame, pd.DataFrame, dict]:
    from sklearn.datasets import load_digits

    from pipeline.config import load_params

    schema = schema_from_params(load_params(REPO / "params.yaml").data)
    bunch = load_digits()
    df = pd.DataFrame(bunch.data[:600], columns=schema.feature_names).assign(id=range(600), label=bunch.target[:600])
    state = {  # the digits' declared range, as preprocess.fit writes it for scale: range
        "numeric": {"names": schema.feature_names, "fill": [None] * 64, "center": [0.0] * 64, "scale": [16.0] * 64},
        "categorical": [], "outputs": schema.feature_names, "target": None,
    }
    return schema, df.iloc[:480], df.iloc[480:], state


def fit(digits, tmp_path, **overrides):
    schema, train_df, val_df, state = digits
    params = TrainParams(**{"epochs": 4, "batch_size": 32, "num_workers": 1, "patience": 10, **overrides})
    return train(train_df, val_df, schema, state, params, tmp_path)


def test_a_lost_worker_resumes_from_its_checkpoint(ray_local, digits, tmp_path):
    """Rank 0 exits hard at the start of epoch 3 of 5; Ray restarts the 2-worker group, which
    resumes from the latest checkpoint the controller had recorded (epoch 2's, or epoch 1's if
    the crash beat its bookkeeping) and finishes the same 5 epochs, each once."""
    result = fit(digits, tmp_path, epochs=5, num_workers=2, max_failures=1, fail_at_epoch=3)
    history = result.history
    assert history["epoch"].tolist() == [1, 2, 3, 4, 5]
    assert history["restarts"].iloc[0] == 0 and (history.loc[history["epoch"] >= 3, "restarts"] == 1).all()


def test_without_failure_budget_the_run_fails(ray_local, digits, tmp_path):
    with pytest.raises(Exception, match="(?i)fail|died|exit"):
        fit(digits, tmp_path, epochs=3, max_failures=0, fail_at_epoch=2)


def test_same_seed_one_worker_is_reproducible(ray_local, digits, tmp_path):
    a = fit(digits, tmp_path / "a", epochs=3)
    b = fit(digits, tmp_path / "b", epochs=3)
    assert a.history["val_loss"].tolist() == b.history["val_loss"].tolist()
    c = fit(digits, tmp_path / "c", epochs=3, seed=7)
    assert c.history["val_loss"].tolist() != a.history["val_loss"].tolist()


@pytest.mark.parametrize(
    "overrides",
    [
        {"model": "cnn", "num_workers": 2, "optimizer": "sgd", "lr": 0.05, "schedule": "cosine", "grad_clip": 1.0},
        {"model": "mlp", "optimizer": "adamw", "schedule": "plateau", "hidden": [64]},
        # mixed precision runs for real on the CPU too (autocast supports bf16 there)
        {"model": "cnn", "precision": "bf16", "grad_clip": 1.0},
        {"model": "lstm", "width": 32, "lr": 0.005},
        {"model": "transformer", "width": 32, "heads": 4, "depth": 1, "lr": 0.002},
    ],
)
def test_every_model_learns(ray_local, digits, tmp_path, overrides):
    result = fit(digits, tmp_path, **overrides)
    assert result.history["val_loss"].iloc[-1] < result.history["val_loss"].iloc[0]
    if overrides.get("schedule") == "cosine":
        assert result.history["lr"].is_monotonic_decreasing
    assert result.history["val_accuracy"].max() > 0.3  # ten classes: chance is 0.1


def test_gpus_the_cluster_lacks_are_a_clear_error(ray_local, digits, tmp_path):
    # No GPU exists on this machine; the check must answer at once instead of waiting for one.
    with pytest.raises(D2DError, match="use_gpu is true but the Ray cluster has 0 GPU"):
        fit(digits, tmp_path, use_gpu=True)
