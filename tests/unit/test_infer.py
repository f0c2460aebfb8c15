import math

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.config import params_from_dict
from pipeline.data.infer import infer_column, infer_schema, render_params
from pipeline.errors import DataError


def frame() -> pd.DataFrame:
    return pd.DataFrame({
        "customer_id": [f"c{i}" for i in range(10)],
        "age": [20, 30, None, 40, 50, 60, 25, 35, 45, 55],
        "income": [1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5, 8.5, 9.5, 10.5],
        "city": ["a", "b", "a", None, "b", "a", "b", "a", "b", "a"],
        "note": [f"free text {i}" for i in range(10)],
        "churn": ["yes", "no"] * 5,
    })


def test_infers_kinds_ranges_nulls_and_task():
    data, notes = infer_schema(frame().assign(note="x"), "churn")
    by_name = {f["name"]: f for f in data["features"]}
    assert data["id_column"] == "customer_id" and data["classes"] == ["no", "yes"]
    assert by_name["age"] == {"name": "age", "kind": "numeric", "dtype": "int", "min": 16, "max": 64, "nullable": True}
    assert by_name["income"]["dtype"] == "float" and by_name["income"]["min"] == pytest.approx(0.6)
    assert by_name["city"] == {"name": "city", "kind": "categorical", "dtype": "str", "values": ["a", "b"], "nullable": True}
    assert notes == []


def test_free_text_is_left_out_with_a_note(monkeypatch):
    monkeypatch.setattr("pipeline.data.infer.MAX_CATEGORIES", 5)
    data, notes = infer_schema(frame(), "churn")
    assert "note" not in {f["name"] for f in data["features"]}
    assert notes == ["note: left out (10 distinct text values: free text or an identifier)"]


@pytest.mark.parametrize(
    "values, kind",
    [(["1", "2", "3.5"], "numeric"), ([True, False, True], "categorical"), ([0, 1, 0], "numeric")],
)
def test_column_kinds(values, kind):
    spec, _ = infer_column("c", pd.Series(values))
    assert spec["kind"] == kind


def test_non_negative_data_keeps_a_zero_floor():
    spec, _ = infer_column("c", pd.Series([0, 5, 10]))
    assert spec["min"] == 0 and spec["max"] == 11


@pytest.mark.parametrize(
    "target, message",
    [("nope", "not in the file")],
)
def test_bad_targets(target, message):
    with pytest.raises(DataError, match=message):
        infer_schema(frame(), target)


def test_continuous_target_is_regression(tmp_path):
    data, _ = infer_schema(frame(), "income")
    assert data["task"] == "regression" and data["classes"] is None
    params = params_from_dict(yaml.safe_load(render_params(data, tmp_path / "c.csv", [])))
    assert params.data.task == "regression" and params.data.classes is None


def test_no_id_column_means_a_derived_row_key(tmp_path):
    """Most files have no id: the params say so, and the schema identifies rows by a key d2d derives."""
    data, _ = infer_schema(frame().drop(columns="customer_id"), "churn")
    assert data["id_column"] is None
    text = render_params(data, tmp_path / "churn.csv", [])
    assert "id_column: null" in text and "d2d derives a stable row key" in text
    params = params_from_dict(yaml.safe_load(text))
    assert params.data.id_column is None


def test_an_id_named_column_that_is_not_unique_is_left_out():
    data, notes = infer_schema(frame().assign(customer_id=["c1"] * 10), "churn")
    assert data["id_column"] is None and "customer_id" not in {f["name"] for f in data["features"]}
    assert notes == ["customer_id: left out (named like an id, but its values are not unique and present in every row)"]


def test_rendered_params_load_and_pick_the_model(tmp_path):
    data, notes = infer_schema(frame(), "churn")
    params = params_from_dict(yaml.safe_load(render_params(data, tmp_path / "churn.csv", notes)))
    assert params.train.model == "mlp" and params.preprocess.scale == "standard"
    img = pd.DataFrame(np.arange(40).reshape(10, 4), columns=["p0", "p1", "p2", "p3"]).assign(id=range(10), y=[0, 1] * 5)
    data, _ = infer_schema(img, "y", image_shape=[1, 2, 2])
    params = params_from_dict(yaml.safe_load(render_params(data, tmp_path / "img.csv", [])))
    assert params.train.model == "cnn" and params.data.image_shape == [1, 2, 2]


@pytest.mark.parametrize(
    "values, dtype",
    [([1, 2, 3], "int"), ([1.0, 2.0, 3.0], "float"), ([1.0, None, 3.0], "int"), ([1.5, 2.0], "float")],
)
def test_int_only_where_a_reader_yields_ints(values, dtype):
    """The signature must match what pandas reads: "59.0" in a CSV is a float64 column."""
    spec, _ = infer_column("c", pd.Series(values))
    assert spec["dtype"] == dtype


