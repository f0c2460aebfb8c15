import numpy as np
import pandas as pd
import pytest

from pipeline.config import RegisterParams
from pipeline.evaluate import (
    classification_metrics,
    confusion,
    gradient_attributions,
    per_class_metrics,
    plot_attributions,
    plot_confusion_matrix,
    plot_learning_curves,
    plot_per_class_f1,
    plot_roc_curves,
    slice_metrics,
)
from pipeline.registry import promotion_decision


def one_hot(pred: np.ndarray, n: int, confidence: float = 0.8) -> np.ndarray:
    """Probabilities that put `confidence` on the predicted class and share the rest."""
    proba = np.full((len(pred), n), (1 - confidence) / (n - 1))
    proba[np.arange(len(pred)), pred] = confidence
    return proba


def test_metrics_on_known_predictions():
    y = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 0])
    m = classification_metrics(y, one_hot(pred, 3))
    assert m["accuracy"] == pytest.approx(4 / 6)
    # per class precision 1/2, 2/3, 1; recall 1/2, 1, 1/2
    assert m["precision_macro"] == pytest.approx((0.5 + 2 / 3 + 1) / 3)
    assert m["recall_macro"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    assert confusion(y, pred, 3).tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]


def test_a_class_never_predicted_counts_as_zero():
    m = classification_metrics(np.array([0, 1, 2]), one_hot(np.array([0, 1, 1]), 3))
    assert m["precision_macro"] == pytest.approx((1 + 0.5 + 0) / 3)


def test_log_loss_and_roc_auc_on_known_probabilities():
    y = np.array([0, 1, 1, 0])
    proba = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    m = classification_metrics(y, proba)
    assert m["log_loss"] == pytest.approx(-np.mean(np.log([0.9, 0.8, 0.4, 0.3])))
    # class 1 scores: positives 0.8, 0.4; negatives 0.1, 0.7 → 3 of 4 pairs ordered right
    assert m["roc_auc_ovr"] == pytest.approx(0.75)
    perfect = classification_metrics(y, np.array([[0.9, 0.1], [0.1, 0.9], [0.2, 0.8], [0.7, 0.3]]))
    assert perfect["roc_auc_ovr"] == 1.0 and perfect["accuracy"] == 1.0


def test_per_class_metrics_and_a_class_missing_from_the_split():
    y = np.array([0, 0, 1, 1])  # class 2 never occurs here
    per_class = per_class_metrics(y, one_hot(np.array([0, 1, 1, 1]), 3), ["a", "b", "c"])
    assert per_class["class"].tolist() == ["a", "b", "c"]
    assert per_class["recall"].tolist() == pytest.approx([0.5, 1.0, 0.0])
    assert per_class["support"].tolist() == [2, 2, 0]
    assert np.isnan(per_class["roc_auc"].iloc[2])  # no positives: no ROC curve, not a fake 0.5
    m = classification_metrics(y, one_hot(np.array([0, 1, 1, 1]), 3))
    assert not np.isnan(m["roc_auc_ovr"])


def test_slices_show_the_group_the_model_fails():
    keys = pd.Series(["north"] * 4 + ["south"] * 4)
    y = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    pred = np.array([0, 1, 0, 1, 1, 0, 1, 0])  # right in the north, wrong in the south
    table = slice_metrics(keys, y, pred, regression=False).set_index("slice")
    assert table.loc["north", "accuracy"] == 1.0 and table.loc["south", "accuracy"] == 0.0
    assert table["rows"].tolist() == [4, 4]


def test_numeric_slices_are_quantile_bins_and_regression_slices_use_rmse():
    keys = pd.Series(np.arange(40, dtype=float))
    y = np.zeros(40)
    pred = np.where(keys >= 30, 2.0, 0.0)  # the top quarter is off by 2
    table = slice_metrics(keys, y, pred, regression=True, bins=4)
    assert len(table) == 4 and table["rows"].tolist() == [10, 10, 10, 10]
    assert sorted(table["rmse"].tolist()) == [0.0, 0.0, 0.0, 2.0]


