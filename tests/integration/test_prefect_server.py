"""Prefect as a team runs it, the helpers: `d2d deploy` (work pool + prefect.yaml's
deployments), a flow run of the training deployment executed by `prefect worker start --pool
d2d-process --run-once`, and the drift monitor's automation starting a retrain, each checked
through the REST API. test_team_mode.py runs them on `prefect server start` (on PostgreSQL,
behind basic auth), the server a team deploys; a second run of the same on a SQLite server
took 170 s of `make test` and checked nothing more.

And here: a `d2d run` killed mid-training, then re-run: it completes, reusing the finished steps."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from pipeline.config import load_params
from pipeline.data import io
from pipeline.runners.data import make_demo
from tests.conftest import REPO
from tests.integration.test_end_to_end import run, small_project

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent


def dvc_project(root: Path) -> Path:
    """A small project with its flows and prefect.yaml, the raw data tracked by DVC in Git."""
    root.mkdir(parents=True)
    small_project(root)
    shutil.copytree(REPO / "flows", root / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "prefect.yaml", root / "prefect.yaml")
    make_demo(load_params(root / "params.yaml"), root)
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "add", "-q", "data/raw/digits.csv"]):
        run(cmd, root)
    return root


def environment(home: Path, api_url: str | None) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PREFECT_HOME": str(home),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)  # exported by MLflow in earlier in-process tests
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def basic_auth(env: dict[str, str]) -> tuple[str, str] | None:
    """The REST calls' credentials: the same PREFECT_API_AUTH_STRING the Prefect clients use."""
    user, _, password = env.get("PREFECT_API_AUTH_STRING", "").partition(":")
    return (user, password) if user else None


def run_on_worker(api: str, deployment_id: str, env: dict[str, str], cwd: Path) -> dict:
    """A flow run of the deployment, executed by `prefect worker start --run-once`; its state must be COMPLETED."""
    answer = httpx.post(f"{api}/deployments/{deployment_id}/create_flow_run", json={}, auth=basic_auth(env), timeout=30)
    assert answer.is_success, f"create_flow_run: {answer.status_code} {answer.text[:2000]}"
    return run_scheduled_on_worker(api, answer.json()["id"], env, cwd)


def run_scheduled_on_worker(api: str, flow_run_id: str, env: dict[str, str], cwd: Path) -> dict:
    worker = subprocess.run([str(BIN / "prefect"), "worker", "start", "--pool", "d2d-process", "--run-once"],
                            cwd=cwd, env=env, capture_output=True, text=True, timeout=800)
    flow_run = httpx.get(f"{api}/flow_runs/{flow_run_id}", auth=basic_auth(env), timeout=30).json()
    assert flow_run["state"]["type"] == "COMPLETED", f"{flow_run['state']}\n{worker.stdout[-3000:]}\n{worker.stderr[-3000:]}"
    return flow_run


