"""The evaluate stage's runner: metrics, plots and the MLflow run with the raw-row model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipeline.config import Params
from pipeline.data import io
from pipeline.data.schema import Schema, schema_from_params
from pipeline.data.split import SPLITS
from pipeline.summaries import Evaluated, Trained, Validated

if TYPE_CHECKING:
    from pipeline.evaluate import Scored
    from pipeline.stages import StageFiles


def evaluate(params: Params, files: StageFiles) -> Evaluated:
    """Score val and test, draw the plots, log the run, its datasets and the raw-row model to
    MLflow; the files' lineage adds to the run's tags (the flow passes its flow run id)."""
    from pipeline import evaluate as ev
    from pipeline.train.models import load_model

    schema = schema_from_params(params.data)
    model, spec = load_model(str(files["model"]))
    state = io.read_json(files["preprocess"])
    keep = (params.evaluate.slice_column,) if params.evaluate.slice_column else ()
    # each split streams through in batches: memory holds a batch, the totals and a bounded sample
    from pipeline.train.trainer import n_inputs as width

    rows = io.score_rows(width(state))  # fewer at a time for images
    scored = {name: ev.score_split(model, io.read_batches(files[name], rows), schema, state, params.evaluate.sample_rows,
                                   keep, params.evaluate.attribution_examples) for name in ("val", "test")}
    metrics = {f"{name}_{k}": v for name in ("val", "test") for k, v in scored[name].metrics().items()}
    test = scored["test"]
    draw = _regression_plots if schema.regression else _classification_plots
    plots, shown = draw(test, metrics, schema, params, files)
    chosen = test.examples
    attributions = ev.gradient_attributions(model, chosen["x"], chosen["y"] if not schema.regression
                                            else np.zeros(len(chosen["y"]), dtype=int))
    plots.append(ev.plot_attributions(chosen["x"], attributions, shown, state["outputs"], schema.input_shape,
                                      files["attributions"]))
    metrics |= _slice_metrics(test, schema, params, files["slices"])
    history = io.read_csv(files["history"])
    trained = Trained.from_report(io.read_json(files["train_report"]))
    plots.append(ev.plot_learning_curves(history, files["learning_curves"], trained.best_epoch))
    run_id, model_uri = _log_run(params, files, metrics, history, plots, model, spec.n_features, schema, trained)
    report = {**{k: round(v, 6) for k, v in metrics.items()}, "mlflow_run_id": run_id, "model_uri": model_uri}
    io.write_json(report, files["metrics"])
    return Evaluated.from_report(report)


def _regression_plots(test: Scored, metrics: dict[str, float], schema: Schema, params: Params,
                      files: StageFiles) -> tuple[list[Path], list[str]]:
    """Predicted against actual; dvc.yaml declares the classification plots too, and for
    regression they say so. Returns the plots and the captions of the rows explained."""
    from pipeline import evaluate as ev

    plots = [ev.plot_predicted_vs_actual(test.y, test.out, files["test_predictions"],
                                         f"test split, R² {metrics['test_r2']:.3f}" + _sampled(test))]
    io.write_csv(pd.DataFrame(columns=["class", "f1"]), files["per_class"])
    for name in ("per_class_f1", "roc_curves"):
        ev.plot_not_applicable(files[name], f"{name}: not applicable to regression")
    return plots, [f"{v:.3g}" for v in test.examples["y"]]


def _classification_plots(test: Scored, metrics: dict[str, float], schema: Schema, params: Params,
                          files: StageFiles) -> tuple[list[Path], list[str]]:
    """Confusion matrix, per-class F1 and ROC curves, and the per-class table. Returns the
    plots and the captions (true → predicted) of the rows explained: the first few of each class."""
    from pipeline import evaluate as ev

    classes = list(schema.classes)
    per_class = test.per_class(classes)
    io.write_csv(per_class, files["per_class"])
    assert isinstance(test.totals, ev.ClassTotals)
    plots = [
        ev.plot_confusion_matrix(test.totals.confusion, classes, files["test_predictions"],
                                 f"test split, accuracy {metrics['test_accuracy']:.3f}"),
        ev.plot_per_class_f1(per_class, files["per_class_f1"], f"test F1 per class (macro {metrics['test_f1_macro']:.3f})"),
        ev.plot_roc_curves(test.y, test.out, classes, files["roc_curves"],
                           f"test ROC, one-vs-rest (macro AUC {metrics['test_roc_auc_ovr']:.3f})"
                           + _sampled(test)),
    ]
    chosen = test.examples
    return plots, [f"{classes[t]} → {classes[p]}" for t, p in zip(chosen["y"], chosen["out"].argmax(1))]


def _sampled(scored: Scored) -> str:
    """A plot title's note when it shows a sample of the split, not every row."""
    return "" if scored.sample.complete else f"\n(a uniform sample of {len(scored.y):,} of {scored.sample.seen:,} rows)"


def _slice_metrics(test: Scored, schema: Schema, params: Params, out: Path) -> dict[str, float]:
    """evaluate.slice_column's groups to `out` (empty when unset), and the worst group's metric;
    over the sample of the test split (all of it when it fits evaluate.sample_rows)."""
    from pipeline import evaluate as ev

    slices, worst = pd.DataFrame(), {}
    if params.evaluate.slice_column:
        column = params.evaluate.slice_column
        slices = ev.slice_metrics(pd.Series(test.sample[column], name=column), test.y, test.predicted(),
                                  schema.regression, params.evaluate.slice_bins)
        key = "rmse" if schema.regression else "f1_macro"
        worst[f"test_worst_slice_{key}"] = float(slices[key].max() if schema.regression else slices[key].min())
    io.write_csv(slices, out)
    return worst


REPORTS_LOGGED = ("validate_report", "clean_report", "split_report", "train_report", "tune_report", "per_class", "slices")


def _log_run(params: Params, files: StageFiles, metrics: dict[str, float], history: pd.DataFrame, plots: list[Path],
             model: Any, n_inputs: int, schema: Schema, trained: Trained) -> tuple[str, str]:
    """One MLflow run: params, curves, metrics, plots and reports, the splits as datasets, the
    Data Docs and the raw-row model, tagged with the data version and the weights' lineage."""
    from pipeline import tracking

    validated = Validated.from_report(io.read_json(files["validate_report"]))
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
        example=io.parquet_head(files["valid"], 5),
        schema=schema,
        tags={"d2d.data_md5": validated.data_md5, "d2d.data_path": validated.data_path,
              **_training_tags(trained, files), **files.lineage},
        trials=io.read_csv(files["tune_trials"]) if params.tune.enabled else None,
        datasets={name: files[name] for name in SPLITS},
        data_docs=files["data_docs"] if files["data_docs"].is_dir() else None,
    )


def _training_tags(trained: Trained, files: StageFiles) -> dict[str, str]:
    """Lineage of the weights: the warm start they came from and the tuned config, when any."""
    tuned = io.read_json(files["tune_report"]) if files["tune_report"].is_file() else {}
    tags = {"d2d.init_from": trained.init_from_version} if trained.init_from is not None else {}
    if tuned.get("enabled"):
        tags |= {"d2d.tuned_config": json.dumps(tuned["best_config"]), "d2d.tune_best_trial": tuned["best_trial"]}
    return tags
