"""Metrics summed batch by batch give what the array functions give on the whole split, for
any cut into batches; the row sample is uniform, bounded, in order and the whole split
while it fits."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.evaluate import classification_metrics, per_class_auc, per_class_metrics, regression_metrics
from pipeline.metric_totals import ClassTotals, RegressionTotals, RowSample, histogram_auc


def proba_for(rng: np.random.Generator, y: np.ndarray, k: int, signal: float = 2.0) -> np.ndarray:
    logits = rng.normal(size=(len(y), k)).astype("float32")
    logits[np.arange(len(y)), y] += signal
    e = np.exp(logits - logits.max(1, keepdims=True))
    return (e / e.sum(1, keepdims=True)).astype("float32")


def cuts(n: int, sizes: list[int]) -> list[slice]:
    out, start = [], 0
    for size in sizes:
        if start >= n:
            break
        out.append(slice(start, min(n, start + size)))
        start += size
    return out + ([slice(start, n)] if start < n else [])


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 300), k=st.integers(2, 6), seed=st.integers(0, 2**16),
       sizes=st.lists(st.integers(1, 80), min_size=1, max_size=10))
def test_class_totals_equal_the_array_metrics(n, k, seed, sizes):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    proba = proba_for(rng, y, k)
    totals = ClassTotals(k)
    for part in cuts(n, sizes):
        totals.add(y[part], proba[part])
    expected = classification_metrics(y, proba)
    got = totals.metrics(per_class_auc(y, proba))  # with the exact AUCs, every figure is the array one
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-9, nan_ok=True)
    table = totals.per_class([f"c{i}" for i in range(k)], per_class_auc(y, proba))
    pd.testing.assert_frame_equal(table, per_class_metrics(y, proba, [f"c{i}" for i in range(k)]),
                                  check_dtype=False, atol=1e-9)


def test_histogram_auc_is_close_to_the_exact_one():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 20_000)
    for signal in (0.5, 2.0, 6.0):  # from weak to very confident models
        proba = proba_for(rng, y, 4, signal)
        totals = ClassTotals(4)
        totals.add(y, proba)
        assert totals.auc() == pytest.approx(per_class_auc(y, proba), abs=2e-4)


def test_histogram_auc_bounds_and_missing_classes():
    assert histogram_auc(np.array([0, 0, 5]), np.array([5, 0, 0])) == 1.0
    assert histogram_auc(np.array([5, 0, 0]), np.array([0, 0, 5])) == 0.0
    assert histogram_auc(np.array([0, 5, 0]), np.array([0, 5, 0])) == 0.5  # all ties
    assert np.isnan(histogram_auc(np.zeros(3), np.array([1, 2, 3])))
    totals = ClassTotals(3)
    totals.add(np.array([0, 1, 0]), np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1]], dtype="float32"))
    assert np.isnan(totals.auc()[2])  # class 2 has no rows here
    assert not np.isnan(totals.metrics()["roc_auc_ovr"])  # the mean is over the classes present


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 300), seed=st.integers(0, 2**16), offset=st.sampled_from([0.0, 1e6]),
       sizes=st.lists(st.integers(1, 80), min_size=1, max_size=10))
def test_regression_totals_equal_the_array_metrics(n, seed, offset, sizes):
    """Also far from zero (offset 1e6), where a plain sum of squares would lose R²."""
    rng = np.random.default_rng(seed)
    y = offset + rng.normal(size=n) * 10
    predicted = y + rng.normal(size=n)
    totals = RegressionTotals()
    for part in cuts(n, sizes):
        totals.add(y[part], predicted[part])
    assert totals.rows == n
    assert totals.metrics() == pytest.approx(regression_metrics(y, predicted), rel=1e-6, abs=1e-9)


def test_an_empty_split_has_zero_rows_and_no_crash():
    assert ClassTotals(3).rows == 0 and ClassTotals(3).metrics()["accuracy"] == 0.0
    assert RegressionTotals().metrics()["mae"] == 0.0


def test_the_sample_is_the_whole_split_while_it_fits():
    sample = RowSample(100, seed=1)
    for start in range(0, 90, 30):
        sample.add(v=np.arange(start, start + 30))
    assert sample.complete and sample["v"].tolist() == list(range(90))


def test_the_sample_is_bounded_ordered_uniform_and_seeded():
    def draw(seed: int, batch: int) -> RowSample:
        s = RowSample(1_000, seed=seed)
        for start in range(0, 50_000, batch):
            s.add(v=np.arange(start, min(start + batch, 50_000)))
        return s

    a = draw(0, 4_096)
    assert not a.complete and a.seen == 50_000 and len(a["v"]) == 1_000
    assert (np.diff(a["v"]) > 0).all()  # the split's order
    assert np.array_equal(a["v"], a.index)
    assert np.array_equal(draw(0, 4_096)["v"], a["v"]) and not np.array_equal(draw(1, 4_096)["v"], a["v"])
    counts = np.histogram(a["v"], bins=10, range=(0, 50_000))[0]
    assert counts.min() > 60 and counts.max() < 140  # about 100 per tenth: uniform over the split


def test_non_finite_outputs_are_named_not_binned():
    with pytest.raises(ValueError, match="predicted probabilities contain NaN"):
        ClassTotals(2).add(np.array([0, 1]), np.array([[0.5, 0.5], [np.nan, np.nan]], dtype="float32"))
    with pytest.raises(ValueError, match="predictions contain NaN"):
        RegressionTotals().add(np.array([1.0, 2.0]), np.array([1.0, np.inf]))
