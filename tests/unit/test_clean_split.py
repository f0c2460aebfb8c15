import hashlib

import numpy as np
import pandas as pd
import pytest

from pipeline.config import CleanParams, DataParams, SplitParams
from pipeline.data import io
from pipeline.data.clean import clean, drop_conflicting_labels, drop_duplicates
from pipeline.data.schema import schema_from_params
from pipeline.data.split import SPLITS, leaked_rows, split
from pipeline.data.validate import REASON
from pipeline.errors import DataError
from tests.conftest import make_frame


def test_duplicates_are_removed_and_kept_aside_with_reason(tiny_schema):
    df = make_frame(tiny_schema, 10)
    dup = df.iloc[[2]].assign(id=100)
    df = pd.concat([df, dup, dup.assign(id=101)], ignore_index=True)
    kept, removed = drop_duplicates(df, tiny_schema)
    assert len(kept) == 10
    assert removed["id"].tolist() == [100, 101]
    assert set(removed[REASON]) == {"duplicate of id 2"}


def test_same_features_other_label_is_a_conflict_not_a_duplicate(tiny_schema):
    df = make_frame(tiny_schema, 10)
    df = pd.concat([df, df.iloc[[0]].assign(id=50, label=2)], ignore_index=True)
    kept, removed = drop_duplicates(df, tiny_schema)
    assert len(kept) == 11 and removed.empty
    kept, removed = drop_conflicting_labels(kept, tiny_schema)
    assert len(kept) == 10 and removed[REASON].tolist() == ["same features as id 0 with another label"]


@pytest.fixture
def nullable_schema():
    return schema_from_params(DataParams(
        classes=[0, 1, 2],
        features=[
            {"prefix": "f", "count": 2, "min": 0, "max": 10, "dtype": "int", "nullable": True},
            {"name": "color", "kind": "categorical", "dtype": "str", "values": ["red", "blue"], "nullable": True},
        ],
    ))


