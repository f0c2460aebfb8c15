"""Serving on loopback with the real parts: `d2d serve` (Ray Serve on a local Ray instance)
in its own process, MLflow on SQLite with a champion the training flow registered, and
`d2d predict` through Ray Data. Requests go over HTTP; the server is stopped by its PID."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest

from pipeline.config import load_params
from pipeline.stages import make_demo
from tests.integration.servers import free_port, stop, wait_http
from tests.integration.test_end_to_end import small_project

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent


def environment() -> dict[str, str]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)  # the project's own SQLite, as a user's run would use
    env.pop("PREFECT_API_URL", None)
    return env


@pytest.fixture(scope="module")
def project(tmp_path_factory, prefect_harness):
    """A champion (version 1) and a second version of the same weights (version 2) to swap to."""
    import mlflow

    from flows.training import training_flow

    root = small_project(tmp_path_factory.mktemp("serve"))
    make_demo(load_params(root / "params.yaml"), root)
    trained = training_flow(params_path="params.yaml", root=str(root))
    assert trained["register"]["promoted"] and trained["register"]["version"] == 1
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    assert mlflow.register_model(trained["metrics"]["model_uri"], "d2d-digits").version == 2
    return root


@pytest.fixture(scope="module")
def server(project):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = project / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(BIN / "d2d"), "serve", "--set", f"serve.port={port}", "--set", "serve.poll_s=0.5",
                                 "--set", "serve.log_flush_s=0.5", "--set", "serve.max_rows=100",
                                 "--set", "serve.max_body_bytes=200000"],
                                cwd=project, env=environment(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_http(f"{url}/health", 240, proc)
            deadline = time.monotonic() + 240
            # Ray Serve's proxy answers 404 until the application is deployed: wait for the app itself
            while httpx.get(f"{url}/health", timeout=30).status_code != 200:
                assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.5)
            yield {"url": url, "proc": proc, "log": log_path}
        finally:
            stop(proc, timeout=60)
    assert proc.returncode is not None


def test_rows(project, n: int = 20) -> list[dict]:
    test = pd.read_parquet(project / "data/split/test.parquet").head(n)
    columns = ["id"] + [c for c in test.columns if c.startswith("pixel_")]
    return test[columns].astype(int).to_dict("records")


test_rows.__test__ = False  # a helper, not a test


def champion_labels(project: Path, rows: list[dict], version: int) -> list:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model(f"models:/d2d-digits/{version}")
    frame = pd.DataFrame(rows).drop(columns="id").astype("int64")
    return model.predict(frame)["label"].tolist()


def test_single_and_multi_row_requests(project, server):
    rows = test_rows(project)
    one = httpx.post(f"{server['url']}/predict", json=rows[0], timeout=30)
    assert one.status_code == 200, one.text
    [answer] = one.json()["predictions"]
    assert answer["model_version"] == "1" and answer["id"] == rows[0]["id"]
    assert abs(sum(answer["probabilities"].values()) - 1) < 1e-5 and answer["probability"] == max(answer["probabilities"].values())

    many = httpx.post(f"{server['url']}/predict", json=rows, timeout=30).json()
    assert many["model_version"] == "1" and [p["id"] for p in many["predictions"]] == [r["id"] for r in rows]
    assert [p["label"] for p in many["predictions"]] == champion_labels(project, rows, 1)  # the registered model's answers

    health = httpx.get(f"{server['url']}/health", timeout=30).json()
    meta = httpx.get(f"{server['url']}/metadata", timeout=30).json()
    assert health == {"status": "ok", "model_version": "1"}
    assert meta["model_name"] == "d2d-digits" and meta["model_version"] == "1" and meta["data_version"]
    assert [c["name"] for c in meta["signature"]["inputs"]] == [f"pixel_{i}" for i in range(64)]


@pytest.mark.parametrize("make, status, words", [
    (lambda r: {k: v for k, v in r.items() if k != "pixel_7"}, 422, "missing column(s) pixel_7"),
    (lambda r: {**r, "label": 3}, 422, "unknown column(s) label"),
    (lambda r: {**r, "pixel_2": "dark"}, 422, "column pixel_2 must be long"),
    (lambda r: b"", 400, "empty body"),
    (lambda r: b"[" + b" " * 250_000 + b"]", 413, "serve.max_body_bytes"),
    (lambda r: [r] * 101, 413, "serve.max_rows=100"),
])
def test_bad_requests_get_a_4xx_naming_the_problem(project, server, make, status, words):
    payload = make(test_rows(project, 1)[0])
    sent = (httpx.post(f"{server['url']}/predict", content=payload, timeout=30) if isinstance(payload, bytes)
            else httpx.post(f"{server['url']}/predict", json=payload, timeout=30))
    assert sent.status_code == status and words in sent.json()["error"], sent.text
    assert httpx.get(f"{server['url']}/health", timeout=30).status_code == 200  # the replica is still up


def test_hot_swap_on_promotion_and_rollback_drops_no_request(project, server):
    rows = test_rows(project, 5)
    seen: list[tuple[float, str]] = []
    failures: list[str] = []
    done = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=30) as http:
            while not done.is_set():
                reply = http.post(f"{server['url']}/predict", json=rows)
                if reply.status_code != 200:
                    failures.append(f"{reply.status_code} {reply.text[:200]}")
                    continue
                versions = {p["model_version"] for p in reply.json()["predictions"]}
                if len(versions) != 1:
                    failures.append(f"one request answered by versions {versions}")
                seen.append((time.monotonic(), versions.pop()))

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(3)
        promoted_at = time.monotonic()
        promoted = subprocess.run([str(BIN / "d2d"), "promote", "2", "--reason", "hot swap test"], cwd=project,
                                  env=environment(), capture_output=True, text=True, timeout=120)
        assert promoted.returncode == 0, promoted.stderr
        deadline = time.monotonic() + 60
        while not any(v == "2" for _, v in seen[-5:]):  # load continues until the swap shows in the responses
            assert time.monotonic() < deadline, "the promotion was not picked up"
            time.sleep(0.1)
        time.sleep(1)
    finally:
        done.set()
        for t in threads:
            t.join()
    assert not failures, failures[:3]
    assert len(seen) > 20
    before = [v for t, v in seen if t < promoted_at]
    assert before and set(before) == {"1"}
    assert seen[-1][1] == "2"  # the version in the responses changed

    rolled = subprocess.run([str(BIN / "d2d"), "rollback", "--reason", "hot swap test"], cwd=project,
                            env=environment(), capture_output=True, text=True, timeout=120)
    assert rolled.returncode == 0, rolled.stderr
    deadline = time.monotonic() + 30
    while httpx.get(f"{server['url']}/health", timeout=30).json()["model_version"] != "1":
        assert time.monotonic() < deadline, "the rollback was not picked up"
        time.sleep(0.2)


def test_the_inference_log_is_written_and_the_monitor_reads_it(project, server):
    from flows.monitor import monitor_flow

    rows = test_rows(project, 60)
    for chunk in (rows[:30], rows[30:]):
        assert httpx.post(f"{server['url']}/predict", json=chunk, timeout=30).status_code == 200
    log_dir = project / "data/inference_log"
    deadline = time.monotonic() + 30
    while True:
        frame = pd.read_parquet(log_dir) if list(log_dir.glob("date=*/part-*.parquet")) else pd.DataFrame()
        if len(frame) >= 60 and set(frame["id"]) >= {r["id"] for r in rows}:
            break
        assert time.monotonic() < deadline, f"{len(frame)} rows logged"
        time.sleep(0.2)
    assert {"timestamp", "model_version", "pixel_0", "out_label", "out_probability"} <= set(frame.columns)
    assert [p.name.startswith("date=") for p in log_dir.iterdir()] == [True] * len(list(log_dir.iterdir()))

    result = monitor_flow(params_path="params.yaml", root=str(project), overrides=["monitor.retrain=off"])
    [batch] = result["batches"]
    assert batch["batch"] == "inference-log" and batch["action"] in ("none", "alert")  # no labels: never appended
    ledger = json.loads((project / "data/monitor/ledger.json").read_text())
    [entry] = ledger["batches"].values()
    assert not entry["labelled"] and entry["appended"] is None and entry["rows"] >= 60
    assert len(ledger["log_parts"]) == entry["log_parts"] > 0
    again = monitor_flow(params_path="params.yaml", root=str(project), overrides=["monitor.retrain=off"])
    assert again["batches"] == []  # every part read once


def test_batch_prediction_on_a_small_file(project, tmp_path):
    rows = test_rows(project, 30)
    frame = pd.DataFrame(rows)
    frame["pixel_9"] = frame["pixel_9"].astype(object)
    frame.loc[4, "pixel_9"] = "smudge"  # one row the model cannot read
    frame.to_csv(tmp_path / "new.csv", index=False)
    out = subprocess.run([str(BIN / "d2d"), "predict", "--input", str(tmp_path / "new.csv"), "--output",
                          str(tmp_path / "scored.parquet")], cwd=project, env=environment(),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "scored 30 rows" in out.stdout and "1 rows could not be scored" in out.stdout
    scored = pd.read_parquet(tmp_path / "scored.parquet")
    assert scored["id"].tolist() == frame["id"].tolist()  # every row, in order
    assert scored.loc[4, "error"].endswith("pixel_9") and pd.isna(scored.loc[4, "label"])
    good = [i for i in range(30) if i != 4]
    expected = champion_labels(project, [rows[i] for i in good], 1)
    assert scored.loc[good, "label"].tolist() == expected and set(scored["model_version"]) == {"1"}

    missing = subprocess.run([str(BIN / "d2d"), "predict", "--input", str(tmp_path / "new.csv"), "--output",
                              str(tmp_path / "scored.txt")], cwd=project, env=environment(),
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "expected a .csv or .parquet" in missing.stderr


def test_health_reports_the_inference_log_counters_and_the_open_server_says_so(project, server):
    assert httpx.post(f"{server['url']}/predict", json=test_rows(project, 2), timeout=30).status_code == 200
    log = httpx.get(f"{server['url']}/health", timeout=30).json()["inference_log"]
    assert log["writer_alive"] is True
    assert log["dropped_rows"] == log["dead_letter_parts"] == log["lost_rows"] == log["write_errors"] == 0
    deadline = time.monotonic() + 30
    while "no bearer token" not in (project / "serve.log").read_text():  # serve.auth_token_env's variable is unset
        assert time.monotonic() < deadline, "the open server did not say so"
        time.sleep(0.2)
