"""Metric functions and the plots people look at: confusion matrix, per-class F1, ROC
curves, learning curves, sliced metrics and gradient attributions."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipeline.metric_totals import ClassTotals, RegressionTotals, RowSample

if TYPE_CHECKING:
    from pipeline.data.schema import Schema


def predict(model: Any, x: np.ndarray, batch: int = 4096) -> np.ndarray:
    """The network's raw outputs on a float32 feature matrix, in batches."""
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out.append(model(torch.tensor(x[i : i + batch])).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype="float32")


def predict_proba(model: Any, x: np.ndarray) -> np.ndarray:
    """Class probabilities (softmax of the logits)."""
    logits = predict(model, x)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def classification_metrics(y_true: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """Accuracy, macro precision/recall/F1 (every class counts equally), one-vs-rest macro
    ROC-AUC and log loss, from the true class indices and the predicted probabilities."""
    from sklearn.metrics import accuracy_score, log_loss, precision_recall_fscore_support

    proba = proba / proba.sum(axis=1, keepdims=True)  # float32 softmax rows sum to 1 only within rounding
    n_classes = proba.shape[1]
    labels = list(range(n_classes))
    y_pred = proba.argmax(1)
    p, r, f1, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average="macro", zero_division=0)
    auc = per_class_auc(y_true, proba)
    present = [a for a in auc if not np.isnan(a)]
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "precision_macro": float(p),
        "recall_macro": float(r),
        "f1_macro": float(f1),
        # classes absent from this split have no ROC curve; the mean is over those present
        "roc_auc_ovr": float(np.mean(present)) if present else float("nan"),
        "log_loss": float(log_loss(y_true, proba, labels=labels)),
    }


def per_class_auc(y_true: np.ndarray, proba: np.ndarray) -> list[float]:
    """One-vs-rest ROC-AUC per class; NaN for a class with no positives (or no negatives) here."""
    from sklearn.metrics import roc_auc_score

    out = []
    for k in range(proba.shape[1]):
        positives = y_true == k
        out.append(float(roc_auc_score(positives, proba[:, k])) if 0 < positives.sum() < len(y_true) else float("nan"))
    return out


def per_class_metrics(y_true: np.ndarray, proba: np.ndarray, classes: list[Any]) -> pd.DataFrame:
    """Precision, recall, F1, support and ROC-AUC for every class."""
    from sklearn.metrics import precision_recall_fscore_support

    labels = list(range(len(classes)))
    p, r, f1, support = precision_recall_fscore_support(y_true, proba.argmax(1), labels=labels, zero_division=0)
    return pd.DataFrame({"class": [str(c) for c in classes], "precision": p, "recall": r, "f1": f1,
                         "support": support, "roc_auc": per_class_auc(y_true, proba)})


def slice_metrics(
    keys: pd.Series, y_true: np.ndarray, y_pred: np.ndarray, regression: bool, bins: int = 4, min_rows: int = 1
) -> pd.DataFrame:
    """The headline metric per group of a column: per value for a categorical column, per
    quantile bin for a numeric one. A group far below the others is the model failing it."""
    if pd.api.types.is_numeric_dtype(keys) and keys.nunique() > bins:
        groups = pd.qcut(keys, q=bins, duplicates="drop").astype(str)
    else:
        groups = keys.astype(str)
    groups = groups.fillna("(missing)").to_numpy()
    rows = []
    for value in sorted(set(groups)):
        mask = groups == value
        if mask.sum() < min_rows:
            continue
        if regression:
            err = y_true[mask] - y_pred[mask]
            rows.append({"slice": value, "rows": int(mask.sum()), "rmse": float(np.sqrt(np.mean(err**2))),
                         "mae": float(np.mean(np.abs(err)))})
        else:
            from sklearn.metrics import f1_score

            rows.append({"slice": value, "rows": int(mask.sum()), "accuracy": float(np.mean(y_true[mask] == y_pred[mask])),
                         "f1_macro": float(f1_score(y_true[mask], y_pred[mask], average="macro", zero_division=0))})
    return pd.DataFrame(rows)