def nullable_frame(n: int = 10) -> pd.DataFrame:
    return pd.DataFrame({
        "id": range(n),
        "f0": [float(i % 10) for i in range(n)],
        "f1": [float(9 - i % 10) for i in range(n)],
        "color": ["red", "blue"] * (n // 2),
        "label": [i % 3 for i in range(n)],
    })


def test_missing_drop_only_hits_drop_columns(nullable_schema):
    df = nullable_frame()
    df.loc[1, "f0"] = np.nan
    df.loc[2, "f1"] = np.nan
    df.loc[3, "color"] = None
    params = CleanParams(missing={"columns": {"f0": "drop"}})
    result = clean(df, nullable_schema, params)
    assert sorted(result.removed["id"]) == [1]
    assert result.removed[REASON].iloc[0] == "f0 is null (clean.missing: drop)"
    assert result.clean["f1"].isna().sum() == 1 and result.clean["color"].isna().sum() == 1  # imputed later


def test_the_preprocessing_spec_imputes_by_the_same_policy_that_clean_drops_by(nullable_schema):
    from pipeline.config import PreprocessParams
    from pipeline.preprocess import preprocess_spec

    params = CleanParams(missing={"numeric": "constant", "fill_value": -1, "columns": {"f0": "drop"}})
    spec = preprocess_spec(nullable_schema, params, PreprocessParams())
    assert [(c["name"], c["impute"]) for c in spec["numeric"] + spec["categorical"]] == [
        ("f0", "drop"), ("f1", "constant"), ("color", "most_frequent")]
    assert spec["fill_value"] == -1 and spec["target"] is None and spec["id"] == "id"


@pytest.mark.parametrize("action, rows_out, f0_max", [("clip", 10, 9.0), ("drop", 9, 9.0)])
def test_iqr_outliers(nullable_schema, action, rows_out, f0_max):
    df = nullable_frame()
    df.loc[4, "f0"] = 1000.0
    result = clean(df, nullable_schema, CleanParams(outliers={"method": "iqr", "action": action}))
    assert len(result.clean) == rows_out
    if action == "clip":
        assert result.clean["f0"].max() < 1000 and result.report["rules"][3]["cells_clipped"] == 1
    else:
        assert result.removed[REASON].tolist() == ["f0 is an outlier (clean.outliers: iqr)"]


def test_range_outliers_clip_to_schema(tiny_schema):
    df = make_frame(tiny_schema, 10).astype({"f0": "float64"})
    df.loc[0, "f0"] = 12.0  # would have been quarantined by validation; clean still enforces it
    out = clean(df, tiny_schema, CleanParams(outliers={"method": "range", "action": "clip"})).clean
    assert out["f0"].max() == 10


def test_clean_report_counts_rows_per_rule(tiny_schema):
    df = make_frame(tiny_schema, 10)
    df = pd.concat([df, df.iloc[[1]].assign(id=99)], ignore_index=True)
    result = clean(df, tiny_schema, CleanParams())
    assert result.report["rows_in"] == 11 and result.report["rows_out"] == 10
    assert [r["rule"] for r in result.report["rules"]] == [
        "drop_duplicates", "drop_conflicting_labels", "missing_drop", "outliers_none_clip", "coerce_types",
    ]
    assert result.report["rules"][0]["removed"] == 1
    assert result.clean["f0"].dtype == "int64"


def test_stratified_split_is_within_one_row_per_class(tiny_schema):
    df = make_frame(tiny_schema, 301)
    df["label"] = np.r_[np.zeros(150, int), np.ones(100, int), np.full(51, 2)]
    s = split(df, "label", "id", SplitParams())
    for name, ratio in (("train", 0.7), ("val", 0.15), ("test", 0.15)):
        counts = getattr(s, name)["label"].value_counts()
        for cls, n in df["label"].value_counts().items():
            assert abs(counts[cls] - ratio * n) <= 1
    ids = [set(getattr(s, p)["id"]) for p in SPLITS]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert set().union(*ids) == set(df["id"])


@pytest.mark.parametrize("strategy", ["stratified", "random", "hash"])
def test_same_seed_and_data_give_byte_identical_files(tmp_path, tiny_schema, strategy):
    df = make_frame(tiny_schema, 200)
    digests = []
    for run in range(2):
        s = split(df, "label", "id", SplitParams(strategy=strategy, seed=3))
        for name in SPLITS:
            path = io.write_parquet(getattr(s, name), tmp_path / f"{run}-{name}.parquet")
            digests.append((run, name, hashlib.md5(path.read_bytes()).hexdigest()))
    first = [d for r, _, d in digests if r == 0]
    second = [d for r, _, d in digests if r == 1]
    assert first == second
    other = split(df, "label", "id", SplitParams(strategy=strategy, seed=4))
    assert other.test["id"].tolist() != split(df, "label", "id", SplitParams(strategy=strategy, seed=3)).test["id"].tolist()


def test_hash_split_keeps_each_row_when_data_is_appended(tiny_schema):
    old = make_frame(tiny_schema, 500)
    new = pd.concat([old, make_frame(tiny_schema, 300, seed=1).assign(id=lambda d: d["id"] + 10_000)], ignore_index=True)
    params = SplitParams(strategy="hash")
    before, after = split(old, "label", "id", params), split(new, "label", "id", params)
    for name in SPLITS:
        assert set(getattr(before, name)["id"]) <= set(getattr(after, name)["id"])
    assert abs(len(after.train) / len(new) - 0.7) < 0.05


def test_leakage_is_detected(tiny_schema):
    df = make_frame(tiny_schema, 60)
    s = split(df, "label", "id", SplitParams())
    assert leaked_rows(s, tiny_schema.feature_names) == 0
    s.test = pd.concat([s.test, s.train.iloc[[0]]], ignore_index=True)
    assert leaked_rows(s, tiny_schema.feature_names) == 2  # the row in train and its copy in test


@pytest.mark.parametrize(
    "n, strategy, fragment",
    [(2, "random", "too few to make the three splits"), (7, "stratified", "class 0 has 3 rows: too few to stratify")],
)
def test_split_rejects_too_small_data(tiny_schema, n, strategy, fragment):
    with pytest.raises(DataError, match=fragment):
        split(make_frame(tiny_schema, n), "label", "id", SplitParams(strategy=strategy))


from hypothesis import given, settings  # noqa: E402  (kept beside the test it serves)
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=100, deadline=None)
@given(rows=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2), st.sampled_from([0, 1, 2])), min_size=1, max_size=30))
def test_repeats_name_the_first_row_as_pandas_does(rows):
    """Each row's duplicate (same features and label) and conflict (same features, another
    label) point at the first such row, as pandas' own grouping finds it; the first is never a repeat."""
    from pipeline.data.clean import repeats_of
    from pipeline.data.schema import schema_from_params

    schema = schema_from_params(DataParams(classes=[0, 1, 2], features=[
        {"name": "a", "kind": "numeric"}, {"name": "b", "kind": "numeric"}]))
    df = pd.DataFrame(rows, columns=["a", "b", "label"]).assign(id=range(len(rows)))
    here = np.arange(len(df))
    first_full = df.groupby(["a", "b", "label"])["id"].transform("first")
    first_features = df.groupby(["a", "b"])["id"].transform("first")
    duplicate = np.where(first_full != here, first_full, -1)
    conflict = np.where((duplicate < 0) & (first_features != here), first_features, -1)
    repeats = repeats_of(df, schema)
    assert repeats.duplicate_of.tolist() == duplicate.tolist()
    assert repeats.conflict_of.tolist() == conflict.tolist()
