"""One function per pipeline stage: read the stage's inputs from disk, call the pure step,
write its outputs. `d2d stage NAME` (the DVC stages) and the Prefect tasks both call these,
so the two ways of running the pipeline produce the same files."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Params
from pipeline.data import io
from pipeline.data.keys import with_row_key
from pipeline.data.schema import schema_from_params
from pipeline.data.split import SPLITS
from pipeline.errors import ConfigError, DataError


@dataclass(frozen=True)
class Paths:
    """Where each stage writes, relative to the project root (mirrored in dvc.yaml)."""

    root: Path

    @property
    def valid(self) -> Path:
        return self.root / "data/validated/valid.parquet"

    @property
    def quarantine(self) -> Path:
        return self.root / "data/quarantine/validate.parquet"

    @property
    def removed(self) -> Path:
        return self.root / "data/quarantine/clean.parquet"

    @property
    def clean(self) -> Path:
        return self.root / "data/clean/clean.parquet"

    def split(self, name: str) -> Path:
        return self.root / f"data/split/{name}.parquet"

    @property
    def preprocess(self) -> Path:
        return self.root / "data/split/preprocess.json"

    @property
    def data_docs(self) -> Path:
        return self.root / "reports/data_docs"

    @property
    def model(self) -> Path:
        return self.root / "models/model.pt"

    @property
    def history(self) -> Path:
        return self.root / "reports/history.csv"

    @property
    def ray_storage(self) -> Path:
        return self.root / "artifacts/ray"

    def report(self, name: str) -> Path:
        return self.root / "reports" / name


def inside_project(path: Path, root: Path) -> bool:
    """Whether `path` stays in the project folder both as written (no `..` or absolute path
    out of it) and where its symbolic links lead."""
    lexical = Path(os.path.normpath(os.path.abspath(path)))
    return lexical.is_relative_to(os.path.abspath(root)) and path.resolve().is_relative_to(root.resolve())


def raw_path(params: Params, root: Path) -> Path:
    """The raw file, relative to the project root. A data.raw that leaves the project (an
    absolute path, `..`, or a symlink out) is refused unless named on the command line
    (`--set data.raw=PATH`): a params file, which may be generated or shared, cannot point
    d2d at a file elsewhere on the machine."""
    path = root / params.data.raw
    if params.raw_named_explicitly:
        return path
    if not inside_project(path, root):
        raise ConfigError(
            f"data.raw '{params.data.raw}' is outside the project folder {os.path.abspath(root)}: copy the file into "
            f"the project (e.g. data/raw/{path.name}) and set data.raw to that relative path, or name it explicitly "
            f"on the command line with --set data.raw={os.path.normpath(os.path.abspath(path))}"
        )
    return path


def data_version(params: Params, root: Path) -> dict[str, Any]:
    """The raw file's md5 (what DVC records) and whether it matches the committed .dvc file."""
    raw = raw_path(params, root)
    if not raw.is_file():
        raise DataError(f"raw data not found: {raw} (run `d2d data demo` for the demo dataset, or `dvc pull`)")
    md5 = io.file_md5(raw)
    recorded = io.dvc_recorded_md5(raw)
    return {"path": str(params.data.raw), "md5": md5, "dvc_md5": recorded, "matches_dvc": recorded == md5}


def run_data_version(params: Params, root: Path) -> dict[str, Any]:
    """The data version, and the raw file cached and pushed to the DVC remote when it is the
    version DVC records; otherwise what to run to version it."""
    from pipeline.versioning import push_tracked

    version = data_version(params, root)
    raw = version["path"]
    if version["dvc_md5"] is None:
        version["dvc"] = f"not tracked: run `dvc add {raw}` to version it"
    elif not version["matches_dvc"]:
        version["dvc"] = f"differs from the DVC record: run `dvc add {raw}` to version it"
    else:
        version["dvc"] = push_tracked(raw_path(params, root), root)
    return version


def make_demo(params: Params, root: Path) -> dict[str, Any]:
    """Write the corrupted digits CSV; deterministic, so a fresh clone gets the recorded md5."""
    from pipeline.data.demo import corrupt, digits_frame

    schema = schema_from_params(params.data)
    digits = digits_frame(schema).head(params.data.demo.rows)
    df, manifest = corrupt(digits, schema, params.data.demo.corrupt_fraction, params.data.demo.seed)
    out = io.write_csv(df, raw_path(params, root))
    return {"path": str(out), "rows": len(df), "md5": io.file_md5(out), "corrupted": manifest}


