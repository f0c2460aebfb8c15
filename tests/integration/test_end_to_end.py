"""End to end with the real components on a small sample of the demo data:
the Prefect test harness, a local Ray instance (2 DDP workers on gloo), MLflow on SQLite,
Great Expectations, and DVC on a temporary Git repository. Nothing is mocked."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline.config import load_params
from pipeline.data import io
from pipeline.data.io import file_md5
from pipeline.runners.data import make_demo
from tests.conftest import REPO

pytestmark = pytest.mark.integration

# Small but real: 400 digits, 2 workers, a few epochs. The gate threshold is lowered so the
# promotion path runs; what the full dataset reaches is measured by `make run`.
SMALL = [
    "data.demo.rows=400",
    "train.epochs=6",
    "train.batch_size=16",
    "train.lr=0.003",
    "train.patience=3",
    "register.min_test_accuracy=0.5",
]


def small_project(root: Path) -> Path:
    """A project folder with the repo's params (plus SMALL) and dvc.yaml, and the code its stages depend on."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for override in SMALL:
        key, value = override.split("=")
        *sections, leaf = key.split(".")
        node = raw
        for s in sections:
            node = node[s]
        node[leaf] = yaml.safe_load(value)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(REPO / "pipeline", root / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_training_flow_end_to_end(tmp_path, prefect_harness):
    import mlflow
    from mlflow import MlflowClient

    from flows.training import training_flow

    root = small_project(tmp_path)
    params = load_params(root / "params.yaml")
    demo = make_demo(params, root)
    run(["git", "init", "-q"], root)
    run(["dvc", "init", "-q"], root)
    run(["dvc", "remote", "add", "-d", "local", str(tmp_path / "remote")], root)
    run(["dvc", "add", "-q", "data/raw/digits.csv"], root)
    shutil.rmtree(root / ".dvc/cache")  # as in a fresh clone: the file exists, the cache does not
    raw_md5 = file_md5(root / "data/raw/digits.csv")
    state = training_flow(params_path="params.yaml", root=str(root), return_state=True)
    assert state.is_completed(), state.message
    result = state.result()

    assert file_md5(root / "data/raw/digits.csv") == raw_md5  # raw data is never modified
    assert (root / result.validate.data_docs).is_file()  # GX Data Docs for every run

    # data version: the md5 DVC records, pushed to the remote
    assert result.data_version.md5 == demo["md5"] and result.data_version.dvc == "pushed to the DVC remote"
    assert (tmp_path / "remote/files/md5" / demo["md5"][:2] / demo["md5"][2:]).is_file()

    # validate: every corrupted row but the duplicates is quarantined, with its reasons
    corrupted = demo["corrupted"]
    quarantine = pd.read_parquet(root / "data/quarantine/validate.parquet")
    assert set(quarantine["id"]) == set(corrupted["missing_pixel"] + corrupted["out_of_range"] + corrupted["unknown_label"])
    assert quarantine["reason"].str.len().gt(0).all()
    # clean + split: duplicates gone, 70/15/15 of what is left
    assert result.clean.rows_in - result.clean.rows_out == len(corrupted["duplicate"])
    sizes = result.split.sizes
    assert sum(sizes.values()) == result.clean.rows_out
    assert abs(sizes["train"] - 0.70 * result.clean.rows_out) <= 1
    # train: per-epoch history from the Ray workers, best weights kept
    history = pd.read_csv(root / "reports/history.csv")
    assert 1 <= len(history) <= 6 and {"train_loss", "val_loss", "val_accuracy"} <= set(history.columns)
    assert result.train.num_workers == 2

    # MLflow: the run, its lineage tags and metrics, the registered version and its alias
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    client = MlflowClient()
    mlflow_run = client.get_run(result.evaluate.mlflow_run_id)
    assert mlflow_run.data.tags["d2d.data_md5"] == demo["md5"]
    assert mlflow_run.data.params["train.epochs"] == "6"
    assert mlflow_run.data.metrics["test_accuracy"] == pytest.approx(result.evaluate.metrics["test_accuracy"], abs=1e-6)
    assert len(client.get_metric_history(mlflow_run.info.run_id, "val_loss")) == len(history)
    artifacts = {a.path for a in client.list_artifacts(mlflow_run.info.run_id, "reports")}
    assert {"reports/test_predictions.png", "reports/learning_curves.png", "reports/validate.json"} <= artifacts

    registered = result.register
    assert registered.version == 1 and registered.promoted == (result.evaluate.metrics["test_accuracy"] >= 0.5)
    assert result.evaluate.metrics["test_accuracy"] >= 0.5, "a CNN on 400 digits should beat chance by far"
    champion = client.get_model_version_by_alias("d2d-digits", "champion")
    assert int(champion.version) == 1
    assert champion.tags["d2d.data_md5"] == demo["md5"]

    # what a person sees in the Prefect UI: the run's summary and per-class metrics as artifacts
    import httpx
    from prefect.settings import PREFECT_API_URL

    # through the server's REST API, as the UI reads them
    flow_run_id = str(state.state_details.flow_run_id)
    found = httpx.post(f"{PREFECT_API_URL.value()}/artifacts/filter", timeout=30, json={
        "artifacts": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 50, "offset": 0, "sort": "CREATED_DESC"})
    found.raise_for_status()
    by_key = {a["key"]: a for a in found.json()}
    summary = by_key["d2d-run-summary"]["data"]
    assert "## Promotion" in summary and "version 1" in summary and result.register.reasons[0] in summary
    assert f"{result.validate.rows_quarantined} quarantined" in summary
    table = by_key["d2d-per-class-metrics"]
    assert table["type"] == "table" and '"class": "9"' in table["data"]
    assert mlflow_run.data.tags["prefect.flow_run_id"] == str(state.state_details.flow_run_id)

    # DVC and Prefect agree: the run is recorded in dvc.lock, so `dvc repro` has nothing to do,
    # and a second run with nothing changed reuses every stage (no new MLflow run or version)
    assert "up to date" in run(["dvc", "status"], root).stdout
    assert "Running stage" not in run(["dvc", "repro"], root).stdout
    again = training_flow(params_path="params.yaml", root=str(root))
    assert again.evaluate.mlflow_run_id == result.evaluate.mlflow_run_id
    assert again.register.version == 1 and again.train == result.train
    assert len(client.search_runs([mlflow_run.info.experiment_id])) == 1

    # the champion predicts on raw rows, straight from the CSV
    model = mlflow.pyfunc.load_model("models:/d2d-digits@champion")
    raw = pd.read_parquet(root / "data/split/test.parquet")  # scaled; use the raw rows by id instead
    rows = pd.read_csv(root / "data/raw/digits.csv").set_index("id").loc[raw["id"]].reset_index()
    pred = model.predict(rows.drop(columns=["label"]).astype("int64"))
    assert (pred["label"].to_numpy() == rows["label"].to_numpy()).mean() == pytest.approx(
        result.evaluate.metrics["test_accuracy"], abs=1e-6
    )


GIT_ID = {"GIT_AUTHOR_NAME": "d2d test", "GIT_AUTHOR_EMAIL": "test@d2d.invalid",
          "GIT_COMMITTER_NAME": "d2d test", "GIT_COMMITTER_EMAIL": "test@d2d.invalid"}


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, **GIT_ID, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    # MLflow exports the URI an in-process test set; a project's own commands use their own
    env.pop("MLFLOW_TRACKING_URI", None)
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def test_dvc_repro_runs_every_stage_once(tmp_path, prefect_harness):
    root = small_project(tmp_path)
    run(["git", "init", "-q"], root)
    run(["dvc", "init", "-q"], root)
    run(["dvc", "config", "core.analytics", "false"], root)
    run(["d2d", "data", "demo"], root)
    run(["dvc", "add", "-q", "data/raw/digits.csv"], root)

    first = run(["dvc", "repro"], root)
    for stage in ("validate", "clean", "split", "train", "evaluate", "register"):
        assert f"Running stage '{stage}'" in first.stdout
    assert (root / "dvc.lock").is_file()
    assert (root / "reports/metrics.json").is_file() and (root / "models/model.pt").is_file()

    second = run(["dvc", "repro"], root)
    assert "Running stage" not in second.stdout
    assert "up to date" in run(["dvc", "status"], root).stdout

    # a `d2d run` after `dvc repro` reuses every output DVC recorded
    from flows.training import training_flow

    metrics_before = (root / "reports/metrics.json").read_text()
    reused = training_flow(params_path="params.yaml", root=str(root))
    timings = yaml.safe_load((root / "reports/timings.json").read_text())
    assert {k: v["how"] for k, v in timings.items() if k != "data-version"} == dict.fromkeys(
        ("validate", "clean", "split", "train", "evaluate", "register"), "reused")
    assert (root / "reports/metrics.json").read_text() == metrics_before and reused.register.version == 1

    # what DVC users look at: the metrics and every declared plot
    shown = run(["dvc", "metrics", "show", "--json"], root).stdout
    assert all(k in shown for k in ("test_accuracy", "test_roc_auc_ovr", "test_log_loss", "best_val_loss"))
    run(["dvc", "plots", "show", "-o", str(tmp_path / "plots")], root)
    page = (tmp_path / "plots/index.html").read_text()
    for plot in ("learning_curves.png", "per_class_f1.png", "roc_curves.png", "attributions.png", "reports/per_class.csv"):
        assert plot in page, plot

    # a changed training param re-runs training and what follows, not the data stages
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"]["epochs"] = 2
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = run(["dvc", "repro"], root)
    assert "Running stage 'train'" in third.stdout and "Running stage 'split'" not in third.stdout

    # every stage's data round-trips through a DVC remote
    run(["dvc", "remote", "add", "-d", "local", str(tmp_path / "remote")], root)
    run(["dvc", "push", "-q"], root)
    def split_files() -> dict[Path, bytes]:  # the three splits are folders of Parquet parts
        return {p: p.read_bytes() for p in sorted((root / "data/split").rglob("[!.]*")) if p.is_file()}

    splits = split_files()
    assert len(splits) == 4 and all((root / "data/split" / f"{s}.parquet").is_dir() for s in ("train", "val", "test"))
    for path in sorted((root / "data/split").glob("[!.]*")):
        io.remove(path)
    shutil.rmtree(root / ".dvc/cache")
    run(["dvc", "pull", "-q"], root)
    assert split_files() == splits

    # an experiment on the data stages, from a Git commit, as DVC users run them
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-q", "-m", "baseline"], root)
    run(["dvc", "exp", "run", "-n", "seed7", "--set-param", "split.seed=7", "split"], root)
    shown = run(["dvc", "exp", "show", "--json"], root).stdout
    assert "seed7" in shown and '"seed": 7' in shown


def wine_with_gaps(path: Path) -> pd.DataFrame:
    """scikit-learn's wine data plus a categorical column, with nulls in three columns."""
    import numpy as np
    from sklearn.datasets import load_wine

    df = load_wine(as_frame=True).frame.rename(columns={"target": "cultivar"})
    rng = np.random.default_rng(0)
    df.insert(0, "sample_id", np.arange(len(df)))
    df["hue_band"] = pd.cut(df["hue"], 3, labels=["pale", "medium", "deep"]).astype(str)
    for col in ("magnesium", "hue_band", "proline"):
        df.loc[rng.choice(len(df), 10, replace=False), col] = None
    df.to_csv(path, index=False)
    return df


def test_bring_your_own_tabular_data(tmp_path, prefect_harness):
    """init-params on a CSV with numeric and categorical columns and missing values, then the
    whole flow with an MLP; the encoding is fitted on the train split only."""
    import json

    import mlflow

    from flows.training import training_flow

    raw = wine_with_gaps(tmp_path / "wine.csv")
    run(["d2d", "init-params", "--data", "wine.csv", "--target", "cultivar"], tmp_path)
    state = training_flow(
        params_path="params.yaml", overrides=["train.epochs=25", "register.min_test_accuracy=0.8"],
        root=str(tmp_path), return_state=True,
    )
    assert state.is_completed(), state.message
    result = state.result()
    assert result.train.epochs_run >= 1 and result.register.promoted

    prep = json.loads((tmp_path / "data/split/preprocess.json").read_text())
    train = pd.read_parquet(tmp_path / "data/split/train.parquet")
    names = prep["numeric"]["names"]
    assert prep["numeric"]["center"][names.index("proline")] == pytest.approx(train["proline"].mean())
    assert prep["numeric"]["fill"][names.index("proline")] == pytest.approx(train["proline"].median())
    assert prep["categorical"][0]["name"] == "hue_band"

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model("models:/d2d-wine@champion")
    gaps = raw[raw["magnesium"].isna() | raw["hue_band"].isna()]
    pred = model.predict(gaps.drop(columns="cultivar"))
    assert len(pred) == len(gaps) and pred["label"].isin([0, 1, 2]).all()
    assert (pred["label"].to_numpy() == gaps["cultivar"].to_numpy()).mean() > 0.8


def test_regression_end_to_end(tmp_path, prefect_harness):
    """A continuous target (scikit-learn's diabetes progression) is inferred as regression and
    goes through the whole flow: standardised target, MSE loss, RMSE/MAE/R², the R² gate."""
    import mlflow
    import numpy as np
    from sklearn.datasets import load_diabetes

    from flows.training import training_flow
    from pipeline.evaluate import regression_metrics

    df = load_diabetes(as_frame=True, scaled=False).frame.rename(columns={"target": "progression"})
    df.insert(0, "patient_id", np.arange(len(df)))
    df["sex"] = df["sex"].map({1.0: "f", 2.0: "m"})
    df.loc[np.random.default_rng(0).choice(len(df), 15, replace=False), "bmi"] = None
    df.to_csv(tmp_path / "diabetes.csv", index=False)
    run(["d2d", "init-params", "--data", "diabetes.csv", "--target", "progression"], tmp_path)
    state = training_flow(params_path="params.yaml", overrides=["register.min_test_r2=0.3"], root=str(tmp_path), return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result.evaluate.metrics["test_r2"] > 0.3, "an MLP should explain a good share of diabetes progression"
    assert result.register.promoted
    assert "val_rmse" in pd.read_csv(tmp_path / "reports/history.csv").columns

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model("models:/d2d-diabetes@champion")
    test = pd.read_parquet(tmp_path / "data/split/test.parquet")
    raw = pd.read_csv(tmp_path / "diabetes.csv").set_index("patient_id").loc[test["patient_id"]].reset_index()
    pred = model.predict(raw.drop(columns="progression"))["prediction"].to_numpy()
    assert regression_metrics(raw["progression"].to_numpy(dtype=float), pred)["r2"] == pytest.approx(result.evaluate.metrics["test_r2"], abs=1e-4)


def iris_without_id(path: Path) -> pd.DataFrame:
    """scikit-learn's iris as most real files come: no id column, a text label, a categorical
    text column, missing values, one exact duplicate and two rows with text in a numeric column."""
    import numpy as np
    from sklearn.datasets import load_iris

    df = load_iris(as_frame=True).frame
    df["species"] = df.pop("target").map({0: "setosa", 1: "versicolor", 2: "virginica"})
    df["petal_size"] = pd.qcut(df["petal length (cm)"].rank(method="first"), 3, labels=["small", "mid", "large"]).astype(object)
    rng = np.random.default_rng(0)
    df.loc[rng.choice(len(df), 6, replace=False), "sepal width (cm)"] = None
    df.loc[rng.choice(len(df), 6, replace=False), "petal_size"] = None
    df = df.astype({"sepal length (cm)": object})
    df.loc[[10, 80], "sepal length (cm)"] = "n/a?"  # bad rows: quarantined, identified by their row key
    df = pd.concat([df, df.iloc[[40]]], ignore_index=True)  # an exact duplicate: removed by cleaning
    df.to_csv(path, index=False)
    return df


def test_data_without_an_id_column_end_to_end(tmp_path, prefect_harness):
    """init-params on a file with no id column, then the whole flow with the hash split: the
    derived row key identifies quarantined and duplicate rows and keeps each row's split."""
    import mlflow

    from flows.training import training_flow
    from pipeline.data.keys import ROW_KEY, row_keys

    raw = iris_without_id(tmp_path / "iris.csv")
    made = run(["d2d", "init-params", "--data", "iris.csv", "--target", "species"], tmp_path)
    assert "no id column" in made.stdout and "id_column: null" in (tmp_path / "params.yaml").read_text()
    state = training_flow(
        params_path="params.yaml", root=str(tmp_path), return_state=True,
        overrides=["train.epochs=30", "train.lr=0.01", "train.batch_size=16", "split.strategy=hash",
                   "validate.data_docs=false", "register.min_test_accuracy=0.6"],
    )
    assert state.is_completed(), state.message
    result = state.result()
    keys = row_keys(pd.read_csv(tmp_path / "iris.csv"), ["sepal length (cm)", "sepal width (cm)", "petal length (cm)",
                                                        "petal width (cm)", "petal_size", "species"])
    quarantine = pd.read_parquet(tmp_path / "data/quarantine/validate.parquet")
    assert sorted(quarantine[ROW_KEY]) == sorted(keys.iloc[[10, 80]])
    assert quarantine["reason"].str.contains("sepal length (cm) is not a number", regex=False).all()
    removed = pd.read_parquet(tmp_path / "data/quarantine/clean.parquet")
    dup = removed[removed["rule"] == "drop_duplicates"]
    # the copy added, and iris's own duplicate (rows 101 and 142)
    assert dict(zip(dup[ROW_KEY], dup["reason"])) == {keys.iloc[-1]: f"duplicate of row key {keys.iloc[40]}",
                                                      keys.iloc[142]: f"duplicate of row key {keys.iloc[101]}"}
    splits = {s: pd.read_parquet(tmp_path / f"data/split/{s}.parquet") for s in ("train", "val", "test")}
    assert sum(len(f) for f in splits.values()) == len(raw) - 4 and all(f[ROW_KEY].is_unique for f in splits.values())
    assert result.split.leaked_rows == 0 and result.register.promoted

    # the champion scores raw rows, which carry no id
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model("models:/d2d-iris@champion")
    rows = pd.read_csv(tmp_path / "iris.csv").drop(index=[10, 80]).drop(columns="species").head(20)
    rows["sepal length (cm)"] = rows["sepal length (cm)"].astype(float)
    assert len(model.predict(rows)) == 20


def test_thirty_percent_bad_rows_is_the_normal_case(tmp_path, prefect_harness):
    """d2d's premise: up to 30% of a raw dataset may be wrong. `d2d data demo` with 30% of the
    digits corrupted, then the flow with the default validate.max_bad_row_fraction: the bad
    rows go to quarantine with their reasons, the duplicates to cleaning, and the model trained
    on the rest still reaches 0.95 test accuracy."""
    from flows.training import training_flow

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    run(["d2d", "data", "demo", "--set", "data.demo.corrupt_fraction=0.3"], tmp_path)
    # the same generator, in process, for the manifest of which rows were corrupted how
    demo = make_demo(load_params(tmp_path / "params.yaml", ["data.demo.corrupt_fraction=0.3"]), tmp_path / "manifest")
    assert demo["md5"] == file_md5(tmp_path / "data/raw/digits.csv")
    corrupted = demo["corrupted"]
    assert sum(map(len, corrupted.values())) == round(0.3 * 1797)

    state = training_flow(params_path="params.yaml", root=str(tmp_path), return_state=True,
                          overrides=["train.epochs=15", "validate.data_docs=false"])
    assert state.is_completed(), state.message
    result = state.result()
    assert result.validate.passed and result.validate.bad_row_fraction > 0.2
    quarantine = pd.read_parquet(tmp_path / "data/quarantine/validate.parquet")
    by_id = quarantine.set_index("id")["reason"]
    assert set(by_id.index) == set(corrupted["missing_pixel"] + corrupted["out_of_range"] + corrupted["unknown_label"])
    assert by_id.loc[corrupted["missing_pixel"]].str.contains("is null").all()
    assert by_id.loc[corrupted["out_of_range"]].str.contains(r"outside \[0, 16\]").all()
    assert by_id.loc[corrupted["unknown_label"]].str.contains("label not in the allowed values").all()
    removed = pd.read_parquet(tmp_path / "data/quarantine/clean.parquet")
    dup = removed[removed["rule"] == "drop_duplicates"]
    # a copied row comes before or after its source; the later of the two is removed, naming the first
    pairs = zip(dup["id"], dup["reason"].str.removeprefix("duplicate of id ").astype(int))
    assert len(dup) == len(corrupted["duplicate"]) and all({a, b} & set(corrupted["duplicate"]) for a, b in pairs)
    assert result.evaluate.metrics["test_accuracy"] >= 0.95, result.evaluate
    assert result.register.promoted
