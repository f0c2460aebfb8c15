"""The inference log never stops: a part that cannot be written is set aside with its reason
and later rows keep flowing, a full queue drops rows and counts them, old partitions are
removed, and hostile frames never kill the writer or lose a row without a count. The bearer
token check that guards every serving route but /health."""

from __future__ import annotations

import json
import os
import stat
import time
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.inference_log import DEAD_LETTER, InferenceLog
from pipeline.serve import bearer_auth


def parts(folder: Path) -> list[Path]:
    return sorted(folder.glob("date=*/part-*.parquet"))  # the monitor's glob


def dead_letters(folder: Path) -> list[dict]:
    return [json.loads(line) for p in sorted((folder / DEAD_LETTER).rglob("*.jsonl")) for line in p.read_text().splitlines()]


def written_rows(folder: Path) -> int:
    return sum(len(pd.read_parquet(p)) for p in parts(folder))


def out(n: int) -> pd.DataFrame:
    return pd.DataFrame({"label": [1] * n, "probability": [0.9] * n})


def until(condition, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the writer did not get there"
        time.sleep(0.05)


def test_ids_of_different_types_in_one_window_are_all_kept_and_later_rows_keep_flowing(tmp_path):
    log = InferenceLog(tmp_path, flush_s=3600)  # flushed by hand: both requests share one window
    log.add(pd.DataFrame({"id": [7], "a": [1.0]}), out(1), "1")
    log.add(pd.DataFrame({"id": ["seven"], "a": [2.0]}), out(1), "1")
    log.add(pd.DataFrame({"id": [8, "eight"], "a": [3.0, 4.0]}), out(2), "1")  # cannot be written at all
    log.flush()
    log.add(pd.DataFrame({"id": [9], "a": [5.0]}), out(1), "1")
    log.close()
    assert log.thread.is_alive() is False and log.stats()["write_errors"] == 0
    ids = [i for p in parts(tmp_path) for i in pd.read_parquet(p)["id"]]
    assert sorted(map(str, ids)) == ["7", "9", "seven"]  # the good requests of the spoilt window, then later rows
    letters = dead_letters(tmp_path)
    assert [r["inputs"]["id"] for r in letters] == [8, "eight"]
    assert all("id" in r["reason"] and r["model_version"] == "1" and r["outputs"]["label"] == 1 for r in letters)
    assert log.stats() | {"writer_alive": None} == {"written_rows": 3, "dead_letter_rows": 2, "dead_letter_parts": 1,
                                                   "dropped_rows": 0, "lost_rows": 0, "write_errors": 0,
                                                   "queued_rows": 0, "writer_alive": None}
    folder = tmp_path / DEAD_LETTER
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in folder.rglob("*.jsonl"))
    assert not list(tmp_path.rglob(".part-*"))  # no temporary file left behind
    assert len(pd.read_parquet(parts(tmp_path)[0])) == 1  # each part is readable on its own


def test_the_writer_thread_survives_a_bad_part_and_writes_the_next(tmp_path):
    log = InferenceLog(tmp_path, flush_s=0.05)
    log.add(pd.DataFrame({"id": [1, "one"]}), out(2), "1")
    until(lambda: log.stats()["dead_letter_rows"] == 2)
    assert log.thread.is_alive()
    log.add(pd.DataFrame({"id": [2]}), out(1), "1")
    until(lambda: written_rows(tmp_path) == 1)
    log.close()


def test_a_full_queue_drops_rows_and_counts_them(tmp_path):
    log = InferenceLog(tmp_path, flush_s=3600, max_queued_rows=5)
    assert log.add(pd.DataFrame({"a": range(3)}), out(3), "1")
    assert not log.add(pd.DataFrame({"a": range(3)}), out(3), "1")  # 6 > 5: the whole request is dropped
    assert log.add(pd.DataFrame({"a": range(2)}), out(2), "1")
    assert not log.add(pd.DataFrame({"a": [9]}), out(1), "1")
    assert log.stats()["dropped_rows"] == 4 and log.stats()["queued_rows"] == 5
    log.flush()  # the queue drains, and there is room again
    assert log.add(pd.DataFrame({"a": [10]}), out(1), "1")
    log.close()
    assert written_rows(tmp_path) == 6 and log.stats()["dropped_rows"] == 4