def run_validate(params: Params, root: Path) -> dict[str, Any]:
    from pipeline.data.validate import validate

    paths = Paths(root)
    version = data_version(params, root)
    schema = schema_from_params(params.data)
    # with no id column, each row gets its derived key here, once, from the raw values
    raw = with_row_key(io.read_table(raw_path(params, root)), schema)
    docs = paths.data_docs if params.validate_.data_docs else None
    # A fresh folder each run: GX adds pages to an existing site, and DVC records this one as
    # an output, so it must hold this run's docs only (or a note that they are off).
    shutil.rmtree(paths.data_docs, ignore_errors=True)
    paths.data_docs.mkdir(parents=True)
    if docs is None:
        (paths.data_docs / "index.html").write_text("<p>Data Docs are off (validate.data_docs: false).</p>\n")
    report = validate(raw, schema, params.validate_, docs)
    io.write_parquet(report.quarantine, paths.quarantine)
    summary = {**report.summary, "data_md5": version["md5"], "data_path": version["path"]}
    if docs:
        summary["data_docs"] = str((docs / "index.html").relative_to(root))
    io.write_json(summary, paths.report("validate.json"))
    if not report.passed:
        raise DataError("validation failed: " + "; ".join(report.reasons))
    io.write_parquet(report.valid, paths.valid)
    return summary


def run_clean(params: Params, root: Path) -> dict[str, Any]:
    from pipeline.data.clean import clean

    paths = Paths(root)
    result = clean(io.read_table(paths.valid), schema_from_params(params.data), params.clean)
    io.write_parquet(result.clean, paths.clean)
    io.write_parquet(result.removed, paths.removed)
    io.write_json(result.report, paths.report("clean.json"))
    return result.report


def run_split(params: Params, root: Path) -> dict[str, Any]:
    """Split, check for leakage, and fit the preprocessing on the train split only."""
    from pipeline import preprocess
    from pipeline.data.clean import preprocess_spec
    from pipeline.data.split import leaked_ids, leaked_rows, split

    paths = Paths(root)
    schema = schema_from_params(params.data)
    splits = split(io.read_table(paths.clean), schema.target, schema.id_column, params.split, schema.regression)
    leaked = leaked_rows(splits, schema.feature_names)
    if leaked:
        shown = ", ".join(leaked_ids(splits, schema.feature_names, schema.id_column)[:3])
        raise DataError(
            f"{leaked} rows share their exact features with a row in another split ({schema.id_label} {shown}, ...); "
            "set clean.drop_duplicates: true so identical examples are removed before splitting"
        )
    for name in SPLITS:
        io.write_parquet(getattr(splits, name), paths.split(name))
    state = preprocess.fit(splits.train, preprocess_spec(schema, params.clean, params.preprocess))
    io.write_json(state, paths.preprocess)
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
    io.write_json(report, paths.report("split.json"))
    return report


