import io
import re

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pipeline import preprocess

SPEC = {
    "numeric": [{"name": "a", "min": 0, "max": 10, "impute": "median"},
                {"name": "b", "min": 0, "max": 4, "impute": None, "dtype": "int"}],
    "categorical": [{"name": "c", "min": None, "max": None, "impute": "most_frequent"}],
    "scale": "standard",
    "fill_value": 0,
    "max_categories": 50,
}
SPEC_A = {"numeric": [{"name": "a", "min": 0, "max": 10, "impute": None}], "categorical": [], "scale": "standard",
          "fill_value": 0, "max_categories": 50}
TRAIN = pd.DataFrame({"a": [1.0, 2.0, 3.0, np.nan], "b": [0, 2, 4, 2], "c": ["x", "y", "x", None]})


def test_fit_uses_train_statistics_only():
    state = preprocess.fit(TRAIN, SPEC)
    assert state["numeric"]["fill"] == [2.0, None]
    assert state["numeric"]["center"] == pytest.approx([2.0, 2.0])
    assert state["categorical"][0] == {"name": "c", "fill": "x", "categories": ["x", "y"]}
    assert state["outputs"] == ["a", "b", "c=x", "c=y"]
    assert state["inputs"] == [{"name": "a", "type": "double", "nullable": True},
                               {"name": "b", "type": "long", "nullable": False},
                               {"name": "c", "type": "string", "nullable": True}]


def test_transform_imputes_scales_and_encodes():
    state = preprocess.fit(TRAIN, SPEC)
    rows = pd.DataFrame({"a": [np.nan, 2.0], "b": [4, 0], "c": [None, "zebra"], "extra": [1, 2]})
    x = preprocess.transform(rows, state)
    assert x.dtype == np.float32 and x.shape == (2, 4)
    assert x[0, 0] == pytest.approx(0.0)  # imputed with the train median, then centred
    assert x[0, 2:].tolist() == [1.0, 0.0]  # null category → most frequent in train
    assert x[1, 2:].tolist() == [0.0, 0.0]  # unseen category → all zeros


@pytest.mark.parametrize(
    "rows, message",
    [
        (pd.DataFrame({"a": [1.0], "c": ["x"]}), "lacks feature column"),
        (pd.DataFrame({"a": [1.0], "b": [np.nan], "c": ["x"]}), "row 0: column b is null"),
        (pd.DataFrame({"a": ["ten"], "b": [1], "c": ["x"]}), "row 0: column a: 'ten' is not a number"),
    ],
)
def test_transform_rejects_bad_rows(rows, message):
    with pytest.raises(ValueError, match=message):
        preprocess.transform(rows, preprocess.fit(TRAIN, SPEC))


@pytest.mark.parametrize("scale, first", [("minmax", 0.0), ("range", 0.1), ("none", 1.0)])
def test_scales(scale, first):
    state = preprocess.fit(TRAIN, {**SPEC, "scale": scale})
    assert preprocess.transform(TRAIN.iloc[[0]], state)[0, 0] == pytest.approx(first)


def test_constant_column_does_not_divide_by_zero():
    state = preprocess.fit(pd.DataFrame({"a": [3.0, 3.0], "b": [1, 1], "c": ["x", "x"]}), SPEC)
    assert np.isfinite(preprocess.transform(TRAIN.fillna({"c": "x"}), state)).all()


def test_int_categories_with_nulls_match_their_ints():
    spec = {**SPEC, "numeric": [], "categorical": [{"name": "c", "impute": "most_frequent"}]}
    state = preprocess.fit(pd.DataFrame({"c": [1.0, 2.0, np.nan, 1.0]}), spec)
    assert state["categorical"][0]["categories"] == ["1", "2"]
    assert preprocess.transform(pd.DataFrame({"c": [2, 1]}), state).tolist() == [[0.0, 1.0], [1.0, 0.0]]


# What ordinary readers make of one raw CSV where the int column b has a null in another row
# (pandas: float64; polars: float64 or Arrow int64; pyarrow: int64 with nulls).
RAW_CSV = b"id,a,b,c\n1,1.5,2,x\n2,,4,y\n3,2.5,,x\n"


