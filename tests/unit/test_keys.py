"""The derived row key (data without an id column): one function, pipeline.data.keys, that
quarantine, duplicates, the hash split, the leakage check and the monitor's known-row check
all use. Tested on the tabular datasets scikit-learn ships, with and without an id column,
with categorical text and missing values, and across the readers people use."""

from __future__ import annotations

import io as stdio
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import SplitParams, ValidateParams, params_from_dict
from pipeline.data.clean import clean
from pipeline.data.infer import infer_schema, render_params
from pipeline.data.keys import ROW_KEY, content_hash, row_ids, row_keys, with_row_key
from pipeline.data.schema import schema_from_params
from pipeline.data.split import hash_assignment, leaked_rows, split
from pipeline.errors import ConfigError


def sklearn_frame(name: str, seed: int = 0) -> tuple[pd.DataFrame, str]:
    """A scikit-learn dataset as a user's file would hold it: a categorical text column and
    missing values in a numeric and the text column (and a duplicated row)."""
    from sklearn import datasets

    loader = {"iris": datasets.load_iris, "wine": datasets.load_wine,
              "breast_cancer": datasets.load_breast_cancer, "diabetes": datasets.load_diabetes}[name]
    df = loader(as_frame=True).frame.rename(columns={"target": "outcome"})
    rng = np.random.default_rng(seed)
    first = df.columns[0]
    df["band"] = pd.qcut(df[first].rank(method="first"), 3, labels=["low", "mid", "high"]).astype(object)
    for col in (df.columns[1], "band"):
        df.loc[rng.choice(len(df), 8, replace=False), col] = None
    if name == "iris":
        df["outcome"] = df["outcome"].map({0: "setosa", 1: "versicolor", 2: "virginica"})
    return pd.concat([df, df.iloc[[5]]], ignore_index=True), "outcome"  # one exact duplicate


DATASETS = ["iris", "wine", "breast_cancer", "diabetes"]


def params_for(df: pd.DataFrame, target: str, tmp_path: Path):
    data, _ = infer_schema(df, target)
    return params_from_dict(yaml.safe_load(render_params(data, tmp_path / "data.csv", [])))


def via_readers(df: pd.DataFrame, tmp_path: Path) -> dict[str, pd.DataFrame]:
    """The same CSV as pandas, pyarrow and polars read it, and a Parquet round trip."""
    import polars as pl
    import pyarrow.csv as pacsv

    path = tmp_path / "data.csv"
    df.to_csv(path, index=False)
    frames = {
        "pandas": pd.read_csv(path),
        "pyarrow": pacsv.read_csv(path).to_pandas(),
        "pandas-pyarrow-dtypes": pd.read_csv(path, dtype_backend="pyarrow"),
        "polars": pl.read_csv(path, infer_schema_length=None).to_pandas(),
    }
    pd.read_csv(path).to_parquet(tmp_path / "data.parquet")
    frames["parquet"] = pd.read_parquet(tmp_path / "data.parquet")
    return frames


@pytest.mark.parametrize("name", DATASETS)
@pytest.mark.parametrize("with_id", [False, True])
def test_inference_and_keys_on_sklearn_data(name, with_id, tmp_path):
    df, target = sklearn_frame(name)
    if with_id:
        df.insert(0, "record_id", np.arange(len(df)) + 1000)
    params = params_for(df, target, tmp_path)
    schema = schema_from_params(params.data)
    assert params.data.id_column == ("record_id" if with_id else None)
    assert schema.derived_key is not with_id and "band" in schema.feature_names
    assert params.data.task == ("regression" if name == "diabetes" else "classification")
    by_name = {f.name: f for f in schema.features}
    assert by_name["band"].kind == "categorical" and by_name["band"].nullable
    assert by_name[sklearn_frame(name)[0].columns[1]].nullable and by_name[sklearn_frame(name)[0].columns[1]].kind == "numeric"
    keyed = with_row_key(df, schema)
    ids = row_ids(keyed, schema)
    assert ids.is_unique and len(ids) == len(df)
    if not with_id:
        # the duplicate row: the same content hash, occurrence 1
        assert ids.iloc[-1] == ids.iloc[5][:-2] + "-1"
        # every reader of the same file gives the same keys
        for reader, frame in via_readers(df, tmp_path).items():
            assert row_ids(frame, schema).tolist() == ids.tolist(), reader