def run_train(params: Params, root: Path) -> dict[str, Any]:
    """Tune first when tune.enabled (the best config then trains), warm-start from
    train.init_from when set, and train with Ray Train."""
    import pandas as pd

    from pipeline.ray_runtime import cpus_for_training, ray_session
    from pipeline.train.models import save_model
    from pipeline.train.trainer import train

    paths = Paths(root)
    schema = schema_from_params(params.data)
    train_df, val_df = io.read_table(paths.split("train")), io.read_table(paths.split("val"))
    state = io.read_json(paths.preprocess)
    train_params, tuned = params.train, {"enabled": False}
    trials = pd.DataFrame(columns=["trial", "epoch", "val_loss"])  # a DVC out either way
    init_state, pinned = None, None
    if params.train.init_from:
        from pipeline import tracking

        tracking.configure(root)
        pinned = tracking.pin_version(params.train.init_from)
        init_state = tracking.network_weights(pinned)
    with ray_session(params.train, cpus_needed=cpus_for_training(params)):
        if params.tune.enabled:
            from pipeline.train.tune import tune

            found = tune(train_df, val_df, schema, state, params.train, params.tune, paths.ray_storage)
            trials = found.trials
            train_params = params.train.model_copy(update=found.best_config)
            tuned = {"enabled": True, "best_config": found.best_config, "best_trial": found.best_trial,
                     "best_val_loss": found.best_val_loss, "trials": found.summary, "seconds": round(found.seconds, 2)}
        result = train(train_df, val_df, schema, state, train_params, paths.ray_storage, init_state)
    io.write_json(tuned, paths.report("tune.json"))
    io.write_csv(trials, paths.report("tune_trials.csv"))
    paths.model.parent.mkdir(parents=True, exist_ok=True)
    save_model(result.model, result.spec, str(paths.model))
    io.write_csv(result.history, paths.history)
    best = result.history.loc[result.history["epoch"] == result.best_epoch].iloc[0]
    report = {
        "epochs_run": len(result.history),
        "best_epoch": result.best_epoch,
        "best_val_loss": float(best["val_loss"]),
        **{f"best_{k}": float(best[k]) for k in ("val_accuracy", "val_rmse") if k in best},
        "train_seconds": round(result.seconds, 2),
        "num_workers": train_params.num_workers,
        **({"tuned": tuned["best_config"]} if tuned["enabled"] else {}),
        **({"init_from": result.transfer["init_from"], "init_from_version": pinned,
            "transferred_tensors": result.transfer["transferred"], "fresh_tensors": result.transfer["fresh"]}
           if result.transfer else {}),
    }
    io.write_json(report, paths.report("train.json"))
    return report


