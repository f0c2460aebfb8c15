"""Drift statistics on synthetic batches with known answers: same distribution, a shift,
small vs large references (which test applies), categorical columns, PSI and the domain
classifier."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.config import DataParams, DriftParams
from pipeline.data.schema import schema_from_params
from pipeline.drift import (
    domain_classifier_auc,
    drift_report,
    performance_drift,
    prediction_drift,
    psi,
    report_html,
    wasserstein_normalised,
)


def schema(n_numeric: int, categorical: bool = False):
    features = [{"prefix": "x", "count": n_numeric, "kind": "numeric", "dtype": "float"}]
    if categorical:
        features.append({"name": "colour", "kind": "categorical", "dtype": "str", "values": ["red", "green", "blue"]})
    return schema_from_params(DataParams(features=features, classes=[0, 1]))


def frame(n: int, k: int, seed: int, shift: float = 0.0, colours=(0.5, 0.3, 0.2)) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(rng.normal(shift, 1.0, size=(n, k)), columns=[f"x{i}" for i in range(k)])
    df["colour"] = rng.choice(["red", "green", "blue"], size=n, p=list(colours))
    return df


@pytest.mark.parametrize("rows, test", [(500, "ks"), (5000, "wasserstein")])
def test_the_test_follows_the_reference_size_and_no_drift_is_found_without_a_shift(rows, test):
    report = drift_report(frame(rows, 5, 0), frame(rows, 5, 1), schema(5), DriftParams())
    assert set(report.features["test"]) == {test}
    assert not report.drifted and report.share < 0.5 and report.multivariate is None  # 5 columns: not wide


@pytest.mark.parametrize("rows", [500, 5000])
def test_a_shift_in_every_feature_is_drift(rows):
    report = drift_report(frame(rows, 5, 0), frame(rows, 5, 1, shift=0.5), schema(5), DriftParams())
    assert report.drifted and report.share == 1.0 and report.features["drifted"].all()
    assert "5 of 5 features drifted" in report.reasons[0]


def test_a_shift_in_a_minority_of_features_is_below_the_share():
    ref, cur = frame(3000, 6, 0), frame(3000, 6, 1)
    cur["x0"] += 1.0
    report = drift_report(ref, cur, schema(6), DriftParams())
    assert report.features.iloc[0]["feature"] == "x0" and report.features.iloc[0]["drifted"]  # most drifted first
    assert report.share == pytest.approx(1 / 6) and not report.drifted
    assert drift_report(ref, cur, schema(6), DriftParams(drift_share=0.1)).drifted


def test_wasserstein_is_in_reference_standard_deviations():
    rng = np.random.default_rng(0)
    ref = rng.normal(0, 2.0, size=(20000, 1))
    assert wasserstein_normalised(ref, ref + 1.0)[0] == pytest.approx(0.5, abs=0.01)  # a shift of half a std
    constant = np.zeros((100, 1))
    assert wasserstein_normalised(constant, constant)[0] == 0.0
    assert np.isinf(wasserstein_normalised(constant, constant + 1)[0])


def test_psi_is_zero_for_the_same_data_and_large_for_a_shift():
    x = np.random.default_rng(0).normal(size=(10000, 2))
    assert psi(x, x).max() < 1e-9
    assert psi(x, x + 1.0).min() > 0.25  # above the usual "significant change" level


@pytest.mark.parametrize("rows, test", [(600, "chi2"), (6000, "jensen_shannon")])
def test_categorical_columns(rows, test):
    same = drift_report(frame(rows, 1, 0), frame(rows, 1, 1), schema(1, categorical=True), DriftParams())
    moved = drift_report(frame(rows, 1, 0), frame(rows, 1, 1, colours=(0.1, 0.3, 0.6)), schema(1, categorical=True),
                         DriftParams())
    colour = lambda r: r.features.set_index("feature").loc["colour"]  # noqa: E731
    assert colour(same)["test"] == test and not colour(same)["drifted"]
    assert colour(moved)["drifted"] and colour(moved)["psi"] > colour(same)["psi"]


def test_the_domain_classifier_sees_a_joint_shift_a_per_feature_vote_misses():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(3000, 60))
    assert domain_classifier_auc(ref, rng.normal(size=(3000, 60))) < 0.6
    # every column moves by a little, too little for most per-column tests, together a lot
    cur = rng.normal(size=(3000, 60)) + 0.06
    report = drift_report(pd.DataFrame(ref, columns=[f"x{i}" for i in range(60)]),
                          pd.DataFrame(cur, columns=[f"x{i}" for i in range(60)]), schema(60), DriftParams())
    assert report.share < 0.5, "the per-feature vote alone would not call this"
    assert report.multivariate["roc_auc"] >= 0.6 and report.multivariate["drifted"] and report.drifted


def test_the_quantile_grid_matches_scipy_s_exact_wasserstein():
    from scipy.stats import wasserstein_distance

    rng = np.random.default_rng(1)
    ref, cur = rng.normal(size=(4000, 3)), rng.gamma(2.0, size=(3000, 3))
    ours = wasserstein_normalised(ref, cur)
    exact = np.array([wasserstein_distance(ref[:, j], cur[:, j]) / ref[:, j].std() for j in range(3)])
    assert ours == pytest.approx(exact, rel=0.01)


def test_the_html_report_has_the_verdict_the_histograms_and_every_feature():
    ref, cur = frame(500, 4, 0), frame(500, 4, 1, shift=1.0, colours=(0.1, 0.3, 0.6))
    report = drift_report(ref, cur, schema(4, categorical=True), DriftParams())
    page = report_html(report, ref, cur, top=3)
    assert report.drifted and '<p class="verdict">DRIFT</p>' in page and report.reasons[0] in page
    assert page.count("data:image/png;base64,") == 3
    assert all(f"<td>{name}</td>" in page for name in ("x0", "x1", "x2", "x3", "colour"))
    quiet = drift_report(ref, frame(500, 4, 2), schema(4, categorical=True), DriftParams())
    assert not quiet.drifted and '<p class="verdict">no drift</p>' in report_html(quiet, ref, frame(500, 4, 2))


def test_prediction_and_performance_drift():
    labels = pd.Series(np.random.default_rng(0).integers(0, 3, 2000))
    assert not prediction_drift(labels, labels.sample(frac=1, random_state=1), DriftParams()).drifted
    assert prediction_drift(labels, pd.Series([0] * 500), DriftParams()).drifted
    assert not performance_drift(0.96, 0.97, 0.02, "accuracy").decayed
    decayed = performance_drift(0.90, 0.97, 0.02, "accuracy")
    assert decayed.decayed and "-0.0700" in decayed.reason
