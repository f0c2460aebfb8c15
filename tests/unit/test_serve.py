"""What the server does before a model sees a request: every bad body gets its own 4xx and a
message naming the problem; good rows come back typed. The inference log writes date
partitions off the request path. Batch inference keeps every row, unscorable ones with an
error."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest

from pipeline.errors import D2DError
from pipeline.predict import input_files
from pipeline.serve import InferenceLog, RequestError, parse_rows, responses

COLUMNS = [("a", "long"), ("b", "double"), ("c", "string")]


def body(rows) -> bytes:
    return json.dumps(rows).encode()


GOOD = {"a": 1, "b": 0.5, "c": "x"}


def test_one_row_or_many_come_back_as_a_frame():
    assert len(parse_rows(body(GOOD), COLUMNS, "id", 10)) == 1
    frame = parse_rows(body([GOOD, {**GOOD, "b": 2, "id": 7}]), COLUMNS, "id", 10)  # an int is a fine double
    assert frame["a"].tolist() == [1, 1] and frame["b"].tolist() == [0.5, 2.0]


@pytest.mark.parametrize("payload, status, words", [
    (b"", 400, "empty body"),
    (b"   ", 400, "empty body"),
    (b"{oops", 400, "not valid JSON"),
    (b"[]", 400, "no rows"),
    (b"42", 400, "expected a JSON object"),
    (body([GOOD, 3]), 400, "expected a JSON object"),
    (body([GOOD] * 11), 413, "serve.max_rows=10"),
    (body([{"a": 1, "b": 0.5}]), 422, "missing column(s) c"),
    (body([{**GOOD, "label": 3}]), 422, "unknown column(s) label"),
    (body([GOOD, {**GOOD, "a": "seven"}]), 422, "row 1: column a must be long, got str 'seven'"),
    (body([{**GOOD, "a": 1.5}]), 422, "column a must be long, got float 1.5"),
    (body([{**GOOD, "a": True}]), 422, "column a must be long, got bool True"),
    (body([{**GOOD, "b": "0.5"}]), 422, "column b must be double"),
    (body([{**GOOD, "c": 3}]), 422, "column c must be string"),
    (body([{**GOOD, "b": None}]), 422, "column b is null"),
])
def test_each_bad_request_gets_its_status_and_names_the_problem(payload, status, words):
    with pytest.raises(RequestError) as caught:
        parse_rows(payload, COLUMNS, "id", 10)
    assert caught.value.status == status and words in str(caught.value)


def test_responses_carry_label_probabilities_version_and_id():
    out = pd.DataFrame({"label": [3], "probability": [0.9], "prob_3": [0.9], "prob_5": [0.1]})
    [row] = responses(out, pd.DataFrame({"id": [11]}), "4", "id")
    assert row == {"model_version": "4", "id": 11, "label": 3, "probability": 0.9, "probabilities": {"3": 0.9, "5": 0.1}}
    assert json.dumps(row)  # plain JSON types


def test_the_inference_log_writes_date_partitions_in_the_background(tmp_path):
    log = InferenceLog(tmp_path, flush_s=0.1)
    log.add(pd.DataFrame({"a": [1, 2]}), pd.DataFrame({"label": [0, 1]}), "3")
    deadline = time.monotonic() + 10
    while not list(tmp_path.glob("date=*/part-*.parquet")):
        assert time.monotonic() < deadline, "nothing written"
        time.sleep(0.05)
    log.add(pd.DataFrame({"a": [3]}), pd.DataFrame({"label": [1]}), "3")
    log.close()  # what is queued at shutdown is written too
    frame = pd.read_parquet(tmp_path)
    assert sorted(frame["a"]) == [1, 2, 3] and set(frame["model_version"]) == {"3"} and "out_label" in frame
    assert not list(tmp_path.rglob(".part-*"))  # no half-written files left


def test_batch_inference_inputs(tmp_path):
    with pytest.raises(D2DError, match="no such file"):
        input_files(tmp_path / "missing.csv")
    with pytest.raises(D2DError, match="no .csv or .parquet"):
        input_files(tmp_path)
    (tmp_path / "a.csv").write_text("x\n1\n")
    (tmp_path / "b.parquet").write_bytes(b"")
    with pytest.raises(D2DError, match="mixes CSV and Parquet"):
        input_files(tmp_path)
    (tmp_path / "b.parquet").unlink()
    assert input_files(tmp_path) == [tmp_path / "a.csv"] and input_files(tmp_path / "a.csv") == [Path(tmp_path / "a.csv")]