def readers() -> dict[str, pd.DataFrame]:
    table = pacsv.read_csv(io.BytesIO(RAW_CSV))
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return {
        "pandas": pd.read_csv(io.BytesIO(RAW_CSV)),
        "pyarrow": table.to_pandas(),
        "pyarrow-dtypes": table.to_pandas(types_mapper=pd.ArrowDtype),
        "polars": pl.read_csv(io.BytesIO(RAW_CSV)).to_pandas(),
        "polars-arrow": pl.read_csv(io.BytesIO(RAW_CSV)).to_pandas(use_pyarrow_extension_array=True),
        "parquet": pd.read_parquet(io.BytesIO(buffer.getvalue())),
        "nullable-ints": pd.read_csv(io.BytesIO(RAW_CSV), dtype_backend="numpy_nullable"),
    }


@pytest.mark.parametrize("reader", list(readers()))
def test_every_reader_s_frame_of_the_raw_file_is_checked_alike(reader):
    """Integral floats and Arrow ints pass for the int column; a null where b has no imputation
    is refused for that row only, naming the column."""
    state = preprocess.fit(TRAIN, SPEC)
    frame = readers()[reader]
    checked, errors = preprocess.check_rows(frame, preprocess.input_spec(state))
    assert list(errors) == ["", "", "column b is null and the model has no imputation for it"]
    assert checked.index.tolist() == [0, 1] and checked["b"].dtype == np.int64 and checked["b"].tolist() == [2, 4]
    assert preprocess.transform(frame.iloc[:2], state).shape == (2, 4)


@pytest.mark.parametrize("value, words", [
    (2.7, "column b: 2.7 is not an integer"),
    (np.inf, "column b: inf is not a finite number"),
    (-np.inf, "column b: -inf is not a finite number"),
    (1e308, "column b: 1e+308 is out of range for a long"),
    (2.0**63, "out of range for a long"),
    ("inf", "column b: 'inf' is not a finite number"),
    ("seven", "column b: 'seven' is not a number"),
    (True, "column b: True is not a number"),
    (None, "column b is null"),
])
def test_a_bad_value_fails_its_row_only_and_names_the_column(value, words):
    state = preprocess.fit(TRAIN, SPEC)
    frame = pd.DataFrame({"a": [1.0, 2.0], "b": pd.Series([1, value], dtype=object), "c": ["x", "y"]})
    checked, errors = preprocess.check_rows(frame, preprocess.input_spec(state))
    assert errors[0] == "" and words in errors[1], errors
    assert checked.index.tolist() == [0]
    with pytest.raises(ValueError, match="row 1: column b"):
        preprocess.transform(frame, state)


def test_a_double_column_refuses_infinity_and_what_overflows_the_network_s_float32_input():
    state = preprocess.fit(TRAIN, SPEC)
    frame = pd.DataFrame({"a": [1e30, np.inf, -1.5, 1e308], "b": [1, 2, 3, 4], "c": ["x", "y", "x", "y"]})
    checked, errors = preprocess.check_rows(frame, preprocess.input_spec(state))
    assert list(errors[:3]) == ["", "column a: inf is not a finite number", ""] and checked.index.tolist() == [0, 2]
    assert errors[3] == "column a: 1e+308 is out of range for the model (its scaled value overflows a 32-bit float)"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.one_of(st.none(), st.floats(allow_nan=True), st.integers(), st.text(max_size=5),
                                    st.booleans()),
                          st.one_of(st.none(), st.floats(allow_nan=True), st.integers(), st.text(max_size=5),
                                    st.booleans())), min_size=1, max_size=8))
def test_hostile_values_give_a_checked_row_or_a_message_never_an_exception(pairs):
    """Any mix of values: every row either passes (and the model can take it) or has an
    error naming a column; the check itself never raises."""
    state = preprocess.fit(TRAIN, SPEC)
    frame = pd.DataFrame({"a": pd.Series([p[0] for p in pairs], dtype=object),
                          "b": pd.Series([p[1] for p in pairs], dtype=object), "c": "x"})
    checked, errors = preprocess.check_rows(frame, preprocess.input_spec(state))
    assert len(errors) == len(pairs) and len(checked) == int((errors == "").sum())
    assert all(e == "" or e.startswith(("column a", "column b")) for e in errors)
    if len(checked):
        assert np.isfinite(preprocess.transform(checked, state)).all()


