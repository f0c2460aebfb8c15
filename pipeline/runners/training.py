"""The train stage's runner: warm start, tuning and Ray Train."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from pipeline.config import Params
from pipeline.data import io
from pipeline.data.schema import Schema, schema_from_params
from pipeline.errors import ConfigError
from pipeline.summaries import Trained

if TYPE_CHECKING:
    from ray.data import Dataset

    from pipeline.stages import StageFiles
    from pipeline.train.trainer import TrainResult


def train(params: Params, files: StageFiles) -> Trained:
    """Tune first when tune.enabled (the best config then trains), warm-start from
    train.init_from when set, and train with Ray Train."""
    from pipeline.ray_runtime import cpus_for_training, ray_session
    from pipeline.train.models import save_model
    from pipeline.train.trainer import train as fit

    from pipeline.preprocess import input_columns

    schema = schema_from_params(params.data)
    state = io.read_json(files["preprocess"])
    columns = [*input_columns(state), schema.target]
    pinned, init_state = _warm_start(params, files.root)
    pretrained = pretrained_weights(params, files.root)  # a bad file fails here, before Ray starts
    with ray_session(params.train, cpus_needed=cpus_for_training(params), dashboard=params.tune.enabled):
        # lazy Ray Datasets: the workers stream them; this process never holds a split. With
        # train.storage_path, the splits are read from a copy there, which every node can reach.
        storage = params.train.storage_path
        # train's row groups in a new order each epoch, for the local shuffle buffer to mix
        order = {"train": params.train.seed if params.train.shuffle == "local" else None, "val": None}
        train_data, val_data = (io.read_dataset(io.shared_copy(files[name], storage) if storage else files[name], columns,
                                                order[name]) for name in ("train", "val"))
        rows = io.parquet_rows(files["train"]) + io.parquet_rows(files["val"])
        tuned, trials = _tune(params, train_data, val_data, schema, state, files["ray_storage"], rows)
        train_params = params.train.model_copy(update=tuned["best_config"]) if tuned["enabled"] else params.train
        result = fit(train_data, val_data, schema, state, train_params, files["ray_storage"], init_state, rows,
                     pretrained)
    io.write_json(tuned, files["tune_report"])
    io.write_csv(trials, files["tune_trials"])
    save_model(result.model, result.spec, str(files["model"]))
    io.write_csv(result.history, files["history"])
    report = _train_report(result, train_params.num_workers, tuned, pinned)
    io.write_json(report, files["train_report"])
    return Trained.from_report(report)


def _warm_start(params: Params, root: Path) -> tuple[str | None, dict[str, Any] | None]:
    """train.init_from pinned to its version now, and that version's network weights; (None, None) when unset."""
    if not params.train.init_from:
        return None, None
    from pipeline import tracking

    tracking.configure(root)
    pinned = tracking.pin_version(params.train.init_from)
    return pinned, tracking.network_weights(pinned)


def pretrained_weights(params: Params, root: Path) -> dict[str, Any] | None:
    """train.pretrained's tensors, read from the file (relative to the project)."""
    if params.train.pretrained is None:
        return None
    from pipeline.train.resnet import read_weights

    try:
        return read_weights(root / params.train.pretrained)
    except ValueError as e:
        raise ConfigError(f"train.pretrained: {e}") from None


def _tune(params: Params, train_data: Dataset, val_data: Dataset, schema: Schema, state: dict[str, Any],
          storage: Path, rows: int) -> tuple[dict[str, Any], pd.DataFrame]:
    """The search (when tune.enabled): what tune.json records, and every trial's epochs (a
    DVC out either way, so empty when tuning is off)."""
    if not params.tune.enabled:
        return {"enabled": False}, pd.DataFrame(columns=["trial", "epoch", "val_loss"])
    from pipeline.train.tune import tune

    search = tune(train_data, val_data, schema, state, params.train, params.tune, storage, rows)
    return {"enabled": True, "best_config": search.best_config, "best_trial": search.best_trial,
            "best_val_loss": search.best_val_loss, "trials": search.summary, "seconds": round(search.seconds, 2)}, search.trials


def _train_report(result: TrainResult, num_workers: int, tuned: dict[str, Any], pinned: str | None) -> dict[str, Any]:
    """train.json: the best epoch's validation figures, the time, and where the weights came from."""
    best = result.history.loc[result.history["epoch"] == result.best_epoch].iloc[0]
    return {
        "epochs_run": len(result.history),
        "best_epoch": result.best_epoch,
        "best_val_loss": float(best["val_loss"]),
        **{f"best_{k}": float(best[k]) for k in ("val_accuracy", "val_rmse") if k in best},
        "train_seconds": round(result.seconds, 2),
        "num_workers": num_workers,
        **({"tuned": tuned["best_config"]} if tuned["enabled"] else {}),
        **({"init_from": result.transfer["init_from"], "init_from_version": pinned}
           if "init_from" in result.transfer else {}),
        **({"pretrained": result.transfer["pretrained"]} if "pretrained" in result.transfer else {}),
        **({"transferred_tensors": result.transfer["transferred"], "fresh_tensors": result.transfer["fresh"]}
           if result.transfer else {}),
    }
