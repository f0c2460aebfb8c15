"""Hyperparameter search: Ray Tune with an ASHA scheduler over Ray Train runs.

Each trial is a Tune function that builds a TorchTrainer (Ray Train V2 has no
`Tuner(trainer)`) and forwards every epoch's report to Tune with TuneReportCallback, so
ASHA can stop weak trials after `grace_period` epochs. The driver side only: MLflow child
runs are logged later from the trials table this returns.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from pipeline.config import SearchDim, TrainParams, TuneParams
from pipeline.data.schema import Schema
from pipeline.errors import D2DError

if TYPE_CHECKING:
    from ray.data import Dataset

METRIC, MODE = "val_loss", "min"
HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "val_accuracy", "val_rmse", "lr", "samples_per_s", "epoch_s"]


@dataclass
class TuneResult:
    best_config: dict[str, Any]  # the sampled values only; the rest comes from train params
    best_trial: str
    best_val_loss: float
    trials: pd.DataFrame  # one row per trial and epoch, with the trial's config
    summary: list[dict[str, Any]]  # one entry per trial
    seconds: float


def search_space(space: dict[str, SearchDim]) -> dict[str, Any]:
    """params' search space as Ray Tune sampling domains."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, dim in space.items():
        if dim.loguniform:
            out[key] = tune.loguniform(*dim.loguniform)
        elif dim.uniform:
            out[key] = tune.uniform(*dim.uniform)
        else:
            out[key] = tune.choice(dim.choice)
    return out


def trial_params(base: TrainParams, sampled: dict[str, Any]) -> TrainParams:
    """The train params one trial runs with; an impossible combination fails that trial with the reason."""
    return TrainParams.model_validate({**base.model_dump(), **sampled})


def _trial(config: dict[str, Any], datasets: dict, schema: Schema, state: dict, base: TrainParams, storage: str,
           name: str) -> None:
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.train.trainer import loop_config, make_trainer, model_spec, n_inputs

    params = trial_params(base, config)
    run_name = f"{name}-{ray.tune.get_context().get_trial_id()}"
    spec = model_spec(schema, n_inputs(state), params)
    trainer = make_trainer(loop_config(spec, schema, state, params), datasets, params, storage, run_name,
                           callbacks=[TuneReportCallback()])
    trainer.fit()


def _cell(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def tune(
    train_data: Dataset, val_data: Dataset, schema: Schema, state: dict, params: TrainParams,
    tune_params: TuneParams, storage: Path, rows: int | None = None,
) -> TuneResult:
    """Search `tune_params.space` with ASHA on validation loss; returns the best config and every trial's history.

    Every trial reads the same featurised datasets: what travels to a trial is the datasets'
    plan (or, when cached, references to the same blocks in the object store), not a copy.
    A sampled batch size applies to the trial's loop; the shuffle is the base params'.
    """
    from ray import tune as rt
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from pipeline.train.ingest import training_datasets
    from pipeline.train.trainer import storage_location

    epochs = tune_params.epochs or params.epochs
    # A trial is short and disposable: fewer workers, no fault drill, no warm start.
    base = params.model_copy(update={"num_workers": tune_params.workers_per_trial, "epochs": epochs,
                                     "fail_at_epoch": None, "init_from": None, "max_failures": 0})
    where = storage_location(params, storage)
    name = f"d2d-tune-{time.strftime('%Y%m%d-%H%M%S')}"
    datasets = training_datasets(train_data, val_data, schema, state, base, rows)
    trainable = rt.with_parameters(_trial, datasets=datasets, schema=schema, state=state,
                                   base=base, storage=where, name=name)
    tuner = rt.Tuner(
        trainable,
        param_space=search_space(tune_params.space),
        tune_config=rt.TuneConfig(
            metric=METRIC,
            mode=MODE,
            num_samples=tune_params.num_samples,
            scheduler=ASHAScheduler(time_attr="training_iteration", max_t=epochs,
                                    grace_period=min(tune_params.grace_period, epochs),
                                    reduction_factor=tune_params.reduction_factor),
            # The generator enforces the concurrency itself (TuneConfig.max_concurrent_trials
            # is ignored for it): trials beyond the CPUs would starve each other's workers.
            search_alg=BasicVariantGenerator(random_state=tune_params.seed, max_concurrent=tune_params.max_concurrent),
        ),
        run_config=rt.RunConfig(name=name, storage_path=where, verbose=1),
    )
    started = time.perf_counter()
    grid = tuner.fit()
    seconds = time.perf_counter() - started

    frames, summary = [], []
    for result in grid:
        trial = str(result.metrics.get("trial_id") or result.path.rstrip("/").rsplit("/", 1)[-1])
        entry = {"trial": trial, "config": result.config, "epochs_run": 0, "best_val_loss": None,
                 "error": str(result.error).splitlines()[0] if result.error else None}
        df = result.metrics_dataframe
        if df is not None and METRIC in df:
            df = df[[c for c in HISTORY_COLUMNS if c in df]].assign(trial=trial)
            for key, value in result.config.items():
                df[f"config.{key}"] = _cell(value)
            frames.append(df)
            entry |= {"epochs_run": len(df), "best_val_loss": float(df[METRIC].min())}
        summary.append(entry)
    finished = [s for s in summary if s["best_val_loss"] is not None]
    if not finished:
        raise D2DError(f"tuning: all {len(summary)} trials failed; the first: {summary[0]['error'] if summary else 'none ran'}")
    best = min(finished, key=lambda s: s["best_val_loss"])
    return TuneResult(best["config"], best["trial"], best["best_val_loss"], pd.concat(frames, ignore_index=True),
                      summary, seconds)