def test_retention_removes_partitions_older_than_the_setting(tmp_path):
    # Days relative to today: close() sweeps once more with the real date, and a test with
    # fixed dates would start failing once they are old.
    today = datetime.now(timezone.utc).date()
    old, recent = (str(today - timedelta(days=d)) for d in (24, 5))
    for day in (old, recent, str(today)):
        (tmp_path / f"date={day}").mkdir()
        pd.DataFrame({"a": [1]}).to_parquet(tmp_path / f"date={day}/part-1.parquet")
    (tmp_path / DEAD_LETTER / f"date={old}").mkdir(parents=True)
    (tmp_path / "date=not-a-day").mkdir()  # not the log's: left alone
    log = InferenceLog(tmp_path, flush_s=3600, retention_days=7)
    removed = log.remove_expired(today=today)
    log.close()
    assert sorted(p.name for p in removed) == [f"date={old}", f"date={old}"]
    assert sorted(p.name for p in tmp_path.glob("date=*")) == [f"date={recent}", f"date={today}", "date=not-a-day"]
    assert InferenceLog(tmp_path, flush_s=3600).remove_expired(today=date(2100, 1, 1)) == []  # None: kept forever


def test_the_writer_applies_retention_on_its_own(tmp_path):
    (tmp_path / "date=2000-01-01").mkdir()
    log = InferenceLog(tmp_path, flush_s=0.05, retention_days=30)
    until(lambda: not (tmp_path / "date=2000-01-01").exists())
    log.close()


def test_parts_have_unique_names_and_a_feature_may_be_called_like_a_log_column(tmp_path):
    log = InferenceLog(tmp_path, flush_s=3600)
    for _ in range(3):
        log.add(pd.DataFrame({"timestamp": [1], "model_version": ["mine"], "out_label": [2]}), out(1), "4")
        log.flush()  # three parts within one clock tick must not overwrite each other
    log.close()
    assert len(parts(tmp_path)) == 3 and not dead_letters(tmp_path)
    frame = pd.read_parquet(parts(tmp_path)[0])
    # the request's columns keep their names; the log's own move aside
    assert frame["timestamp"].tolist() == [1] and frame["model_version"].tolist() == ["mine"]
    assert frame["out_label"].tolist() == [2] and frame["_out_label"].tolist() == [1]
    assert frame["_model_version"].tolist() == ["4"] and "_timestamp" in frame


# Hostile frames: column names of any kind (empty, duplicated, numbers, the log's own), cells of
# mixed types, empty frames, outputs of another length. Whatever arrives, the writer stays up
# and each row is written, dead-lettered or counted as dropped.
names = st.one_of(st.text(max_size=6), st.sampled_from(["timestamp", "model_version", "out_label", "id", "date"]),
                  st.integers(-3, 3))
cells = st.one_of(st.none(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
                  st.text(max_size=5), st.booleans(), st.binary(max_size=4), st.lists(st.integers(), max_size=2))


@st.composite
def hostile_frames(draw) -> tuple[pd.DataFrame, pd.DataFrame]:
    rows = draw(st.integers(0, 4))
    columns = draw(st.lists(names, max_size=4))
    frame = pd.DataFrame([[draw(cells) for _ in columns] for _ in range(rows)], columns=columns) if columns \
        else pd.DataFrame(index=range(rows))
    out_rows = draw(st.sampled_from([rows, rows, rows + 1, max(rows - 1, 0)]))
    return frame, pd.DataFrame({"label": [draw(cells) for _ in range(out_rows)]})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests=st.lists(hostile_frames(), max_size=6), capacity=st.integers(1, 12))
