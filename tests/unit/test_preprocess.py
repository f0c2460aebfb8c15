import numpy as np
import pandas as pd
import pytest

from pipeline import preprocess

SPEC = {
    "numeric": [{"name": "a", "min": 0, "max": 10, "impute": "median"}, {"name": "b", "min": 0, "max": 4, "impute": None}],
    "categorical": [{"name": "c", "min": None, "max": None, "impute": "most_frequent"}],
    "scale": "standard",
    "fill_value": 0,
    "max_categories": 50,
}
TRAIN = pd.DataFrame({"a": [1.0, 2.0, 3.0, np.nan], "b": [0, 2, 4, 2], "c": ["x", "y", "x", None]})


def test_fit_uses_train_statistics_only():
    state = preprocess.fit(TRAIN, SPEC)
    assert state["numeric"]["fill"] == [2.0, None]
    assert state["numeric"]["center"] == pytest.approx([2.0, 2.0])
    assert state["categorical"][0] == {"name": "c", "fill": "x", "categories": ["x", "y"]}
    assert state["outputs"] == ["a", "b", "c=x", "c=y"]


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
        (pd.DataFrame({"a": [1.0], "b": [np.nan], "c": ["x"]}), "null value in column b"),
        (pd.DataFrame({"a": ["ten"], "b": [1], "c": ["x"]}), "column a holds a value that is not a number"),
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
