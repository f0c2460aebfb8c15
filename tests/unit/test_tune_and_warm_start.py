"""The pure pieces of tuning, warm starts and cluster connection: the search space from params,
a trial's params, which weights transfer, and clear errors for bad settings."""

from __future__ import annotations

import socket

import pytest
import torch

from pipeline.config import SearchDim, TrainParams, TuneParams, load_params
from pipeline.errors import ConfigError, D2DError
from pipeline.train.models import ModelSpec, build_model
from pipeline.ray_runtime import check_reachable, ray_session
from pipeline.train.trainer import storage_location, transferable
from pipeline.train.tune import search_space, trial_params
from tests.conftest import REPO


def spec(n_classes: int = 10, hidden: tuple[int, ...] = (32,)) -> ModelSpec:
    return ModelSpec(kind="mlp", n_features=12, n_classes=n_classes, image_shape=None, channels=(8,), hidden=hidden,
                     dropout=0.0, norm="none", width=16, depth=1, heads=2)


def test_search_space_maps_each_kind_to_a_tune_domain():
    from ray.tune.search.sample import Categorical, Float

    space = search_space({"lr": SearchDim(loguniform=[1e-4, 1e-2]), "dropout": SearchDim(uniform=[0.0, 0.5]),
                          "hidden": SearchDim(choice=[[64], [128]])})
    assert isinstance(space["lr"], Float) and space["lr"].lower == 1e-4 and space["lr"].upper == 1e-2
    assert isinstance(space["dropout"], Float) and isinstance(space["hidden"], Categorical)
    assert space["hidden"].categories == [[64], [128]]
    assert 1e-4 <= space["lr"].sample() <= 1e-2


def test_a_trial_overrides_only_what_it_sampled():
    base = TrainParams(epochs=7, num_workers=1, lr=0.1)
    trial = trial_params(base, {"lr": 0.003, "hidden": [256]})
    assert (trial.lr, trial.hidden, trial.epochs, trial.num_workers) == (0.003, [256], 7, 1)
    with pytest.raises(Exception, match="divisible"):  # an impossible sample fails that trial, with the reason
        trial_params(TrainParams(model="transformer", width=64, heads=4), {"heads": 3})


@pytest.mark.parametrize(
    "override, message",
    [
        ("tune.space={}", "space is empty"),
        ("tune.space.num_workers={choice: [1, 2]}", "'num_workers' cannot be tuned"),
        ("tune.space.lr={loguniform: [0, 1]}", "positive"),
        ("tune.space.lr={uniform: [0.1, 0.2], choice: [1]}", "exactly one"),
        ("tune.num_samples=0", "tune.num_samples"),
        ("train.init_from=champion", "expected an MLflow model URI"),
    ],
)
def test_bad_tuning_and_warm_start_params_name_the_problem(override, message):
    overrides = ["tune.enabled=true", override]
    with pytest.raises(ConfigError, match=message):
        load_params(REPO / "params.yaml", overrides)


def test_the_default_search_space_is_the_issue_s():
    tune = TuneParams()
    assert not tune.enabled and set(tune.space) == {"lr", "batch_size", "hidden", "dropout"}
    assert load_params(REPO / "params.yaml").tune.space.keys() == tune.space.keys()


def test_every_tensor_transfers_between_identical_architectures():
    old, new = build_model(spec()), build_model(spec())
    kept, fresh = transferable(new.state_dict(), old.state_dict())
    assert fresh == [] and kept.keys() == new.state_dict().keys()


def test_a_new_head_starts_fresh_and_the_body_transfers():
    old, new = build_model(spec(n_classes=10)), build_model(spec(n_classes=3))
    kept, fresh = transferable(new.state_dict(), old.state_dict())
    assert fresh and kept, "the output layer differs, the hidden layer does not"
    new.load_state_dict(kept, strict=False)
    for name in kept:
        assert torch.equal(new.state_dict()[name], old.state_dict()[name])
    assert all(tuple(new.state_dict()[n].shape) != tuple(old.state_dict()[n].shape) for n in fresh)


def test_storage_location(tmp_path):
    assert storage_location(TrainParams(), tmp_path / "ray") == str((tmp_path / "ray").resolve())
    assert storage_location(TrainParams(storage_path="s3://bucket/d2d"), tmp_path) == "s3://bucket/d2d"
    assert storage_location(TrainParams(storage_path=str(tmp_path / "nfs")), tmp_path) == str(tmp_path / "nfs")


def test_a_cluster_address_with_nothing_listening_fails_fast():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        with pytest.raises(D2DError, match=f"cannot connect to the Ray cluster at 127.0.0.1:{port}"):
            check_reachable(f"127.0.0.1:{port}")
        with pytest.raises(D2DError, match="cannot connect"):
            check_reachable(f"ray://127.0.0.1:{port}")
    with pytest.raises(D2DError, match="expected host:port"):
        check_reachable("just-a-name")
    check_reachable("auto")  # left to Ray: it finds the local cluster and its token itself


def test_ray_address_from_the_environment_is_checked_too(monkeypatch):
    import ray

    if ray.is_initialized():
        pytest.fail("unit tests must not leave Ray running")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    with pytest.raises(D2DError, match="127.0.0.1:1"):
        with ray_session(TrainParams()):
            pass