def gradient_attributions(model: Any, x: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Gradient × input of the target output with respect to each input feature: how much
    each (preprocessed) feature pushed the model towards that output, one row per example."""
    import torch

    model.eval()
    inputs = torch.tensor(x, requires_grad=True)
    out = model(inputs)
    picked = out[torch.arange(len(x)), torch.as_tensor(targets, dtype=torch.long)]
    (grad,) = torch.autograd.grad(picked.sum(), inputs)
    return (grad * inputs).detach().numpy()


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """MAE, RMSE and R² in the target's own units."""
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    return {
        "mae": float(mean_absolute_error(y_true, y_pred)),
        "rmse": float(mean_squared_error(y_true, y_pred) ** 0.5),
        "r2": float(r2_score(y_true, y_pred)),
    }


def plot_predicted_vs_actual(y_true: np.ndarray, y_pred: np.ndarray, path: Path, title: str) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.scatter(y_true, y_pred, s=10, alpha=0.6)
    lo, hi = float(min(y_true.min(), y_pred.min())), float(max(y_true.max(), y_pred.max()))
    ax.plot([lo, hi], [lo, hi], color="grey", linestyle="--", linewidth=1, label="perfect")
    ax.set_xlabel("actual")
    ax.set_ylabel("predicted")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(y_true, y_pred, labels=list(range(n_classes)))


def plot_confusion_matrix(cm: np.ndarray, classes: list[Any], path: Path, title: str) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5.2))
    im = ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), [str(c) for c in classes])
    ax.set_yticks(range(len(classes)), [str(c) for c in classes])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    threshold = cm.max() / 2 if cm.size else 0
    for (i, j), v in np.ndenumerate(cm):
        if v:
            ax.text(j, i, str(v), ha="center", va="center", fontsize=8, color="white" if v > threshold else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


def plot_learning_curves(history: pd.DataFrame, path: Path, best_epoch: int | None = None) -> Path:
    plt = _pyplot()
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    loss_ax.plot(history["epoch"], history["train_loss"], label="train")
    loss_ax.plot(history["epoch"], history["val_loss"], label="validation")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("cross-entropy")
    loss_ax.set_title("loss")
    metric = "val_accuracy" if "val_accuracy" in history else "val_rmse"
    acc_ax.plot(history["epoch"], history[metric], color="tab:green")
    acc_ax.set_xlabel("epoch")
    acc_ax.set_ylabel(metric.removeprefix("val_"))
    acc_ax.set_title(f"validation {metric.removeprefix('val_')}")
    for ax in (loss_ax, acc_ax):
        if best_epoch is not None:
            ax.axvline(best_epoch, color="grey", linestyle="--", linewidth=1, label="best epoch")
        ax.grid(alpha=0.3)
    loss_ax.legend()
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    from pipeline.data import io

    fig.tight_layout()
    with io.atomic(path) as tmp:  # the format from the name, as the temporary file's is .tmp
        fig.savefig(tmp, dpi=110, format=path.suffix.removeprefix("."))
    plt.close(fig)
    return path


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (no display on servers and workers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_per_class_f1(per_class: pd.DataFrame, path: Path, title: str) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(per_class) + 2), 4))
    bars = ax.bar(per_class["class"], per_class["f1"], color="tab:blue")
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_ylim(0, 1.08)
    ax.set_xlabel("class")
    ax.set_ylabel("F1")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_roc_curves(y_true: np.ndarray, proba: np.ndarray, classes: list[Any], path: Path, title: str) -> Path:
    from sklearn.metrics import roc_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for k, (name, auc) in enumerate(zip(classes, per_class_auc(y_true, proba))):
        if np.isnan(auc):
            continue
        fpr, tpr, _ = roc_curve(y_true == k, proba[:, k])
        ax.plot(fpr, tpr, linewidth=1.2, label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_attributions(
    x: np.ndarray, attributions: np.ndarray, labels: list[str], feature_names: list[str],
    image_shape: list[int] | None, path: Path,
) -> Path:
    """Saliency for image inputs (each example beside its |gradient × input| map), or for
    tabular inputs a heatmap of the attributions of the most influential features."""
    plt = _pyplot()
    if image_shape:
        c, h, w = image_shape
        n = len(x)
        cols = min(n, 10)
        rows = 2 * int(np.ceil(n / cols))
        fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.4 * rows), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for i in range(n):
            r, col = 2 * (i // cols), i % cols
            # the pixels lead each row; a manifest's extra columns (after them) are not drawn
            axes[r][col].imshow(x[i][:c * h * w].reshape(c, h, w).mean(0), cmap="gray_r")
            axes[r][col].set_title(labels[i], fontsize=8)
            axes[r + 1][col].imshow(np.abs(attributions[i][:c * h * w]).reshape(c, h, w).sum(0), cmap="hot")
        fig.suptitle("test examples, true → predicted (top), and saliency |gradient × input| (bottom)", fontsize=9)
        return _save(fig, path)
    top = np.argsort(-np.abs(attributions).mean(0))[:20]
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(top) + 2), max(3, 0.3 * len(x) + 1.5)))
    values = attributions[:, top]
    bound = float(np.abs(values).max()) or 1.0
    im = ax.imshow(values, cmap="coolwarm", vmin=-bound, vmax=bound, aspect="auto")
    ax.set_xticks(range(len(top)), [feature_names[j] for j in top], rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(x)), labels, fontsize=7)
    ax.set_title("feature attributions (gradient × input) for test examples, by true class")
    fig.colorbar(im, ax=ax, fraction=0.03)
    return _save(fig, path)