def test_gradient_attributions_find_the_feature_that_matters():
    import torch

    net = torch.nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[0.0, 5.0, 0.0], [0.0, -5.0, 0.0]]))
    x = np.ones((4, 3), dtype="float32")
    attr = gradient_attributions(net, x, np.array([0, 0, 1, 1]))
    assert attr.shape == (4, 3)
    assert np.abs(attr[:, 1]).min() > 0 and np.abs(attr[:, [0, 2]]).max() == 0
    assert (attr[:2, 1] > 0).all() and (attr[2:, 1] < 0).all()


def digits_inputs():
    from pipeline.config import load_params
    from pipeline.data.schema import schema_from_params
    from tests.conftest import REPO

    schema = schema_from_params(load_params(REPO / "params.yaml").data)
    state = {"numeric": {"names": schema.feature_names, "fill": [None] * 64, "center": [0.0] * 64, "scale": [16.0] * 64},
             "categorical": [], "outputs": schema.feature_names, "target": None}
    return schema, state


def test_a_split_scored_in_batches_keeps_the_first_rows_of_each_class_to_explain():
    import torch

    from pipeline.evaluate import score_split

    schema, state = digits_inputs()
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.integers(0, 17, (7, 64)), columns=schema.feature_names).assign(
        label=[2, 0, 0, 1, 0, 2, 1])
    torch.manual_seed(0)
    scored = score_split(torch.nn.Linear(64, 10), [frame.iloc[:3], frame.iloc[3:]], schema, state, sample_rows=100)
    assert scored.examples["y"].tolist() == [0, 0, 1, 1, 2, 2]  # the first two of each class, by class
    expected = frame.iloc[[1, 2, 3, 6, 0, 5]][schema.feature_names].to_numpy("float32") / 16
    assert np.allclose(scored.examples["x"], expected) and scored.examples["out"].shape == (6, 10)
    assert scored.sample.complete and scored.y.tolist() == [2, 0, 0, 1, 0, 2, 1]


def test_roc_auc_is_exact_while_the_split_fits_the_sample_and_estimated_beyond():
    import torch

    from pipeline.evaluate import score_split

    schema, state = digits_inputs()
    rng = np.random.default_rng(1)
    frame = pd.DataFrame(rng.integers(0, 17, (3000, 64)), columns=schema.feature_names).assign(
        label=rng.integers(0, 10, 3000))
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 10)
    batches = lambda: (frame.iloc[i:i + 500] for i in range(0, 3000, 500))  # noqa: E731
    whole = score_split(model, batches(), schema, state, sample_rows=3000)
    sampled = score_split(model, batches(), schema, state, sample_rows=400)
    assert whole.sample.complete and not sampled.sample.complete and len(sampled.y) == 400
    exact = whole.metrics()
    assert exact["roc_auc_ovr"] == pytest.approx(
        classification_metrics(frame["label"].to_numpy(), whole.out)["roc_auc_ovr"], abs=1e-12)
    estimated = sampled.metrics()
    assert estimated["roc_auc_ovr"] != exact["roc_auc_ovr"]  # from the histograms, not the 400 sampled rows
    assert estimated["roc_auc_ovr"] == pytest.approx(exact["roc_auc_ovr"], abs=2e-3)
    assert {k: v for k, v in estimated.items() if k != "roc_auc_ovr"} == pytest.approx(
        {k: v for k, v in exact.items() if k != "roc_auc_ovr"}, rel=1e-9)