@pytest.mark.parametrize("values, integral", [
    ([0.0, 1.634266486238469e308], False),  # the widened maximum overflows to infinity
    ([-1.7e308, 1.7e308], False),  # so does the span
    ([9_007_199_254_740_995.0], True),  # beyond 2**53 a margin of 1 is below the float spacing
    ([123456.7, 123456.71], False),  # rounding to 6 digits would cut into the data
])
def test_an_inferred_range_is_finite_and_strictly_wider_than_the_data(values, integral):
    """Found by the Hypothesis test of init-params: these gave an OverflowError, or params
    whose max was not above their min."""
    from pipeline.data.infer import numeric_range

    lo, hi = numeric_range(min(values), max(values), integral)
    assert math.isfinite(lo) and math.isfinite(hi) and lo < hi
    assert lo <= min(values) and hi >= max(values)


def _cells(kind: str):
    from hypothesis import strategies as st

    floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
    return {
        "int": st.integers(-1000, 1000),
        "float": floats,
        "text": st.sampled_from(["a", "b", "c", None]),
        "mixed": st.one_of(st.integers(0, 3), st.sampled_from(["x", "y", None])),
        "bool": st.booleans(),
        "free": st.text(max_size=4),
    }[kind]


def _frames():
    """Frames of every column kind inference meets, with nulls, infinities, ids that may repeat
    and a target that may hold one class, text or numbers."""
    from hypothesis import strategies as st

    @st.composite
    def build(draw):
        rows = draw(st.integers(1, 40))
        columns = {f"c_{k}": draw(st.lists(_cells(k), min_size=rows, max_size=rows))
                   for k in draw(st.lists(st.sampled_from(["int", "float", "text", "mixed", "bool", "free"]),
                                          min_size=1, max_size=6, unique=True))}
        ids: list = list(draw(st.permutations(range(rows))))  # unique, until one is repeated or missing
        ids[draw(st.integers(0, rows - 1))] = draw(st.sampled_from([ids[0], None, rows]))
        columns["row_id"] = ids
        columns["y"] = draw(st.lists(st.one_of(st.sampled_from(["p", "q"]), st.integers(0, 30), st.floats(0, 1)),
                                     min_size=rows, max_size=rows))
        df = pd.DataFrame(columns)
        return df.astype({"y": draw(st.sampled_from(["object", "str"]))}) if df["y"].map(type).nunique() > 1 else df
    return build()


def _outcome(fn):
    try:
        return fn()
    except DataError as e:
        return str(e)


from hypothesis import given, settings  # noqa: E402  (kept beside the test it serves)
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=150, deadline=None)
@given(df=_frames(), cuts=st.lists(st.integers(1, 39), max_size=4))
def test_inferring_batch_by_batch_gives_the_whole_frame_answer(df, cuts):
    """init-params reads a dataset in batches, so memory holds one at a time: the params it
    infers are the ones the whole frame read at once gives, errors included."""
    from pipeline.data.infer import infer_batches

    edges = sorted({0, len(df), *(c for c in cuts if c < len(df))})
    batches = [df.iloc[a:b] for a, b in zip(edges, edges[1:])]
    assert _outcome(lambda: infer_batches(batches, "y")) == _outcome(lambda: infer_schema(df, "y"))


def test_batches_that_read_as_numbers_then_text_make_a_text_column(tmp_path):
    """A CSV read in chunks: a column all numbers in one chunk and text in the next is what a
    whole read makes it, one text column with every value."""
    from pipeline.data import io
    from pipeline.data.infer import infer_batches

    path = tmp_path / "d.csv"
    pd.DataFrame({"code": ["1", "2", "1", "2", "a", "b"], "x": [1.5, 2, 3, 4, 5, 6], "y": [0, 1] * 3}).to_csv(path, index=False)
    whole = infer_schema(io.read_table(path), "y")
    chunked = infer_batches(io.read_batches(path, rows=2), "y")
    assert chunked == whole
    assert {f["name"]: f for f in chunked[0]["features"]}["code"]["values"] == ["1", "2", "a", "b"]


def test_init_params_reads_a_folder_of_parts_in_batches(tmp_path, monkeypatch):
    """The whole folder is never read at once: the ranges cover every part."""
    from pipeline.data import io
    from pipeline.data.infer import infer_batches

    folder = tmp_path / "raw"
    folder.mkdir()
    for i in range(3):
        pd.DataFrame({"x": [i * 10.0, i * 10.0 + 1], "y": [0, 1]}).to_parquet(folder / f"part-{i}.parquet")
    monkeypatch.setattr(io, "read_table", lambda *_: pytest.fail("read the dataset whole"))
    data, _ = infer_batches(io.read_batches(folder, rows=1), "y")
    x = data["features"][0]
    assert x["min"] <= 0 and x["max"] >= 21 and data["classes"] == [0, 1]