def plot_not_applicable(path: Path, text: str) -> Path:
    """A small image that says why a declared plot has no content for this task."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 1.2))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=10, color="grey")
    return _save(fig, path)


@dataclass(frozen=True)
class Scored:
    """A split scored by the network in batches: the exact totals of the whole split; a
    bounded uniform sample of its rows (the truth `y`: class indices or actual values, the
    outputs `out`: class probabilities or predicted values, and any extra columns asked for)
    for the plots and slices, the whole split, in order, while it fits; and `examples`, the
    first few rows of each class (regression: of the split) with their network inputs, to
    explain."""

    totals: ClassTotals | RegressionTotals
    sample: RowSample
    regression: bool
    examples: dict[str, np.ndarray] = field(default_factory=dict)  # x, y, out; none for a re-scored model

    @property
    def y(self) -> np.ndarray:
        return self.sample["y"]

    @property
    def out(self) -> np.ndarray:
        return self.sample["out"]

    def predicted(self) -> np.ndarray:
        """The predicted class index per sampled row, or the predicted value."""
        return self.out if self.regression else self.out.argmax(1)

    def exact_auc(self) -> list[float] | None:
        """Per-class ROC-AUC from every row when the sample holds the whole split (the totals'
        histograms estimate it otherwise)."""
        if self.regression or not self.sample.complete:
            return None
        return per_class_auc(self.y, self.out / self.out.sum(axis=1, keepdims=True))  # as classification_metrics

    def metrics(self) -> dict[str, float]:
        if isinstance(self.totals, RegressionTotals):
            return self.totals.metrics()
        return self.totals.metrics(self.exact_auc())

    def per_class(self, classes: list[Any]) -> pd.DataFrame:
        """Precision, recall, F1, support and ROC-AUC per class, over the whole split."""
        assert isinstance(self.totals, ClassTotals)
        return self.totals.per_class(classes, self.exact_auc())


def score_split(model: Any, batches: Iterable[pd.DataFrame], schema: Schema, state: dict[str, Any],
                sample_rows: int, keep: tuple[str, ...] = (), examples: int = 2, seed: int = 0) -> Scored:
    """The network on one split, batch by batch, through the fitted preprocessing; regression
    outputs are scaled back to the target's units. Memory holds one batch, the totals, a
    sample of `sample_rows` rows (with the columns in `keep`) and the first `examples` rows of
    each class (regression: the first ten rows) with their inputs."""
    from pipeline.preprocess import unscale_target
    from pipeline.train.trainer import features_and_labels

    totals: ClassTotals | RegressionTotals = RegressionTotals() if schema.regression else ClassTotals(schema.n_outputs)
    sample = RowSample(sample_rows, seed)
    groups = 1 if schema.regression else schema.n_outputs
    firsts: list[list[dict[str, np.ndarray]]] = [[] for _ in range(groups)]  # per class: the first rows, in order
    for frame in batches:
        x, y = features_and_labels(frame, schema, state)
        if schema.regression:
            y = frame[schema.target].to_numpy(dtype="float64")
            out = unscale_target(predict(model, x)[:, 0], state)
        else:
            out = predict_proba(model, x)
        totals.add(y, out)
        sample.add(y=y, out=out, **{c: frame[c].to_numpy() for c in keep})
        wanted = 10 if schema.regression else examples
        for k, rows in enumerate(firsts):
            have = sum(len(r["y"]) for r in rows)
            if have < wanted:
                pick = (np.arange(len(y)) if schema.regression else np.flatnonzero(y == k))[: wanted - have]
                rows.append({"x": x[pick], "y": y[pick], "out": out[pick]})
    parts = [r for rows in firsts for r in rows]
    from pipeline.train.trainer import n_inputs

    width = n_inputs(state)
    chosen = {name: np.concatenate([r[name] for r in parts]) if parts else np.zeros((0, width) if name == "x" else 0)
              for name in ("x", "y", "out")}
    return Scored(totals, sample, schema.regression, chosen)