NUMBERS_ONLY = {"numeric": [{"name": "a", "min": 0, "max": 10, "impute": "median"},
                            {"name": "b", "min": 0, "max": 4, "impute": None, "dtype": "int"},
                            {"name": "d", "min": None, "max": None, "impute": None}],
                "categorical": [], "scale": "standard", "fill_value": 0, "max_categories": 50}
# ordinary values (most rows pass, so the fast path runs) and hostile ones
NUMBER = st.one_of(st.floats(-1e6, 1e6), st.integers(-1000, 1000), st.none(), st.floats(allow_nan=True),
                   st.integers(-2**70, 2**70), st.sampled_from([1e300, -1e39, 0.5]))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(NUMBER, NUMBER, NUMBER), min_size=1, max_size=8), st.booleans())
@example([(1.0, 0.5, 1.0)], False)  # a fraction in the integer column b, every value finite
def test_a_numbers_only_model_s_transform_gives_what_the_checked_rows_give(rows, as_objects):
    """transform scales a numbers-only model's inputs in one float64 block (training takes
    every batch through it); the result, or the first bad row's message, is check_rows'
    rows imputed and standardised by hand."""
    state = preprocess.fit(pd.DataFrame({"a": [1.0, 2.0, 3.0, np.nan], "b": [0, 2, 4, 2], "d": [5.0, -1.0, 0.5, 2.0]}),
                           NUMBERS_ONLY)
    frame = pd.DataFrame(rows, columns=["a", "b", "d"], dtype=object if as_objects else None)
    checked, errors = preprocess.check_rows(frame, preprocess.input_spec(state))
    bad = np.flatnonzero(errors != "")
    if len(bad):
        with pytest.raises(ValueError, match=re.escape(f"row {bad[0]}: {errors[bad[0]]}")):
            preprocess.transform(frame, state)
        return
    num = state["numeric"]
    x = checked[num["names"]].to_numpy(dtype="float64")
    x = np.where(np.isnan(x), np.array([np.nan if f is None else f for f in num["fill"]]), x)
    expected = ((x - np.array(num["center"])) / np.array(num["scale"])).astype("float32")
    np.testing.assert_array_equal(preprocess.transform(frame, state), expected)


def test_the_logged_signature_lets_every_reader_s_numbers_reach_the_model_s_own_check():
    """MLflow's enforcement refuses float64 for `long` and int64 for `double`; the signature
    declares numbers `any` so both readings reach check_rows, and text stays `string`."""
    from mlflow.models.utils import validate_schema
    from mlflow.types import ColSpec
    from mlflow.types import Schema as MlflowSchema

    from pipeline.data.schema import Column
    from pipeline.tracking import input_colspec

    columns = [Column("b", "numeric", "int"), Column("a", "numeric", "float", nullable=True),
               Column("c", "categorical", "str", nullable=True), Column("k", "categorical", "int")]
    schema = MlflowSchema([input_colspec(c) for c in columns])
    assert [c.to_dict()["type"] for c in schema.inputs] == ["any", "any", "string", "any"]
    assert [c.required for c in schema.inputs] == [True, False, False, True]
    for frame in readers().values():
        validate_schema(frame.assign(k=1), schema)  # raises on a refused column
    with pytest.raises(Exception, match="Can not safely convert float64 to int64"):  # what `long` did
        validate_schema(readers()["pandas"], MlflowSchema([ColSpec("long", "b")]))