def test_hostile_frames_never_stop_the_writer_nor_vanish(tmp_path_factory, requests, capacity):
    folder = tmp_path_factory.mktemp("log")
    log = InferenceLog(folder, flush_s=3600, max_queued_rows=capacity)
    for i, (frame, result) in enumerate(requests):
        log.add(frame, result, "1")
        if i % 2:
            log.flush()
        assert log.thread.is_alive()
    log.close()
    stats = log.stats()
    assert stats["write_errors"] == 0 and stats["lost_rows"] == 0
    total = sum(len(frame) for frame, _ in requests)
    assert stats["written_rows"] + stats["dead_letter_rows"] + stats["dropped_rows"] == total
    assert written_rows(folder) == stats["written_rows"]  # the counts are what is on disk
    assert len(dead_letters(folder)) == stats["dead_letter_rows"]
    assert not list(folder.rglob(".part-*"))


def app(token: str) -> TestClient:
    api = FastAPI()
    bearer_auth(api, token)

    @api.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @api.post("/predict")
    def predict() -> dict:
        return {"predictions": []}

    @api.post("/invocations")  # a route added by someone else is covered too
    def invocations() -> dict:
        return {"predictions": []}

    @api.get("/metadata")
    def metadata() -> dict:
        return {}

    return TestClient(api)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                                     {"Authorization": "Basic s3cret"}, {"Authorization": "Bearer "},
                                     {"Authorization": "Bearer s3cret-and-more"}, {"Authorization": "Bearer s3crét".encode("latin-1")}])
@pytest.mark.parametrize("method, path", [("post", "/predict"), ("post", "/invocations"), ("get", "/metadata"),
                                          ("get", "/docs"), ("get", "/nowhere"), ("post", "/health")])
def test_with_a_token_set_every_route_but_health_needs_it(headers, method, path):
    client = app("s3cret")
    answer = client.request(method, path, headers=headers)
    assert answer.status_code == 401 and "Authorization: Bearer" in answer.json()["error"]
    assert answer.headers["www-authenticate"] == "Bearer"


def test_the_right_token_passes_and_health_stays_open():
    client = app("s3cret")
    assert client.get("/health").status_code == 200  # a load balancer's probe
    for scheme in ("Bearer", "bearer"):
        assert client.post("/predict", headers={"Authorization": f"{scheme} s3cret"}).status_code == 200
        assert client.post("/invocations", headers={"Authorization": f"{scheme} s3cret"}).status_code == 200
    open_ = app("")
    assert open_.post("/predict").status_code == 200 and open_.get("/metadata").status_code == 200


def test_settings_read_the_token_from_the_variable_params_name(monkeypatch, tmp_path):
    from pipeline.config import ServeParams
    from pipeline.serve import ServeSettings

    class Params:
        serve = ServeParams(auth_token_env="MY_TOKEN")
        register_ = type("R", (), {"model_name": "m"})
        data = type("D", (), {"id_column": "id"})

    monkeypatch.setenv("MY_TOKEN", "abc")
    assert ServeSettings.from_params(Params, "sqlite://", tmp_path).auth_token == "abc"
    monkeypatch.delenv("MY_TOKEN")
    assert ServeSettings.from_params(Params, "sqlite://", tmp_path).auth_token == ""
    with pytest.raises(ValueError, match="auth_token_env"):
        ServeParams(auth_token_env="not a name")
    assert os.environ.get("MY_TOKEN") is None


@settings(max_examples=200, deadline=None)
@given(value=st.binary(max_size=80).filter(lambda b: b"\r" not in b and b"\n" not in b and b"\0" not in b),
       path=st.sampled_from(["/predict", "/invocations", "/metadata", "/health/", "//health", "/%2e/predict"]))
def test_any_authorization_header_but_the_right_one_gets_401_never_a_crash(value, path):
    client = app("s3cret")
    answer = client.request("POST" if "predict" in path or "invocations" in path else "GET", path,
                            headers={"Authorization": value})
    right = value.strip() in (b"Bearer s3cret", b"bearer s3cret") or (
        value.split(b" ", 1)[0].lower() == b"bearer" and value.split(b" ", 1)[-1].strip() == b"s3cret")
    assert answer.status_code == (200 if right and path in ("/predict", "/invocations", "/metadata") else
                                  404 if right else 401)
