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
from pipeline.runners.data import make_demo
from tests.integration.servers import free_port, stop_leader, wait_http
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
    assert trained.register.promoted and trained.register.version == 1
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    assert mlflow.register_model(trained.evaluate.model_uri, "d2d-digits").version == 2
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
            stop_leader(proc)
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
    assert health["status"] == "ok" and health["model_version"] == "1" and health["inference_log"]["writer_alive"]
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
    [batch] = result.batches
    assert batch.batch == "inference-log" and batch.decision.action in ("none", "alert")  # no labels: never appended
    ledger = json.loads((project / "data/monitor/ledger.json").read_text())
    [entry] = ledger["batches"].values()
    assert not entry["labelled"] and entry["appended"] is None and entry["rows"] >= 60
    assert len(ledger["log_parts"]) == entry["log_parts"] > 0
    again = monitor_flow(params_path="params.yaml", root=str(project), overrides=["monitor.retrain=off"])
    assert again.batches == ()  # every part read once


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
    assert (tmp_path / "scored.parquet").is_dir()  # a Parquet dataset, written by Ray Data's workers
    scored = pd.read_parquet(tmp_path / "scored.parquet")
    assert scored["id"].tolist() == frame["id"].tolist()  # every row, in order
    assert scored.loc[4, "error"] == "column pixel_9: 'smudge' is not a number" and pd.isna(scored.loc[4, "label"])
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


# Issue 14, points 1, 3, 5 and 12: hostile bodies, the id's type, MLflow's scoring protocol,
# and batch predict on the raw file's own values (the same check everywhere).

def chunked(size: int):
    """A body with no Content-Length (chunked transfer), `size` bytes of one JSON array."""
    yield b"["
    sent = 1
    while sent < size:
        yield b" " * 10_000
        sent += 10_000
    yield b"]"


def test_hostile_bodies_get_200_or_a_4xx_and_the_replica_stays_up(project, server):
    row = test_rows(project, 1)[0]
    text = json.dumps(row)
    cases = [
        (b"[" * 100_000, 400, "nests too deeply"),
        (b"{" * 60_000, 400, "not valid JSON"),
        (text.replace(f'"pixel_3": {row["pixel_3"]}', '"pixel_3": ' + "9" * 5000).encode(), 422,
         "an integer in the body is out of range"),
        (text.replace(f'"pixel_3": {row["pixel_3"]}', '"pixel_3": 99999999999999999999999').encode(), 422,
         "column pixel_3: 1e+23 is out of range for a long"),
        (text.replace(f'"pixel_3": {row["pixel_3"]}', '"pixel_3": NaN').encode(), 400, "NaN is not a JSON number"),
        (text.replace(f'"pixel_3": {row["pixel_3"]}', '"pixel_3": Infinity').encode(), 400, "Infinity"),
        (text.replace(f'"pixel_3": {row["pixel_3"]}', '"pixel_3": 1e308').encode(), 422, "out of range for a long"),
        (text.replace(f'"pixel_3": {row["pixel_3"]}', '"pixel_3": 2.5').encode(), 422, "column pixel_3: 2.5 is not an integer"),
        (text.replace(f'"pixel_3": {row["pixel_3"]}', '"pixel_3": null').encode(), 422, "column pixel_3 is null"),
        (json.dumps({**row, "id": "seven"}).encode(), 422, "id column id must be long, got str 'seven'"),
        (json.dumps([{**row, "id": 7}, {**row, "id": "seven"}]).encode(), 422, "row 1: id column id must be long"),
        (b"\xff\xfe\x00", 400, "not valid JSON"),
        (json.dumps({**row, "pixel_3": float(row["pixel_3"])}).encode(), 200, None),  # a pandas reader's integral float
    ]
    for payload, status, words in cases:
        sent = httpx.post(f"{server['url']}/predict", content=payload, timeout=60)
        assert sent.status_code == status, (payload[:80], sent.text[:300])
        if words:
            assert words in sent.json()["error"], sent.text[:300]
    # no Content-Length: the body is read as a stream and stopped at serve.max_body_bytes
    over = httpx.post(f"{server['url']}/predict", content=chunked(400_000), timeout=60)
    assert over.status_code == 413 and "serve.max_body_bytes=200000" in over.json()["error"], over.text[:300]
    under = httpx.post(f"{server['url']}/predict", content=(c for c in [text.encode()]), timeout=60)
    assert under.status_code == 200, under.text[:300]
    assert httpx.get(f"{server['url']}/health", timeout=30).status_code == 200  # the replica is still up


