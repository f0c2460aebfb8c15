"""The driver side of training: build ScalingConfig/RunConfig, fit on the Ray that
pipeline.ray_runtime connected to, and read the best model and the per-epoch history back
from the last checkpoint."""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from pipeline.config import TrainParams
from pipeline.data.schema import Schema
from pipeline.errors import D2DError

if TYPE_CHECKING:
    from ray.data import Dataset

    from pipeline.train.models import ModelSpec


@dataclass
class TrainResult:
    model: object  # torch.nn.Module with the best weights, in eval mode
    spec: ModelSpec
    history: pd.DataFrame
    best_epoch: int
    seconds: float
    transfer: dict = field(default_factory=dict)  # warm start: what was initialised from init_from or pretrained


def features_and_labels(df: pd.DataFrame, schema: Schema, state: dict) -> tuple[np.ndarray, np.ndarray]:
    """The network's float32 inputs (fitted preprocessing) and its targets: int64 class
    indices, or for regression the target standardised by train statistics."""
    from pipeline.preprocess import scale_target, transform

    x = transform(df, state)
    if schema.regression:
        return x, scale_target(df[schema.target], state)
    index = {str(c): i for i, c in enumerate(schema.classes)}
    # A batch holds a few distinct labels: look those up, not every row's string.
    codes, uniques = pd.factorize(df[schema.target])
    lookup = np.array([index.get(str(u), -1) for u in uniques] + [-1], dtype="int64")  # code -1: a null
    y = lookup[codes]
    if (y < 0).any():
        bad = df[schema.target].iloc[int(np.flatnonzero(y < 0)[0])]
        raise ValueError(f"label {bad!r} is not one of the classes the model was trained on")
    return x, y


def model_spec(schema: Schema, n_inputs: int, params: TrainParams) -> ModelSpec:
    from pipeline.train.models import ModelSpec

    return ModelSpec(
        kind=params.model,
        n_features=n_inputs,
        n_classes=schema.n_outputs,
        image_shape=schema.input_shape,
        channels=tuple(params.channels),
        hidden=tuple(params.hidden),
        dropout=params.dropout,
        norm=params.norm,
        width=params.width,
        depth=params.depth,
        heads=params.heads,
    )


def _check_resources(params: TrainParams) -> None:
    """Fail at once, naming the shortfall, where Ray would wait for resources forever."""
    import ray

    resources = ray.cluster_resources()
    if params.use_gpu and resources.get("GPU", 0) < params.num_workers:
        have = resources.get("GPU", 0)
        raise D2DError(f"train.use_gpu is true but the Ray cluster has {have:g} GPU(s) for {params.num_workers} worker(s)")
    # Ray Train reserves the workers' CPUs away from Ray Data: its read and featurise tasks
    # need one more, or the workers wait for data that never comes.
    needed = params.num_workers * params.cpus_per_worker + 1
    if resources.get("CPU", 0) < needed:
        raise D2DError(f"the Ray cluster has {resources.get('CPU', 0):g} CPU(s); {params.num_workers} worker(s) × "
                       f"train.cpus_per_worker {params.cpus_per_worker} need {needed}, one for Ray Data's reads")


def storage_location(params: TrainParams, default: Path) -> str:
    """Where Ray Train writes checkpoints: train.storage_path (a shared path or s3://...) or the project's folder."""
    if params.storage_path is None:
        return str(default.resolve())
    if "://" in params.storage_path:
        return params.storage_path
    return str(Path(params.storage_path).resolve())


def loop_config(spec: ModelSpec, schema: Schema, state: dict, params: TrainParams) -> dict:
    """What every worker's loop receives: the model spec and the loop's settings. Hyperparameters
    only: the data reaches the workers as Ray Dataset shards, so this stays the same size
    whatever the row count."""
    from pipeline.train.ingest import ingest_options

    return {
        "spec": spec.to_dict(),
        "epochs": params.epochs, "batch_size": params.batch_size, "lr": params.lr,
        "optimizer": params.optimizer, "schedule": params.schedule, "grad_clip": params.grad_clip,
        "precision": params.precision, "grad_accum_steps": params.grad_accum_steps,
        "lr_scaling": params.lr_scaling, "compile": params.compile, "channels_last": params.channels_last,
        "weight_decay": params.weight_decay, "patience": params.patience, "seed": params.seed,
        "fail_at_epoch": params.fail_at_epoch,
        "threads": params.cpus_per_worker,
        "regression": schema.regression,
        # validation RMSE is reported in the target's own units
        "target_scale": state["target"]["scale"] if schema.regression else 1.0,
        "init_state": None,
        "freeze": params.freeze, "unfreeze_epoch": params.unfreeze_epoch, "backbone_lr_scale": params.backbone_lr_scale,
        **ingest_options(params, n_inputs(state)),
        **augmentation(schema, state),
    }


def augmentation(schema: Schema, state: dict) -> dict:
    """The loop's image augmentation (data.images.augment), with what it needs to undo and
    redo the normalisation; nothing for tables or when every part is off."""
    if schema.images is None or schema.images.augment == type(schema.images.augment)():
        return {}
    return {"augment": schema.images.augment.model_dump(), "image_shape": list(schema.input_shape or ()),
            "image_mean": state["mean"], "image_std": state["std"]}