def run_evaluate(params: Params, root: Path, tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Score val and test, draw the plots, log the run, its datasets and the raw-row model to
    MLflow. `tags` adds to the run's lineage tags (the flow passes its flow run id)."""
    import pandas as pd

    from pipeline import tracking
    from pipeline import evaluate as ev
    from pipeline.preprocess import unscale_target
    from pipeline.train.models import load_model
    from pipeline.train.trainer import features_and_labels

    paths = Paths(root)
    schema = schema_from_params(params.data)
    model, spec = load_model(str(paths.model))
    state = io.read_json(paths.preprocess)
    metrics: dict[str, float] = {}
    frames = {name: io.read_table(paths.split(name)) for name in SPLITS}
    scored = {}
    for name in ("val", "test"):
        x, y = features_and_labels(frames[name], schema, state)
        if name == "test":
            x_test = x  # the attributions below explain test rows
        if schema.regression:
            scored[name] = (frames[name][schema.target].to_numpy(dtype="float64"),
                            unscale_target(ev.predict(model, x)[:, 0], state))
            metrics |= {f"{name}_{k}": v for k, v in ev.regression_metrics(*scored[name]).items()}
        else:
            scored[name] = (y, ev.predict_proba(model, x))
            metrics |= {f"{name}_{k}": v for k, v in ev.classification_metrics(*scored[name]).items()}
    y_test, out_test = scored["test"]
    plots = []
    if schema.regression:
        pred_test = out_test
        plots.append(ev.plot_predicted_vs_actual(y_test, out_test, paths.report("test_predictions.png"),
                                                 f"test split, R² {metrics['test_r2']:.3f}"))
        # dvc.yaml declares the classification plots too; for regression they say so
        io.write_csv(pd.DataFrame(columns=["class", "f1"]), paths.report("per_class.csv"))
        for name in ("per_class_f1.png", "roc_curves.png"):
            ev.plot_not_applicable(paths.report(name), f"{name.removesuffix('.png')}: not applicable to regression")
        chosen = np.arange(min(10, len(x_test)))
        attr = ev.gradient_attributions(model, x_test[chosen], np.zeros(len(chosen), dtype=int))
        shown = [f"{v:.3g}" for v in y_test[chosen]]
    else:
        classes = list(schema.classes)
        pred_test = out_test.argmax(1)
        per_class = ev.per_class_metrics(y_test, out_test, classes)
        io.write_csv(per_class, paths.report("per_class.csv"))
        plots += [
            ev.plot_confusion_matrix(ev.confusion(y_test, pred_test, schema.n_outputs), classes,
                                     paths.report("test_predictions.png"), f"test split, accuracy {metrics['test_accuracy']:.3f}"),
            ev.plot_per_class_f1(per_class, paths.report("per_class_f1.png"), f"test F1 per class (macro {metrics['test_f1_macro']:.3f})"),
            ev.plot_roc_curves(y_test, out_test, classes, paths.report("roc_curves.png"),
                               f"test ROC, one-vs-rest (macro AUC {metrics['test_roc_auc_ovr']:.3f})"),
        ]
        chosen = ev.examples_per_class(y_test, schema.n_outputs, params.evaluate.attribution_examples)
        attr = ev.gradient_attributions(model, x_test[chosen], y_test[chosen])
        shown = [f"{classes[t]} → {classes[p]}" for t, p in zip(y_test[chosen], pred_test[chosen])]
    plots.append(ev.plot_attributions(x_test[chosen], attr, shown, state["outputs"], schema.image_shape,
                                      paths.report("attributions.png")))
    slices = pd.DataFrame()
    if params.evaluate.slice_column:
        slices = ev.slice_metrics(frames["test"][params.evaluate.slice_column], y_test, pred_test, schema.regression,
                                  params.evaluate.slice_bins)
        key = "rmse" if schema.regression else "f1_macro"
        metrics[f"test_worst_slice_{key}"] = float(slices[key].max() if schema.regression else slices[key].min())
    io.write_csv(slices, paths.report("slices.csv"))
    history = pd.read_csv(paths.history)
    train_report = io.read_json(paths.report("train.json"))
    plots.append(ev.plot_learning_curves(history, paths.report("learning_curves.png"), train_report["best_epoch"]))
    validation = io.read_json(paths.report("validate.json"))

    tracking.configure(root)
    tracking.reachable(tracking.ping)
    reports = [paths.report(n) for n in ("validate.json", "clean.json", "split.json", "train.json", "tune.json",
                                         "per_class.csv", "slices.csv") if paths.report(n).is_file()]
    run_id, model_uri = tracking.log_pipeline_run(
        params=params,
        metrics=metrics,
        history=history,
        artifacts=[*plots, *reports, paths.preprocess],
        root=root,
        model=model,  # the network evaluated above, exported as is
        n_inputs=spec.n_features,
        preprocess_path=paths.preprocess,
        example=io.read_table(paths.valid).head(5),
        schema=schema,
        tags={"d2d.data_md5": validation["data_md5"], "d2d.data_path": validation["data_path"],
              **_training_tags(train_report, paths), **(tags or {})},
        trials=pd.read_csv(paths.report("tune_trials.csv")) if params.tune.enabled else None,
        datasets={name: frames[name] for name in SPLITS},
        data_docs=paths.data_docs if paths.data_docs.is_dir() else None,
    )
    report = {**{k: round(v, 6) for k, v in metrics.items()}, "mlflow_run_id": run_id, "model_uri": model_uri}
    io.write_json(report, paths.report("metrics.json"))
    return report


def _training_tags(trained: dict[str, Any], paths: Paths) -> dict[str, str]:
    """Lineage of the weights (`trained`: train.json): the warm start they came from and the
    tuned config, when any."""
    import json

    tuned = io.read_json(paths.report("tune.json")) if paths.report("tune.json").is_file() else {}
    tags = {"d2d.init_from": trained["init_from_version"]} if "init_from" in trained else {}
    if tuned.get("enabled"):
        tags |= {"d2d.tuned_config": json.dumps(tuned["best_config"]), "d2d.tune_best_trial": tuned["best_trial"]}
    return tags


def run_register(params: Params, root: Path) -> dict[str, Any]:
    """Register the evaluated model and gate it against the champion on the current test split."""
    from pipeline import registry, tracking

    paths = Paths(root)
    metrics = io.read_json(paths.report("metrics.json"))
    tracking.configure(root)
    tracking.reachable(tracking.ping)
    decision = tracking.reachable(lambda: registry.register_and_gate(
        metrics, params.register_, params.data.task, io.read_table(paths.split("test")), schema_from_params(params.data)))
    io.write_json(decision, paths.report("register.json"))
    return decision


STAGES = {
    "validate": run_validate,
    "clean": run_clean,
    "split": run_split,
    "train": run_train,
    "evaluate": run_evaluate,
    "register": run_register,
}
