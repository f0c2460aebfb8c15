"""What the server does before a model sees a request: every bad body gets its own 4xx and a
message naming the problem; good rows come back typed. The inference log writes date
partitions off the request path. Batch inference keeps every row, unscorable ones with an
error."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import D2DError
from pipeline.predict import input_files
from pipeline.serve import InferenceLog, RequestError, parse_invocation, parse_rows, responses

COLUMNS = [{"name": "a", "type": "long", "nullable": False}, {"name": "b", "type": "double", "nullable": False},
           {"name": "c", "type": "string", "nullable": False}]
ID = {"name": "id", "type": "long"}


def body(rows) -> bytes:
    return json.dumps(rows).encode()


GOOD = {"a": 1, "b": 0.5, "c": "x"}


def test_one_row_or_many_come_back_as_a_frame():
    assert len(parse_rows(body(GOOD), COLUMNS, ID, 10)) == 1
    frame = parse_rows(body([GOOD, {**GOOD, "b": 2, "id": 7}]), COLUMNS, ID, 10)  # an int is a fine double
    assert frame["a"].tolist() == [1, 1] and frame["b"].tolist() == [0.5, 2.0]
    # what a client sends from a pandas frame of the raw file: an integral float for an int column
    assert parse_rows(body({**GOOD, "a": 3.0}), COLUMNS, ID, 10)["a"].dtype == "int64"


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
    (body([{**GOOD, "a": 1.5}]), 422, "row 0: column a: 1.5 is not an integer"),
    (body([{**GOOD, "a": 1e308}]), 422, "column a: 1e+308 is out of range for a long"),
    (body([{**GOOD, "a": 2**63}]), 422, "column a: 9.223372036854776e+18 is out of range for a long"),
    (body([{**GOOD, "a": 10**100}]), 422, "column a: 1e+100 is out of range for a long"),
    (body([{**GOOD, "b": 10**100}]), 200, None),  # a big integer is a fine double
    (f'{{"a": {"9" * 5000}, "b": 1, "c": "x"}}'.encode(), 422, "an integer in the body is out of range"),
    (f'{{"a": 1, "b": {"9" * 400}, "c": "x"}}'.encode(), 422, "row 0: column b: a 400-digit integer is out of range"),
    (b'{"a": 1, "b": NaN, "c": "x"}', 400, "NaN is not a JSON number"),
    (b'{"a": 1, "b": -Infinity, "c": "x"}', 400, "-Infinity is not a JSON number"),
    (b'{"a": 1, "b": 1e999, "c": "x"}', 422, "column b: inf is not a finite number"),
    (b"[" * 100_000, 400, "nests too deeply"),
    (b"\xff\xfe{", 400, "not valid JSON"),
    (body([{**GOOD, "id": "seven"}]), 422, "row 0: id column id must be long, got str 'seven'"),
    (body([{**GOOD, "id": 7.0}]), 422, "id column id must be long, got float"),
    (body([{**GOOD, "id": 2**64}]), 422, "id column id must be long"),
    (body([{**GOOD, "a": True}]), 422, "column a must be long, got bool True"),
    (body([{**GOOD, "b": "0.5"}]), 422, "column b must be double"),
    (body([{**GOOD, "c": 3}]), 422, "column c must be string"),
    (body([{**GOOD, "b": None}]), 422, "column b is null"),
])
def test_each_bad_request_gets_its_status_and_names_the_problem(payload, status, words):
    if status == 200:
        assert len(parse_rows(payload, COLUMNS, ID, 10)) == 1
        return
    with pytest.raises(RequestError) as caught:
        parse_rows(payload, COLUMNS, ID, 10)
    assert caught.value.status == status and words in str(caught.value)


def test_a_null_passes_where_the_model_imputes_and_an_id_is_refused_where_the_model_has_none():
    nullable = [{**c, "nullable": True} for c in COLUMNS]
    frame = parse_rows(body([{**GOOD, "a": None, "c": None}]), nullable, None, 10)
    assert frame["a"].isna().all() and frame["c"].isna().all()
    with pytest.raises(RequestError, match="unknown column"):
        parse_rows(body([{**GOOD, "id": 7}]), COLUMNS, None, 10)
    untyped = {"name": "id", "type": None}  # a model fitted before the id's type was recorded
    assert parse_rows(body([{**GOOD, "id": "a"}, {**GOOD, "id": "b"}]), COLUMNS, untyped, 10)["id"].tolist() == ["a", "b"]
    with pytest.raises(RequestError, match="every row's id must have the same type"):
        parse_rows(body([{**GOOD, "id": 7}, {**GOOD, "id": "seven"}]), COLUMNS, untyped, 10)


@pytest.mark.parametrize("payload", [
    {"dataframe_split": {"columns": ["a", "b", "c", "id"], "data": [[1, 0.5, "x", 4], [2, 1.5, "y", 5]]}},
    {"dataframe_split": {"index": [0, 1], "columns": ["a", "b", "c"], "data": [[1, 0.5, "x"], [2, 1.5, "y"]]}},
    {"dataframe_records": [{"a": 1, "b": 0.5, "c": "x"}, {"a": 2, "b": 1.5, "c": "y"}]},
    {"instances": [{"a": 1, "b": 0.5, "c": "x"}, {"a": 2, "b": 1.5, "c": "y"}]},
    {"inputs": {"a": [1, 2], "b": [0.5, 1.5], "c": ["x", "y"]}},
    {"inputs": [{"a": 1, "b": 0.5, "c": "x"}, {"a": 2, "b": 1.5, "c": "y"}], "params": {"unused": 1}},
])
def test_each_mlflow_scoring_format_gives_the_same_frame(payload):
    frame = parse_invocation(body(payload), COLUMNS, ID, 10)
    assert frame[["a", "b", "c"]].to_dict("list") == {"a": [1, 2], "b": [0.5, 1.5], "c": ["x", "y"]}


@pytest.mark.parametrize("payload, status, words", [
    (body([GOOD]), 400, "dataframe_split"),
    (body({"dataframe_records": [GOOD], "instances": [GOOD]}), 400, "dataframe_split"),
    (body({"dataframe_split": {"columns": ["a"], "data": [[1, 2]]}}), 400, "every data row must be a list of 1"),
    (body({"dataframe_split": {"columns": [1], "data": [[1]]}}), 400, "columns must be distinct strings"),
    (body({"inputs": {"a": [1, 2], "b": [1]}}), 400, "all of one length"),
    (body({"inputs": [[1, 0.5, "x"]]}), 400, "list of row objects"),
    (body({"dataframe_records": [{**GOOD, "a": 2.5}]}), 422, "row 0: column a: 2.5 is not an integer"),
    (b'{"instances": [{"a": 1, "b": NaN, "c": "x"}]}', 400, "NaN is not a JSON number"),
])
def test_mlflow_formats_get_the_same_checks_and_errors(payload, status, words):
    with pytest.raises(RequestError) as caught:
        parse_invocation(payload, COLUMNS, ID, 10)
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


# JSON values of every kind, hostile ones included: huge and non-finite numbers, deep nesting,
# odd keys; then bodies built from them, valid ones among them, and raw bytes.
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=4), inner, max_size=3)),
                      max_leaves=8)
ROW = st.fixed_dictionaries({"a": st.one_of(st.integers(-(2**70), 2**70), st.floats(), VALUES),
                             "b": st.one_of(st.floats(), VALUES), "c": st.one_of(st.text(max_size=5), VALUES)},
                            optional={"id": VALUES, "extra": VALUES})
HOSTILE = st.sampled_from([
    b"[" * 100_000, b"{" * 50_000, b'{"a": ' * 30_000, ("9" * 5000).encode(), b"NaN", b"-Infinity", b"1e999",
    b'{"a": 1e308, "b": 1, "c": "x"}', b'{"a": 99999999999999999999999, "b": 1, "c": "x"}', b"\x00\xff", b"",
    b'{"a": 1, "b": 1, "c": "x", "id": 7}', b'[{"a": 1, "b": 1, "c": "x", "id": "seven"}]',
])


def _text(value) -> bytes:
    return json.dumps(value, allow_nan=True).encode()  # NaN and Infinity too: clients send them


BODIES = st.one_of(
    HOSTILE,
    st.builds(_text, ROW), st.builds(_text, st.lists(ROW, max_size=12)), st.builds(_text, VALUES),
    st.builds(_text, st.fixed_dictionaries({}, optional={"dataframe_split": VALUES, "inputs": st.lists(ROW, max_size=3),
                                                         "instances": VALUES, "dataframe_records": st.lists(ROW),
                                                         "params": VALUES})),
    st.builds(lambda rows: _text({"dataframe_split": {"columns": ["a", "b", "c"],
                                                      "data": [[r["a"], r["b"], r["c"]] for r in rows]}}),
              st.lists(ROW, max_size=3)),
    st.binary(max_size=64),
)


@settings(max_examples=400, deadline=None)
@given(BODIES, st.sampled_from([parse_rows, parse_invocation]))
def test_any_body_gives_checked_rows_or_a_4xx_naming_the_problem(payload, check):
    """The real request check, for /predict and /invocations alike: a frame the model can take,
    or RequestError with a 4xx; never another exception (that would be a 500)."""
    try:
        frame = check(payload, COLUMNS, ID, 10)
    except RequestError as e:
        assert 400 <= e.status < 500 and str(e)
        return
    assert 1 <= len(frame) <= 10 and frame["a"].dtype == "int64" and frame["b"].map(math.isfinite).all()
    assert frame["c"].map(lambda v: isinstance(v, str)).all()


NUMERIC = COLUMNS[:2]  # numbers only: serving checks one float64 matrix (check_matrix), no frame first
NUMERIC_ROW = st.fixed_dictionaries({"a": st.one_of(st.integers(-(2**70), 2**70), st.floats(), VALUES),
                                     "b": st.one_of(st.integers(-(10**400), 10**400), st.floats(), VALUES)},
                                    optional={"id": VALUES})


@settings(max_examples=300, deadline=None)
@given(st.one_of(HOSTILE, st.builds(_text, NUMERIC_ROW), st.builds(_text, st.lists(NUMERIC_ROW, max_size=12))))
def test_any_body_for_a_numbers_only_model_gives_checked_rows_or_a_4xx(payload):
    try:
        frame = parse_rows(payload, NUMERIC, ID, 10)
    except RequestError as e:
        assert 400 <= e.status < 500 and str(e)
        return
    assert frame["a"].dtype == "int64" and frame["b"].map(math.isfinite).all()
