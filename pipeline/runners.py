"""One runner per stage of the table in pipeline/stages.py: read the stage's inputs, call the
pure step, write its outputs, return its summary. A runner touches only the files its table
entry declares (`files[name]`), so `d2d stage NAME` (the DVC stages) and the Prefect tasks,
which both call these, produce the same files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipeline.config import Params
from pipeline.data import io
from pipeline.data.keys import with_row_key
from pipeline.data.schema import Schema, schema_from_params
from pipeline.data.split import SPLITS
from pipeline.errors import DataError
from pipeline.project import raw_path
from pipeline.summaries import Cleaned, DataVersion, Evaluated, Registered, SplitSizes, Trained, Validated

if TYPE_CHECKING:
    from pipeline.evaluate import Scored
    from pipeline.stages import StageFiles
    from pipeline.train.trainer import TrainResult

RAW = "raw"  # pipeline.stages.RAW: the raw file's name in a StageFiles


def read_data_version(raw: Path, declared: str) -> DataVersion:
    """The raw file's md5 (what DVC records) and whether it matches the committed .dvc file;
    `declared` is data.raw as params give it."""
    if not raw.is_file():
        raise DataError(f"raw data not found: {raw} (run `d2d data demo` for the demo dataset, or `dvc pull`)")
    md5 = io.file_md5(raw)
    recorded = io.dvc_recorded_md5(raw)
    return DataVersion(str(declared), md5, recorded, recorded == md5)


def data_version(params: Params, files: StageFiles) -> DataVersion:
    """The data version, and the raw file cached and pushed to the DVC remote when it is the
    version DVC records; otherwise what to run to version it."""
    from dataclasses import replace

    from pipeline.versioning import push_tracked

    version = read_data_version(files[RAW], params.data.raw)
    if version.dvc_md5 is None:
        outcome = f"not tracked: run `dvc add {version.path}` to version it"
    elif not version.matches_dvc:
        outcome = f"differs from the DVC record: run `dvc add {version.path}` to version it"
    else:
        outcome = push_tracked(files[RAW], files.root)
    return replace(version, dvc=outcome)


def make_demo(params: Params, root: Path) -> dict[str, Any]:
    """Write the corrupted digits CSV to data.raw; deterministic, so a fresh clone gets the recorded md5."""
    from pipeline.data.demo import corrupt, digits_frame

    schema = schema_from_params(params.data)
    digits = digits_frame(schema).head(params.data.demo.rows)
    df, manifest = corrupt(digits, schema, params.data.demo.corrupt_fraction, params.data.demo.seed)
    out = io.write_csv(df, raw_path(params, root))
    return {"path": str(out), "rows": len(df), "md5": io.file_md5(out), "corrupted": manifest}


def validate(params: Params, files: StageFiles) -> Validated:
    from pipeline.data.validate import validate as check

    version = read_data_version(files[RAW], params.data.raw)
    schema = schema_from_params(params.data)
    # with no id column, each row gets its derived key here, once, from the raw values
    raw = with_row_key(io.read_table(files[RAW]), schema)
    docs = files["data_docs"] if params.validate_.data_docs else None
    # A fresh folder each run: GX adds pages to an existing site, and DVC records this one as
    # an output, so it must hold this run's docs only (or a note that they are off).
    io.fresh_dir(files["data_docs"])
    if docs is None:
        io.write_text("<p>Data Docs are off (validate.data_docs: false).</p>\n", files["data_docs"] / "index.html")
    report = check(raw, schema, params.validate_, docs)
    io.write_parquet(report.quarantine, files["quarantine"])
    summary = {**report.summary, "data_md5": version.md5, "data_path": version.path}
    if docs:
        summary["data_docs"] = str((docs / "index.html").relative_to(files.root))
    io.write_json(summary, files["validate_report"])
    if not report.passed:
        raise DataError("validation failed: " + "; ".join(report.reasons))
    io.write_parquet(report.valid, files["valid"])
    return Validated.from_report(summary)


def clean(params: Params, files: StageFiles) -> Cleaned:
    from pipeline.data.clean import clean as apply_rules

    result = apply_rules(io.read_table(files["valid"]), schema_from_params(params.data), params.clean)
    io.write_parquet(result.clean, files["clean"])
    io.write_parquet(result.removed, files["removed"])
    io.write_json(result.report, files["clean_report"])
    return Cleaned.from_report(result.report)


def split(params: Params, files: StageFiles) -> SplitSizes:
    """Split, check for leakage, and fit the preprocessing on the train split only."""
    from pipeline import preprocess
    from pipeline.data.split import leaked_ids, leaked_rows, split as assign

    schema = schema_from_params(params.data)
    splits = assign(io.read_table(files["clean"]), schema.target, schema.id_column, params.split, schema.regression)
    leaked = leaked_rows(splits, schema.feature_names)
    if leaked:
        shown = ", ".join(leaked_ids(splits, schema.feature_names, schema.id_column)[:3])
        raise DataError(
            f"{leaked} rows share their exact features with a row in another split ({schema.id_label} {shown}, ...); "
            "set clean.drop_duplicates: true so identical examples are removed before splitting"
        )
    for name in SPLITS:
        io.write_parquet(getattr(splits, name), files[name])
    state = preprocess.fit(splits.train, preprocess.preprocess_spec(schema, params.clean, params.preprocess))
    io.write_json(state, files["preprocess"])
    per_class = {} if schema.regression else {
        name: getattr(splits, name)[schema.target].astype(str).value_counts().sort_index().to_dict() for name in SPLITS
    }
    report = {
        "sizes": splits.sizes(),
        "strategy": params.split.strategy,
        "seed": params.split.seed,
        "per_class": per_class,
        "leaked_rows": leaked,
        "model_inputs": len(state["outputs"]),
    }
    io.write_json(report, files["split_report"])
    return SplitSizes.from_report(report)


def train(params: Params, files: StageFiles) -> Trained:
    """Tune first when tune.enabled (the best config then trains), warm-start from
    train.init_from when set, and train with Ray Train."""
    from pipeline.ray_runtime import cpus_for_training, ray_session
    from pipeline.train.models import save_model
    from pipeline.train.trainer import train as fit

    schema = schema_from_params(params.data)
    train_df, val_df = io.read_table(files["train"]), io.read_table(files["val"])
    state = io.read_json(files["preprocess"])
    pinned, init_state = _warm_start(params, files.root)
    with ray_session(params.train, cpus_needed=cpus_for_training(params)):
        tuned, trials = _tune(params, train_df, val_df, schema, state, files["ray_storage"])
        train_params = params.train.model_copy(update=tuned["best_config"]) if tuned["enabled"] else params.train
        result = fit(train_df, val_df, schema, state, train_params, files["ray_storage"], init_state)
    io.write_json(tuned, files["tune_report"])
    io.write_csv(trials, files["tune_trials"])
    files["model"].parent.mkdir(parents=True, exist_ok=True)
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


def _tune(params: Params, train_df: pd.DataFrame, val_df: pd.DataFrame, schema: Schema, state: dict[str, Any],
          storage: Path) -> tuple[dict[str, Any], pd.DataFrame]:
    """The search (when tune.enabled): what tune.json records, and every trial's epochs (a
    DVC out either way, so empty when tuning is off)."""
    if not params.tune.enabled:
        return {"enabled": False}, pd.DataFrame(columns=["trial", "epoch", "val_loss"])
    from pipeline.train.tune import tune

    found = tune(train_df, val_df, schema, state, params.train, params.tune, storage)
    return {"enabled": True, "best_config": found.best_config, "best_trial": found.best_trial,
            "best_val_loss": found.best_val_loss, "trials": found.summary, "seconds": round(found.seconds, 2)}, found.trials


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
        **({"init_from": result.transfer["init_from"], "init_from_version": pinned,
            "transferred_tensors": result.transfer["transferred"], "fresh_tensors": result.transfer["fresh"]}
           if result.transfer else {}),
    }


def evaluate(params: Params, files: StageFiles) -> Evaluated:
    """Score val and test, draw the plots, log the run, its datasets and the raw-row model to
    MLflow; the files' lineage adds to the run's tags (the flow passes its flow run id)."""
    from pipeline import evaluate as ev
    from pipeline.train.models import load_model

    schema = schema_from_params(params.data)
    model, spec = load_model(str(files["model"]))
    state = io.read_json(files["preprocess"])
    frames = {name: io.read_table(files[name]) for name in SPLITS}
    scored = {name: ev.score_split(model, frames[name], schema, state) for name in ("val", "test")}
    metrics = {f"{name}_{k}": v for name in ("val", "test") for k, v in ev.split_metrics(scored[name], schema).items()}
    test = scored["test"]
    draw = _regression_plots if schema.regression else _classification_plots
    plots, chosen, shown = draw(test, metrics, schema, params, files)
    attributions = ev.gradient_attributions(model, test.x[chosen], test.y[chosen] if not schema.regression
                                            else np.zeros(len(chosen), dtype=int))
    plots.append(ev.plot_attributions(test.x[chosen], attributions, shown, state["outputs"], schema.image_shape,
                                      files["attributions"]))
    metrics |= _slice_metrics(frames["test"], test, schema, params, files["slices"])
    history = io.read_csv(files["history"])
    train_report = io.read_json(files["train_report"])
    plots.append(ev.plot_learning_curves(history, files["learning_curves"], train_report["best_epoch"]))
    run_id, model_uri = _log_run(params, files, metrics, history, plots, model, spec.n_features, schema, frames,
                                 train_report)
    report = {**{k: round(v, 6) for k, v in metrics.items()}, "mlflow_run_id": run_id, "model_uri": model_uri}
    io.write_json(report, files["metrics"])
    return Evaluated.from_report(report)


def _regression_plots(test: Scored, metrics: dict[str, float], schema: Schema, params: Params,
                      files: StageFiles) -> tuple[list[Path], np.ndarray, list[str]]:
    """Predicted against actual; dvc.yaml declares the classification plots too, and for
    regression they say so. Returns the plots, the rows to explain and their captions."""
    from pipeline import evaluate as ev

    plots = [ev.plot_predicted_vs_actual(test.y, test.out, files["test_predictions"],
                                         f"test split, R² {metrics['test_r2']:.3f}")]
    io.write_csv(pd.DataFrame(columns=["class", "f1"]), files["per_class"])
    for name in ("per_class_f1", "roc_curves"):
        ev.plot_not_applicable(files[name], f"{name}: not applicable to regression")
    chosen = np.arange(min(10, len(test.x)))
    return plots, chosen, [f"{v:.3g}" for v in test.y[chosen]]


def _classification_plots(test: Scored, metrics: dict[str, float], schema: Schema, params: Params,
                          files: StageFiles) -> tuple[list[Path], np.ndarray, list[str]]:
    """Confusion matrix, per-class F1 and ROC curves, and the per-class table. Returns the
    plots, a few test rows per class to explain and their captions (true → predicted)."""
    from pipeline import evaluate as ev

    classes = list(schema.classes)
    predicted = test.predicted()
    per_class = ev.per_class_metrics(test.y, test.out, classes)
    io.write_csv(per_class, files["per_class"])
    plots = [
        ev.plot_confusion_matrix(ev.confusion(test.y, predicted, schema.n_outputs), classes, files["test_predictions"],
                                 f"test split, accuracy {metrics['test_accuracy']:.3f}"),
        ev.plot_per_class_f1(per_class, files["per_class_f1"], f"test F1 per class (macro {metrics['test_f1_macro']:.3f})"),
        ev.plot_roc_curves(test.y, test.out, classes, files["roc_curves"],
                           f"test ROC, one-vs-rest (macro AUC {metrics['test_roc_auc_ovr']:.3f})"),
    ]
    chosen = ev.examples_per_class(test.y, schema.n_outputs, params.evaluate.attribution_examples)
    return plots, chosen, [f"{classes[t]} → {classes[p]}" for t, p in zip(test.y[chosen], predicted[chosen])]


def _slice_metrics(frame: pd.DataFrame, test: Scored, schema: Schema, params: Params, out: Path) -> dict[str, float]:
    """evaluate.slice_column's groups to `out` (empty when unset), and the worst group's metric."""
    from pipeline import evaluate as ev

    slices, worst = pd.DataFrame(), {}
    if params.evaluate.slice_column:
        slices = ev.slice_metrics(frame[params.evaluate.slice_column], test.y, test.predicted(), schema.regression,
                                  params.evaluate.slice_bins)
        key = "rmse" if schema.regression else "f1_macro"
        worst[f"test_worst_slice_{key}"] = float(slices[key].max() if schema.regression else slices[key].min())
    io.write_csv(slices, out)
    return worst


REPORTS_LOGGED = ("validate_report", "clean_report", "split_report", "train_report", "tune_report", "per_class", "slices")


def _log_run(params: Params, files: StageFiles, metrics: dict[str, float], history: pd.DataFrame, plots: list[Path],
             model: Any, n_inputs: int, schema: Schema, frames: dict[str, pd.DataFrame],
             train_report: dict[str, Any]) -> tuple[str, str]:
    """One MLflow run: params, curves, metrics, plots and reports, the splits as datasets, the
    Data Docs and the raw-row model, tagged with the data version and the weights' lineage."""
    from pipeline import tracking

    validation = io.read_json(files["validate_report"])
    tracking.configure(files.root)
    tracking.reachable(tracking.ping)
    reports = [files[n] for n in REPORTS_LOGGED if files[n].is_file()]
    return tracking.log_pipeline_run(
        params=params,
        metrics=metrics,
        history=history,
        artifacts=[*plots, *reports, files["preprocess"]],
        root=files.root,
        model=model,  # the network evaluated above, exported as is
        n_inputs=n_inputs,
        preprocess_path=files["preprocess"],
        example=io.read_table(files["valid"]).head(5),
        schema=schema,
        tags={"d2d.data_md5": validation["data_md5"], "d2d.data_path": validation["data_path"],
              **_training_tags(Trained.from_report(train_report), files), **files.lineage},
        trials=io.read_csv(files["tune_trials"]) if params.tune.enabled else None,
        datasets=frames,
        data_docs=files["data_docs"] if files["data_docs"].is_dir() else None,
    )


def _training_tags(trained: Trained, files: StageFiles) -> dict[str, str]:
    """Lineage of the weights: the warm start they came from and the tuned config, when any."""
    tuned = io.read_json(files["tune_report"]) if files["tune_report"].is_file() else {}
    tags = {"d2d.init_from": trained.init_from_version} if trained.init_from is not None else {}
    if tuned.get("enabled"):
        tags |= {"d2d.tuned_config": json.dumps(tuned["best_config"]), "d2d.tune_best_trial": tuned["best_trial"]}
    return tags


def register(params: Params, files: StageFiles) -> Registered:
    """Register the evaluated model and gate it against the champion on the current test split."""
    from dataclasses import asdict

    from pipeline import registry, tracking

    evaluated = Evaluated.from_report(io.read_json(files["metrics"]))
    tracking.configure(files.root)
    tracking.reachable(tracking.ping)
    decision = tracking.reachable(lambda: registry.register_and_gate(
        evaluated, params.register_, params.data.task, io.read_table(files["test"]), schema_from_params(params.data)))
    io.write_json(asdict(decision), files["register_report"])
    return decision