def transferable(model_state: dict, init_state: dict) -> tuple[dict, list[str]]:
    """The tensors of `init_state` that fit the new model by name and shape, and the names that start fresh."""
    kept = {k: v for k, v in init_state.items() if k in model_state and tuple(v.shape) == tuple(model_state[k].shape)}
    return kept, sorted(set(model_state) - set(kept))


def make_trainer(config: dict, datasets: dict, params: TrainParams, storage: str, name: str,
                 callbacks: list | None = None):
    """The TorchTrainer for one run: the datasets it shards, ScalingConfig, failure policy and
    checkpoints from params."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.train.ingest import ingest_config
    from pipeline.train.loop import train_loop_per_worker

    # Ray Train passes these from the driver's environment to its controller and workers.
    # The controller polls workers every 2 s by default and a report waits for the previous
    # one to be consumed, which made a 0.1 s epoch take 2 s; a short interval keeps epochs
    # honest. The print patch copies every worker print into the log a second time.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # The fault drill's once-only marker lives beside the run's checkpoints when those are on
    # a filesystem; with object storage, in the node's temp folder.
    marker_root = storage if "://" not in storage else tempfile.gettempdir()
    config = {**config, "drill_marker": os.path.join(marker_root, name, "fault_drill.done")}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        datasets=datasets,
        dataset_config=ingest_config(params, config["spec"]["n_features"]),
        torch_config=TorchConfig(backend="nccl" if params.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=params.num_workers,
            use_gpu=params.use_gpu,
            resources_per_worker={"CPU": params.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=params.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=params.num_to_keep),
            # The workers print one line per epoch; Ray Train's per-report INFO lines drown it.
            logging_config=LoggingConfig(log_level="WARNING"),
            callbacks=callbacks or None,
        ),
    )


def read_checkpoint(checkpoint) -> dict:
    """The loop's state from a Ray Train checkpoint (local or remote storage)."""
    from pipeline.train.loop import STATE_FILE, load_state

    with checkpoint.as_directory() as d:
        return load_state(os.path.join(d, STATE_FILE), "cpu")


def n_inputs(state: dict) -> int:
    """The network's input width: one per fitted output column of the preprocessing, or, for
    image files, one per pixel and channel at the training size, then the fitted outputs of
    a manifest's extra columns."""
    from pipeline.preprocess import extras_state, is_images

    if is_images(state):
        extras = extras_state(state)
        return (3 if state["mode"] == "RGB" else 1) * state["size"] ** 2 + (len(extras["outputs"]) if extras else 0)
    return len(state["outputs"])


def pretrained_backbone(spec: ModelSpec, weights: dict, source: str) -> tuple[dict, list[str]]:
    """The backbone tensors of a ResNet `spec` loaded from `weights` (torchvision naming,
    input channels adapted), and the names that start fresh (the head), as `transferable`
    gives them; a mismatch is a D2DError naming the file and the tensors."""
    from pipeline.train.models import build_model
    from pipeline.train.resnet import ResNet, load_backbone

    model = build_model(spec)
    if not isinstance(model, ResNet):
        raise D2DError(f"train.pretrained {source}: pretrained weights are for the resnet models, not {spec.kind}")
    try:
        loaded = load_backbone(model, weights)
    except ValueError as e:
        raise D2DError(f"train.pretrained {source}: {e}") from None
    state = model.state_dict()
    return {k: state[k] for k in loaded}, sorted(set(state) - set(loaded))


def train(
    train_data: Dataset, val_data: Dataset, schema: Schema, state: dict, params: TrainParams, storage: Path,
    init_state: dict | None = None, rows: int | None = None, pretrained: dict | None = None,
) -> TrainResult:
    """Fit the model from params with Ray Train's TorchTrainer; returns the best epoch's weights.

    `train_data` and `val_data` are Ray Datasets of raw split rows (read from the split files);
    the workers read them featurised, shard by shard; `rows`, their row count when known (from
    the files' footers). `init_state` (a state dict, for a warm start) initialises every
    tensor that fits the model; `pretrained` (a ResNet state dict in torchvision's naming)
    initialises the backbone, every tensor of it, and leaves the head new.
    """
    from pipeline.train.ingest import training_datasets
    from pipeline.train.models import build_model

    spec = model_spec(schema, n_inputs(state), params)
    config = loop_config(spec, schema, state, params)
    transfer: dict = {}
    if init_state is not None:
        kept, fresh = transferable(build_model(spec).state_dict(), init_state)
        if not kept:
            raise D2DError(f"train.init_from {params.init_from}: none of its weights fit a {spec.kind} model for these inputs")
        config["init_state"] = kept
        transfer = {"init_from": params.init_from, "transferred": len(kept), "fresh": fresh}
    if pretrained is not None:
        config["init_state"], fresh = pretrained_backbone(spec, pretrained, str(params.pretrained))
        transfer = {"pretrained": str(params.pretrained), "transferred": len(config["init_state"]), "fresh": fresh}
    _check_resources(params)
    datasets = training_datasets(train_data, val_data, schema, state, params, rows)
    name = f"d2d-train-{time.strftime('%Y%m%d-%H%M%S')}"
    trainer = make_trainer(config, datasets, params, storage_location(params, storage), name)
    started = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - started
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    saved = read_checkpoint(result.checkpoint)
    model = build_model(spec)
    model.load_state_dict(saved["best_model"])
    history = pd.DataFrame(saved["history"])
    best_epoch = int(history.loc[history["val_loss"].idxmin(), "epoch"])
    return TrainResult(model.eval(), spec, history, best_epoch, seconds, transfer)
