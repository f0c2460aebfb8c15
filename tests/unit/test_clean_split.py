import numpy as np
import pandas as pd
import pytest

from pipeline.config import CleanParams, SplitParams
from pipeline.data.clean import clean, drop_duplicates, scale_features
from pipeline.data.split import split
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


def test_same_pixels_different_label_is_not_a_duplicate(tiny_schema):
    df = make_frame(tiny_schema, 10)
    df = pd.concat([df, df.iloc[[0]].assign(id=50, label=2)], ignore_index=True)
    kept, removed = drop_duplicates(df, tiny_schema)
    assert len(kept) == 11 and removed.empty


def test_scaling_maps_declared_range_to_unit(tiny_schema):
    df = make_frame(tiny_schema, 10)
    df.loc[0, tiny_schema.feature_names] = [0, 10, 5, 2]
    out = scale_features(df, tiny_schema)
    assert out.loc[0, tiny_schema.feature_names].tolist() == pytest.approx([0.0, 1.0, 0.5, 0.2])
    assert out[tiny_schema.feature_names].dtypes.eq("float32").all()
    assert df.loc[0, "f1"] == 10  # input untouched


@pytest.mark.parametrize("drop, scale, rows_out", [(True, "range", 10), (False, "none", 11)])
def test_clean_report_counts_rows_per_rule(tiny_schema, drop, scale, rows_out):
    df = make_frame(tiny_schema, 10)
    df = pd.concat([df, df.iloc[[1]].assign(id=99)], ignore_index=True)
    result = clean(df, tiny_schema, CleanParams(drop_duplicates=drop, scale=scale))
    assert len(result.clean) == rows_out == result.report["rows_out"]
    assert result.report["rows_in"] == 11
    assert [r["rule"] for r in result.report["rules"]] == (["drop_duplicates", "scale_to_unit_range"] if drop else [])


def test_split_sizes_and_stratification(tiny_schema):
    df = make_frame(tiny_schema, 300)
    s = split(df, "label", SplitParams())
    assert s.sizes() == {"train": 210, "val": 45, "test": 45}
    for part in (s.train, s.val, s.test):
        shares = part["label"].value_counts(normalize=True)
        assert np.allclose(shares, 1 / 3, atol=0.02)
    ids = [set(p["id"]) for p in (s.train, s.val, s.test)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert set().union(*ids) == set(df["id"])


def test_split_is_seeded(tiny_schema):
    df = make_frame(tiny_schema, 120)
    a, b = split(df, "label", SplitParams(seed=1)), split(df, "label", SplitParams(seed=1))
    c = split(df, "label", SplitParams(seed=2))
    assert a.test["id"].tolist() == b.test["id"].tolist()
    assert a.test["id"].tolist() != c.test["id"].tolist()


@pytest.mark.parametrize("n", [2, 5])
def test_split_rejects_too_small_classes(tiny_schema, n):
    with pytest.raises(DataError, match="too few"):
        split(make_frame(tiny_schema, n), "label", SplitParams())
