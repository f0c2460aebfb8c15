"""Tuning, warm starts and clusters, for real: Ray Tune with ASHA over Ray Train runs on a
local Ray instance, MLflow child runs on SQLite, a warm start from the registered champion,
and the training stage submitted as a Ray job to a `ray start --head` cluster on loopback
(token auth on, as Ray 2.60 sets it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipeline.config import load_params
from pipeline.data import io
from pipeline import stages
from pipeline.runners.data import make_demo
from tests.integration.servers import free_port, ray_head
from tests.integration.test_end_to_end import small_project

pytestmark = pytest.mark.integration

TUNE = ["tune.enabled=true", "tune.num_samples=4", "tune.epochs=3", "tune.grace_period=1", "tune.reduction_factor=2",
        "train.epochs=4", "train.num_workers=1"]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A small project with its data stages run: what the training stage reads."""
    root = small_project(tmp_path_factory.mktemp("project"))
    params = load_params(root / "params.yaml")
    make_demo(params, root)
    for name in ("validate", "clean", "split"):
        stages.run(name, params, root)
    return root


def test_tuning_searches_with_asha_logs_child_runs_and_trains_the_best(project):
    from mlflow import MlflowClient

    params = load_params(project / "params.yaml", TUNE)
    trained = stages.run("train", params, project)
    tuned = io.read_json(project / "reports/tune.json")
    trials = pd.read_csv(project / "reports/tune_trials.csv")

    assert tuned["enabled"] and len(tuned["trials"]) == 4 and trials["trial"].nunique() == 4
    assert not any(t["error"] for t in tuned["trials"])
    epochs_run = [t["epochs_run"] for t in tuned["trials"]]
    assert max(epochs_run) == 3 and min(epochs_run) < 3, f"ASHA stopped no trial early: {epochs_run}"
    # the best trial, found again from the raw per-epoch table
    assert tuned["best_trial"] == trials.groupby("trial")["val_loss"].min().idxmin()
    best = next(t for t in tuned["trials"] if t["trial"] == tuned["best_trial"])
    assert tuned["best_config"] == best["config"] and set(best["config"]) == set(params.tune.space)
    # the final model trained with the winning config: its history ran at the tuned rate
    history = pd.read_csv(project / "reports/history.csv")
    assert trained.tuned == best["config"]
    assert history["lr"].tolist() == pytest.approx([best["config"]["lr"]] * len(history))

    stages.run("evaluate", params, project)
    metrics = io.read_json(project / "reports/metrics.json")
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    parent = client.get_run(metrics["mlflow_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.data.tags["d2d.tune_trial"] for c in children) == sorted(trials["trial"].unique())
    for child in children:
        rows = trials[trials["trial"] == child.data.tags["d2d.tune_trial"]]
        assert len(client.get_metric_history(child.info.run_id, "val_loss")) == len(rows)
        assert child.data.params["lr"] == str(rows["config.lr"].iloc[0])
    assert parent.data.tags["d2d.tune_best_trial"] == tuned["best_trial"]


def test_warm_start_from_the_champion(project):
    """Register the model trained above, then retrain from `models:/…@champion`: every tensor
    transfers, and the first epoch already scores like the champion, not like a fresh start."""
    base = load_params(project / "params.yaml", ["register.min_test_accuracy=0.3"])
    if not (project / "reports/metrics.json").is_file():  # run on its own (pytest -k): train one first
        stages.run("train", base, project)
        stages.run("evaluate", base, project)
    decision = stages.run("register", base, project)
    assert decision.promoted, decision.reasons
    # the champion's architecture: the tuned config when the tuning test trained it
    tuned = io.read_json(project / "reports/tune.json").get("best_config", {})
    same = ["train.epochs=1", "train.num_workers=1", *(f"train.{k}={json.dumps(v)}" for k, v in tuned.items())]
    scratch = stages.run("train", load_params(project / "params.yaml", same), project)
    warm = stages.run("train", load_params(project / "params.yaml", [*same, "train.init_from=models:/d2d-digits@champion"]), project)
    assert warm.init_from == "models:/d2d-digits@champion" and warm.fresh_tensors == ()
    assert warm.transferred_tensors > 0
    assert warm.best_val_loss < scratch.best_val_loss / 2, (warm, scratch)


@pytest.fixture
def ray_cluster(tmp_path):
    with ray_head(tmp_path, dict(os.environ)) as cluster:
        yield cluster


def test_training_stage_as_a_ray_job_on_a_cluster(project, ray_cluster):
    """The documented entrypoint: `ray job submit -- d2d stage train --root <project>`."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    for name in ("models/model.pt", "reports/train.json"):
        (project / name).unlink(missing_ok=True)
    storage = project / "cluster_storage"
    submit = subprocess.run(
        ["ray", "job", "submit", "--address", ray_cluster["dashboard"], "--submission-id", "d2d-train-test", "--",
         "d2d", "stage", "train", "--root", str(project),
         "--set", "train.epochs=2", "--set", f"train.storage_path={storage}"],
        env=ray_cluster["env"], capture_output=True, text=True, timeout=600,
    )
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    client = JobSubmissionClient(ray_cluster["dashboard"], headers={"Authorization": f"Bearer {ray_cluster['env']['RAY_AUTH_TOKEN']}"})
    assert client.get_job_status("d2d-train-test") == JobStatus.SUCCEEDED
    logs = client.get_job_logs("d2d-train-test")
    assert "train done" in logs and "Connecting to existing Ray cluster" in logs, logs[-2000:]
    report = io.read_json(project / "reports/train.json")
    assert report["epochs_run"] == 2 and (project / "models/model.pt").is_file()
    assert any(storage.glob("d2d-train-*/checkpoint_*")), "checkpoints go to train.storage_path"
    # the splits the workers read are copies under train.storage_path, where every node sees them
    staged = {p.name for p in storage.glob("datasets/*/*.parquet")}
    assert staged == {"train.parquet", "val.parquet"} and len(list(storage.glob("datasets/*/COMPLETE"))) == 2


def test_an_unreachable_cluster_is_a_clear_error(project):
    """A wrong train.ray_address fails fast with one line naming it (exit 1: a service, not
    the input, is at fault), not a hang."""
    out = subprocess.run(
        ["d2d", "stage", "train", "--root", str(project), "--set", f"train.ray_address=127.0.0.1:{free_port()}"],
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"},
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    assert "cannot connect to the Ray cluster at 127.0.0.1:" in out.stderr and "Traceback" not in out.stderr
