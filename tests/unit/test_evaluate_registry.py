import numpy as np
import pandas as pd
import pytest

from pipeline.config import RegisterParams
from pipeline.evaluate import classification_metrics, confusion, plot_confusion_matrix, plot_learning_curves
from pipeline.registry import promotion_decision


def test_metrics_on_known_predictions():
    y = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 0])
    m = classification_metrics(y, pred, 3)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # per class precision 1/2, 2/3, 1; recall 1/2, 1, 1/2
    assert m["precision_macro"] == pytest.approx((0.5 + 2 / 3 + 1) / 3)
    assert m["recall_macro"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    assert confusion(y, pred, 3).tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]


def test_a_class_never_predicted_counts_as_zero():
    m = classification_metrics(np.array([0, 1, 2]), np.array([0, 1, 1]), 3)
    assert m["precision_macro"] == pytest.approx((1 + 0.5 + 0) / 3)


def test_plots_are_written(tmp_path):
    cm = plot_confusion_matrix(np.eye(3, dtype=int) * 5, [0, 1, 2], tmp_path / "cm.png", "t")
    hist = pd.DataFrame({"epoch": [1, 2, 3], "train_loss": [1, 0.5, 0.3], "val_loss": [1.1, 0.6, 0.5], "val_accuracy": [0.5, 0.7, 0.8]})
    lc = plot_learning_curves(hist, tmp_path / "lc.png", best_epoch=3)
    for path in (cm, lc):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "accuracy, champion, promote",
    [(0.96, None, True), (0.95, None, True), (0.94, None, False), (0.99, "3", False)],
)
def test_promotion_gate(accuracy, champion, promote):
    ok, reasons = promotion_decision({"test_accuracy": accuracy}, RegisterParams(min_test_accuracy=0.95), champion)
    assert ok is promote
    assert "register.min_test_accuracy=0.95" in reasons[0]
    if champion:
        assert "already champion" in reasons[-1]


@pytest.mark.parametrize("r2, promote", [(0.7, True), (0.2, False)])
def test_regression_gate_reads_r2(r2, promote):
    ok, reasons = promotion_decision({"test_r2": r2}, RegisterParams(min_test_r2=0.5), None, "regression")
    assert ok is promote and "register.min_test_r2=0.5" in reasons[0]


def test_regression_metrics():
    from pipeline.evaluate import regression_metrics

    m = regression_metrics(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 5.0]))
    assert m["mae"] == pytest.approx(2 / 3) and m["rmse"] == pytest.approx((4 / 3) ** 0.5)
    assert m["r2"] == pytest.approx(1 - 4 / 2)