@pytest.mark.parametrize("name", DATASETS)
def test_duplicates_and_hash_split_by_derived_key(name, tmp_path):
    df, target = sklearn_frame(name)
    params = params_for(df, target, tmp_path)
    schema = schema_from_params(params.data)
    keyed = with_row_key(df, schema)
    result = clean(keyed, schema, params.clean)
    dup = result.removed[result.removed["rule"] == "drop_duplicates"]
    # the copy is removed, named by its own key, with the key of the row it repeats (iris has
    # a duplicate of its own, too)
    copy = dup[dup[ROW_KEY] == keyed[ROW_KEY].iloc[-1]]
    assert len(copy) == 1 and copy["reason"].iloc[0] == f"duplicate of row key {keyed[ROW_KEY].iloc[5]}"
    assert len(dup) == len(df) - len(df.drop_duplicates())
    hashed = SplitParams(strategy="hash")
    splits = split(result.clean, schema.target, schema.id_column, hashed, schema.regression)
    assert leaked_rows(splits, schema.feature_names) == 0
    # stable when rows are appended: every earlier row keeps its key and its split
    more, _ = sklearn_frame(name, seed=1)
    grown = with_row_key(pd.concat([df, more.sample(20, random_state=0)], ignore_index=True), schema)
    assert grown[ROW_KEY].iloc[: len(df)].tolist() == keyed[ROW_KEY].tolist()
    before = pd.Series(hash_assignment(keyed[ROW_KEY], hashed), index=keyed[ROW_KEY])
    after = pd.Series(hash_assignment(grown[ROW_KEY], hashed), index=grown[ROW_KEY])
    assert (after.loc[before.index] == before).all()


def test_integral_floats_ints_and_text_numbers_are_one_value():
    """What differs between readers is the type, not the value: 5, 5.0, "5" and a null as
    NaN, None or NA give the same cell."""
    a = pd.DataFrame({"x": pd.array([5, None, 7], dtype="Int64"), "c": ["a", None, "b"]})
    b = pd.DataFrame({"x": [5.0, np.nan, 7.0], "c": pd.Series(["a", np.nan, "b"], dtype="string")})
    c = pd.DataFrame({"x": pd.Series(["5", None, "7.0"], dtype=object), "c": pd.Series(["a", pd.NA, "b"], dtype=object)})
    assert (content_hash(a, ["x", "c"]) == content_hash(b, ["x", "c"])).all()
    assert (content_hash(a, ["x", "c"]) == content_hash(c, ["x", "c"])).all()
    # and different values, nulls and text stay apart
    d = pd.DataFrame({"x": [5.5, 0.0, 7.0], "c": ["a", "", "7"]})
    assert (content_hash(a, ["x", "c"]) != content_hash(d, ["x", "c"])).all()
    # what pandas' CSV reader reads as missing is missing, whoever read it (pyarrow keeps "" as text)
    assert len(set(content_hash(pd.DataFrame({"x": [None, "", "None", "nan", "NA", np.nan, pd.NA]}), ["x"]))) == 1
    assert len(set(content_hash(pd.DataFrame({"x": [None, 0, "0.0", "x"]}), ["x"]))) == 3


def test_column_order_in_the_file_does_not_change_the_key():
    df = pd.DataFrame({"a": [1, 2], "b": ["x", "y"]})
    assert row_keys(df, ["a", "b"]).tolist() == row_keys(df[["b", "a"]], ["a", "b"]).tolist()


cells = st.one_of(
    st.none(),
    st.integers(-(2**53), 2**53),
    st.floats(allow_nan=False, allow_infinity=False, width=64).map(lambda v: float(f"{v:.10g}")),
    st.sampled_from(["a", "b c", "ü", "yes", "", "1e3"]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(cells, cells, st.integers(0, 3)), min_size=1, max_size=30))
