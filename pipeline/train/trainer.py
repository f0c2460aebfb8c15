"""The driver side of training: connect to Ray, build ScalingConfig/RunConfig, fit, and
read the best model and the per-epoch history back from the last checkpoint."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from pipeline.config import TrainParams
from pipeline.data.schema import Schema
from pipeline.errors import D2DError

if TYPE_CHECKING:
    from pipeline.train.models import ModelSpec


@dataclass
class TrainResult:
    model: object  # torch.nn.Module with the best weights, in eval mode
    spec: ModelSpec
    history: pd.DataFrame
    best_epoch: int
    seconds: float


@contextmanager
def ray_session(params: TrainParams) -> Iterator[None]:
    """Use the Ray that is already up, the cluster in RAY_ADDRESS, or start a local one.

    Only a Ray instance started here is shut down on exit.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        # Logical CPUs: a 2-core laptop can still host the driver and two 1-CPU workers.
        needed = params.num_workers * params.cpus_per_worker + 1
        ray.init(num_cpus=max(os.cpu_count() or 1, needed), log_to_driver=True)
    try:
        yield
    finally:
        ray.shutdown()


def features_and_labels(df: pd.DataFrame, schema: Schema, state: dict) -> tuple[np.ndarray, np.ndarray]:
    """The network's float32 inputs (fitted preprocessing) and its targets: int64 class
    indices, or for regression the target standardised by train statistics."""
    from pipeline.preprocess import scale_target, transform

    x = transform(df, state)
    if schema.regression:
        return x, scale_target(df[schema.target], state)
    index = {str(c): i for i, c in enumerate(schema.classes)}
    y = df[schema.target].astype(str).map(index).to_numpy(dtype="int64")
    return x, y


def model_spec(schema: Schema, n_inputs: int, params: TrainParams) -> ModelSpec:
    from pipeline.train.models import ModelSpec

    return ModelSpec(
        kind=params.model,
        n_features=n_inputs,
        n_classes=schema.n_outputs,
        image_shape=schema.image_shape,
        channels=tuple(params.channels),
        hidden=tuple(params.hidden),
        dropout=params.dropout,
        norm=params.norm,
        width=params.width,
        depth=params.depth,
        heads=params.heads,
    )


def _check_resources(params: TrainParams) -> None:
    import ray

    if params.use_gpu and ray.cluster_resources().get("GPU", 0) < params.num_workers:
        have = ray.cluster_resources().get("GPU", 0)
        raise D2DError(f"train.use_gpu is true but the Ray cluster has {have:g} GPU(s) for {params.num_workers} worker(s)")


def train(
    train_df: pd.DataFrame, val_df: pd.DataFrame, schema: Schema, state: dict, params: TrainParams, storage: Path
) -> TrainResult:
    """Fit the model from params with Ray Train's TorchTrainer; returns the best epoch's weights."""
    import torch
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.train.loop import STATE_FILE, train_loop_per_worker
    from pipeline.train.models import build_model

    x_train, y_train = features_and_labels(train_df, schema, state)
    x_val, y_val = features_and_labels(val_df, schema, state)
    spec = model_spec(schema, x_train.shape[1], params)
    config = {
        "spec": spec.to_dict(),
        "x_train": x_train, "y_train": y_train, "x_val": x_val, "y_val": y_val,
        "epochs": params.epochs, "batch_size": params.batch_size, "lr": params.lr,
        "optimizer": params.optimizer, "schedule": params.schedule, "grad_clip": params.grad_clip,
        "precision": params.precision,
        "weight_decay": params.weight_decay, "patience": params.patience, "seed": params.seed,
        "fail_at_epoch": params.fail_at_epoch,
        "threads": params.cpus_per_worker,
        "regression": schema.regression,
        # validation RMSE is reported in the target's own units
        "target_scale": state["target"]["scale"] if schema.regression else 1.0,
    }
    _check_resources(params)
    # Ray Train passes these from the driver's environment to its controller and workers.
    # The controller polls workers every 2 s by default and a report waits for the previous
    # one to be consumed, which made a 0.1 s epoch take 2 s; a short interval keeps epochs
    # honest. The print patch copies every worker print into the log a second time.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    name = f"d2d-train-{time.strftime('%Y%m%d-%H%M%S')}"
    config["drill_marker"] = str(storage.resolve() / name / "fault_drill.done")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if params.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=params.num_workers,
            use_gpu=params.use_gpu,
            resources_per_worker={"CPU": params.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage.resolve()),
            failure_config=FailureConfig(max_failures=params.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=params.num_to_keep),
            # The workers print one line per epoch; Ray Train's per-report INFO lines drown it.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    started = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - started
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=False)
    model = build_model(spec)
    model.load_state_dict(state["best_model"])
    history = pd.DataFrame(state["history"])
    best_epoch = int(history.loc[history["val_loss"].idxmin(), "epoch"])
    return TrainResult(model.eval(), spec, history, best_epoch, seconds)