def test_mlflow_clients_score_through_invocations(project, server):
    """Each of MLflow's formats, as MLflow's own client helpers send them, gets the same
    predictions as /predict; a bad value gets /predict's error."""
    from mlflow.deployments import PredictionsResponse
    from mlflow.models import convert_input_example_to_serving_input
    from mlflow.pyfunc.scoring_server.client import ScoringServerClient
    from mlflow.utils.proto_json_utils import dump_input_data

    rows = test_rows(project, 5)
    frame = pd.DataFrame(rows).drop(columns="id")
    expected = champion_labels(project, rows, 1)
    port = int(server["url"].rsplit(":", 1)[1])
    client = ScoringServerClient("127.0.0.1", port)
    features = frame.to_dict("records")
    bodies = {
        "dataframe_split": convert_input_example_to_serving_input(frame),
        "dataframe_records": json.dumps({"dataframe_records": features}),
        "instances": dump_input_data(features, inputs_key="instances"),
        "inputs": dump_input_data(features),
        "inputs (columnar)": json.dumps({"inputs": frame.to_dict("list")}),
    }
    for name, body in bodies.items():
        reply = httpx.post(f"{server['url']}/invocations", content=body, headers={"Content-Type": "application/json"},
                           timeout=60)
        assert reply.status_code == 200, (name, reply.text[:300])
        predictions = PredictionsResponse.from_json(reply.text).get_predictions()
        assert predictions["label"].tolist() == expected, name
    assert client.invoke(frame).get_predictions()["label"].tolist() == expected  # MLflow's client, unchanged
    assert client.invoke(frame.astype("float64")).get_predictions()["label"].tolist() == expected  # integral floats

    bad = httpx.post(f"{server['url']}/invocations", json={"dataframe_records": [{**features[0], "pixel_3": 2.5}]},
                     timeout=60)
    assert bad.status_code == 422 and "column pixel_3: 2.5 is not an integer" in bad.json()["message"]
    for payload in (b"[" * 100_000, b'{"inputs": [{"pixel_0": NaN}]}', b'{"dataframe_split": 3}', b"{}"):
        refused = httpx.post(f"{server['url']}/invocations", content=payload, timeout=60)
        assert 400 <= refused.status_code < 500 and refused.json()["error_code"] == "BAD_REQUEST", refused.text[:300]
    csv = httpx.post(f"{server['url']}/invocations", content=frame.to_csv(index=False),
                     headers={"Content-Type": "text/csv"}, timeout=60)
    assert csv.status_code == 415
    assert httpx.get(f"{server['url']}/health", timeout=30).status_code == 200


def test_batch_predict_checks_each_row_alike_and_keeps_an_existing_output(project, tmp_path):
    """The raw file's own readings of bad values fail only their rows, with the column named;
    the others are scored in order; an existing output needs --force."""
    rows = test_rows(project, 12)
    lines = pd.DataFrame(rows).astype(object)
    bad = {1: ("pixel_5", "inf"), 3: ("pixel_6", "1e308"), 5: ("pixel_7", "2.7"), 7: ("pixel_8", "")}
    for i, (column, value) in bad.items():
        lines.loc[i, column] = value
    lines.loc[9, "pixel_10"] = "4.0"  # an integral float is the integer it writes
    source = tmp_path / "raw.csv"
    lines.to_csv(source, index=False)
    output = tmp_path / "scored.csv"
    output.write_text("precious\n")
    refused = subprocess.run([str(BIN / "d2d"), "predict", "-i", str(source), "-o", str(output)], cwd=project,
                             env=environment(), capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "exists; pass --force" in refused.stderr and output.read_text() == "precious\n"
    done = subprocess.run([str(BIN / "d2d"), "predict", "-i", str(source), "-o", str(output), "--force",
                           "--set", "serve.predict_batch_size=4"], cwd=project, env=environment(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "scored 12 rows" in done.stdout and "4 rows could not be scored" in done.stdout
    scored = pd.read_csv(output, keep_default_na=False)
    assert scored["id"].tolist() == [r["id"] for r in rows]  # every row, in input order, across batches
    assert scored.loc[1, "error"] == "column pixel_5: 'inf' is not a finite number"
    assert scored.loc[3, "error"].startswith("column pixel_6: '1e308' is out of range for a long")
    assert scored.loc[5, "error"] == "column pixel_7: '2.7' is not an integer"
    assert scored.loc[7, "error"] == "column pixel_8 is null and the model has no imputation for it"
    good = [i for i in range(12) if i not in bad]
    assert (scored.loc[good, "error"] == "").all() and (scored.loc[list(bad), "label"] == "").all()
    assert scored.loc[good, "label"].astype(int).tolist() == champion_labels(project, [rows[i] for i in good], 1)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left