def test_batches_are_written_in_order_with_one_schema_and_no_temporary_file(tmp_path):
    from pipeline.data.io import write_batches

    batches = [pd.DataFrame({"id": [1, 2], "label": pd.array([3, 4], dtype="Int64"), "error": ["", ""]}),
               pd.DataFrame({"id": [3], "label": pd.array([None], dtype="Int64"), "error": ["column b is null"]})]
    for name in ("out.parquet", "out.csv"):
        assert write_batches(iter(batches), tmp_path / name) == 3
        back = pd.read_parquet(tmp_path / name) if name.endswith("parquet") else pd.read_csv(tmp_path / name)
        assert back["id"].tolist() == [1, 2, 3] and back["label"].isna().tolist() == [False, False, True]

    def failing():
        yield batches[0]
        raise RuntimeError("a worker died")

    with pytest.raises(RuntimeError):
        write_batches(failing(), tmp_path / "half.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv", "out.parquet"]  # nothing half-written


def test_an_existing_output_needs_force(tmp_path):
    from pipeline.errors import D2DError
    from pipeline.predict import check_output

    (tmp_path / "scored.csv").write_text("kept\n")
    with pytest.raises(D2DError, match="exists; pass --force"):
        check_output(tmp_path / "scored.csv", force=False)
    check_output(tmp_path / "scored.csv", force=True)
    (tmp_path / "d.csv").mkdir()
    with pytest.raises(D2DError, match="is a folder"):
        check_output(tmp_path / "d.csv", force=True)
    (tmp_path / "scored.parquet").mkdir()  # a Parquet output is a dataset folder
    with pytest.raises(D2DError, match="exists; pass --force"):
        check_output(tmp_path / "scored.parquet", force=False)
    check_output(tmp_path / "scored.parquet", force=True)


def test_a_staged_folder_replaces_the_old_one_only_when_written(tmp_path):
    from pipeline.data import io

    target = tmp_path / "out.parquet"
    target.mkdir()
    (target / "old.parquet").write_text("old")
    with pytest.raises(RuntimeError):
        with io.staged_dir(target) as folder:
            (folder / "part-0.parquet").write_text("half")
            raise RuntimeError("the job failed")
    assert [p.name for p in tmp_path.iterdir()] == ["out.parquet"] and (target / "old.parquet").exists()
    with io.staged_dir(target) as folder:
        pd.DataFrame({"a": [1, 2]}).to_parquet(folder / "part-1.parquet")
        pd.DataFrame({"a": [3]}).to_parquet(folder / "part-0.parquet")
    assert [p.name for p in tmp_path.iterdir()] == ["out.parquet"]
    assert io.parquet_rows(target) == 3
    assert pd.concat(io.read_batches(target))["a"].tolist() == [3, 1, 2]  # parts in name order


def test_the_file_that_ships_in_the_model_imports_and_fits_without_d2d(tmp_path):
    """A logged model loads preprocess.py by itself: its d2d types must stay type-checking only."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import importlib.util, json, sys\n"
        "sys.modules['pipeline'] = None  # any import of d2d's code now fails\n"
        f"spec = importlib.util.spec_from_file_location('preprocess', {str(Path(preprocess.__file__))!r})\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        "import pandas as pd\n"
        f"print(json.dumps(module.fit(pd.DataFrame({{'a': [1.0, 3.0]}}), {SPEC_A!r})['numeric']['center']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[2.0]"


def test_touch_writes_an_empty_marker_and_its_folders(tmp_path):
    from pipeline.data import io

    marker = tmp_path / "run" / "fault_drill.done"
    assert io.touch(marker) == marker
    assert marker.read_bytes() == b"" and [p.name for p in marker.parent.iterdir()] == ["fault_drill.done"]


@pytest.mark.parametrize("rows,expected", [(1_000, 1_000), (50, 50), (5_000, 2_345)])
def test_a_parquet_sample_is_bounded_uniform_and_in_order(tmp_path, rows, expected):
    """The drift reference: at most `rows` rows, in file order, from every part of the table."""
    from pipeline.data import io

    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"v": np.arange(2_345)}), path, row_group_size=300)
    sample = io.parquet_sample(path, rows, seed=3)
    assert len(sample) == min(expected, rows) and sample["v"].is_monotonic_increasing and sample["v"].is_unique
    if rows < 2_345:
        assert np.histogram(sample["v"], bins=5, range=(0, 2_345))[0].min() > rows / 5 * 0.6
    else:
        assert sample["v"].tolist() == list(range(2_345))
