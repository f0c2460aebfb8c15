"""Team mode, tested without Docker (`make team-test`; `make test` runs it too): the servers a
team runs, as real processes on loopback:
- PostgreSQL from Debian's package, with databases for MLflow, its users and Prefect, and a
  password full of URL-special characters (so every URL built from it must escape it);
- `mlflow server` on PostgreSQL behind basic auth, with artifacts proxied;
- `prefect server start` on PostgreSQL behind Prefect's basic auth, with a process worker;
- `ray start --head` with token auth.

d2d is pointed at them only through PREFECT_API_URL (+ PREFECT_API_AUTH_STRING),
MLFLOW_TRACKING_URI (+ username and password), RAY_ADDRESS (+ RAY_AUTH_TOKEN) and a DVC remote.
Each server refuses a client without credentials. It runs the training deployment
and the drift monitor on a small sample, and each result is checked through that server's
own API. The ExitStack stops every server, by its PID, even when a check fails."""

from __future__ import annotations

import secrets
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from pipeline.data.io import file_md5
from tests.integration import servers
from tests.integration.test_end_to_end import run
from tests.integration.test_prefect_server import (
    basic_auth, deploy_and_train, drift_retrains_through_the_automation, dvc_project, environment,
)

pytestmark = [pytest.mark.integration, pytest.mark.team]


def test_training_and_the_drift_monitor_on_team_servers(tmp_path: Path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    password = secrets.token_hex(12)
    db_password = f"p@ss:w/rd%41#?& {secrets.token_hex(4)}"  # breaks any URL that pastes it raw
    prefect_auth = f"d2d:{secrets.token_hex(12)}"
    with ExitStack() as stack:
        database = stack.enter_context(servers.postgres(tmp_path / "pg", ("mlflow", "mlflow_auth", "prefect"),
                                                        password=db_password))
        host = database.rsplit("/", 1)[0]
        mlflow_url = stack.enter_context(servers.mlflow_server(
            database, tmp_path / "artifacts", tmp_path / "mlflow.log",
            auth={"database_uri": f"{host}/mlflow_auth", "username": "admin", "password": password}))
        base = environment(tmp_path / "prefect_home", None)
        api = stack.enter_context(servers.prefect_server(
            tmp_path, base, database_url=host.replace("postgresql://", "postgresql+asyncpg://") + "/prefect",
            auth_string=prefect_auth))
        ray = stack.enter_context(servers.ray_head(tmp_path, base))
        # the only way d2d learns where the servers are
        env = {**ray["env"], "PREFECT_API_URL": api, "PREFECT_API_AUTH_STRING": prefect_auth, "MLFLOW_TRACKING_URI": mlflow_url,
               "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": password, "RAY_ADDRESS": ray["gcs"]}

        # MLflow refuses a client without credentials
        anonymous = httpx.get(f"{mlflow_url}/api/2.0/mlflow/experiments/search", params={"max_results": 1}, timeout=30)
        assert anonymous.status_code == 401
        auth = ("admin", password)
        # so does Prefect: without its basic auth, or with a wrong one; its health probe stays open
        assert httpx.get(f"{api}/health", timeout=30).status_code == 200
        for wrong in (None, ("d2d", "guess")):
            refused = httpx.post(f"{api}/deployments/filter", json={}, auth=wrong, timeout=30)
            assert refused.status_code == 401, refused.text
        assert httpx.post(f"{api}/deployments/filter", json={}, auth=basic_auth(env), timeout=30).status_code == 200
        # and Prefect's own client, without PREFECT_API_AUTH_STRING
        anonymous_cli = subprocess.run([str(Path(sys.executable).parent / "prefect"), "work-pool", "ls"], cwd=tmp_path,
                                       env={k: v for k, v in env.items() if k != "PREFECT_API_AUTH_STRING"},
                                       capture_output=True, text=True, timeout=120)
        assert anonymous_cli.returncode != 0 and "401" in anonymous_cli.stdout + anonymous_cli.stderr

        root = dvc_project(tmp_path / "project")
        run(["dvc", "remote", "add", "-d", "team", str(tmp_path / "dvc-remote")], root)
        training, flow_run = deploy_and_train(root, api, env, tmp_path)

        # the registry has a champion with lineage back to the data and the Prefect run
        champion = httpx.get(f"{mlflow_url}/api/2.0/mlflow/registered-models/alias", auth=auth, timeout=30,
                             params={"name": "d2d-digits", "alias": "champion"}).json()["model_version"]
        tags = {t["key"]: t["value"] for t in champion["tags"]}
        raw_md5 = file_md5(root / "data/raw/digits.csv")
        assert tags["prefect.flow_run_id"] == flow_run["id"] and tags["d2d.data_md5"] == raw_md5
        assert float(tags["d2d.test_accuracy"]) >= 0.5 and tags["d2d.decision"] == "promoted"
        assert (tmp_path / "dvc-remote/files/md5" / raw_md5[:2] / raw_md5[2:]).is_file()  # the data version, pushed
        assert any((tmp_path / "artifacts").rglob("MLmodel"))  # artifacts went through the server to its store
        # the data stages ran on the cluster's actors (data.engine: auto), which name their
        # parts after the input part they came from (p00000-...), where one process writes part-...
        for folder in ("data/validated/valid.parquet", "data/clean/clean.parquet", "data/split/train.parquet"):
            names = [p.name for p in (root / folder).glob("*.parquet")]
            assert names and all(n.startswith("p00000-") for n in names), (folder, names)

        # the training ran on the cluster: its driver is a job there, and it succeeded
        jobs = JobSubmissionClient(ray["dashboard"], headers={"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"}).list_jobs()
        assert [j.status for j in jobs if j.type.name == "DRIVER"].count(JobStatus.SUCCEEDED) >= 1, jobs

        # the drift monitor: a shifted batch → event → automation → a retrain on the worker
        drift_retrains_through_the_automation(root, api, env, tmp_path, training)
        versions = httpx.get(f"{mlflow_url}/api/2.0/mlflow/model-versions/search", auth=auth, timeout=30,
                             params={"filter": "name='d2d-digits'"}).json()["model_versions"]
        assert sorted(int(v["version"]) for v in versions) == [1, 2]
        monitoring = httpx.get(f"{mlflow_url}/api/2.0/mlflow/experiments/get-by-name", auth=auth, timeout=30,
                               params={"experiment_name": "monitoring"})
        experiment_id = monitoring.json()["experiment"]["experiment_id"]
        runs = httpx.post(f"{mlflow_url}/api/2.0/mlflow/runs/search", auth=auth, timeout=30,
                          json={"experiment_ids": [experiment_id]}).json()["runs"]
        assert len(runs) == 1 and {t["key"]: t["value"] for t in runs[0]["data"]["tags"]}["d2d.action"] == "retrain"
        jobs = JobSubmissionClient(ray["dashboard"], headers={"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"}).list_jobs()
        assert [j.status for j in jobs if j.type.name == "DRIVER"].count(JobStatus.SUCCEEDED) >= 2  # the retrain too