def test_plots_are_written(tmp_path):
    cm = plot_confusion_matrix(np.eye(3, dtype=int) * 5, [0, 1, 2], tmp_path / "cm.png", "t")
    hist = pd.DataFrame({"epoch": [1, 2, 3], "train_loss": [1, 0.5, 0.3], "val_loss": [1.1, 0.6, 0.5], "val_accuracy": [0.5, 0.7, 0.8]})
    lc = plot_learning_curves(hist, tmp_path / "lc.png", best_epoch=3)
    y = np.array([0, 1, 2, 0, 1, 2])
    proba = one_hot(np.array([0, 1, 2, 0, 2, 2]), 3)
    f1 = plot_per_class_f1(per_class_metrics(y, proba, ["a", "b", "c"]), tmp_path / "f1.png", "t")
    roc = plot_roc_curves(y, proba, ["a", "b", "c"], tmp_path / "roc.png", "t")
    x = np.random.default_rng(0).random((3, 4)).astype("float32")
    saliency = plot_attributions(x, x - 0.5, ["0", "1", "2"], ["a", "b", "c", "d"], [1, 2, 2], tmp_path / "s.png")
    tabular = plot_attributions(x, x - 0.5, ["0", "1", "2"], ["a", "b", "c", "d"], None, tmp_path / "t.png")
    for path in (cm, lc, f1, roc, saliency, tabular):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("accuracy, promote", [(0.96, True), (0.95, True), (0.94, False)])
def test_the_first_model_needs_only_the_absolute_gate(accuracy, promote):
    ok, reasons = promotion_decision({"test_accuracy": accuracy}, RegisterParams(min_test_accuracy=0.95), None)
    assert ok is promote
    assert "register.min_test_accuracy=0.95" in reasons[0] and "no champion yet" in reasons[1]


@pytest.mark.parametrize(
    "challenger_f1, champion_f1, promote",
    [(0.97, 0.96, True), (0.958, 0.96, True), (0.954, 0.96, False), (0.90, 0.99, False)],
)
def test_the_challenger_must_not_be_worse_than_the_champion_beyond_the_tolerance(challenger_f1, champion_f1, promote):
    params = RegisterParams(min_test_accuracy=0.5, tolerance=0.005)
    champion = {"version": "3", "metrics": {"test_f1_macro": champion_f1}}
    ok, reasons = promotion_decision({"test_accuracy": 0.97, "test_f1_macro": challenger_f1}, params, champion)
    assert ok is promote
    assert "champion version 3" in reasons[1] and "same test split" in reasons[1]
    assert ("not worse beyond" in reasons[1]) is promote


def test_meeting_the_champion_is_not_enough_below_the_absolute_threshold():
    params = RegisterParams(min_test_accuracy=0.95)
    champion = {"version": "1", "metrics": {"test_f1_macro": 0.5}}
    ok, reasons = promotion_decision({"test_accuracy": 0.9, "test_f1_macro": 0.9}, params, champion)
    assert not ok and "is below" in reasons[0]


def test_the_compared_metric_is_configurable():
    params = RegisterParams(min_test_accuracy=0.5, compare_metric="roc_auc_ovr", tolerance=0.0)
    champion = {"version": "1", "metrics": {"test_f1_macro": 0.1, "test_roc_auc_ovr": 0.99}}
    ok, reasons = promotion_decision({"test_accuracy": 0.9, "test_f1_macro": 0.9, "test_roc_auc_ovr": 0.98}, params, champion)
    assert not ok and "test_roc_auc_ovr" in reasons[1]


@pytest.mark.parametrize("r2, promote", [(0.7, True), (0.2, False)])
def test_regression_gate_reads_r2(r2, promote):
    ok, reasons = promotion_decision({"test_r2": r2}, RegisterParams(min_test_r2=0.5), None, "regression")
    assert ok is promote and "register.min_test_r2=0.5" in reasons[0]


def test_regression_metrics():
    from pipeline.evaluate import regression_metrics

    m = regression_metrics(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 5.0]))
    assert m["mae"] == pytest.approx(2 / 3) and m["rmse"] == pytest.approx((4 / 3) ** 0.5)
    assert m["r2"] == pytest.approx(1 - 4 / 2)


def test_a_champion_that_cannot_score_todays_data_leaves_only_the_absolute_gate():
    champion = {"version": "4", "error": "missing column pixel_0"}
    ok, reasons = promotion_decision({"test_accuracy": 0.97, "test_f1_macro": 0.9}, RegisterParams(), champion)
    assert ok and "cannot score the current test split (missing column pixel_0)" in reasons[1]
    ok, _ = promotion_decision({"test_accuracy": 0.5, "test_f1_macro": 0.5}, RegisterParams(), champion)
    assert not ok