def deploy_and_train(root: Path, api: str, env: dict[str, str], cwd: Path) -> tuple[dict, dict]:
    """`d2d deploy`, then one run of the training deployment on a worker: (deployment, flow run)."""
    deployed = subprocess.run([str(BIN / "d2d"), "deploy"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert deployed.returncode == 0, deployed.stdout[-2000:] + deployed.stderr[-2000:]
    pool = httpx.get(f"{api}/work_pools/d2d-process", auth=basic_auth(env), timeout=30).json()
    assert pool["type"] == "process"
    deployment = httpx.get(f"{api}/deployments/name/d2d-training/training", auth=basic_auth(env), timeout=30).json()
    assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 3 * * 1"]
    assert deployment["parameters"] == {"params_path": "params.yaml", "root": "."}
    # prefect.yaml's concurrency_limit reached the server: one training run at a time, the rest queued
    assert deployment["global_concurrency_limit"]["limit"] == 1
    assert deployment["concurrency_options"]["collision_strategy"] == "ENQUEUE"
    flow_run = run_on_worker(api, deployment["id"], env, cwd)
    found = httpx.post(f"{api}/artifacts/filter", auth=basic_auth(env), timeout=30, json={
        "artifacts": {"flow_run_id": {"any_": [flow_run["id"]]}}, "limit": 50, "offset": 0, "sort": "CREATED_DESC"})
    assert {"d2d-run-summary", "d2d-per-class-metrics"} <= {a["key"] for a in found.json()}
    assert (root / "reports/register.json").is_file() and (root / "dvc.lock").is_file()
    assert "up to date" in run(["dvc", "status"], root).stdout
    return deployment, flow_run


def drift_retrains_through_the_automation(root: Path, api: str, env: dict[str, str], cwd: Path, training: dict) -> dict:
    """The drift-monitor deployment (daily cron) finds a shifted batch and emits
    d2d.drift.detected; the training deployment's trigger from prefect.yaml (an automation)
    starts a training run, which the worker executes. Returns that run."""
    monitor = httpx.get(f"{api}/deployments/name/d2d-drift-monitor/drift-monitor", auth=basic_auth(env), timeout=30).json()
    assert [s["schedule"]["cron"] for s in monitor["schedules"]] == ["0 6 * * *"]
    automations = httpx.post(f"{api}/automations/filter", json={}, auth=basic_auth(env), timeout=30).json()
    [trigger] = [a for a in automations if any(x.get("deployment_id") == training["id"] for x in a["actions"])]
    assert trigger["trigger"]["expect"] == ["d2d.drift.detected"]
    assert trigger["trigger"]["match"] == {"prefect.resource.id": "d2d.model.d2d-digits", "d2d.retrain": "automation"}

    def training_runs() -> list[dict]:
        return httpx.post(f"{api}/flow_runs/filter", auth=basic_auth(env), timeout=30, json={
            "flow_runs": {"deployment_id": {"any_": [training["id"]]}}, "sort": "EXPECTED_START_TIME_DESC"}).json()

    before = {r["id"] for r in training_runs()}
    simulated = subprocess.run([str(BIN / "d2d"), "simulate-drift", "--kind", "thicken", "--strength", "0.8"],
                               cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert simulated.returncode == 0, simulated.stderr[-2000:]
    run_on_worker(api, monitor["id"], env, cwd)
    [entry] = yaml.safe_load((root / "data/monitor/ledger.json").read_text())["batches"].values()
    assert entry["action"] == "retrain" and entry["appended"]["md5_after"] == io.dvc_md5(root / "data/raw/digits.csv")

    deadline = time.monotonic() + 60
    while not [r for r in training_runs() if r["id"] not in before]:  # the automation reacts on the server's own time
        assert time.monotonic() < deadline, "the drift event did not start a training run"
        time.sleep(1)
    [retrain] = [r for r in training_runs() if r["id"] not in before]
    return run_scheduled_on_worker(api, retrain["id"], env, cwd)


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the run and everything it started (its Ray processes included): a lost machine."""
    family = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=60)


def test_a_run_killed_mid_training_completes_on_rerun_reusing_finished_steps(tmp_path):
    root = dvc_project(tmp_path / "project")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"].update(epochs=30, patience=30)  # long enough to be killed mid-way
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = environment(tmp_path / "prefect_home", None)
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen([str(BIN / "d2d"), "run"], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        while not list((root / "artifacts/ray").glob("d2d-train-*/checkpoint_*")):
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "training never checkpointed"
            time.sleep(0.5)
        _kill_tree(first)
    assert not (root / "reports/register.json").exists()
    locked = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert {"validate", "clean", "split"} <= set(locked) and "train" not in locked  # what finished is recorded

    second = subprocess.run([str(BIN / "d2d"), "run"], cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    log = second.stdout + second.stderr
    for stage in ("validate", "clean", "split"):
        assert f"{stage}: up to date in dvc.lock" in log, stage
    assert "train: up to date" not in log and (root / "reports/register.json").is_file()
    assert "up to date" in run(["dvc", "status"], root).stdout
