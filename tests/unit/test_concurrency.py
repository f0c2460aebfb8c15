"""Two writers at once: every atomic write has its own temporary file, so each installs a
whole file; two `d2d run`s in one project: the second is refused with one line; the Prefect
deployments run one at a time; a failed `dvc push` is reported, not swallowed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline import monitor, versioning
from pipeline.data import io
from pipeline.errors import D2DError
from tests.conftest import REPO

D2D = str(Path(sys.executable).with_name("d2d"))


def test_two_writers_at_once_each_install_a_whole_file(tmp_path):
    path = tmp_path / "out" / "report.json"
    payloads = [{"writer": w, "rows": [w] * 200_000} for w in range(2)]  # big enough for the writes to overlap
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def write(payload: dict) -> None:
        start.wait()
        try:
            for _ in range(15):
                io.write_json(payload, path)
        except BaseException as e:  # a writer whose temporary file the other renamed away
            errors.append(e)

    threads = [threading.Thread(target=write, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert json.loads(path.read_text()) in payloads  # one writer's file, whole
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]  # no temporary file left


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    path = io.write_csv(pd.DataFrame({"a": [1]}), tmp_path / "t.csv")

    class Unwritable:
        def to_csv(self, *args, **kwargs):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        io.write_csv(Unwritable(), path)  # type: ignore[arg-type]
    assert path.read_text() == "a\n1\n" and [p.name for p in tmp_path.iterdir()] == ["t.csv"]


HOLD = """
import sys, time
from pathlib import Path
from pipeline import lock
with lock.exclusive(Path(sys.argv[1]), "a training run"):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_second_run_in_the_same_project_is_refused_with_one_line(tmp_path):
    """Two real processes: one holds the project's run lock (as a `d2d run` does for its whole
    flow), the other is `d2d run` in the same project."""
    from pipeline import stages

    (tmp_path / "params.yaml").write_bytes((REPO / "params.yaml").read_bytes())
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(stages.path("run_lock", tmp_path))], stdout=subprocess.PIPE, text=True,
                              env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        out = subprocess.run([D2D, "run"], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    finally:
        holder.kill()
        holder.wait()
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2, out.stderr[-2000:]
    assert len(lines) == 1 and "a training run is already in progress" in lines[0] and f"process {holder.pid}" in lines[0]
    assert not (tmp_path / "data").exists() and not (tmp_path / "reports").exists()  # the second run touched nothing


def test_the_lock_is_released_when_its_holder_dies(tmp_path):
    from pipeline import lock

    path = tmp_path / "run.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(D2DError, match="already in progress"):
        with lock.exclusive(path, "a training run"):
            pass
    holder.kill()  # no cleanup runs: the operating system drops the lock with the process
    holder.wait()
    with lock.exclusive(path, "a training run"):
        pass


def test_each_deployment_runs_one_at_a_time_as_prefect_reads_it():
    from prefect.cli.deploy._models import DeploymentConfig
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    from app.cli import concurrency_limit

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    assert {d["name"] for d in spec["deployments"]} == {"training", "drift-monitor"}
    for d in spec["deployments"]:
        parsed = DeploymentConfig.model_validate(d)  # what `prefect deploy` validates prefect.yaml with
        assert parsed.concurrency_limit.limit == 1 and parsed.concurrency_limit.collision_strategy == "ENQUEUE"
        # `d2d serve-flows` hands the same limit to Prefect
        assert concurrency_limit(d) == ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)


def run(args: list[str], cwd: Path) -> None:
    subprocess.run(args, cwd=cwd, check=True, capture_output=True, timeout=300)


def dvc(args: list[str], cwd: Path) -> None:
    run([sys.executable, "-m", "dvc", *args], cwd)


@pytest.fixture
def dvc_project(tmp_path) -> tuple[Path, Path]:
    run(["git", "init", "-q"], tmp_path)
    dvc(["init", "-q"], tmp_path)
    dvc(["config", "core.analytics", "false"], tmp_path)
    raw = io.write_csv(pd.DataFrame({"id": [1, 2], "x": [3, 4]}), tmp_path / "data/raw.csv")
    dvc(["add", "-q", "data/raw.csv"], tmp_path)
    return tmp_path, raw


def test_a_failed_dvc_push_is_reported_with_what_to_do(dvc_project):
    root, raw = dvc_project
    (root / "not-a-folder").write_text("a file where the remote's folder should be")
    dvc(["remote", "add", "-d", "broken", str(root / "not-a-folder" / "remote")], root)
    outcome = versioning.push_tracked(raw, root)
    assert outcome.startswith("dvc push failed") and versioning.push_failed(outcome)
    [warning] = monitor.push_warnings({"dvc": outcome}, None)
    assert "local DVC cache only" in warning and "dvc push" in warning


def test_no_remote_is_not_a_failure_and_a_working_remote_pushes(dvc_project):
    root, raw = dvc_project
    outcome = versioning.push_tracked(raw, root)
    assert "no default DVC remote" in outcome and not versioning.push_failed(outcome)
    dvc(["remote", "add", "-d", "local", str(root.parent / "remote")], root)
    assert versioning.push_tracked(raw, root) == "pushed to the DVC remote"


def test_the_run_summary_warns_when_the_data_version_was_not_pushed(capsys):
    from dataclasses import replace

    from app.cli import print_run_summary
    from tests.unit.test_report_and_lock import RESULT

    metrics = {f"test_{k}": 0.9 for k in ("accuracy", "f1_macro", "precision_macro", "recall_macro", "roc_auc_ovr",
                                           "log_loss")}
    result = replace(RESULT, evaluate=replace(RESULT.evaluate, metrics=metrics))
    failed = replace(result, data_version=replace(RESULT.data_version, dvc="dvc push failed: ERROR: unexpected error"))
    print_run_summary(failed, 3.0, None)
    out = capsys.readouterr().out
    assert "warning: dvc push failed: ERROR: unexpected error" in out and "run `dvc push`" in out
    print_run_summary(result, 3.0, None)
    assert "warning" not in capsys.readouterr().out