def test_keys_are_unique_and_reader_independent(rows, tmp_path):
    """Any mix of numbers, text and nulls: keys are unique, and pandas and pyarrow reading the
    same CSV (object, float64, int64 or string columns, as each decides) give the same keys."""
    import pyarrow.csv as pacsv

    df = pd.DataFrame(rows, columns=["a", "b", "y"])
    text = df.to_csv(index=False)
    by_pandas = pd.read_csv(stdio.StringIO(text), keep_default_na=True)
    by_arrow = pacsv.read_csv(stdio.BytesIO(text.encode())).to_pandas()
    k1, k2 = row_keys(by_pandas, ["a", "b", "y"]), row_keys(by_arrow, ["a", "b", "y"])
    assert k1.is_unique
    assert k1.tolist() == k2.tolist()
    # appending never changes an earlier key
    doubled = pd.concat([by_pandas, by_pandas], ignore_index=True)
    assert row_keys(doubled, ["a", "b", "y"]).iloc[: len(df)].tolist() == k1.tolist()


def test_validation_quarantines_rows_by_derived_key(tmp_path):
    from pipeline.data.validate import validate

    df, target = sklearn_frame("wine")
    params = params_for(df, target, tmp_path)
    schema = schema_from_params(params.data)
    bad = df.copy()
    bad.loc[[3, 9], "alcohol"] = 99.0  # outside the inferred range
    report = validate(with_row_key(bad, schema), schema, ValidateParams(data_docs=False))
    assert len(report.quarantine) == 2 and report.quarantine[ROW_KEY].is_unique
    assert set(report.quarantine[ROW_KEY]) == set(with_row_key(bad, schema)[ROW_KEY].iloc[[3, 9]])
    assert report.quarantine["reason"].str.contains("alcohol outside").all()
    assert ROW_KEY in report.valid.columns and report.valid[ROW_KEY].is_unique


def test_monitor_known_row_check_with_derived_keys(tmp_path):
    """A labelled batch that repeats rows of the dataset: those rows are quarantined as
    already in the dataset; new rows are kept and appended without the key column."""
    from pipeline.monitor import known_ids, screen_batch

    df, target = sklearn_frame("iris")
    df = df.drop_duplicates().reset_index(drop=True)
    raw = tmp_path / "data/raw/iris.csv"
    raw.parent.mkdir(parents=True)
    df.to_csv(raw, index=False)
    data, _ = infer_schema(df, target)
    params = params_from_dict({**yaml.safe_load(render_params(data, Path("data/raw/iris.csv"), [])),
                               "validate": {"data_docs": False, "min_rows": 5}})
    schema = schema_from_params(params.data)
    known = known_ids(params, tmp_path)
    assert len(known) == len(df)
    fresh = df.iloc[2::15].head(10).assign(**{schema.feature_names[0]: 4.44})  # new values, so new rows
    batch = pd.concat([pd.read_csv(raw).iloc[1::15].head(10), fresh], ignore_index=True)  # every class
    screened = screen_batch(batch, schema, params, known)
    repeated = screened.quarantine[screened.quarantine["reason"] == "the same row is already in the dataset"]
    assert len(repeated) == 10 and len(screened.raw_valid) == 10
    assert ROW_KEY not in screened.raw_valid.columns  # what is appended is the raw rows, as read
    assert screened.raw_valid[schema.feature_names[0]].eq(4.44).all()


def test_the_row_key_name_is_reserved(tiny_data_params):
    with pytest.raises(ValueError, match="reserved"):
        type(tiny_data_params).model_validate({**tiny_data_params.model_dump(), "target": ROW_KEY})
    with pytest.raises(ConfigError, match="reserved"):
        params_from_dict({"data": {**tiny_data_params.model_dump(mode="json"), "id_column": ROW_KEY}})


def test_leakage_check_names_rows_by_derived_key(tmp_path):
    """Without cleaning, a duplicate can land in two splits: the check counts both copies and
    names them by their row keys."""
    from pipeline.data.split import Splits, leaked_ids

    df, target = sklearn_frame("wine")
    schema = schema_from_params(params_for(df, target, tmp_path).data)
    keyed = with_row_key(df, schema)
    splits = Splits(keyed.iloc[:100], keyed.iloc[100:150], keyed.iloc[150:])  # row 5 in train, its copy in test
    assert leaked_rows(splits, schema.feature_names) == 2
    assert leaked_ids(splits, schema.feature_names, schema.id_column) == [keyed[ROW_KEY].iloc[5], keyed[ROW_KEY].iloc[-1]]
