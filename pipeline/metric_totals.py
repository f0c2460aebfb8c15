"""Metrics summed batch by batch, so that a split of any size is scored in bounded memory:
confusion counts, the log-loss sum and per-class histograms of the scores for
classification; error and target moments for regression. Each `metrics()` gives what
evaluate's array functions give on the whole split (tests hold them equal), and
`RowSample` keeps a bounded uniform sample of rows for the plots and attributions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

# ROC-AUC from histograms of each class's score on the logit scale: 8,192 bins over
# [-20, 20] resolve 0.005 in logit, fine enough where confident models put most rows (near 0
# and 1), where bins of the probability itself would lump them together.
LOGIT_BINS, LOGIT_LIMIT = 8192, 20.0


def _bin(proba: np.ndarray) -> np.ndarray:
    p = np.clip(proba.astype("float64"), 1e-300, 1.0)
    logit = np.log(p) - np.log1p(-np.minimum(p, 1 - 1e-16))
    scaled = (np.clip(logit, -LOGIT_LIMIT, LOGIT_LIMIT) + LOGIT_LIMIT) / (2 * LOGIT_LIMIT)
    return np.minimum((scaled * LOGIT_BINS).astype(np.int64), LOGIT_BINS - 1)


def _finite(values: np.ndarray, what: str) -> None:
    if not np.isfinite(values).all():
        raise ValueError(f"{what} contain NaN or infinity: the model cannot be scored")


def histogram_auc(positives: np.ndarray, negatives: np.ndarray) -> float:
    """P(a positive outscores a negative), ties (a shared bin) counting half; NaN without both."""
    n_pos, n_neg = positives.sum(), negatives.sum()
    if not n_pos or not n_neg:
        return float("nan")
    below = np.cumsum(negatives) - negatives  # negatives in lower bins
    return float((positives * (below + 0.5 * negatives)).sum() / (n_pos * n_neg))


@dataclass
class ClassTotals:
    """A classification split's sums: enough for accuracy, macro precision/recall/F1, log loss,
    per-class figures and (approximately, from histograms) one-vs-rest ROC-AUC."""

    n_classes: int
    confusion: np.ndarray = field(init=False)  # true × predicted counts
    log_loss_sum: float = 0.0
    positives: np.ndarray = field(init=False)  # per class: histogram of its score over its own rows
    negatives: np.ndarray = field(init=False)  # ... over the other rows

    def __post_init__(self) -> None:
        k = self.n_classes
        self.confusion = np.zeros((k, k), dtype=np.int64)
        self.positives = np.zeros((k, LOGIT_BINS), dtype=np.int64)
        self.negatives = np.zeros((k, LOGIT_BINS), dtype=np.int64)

    @property
    def rows(self) -> int:
        return int(self.confusion.sum())

    def add(self, y: np.ndarray, proba: np.ndarray) -> None:
        """One batch: true class indices and predicted probabilities (rows × classes)."""
        _finite(proba, "predicted probabilities")
        k = self.n_classes
        proba = proba / proba.sum(axis=1, keepdims=True)  # as classification_metrics does
        self.confusion += np.bincount(y * k + proba.argmax(1), minlength=k * k).reshape(k, k)
        eps = np.finfo(proba.dtype).eps  # sklearn's log_loss clips at the dtype's eps
        self.log_loss_sum += float(-np.log(np.clip(proba[np.arange(len(y)), y], eps, 1 - eps)).sum())
        bins = _bin(proba)
        for c in range(k):
            own = y == c
            self.positives[c] += np.bincount(bins[own, c], minlength=LOGIT_BINS)
            self.negatives[c] += np.bincount(bins[~own, c], minlength=LOGIT_BINS)

    def per_class(self, classes: list, auc: list[float] | None = None) -> pd.DataFrame:
        """Precision, recall, F1, support and ROC-AUC per class (as evaluate.per_class_metrics);
        `auc` replaces the histogram's when the exact figures are known."""
        tp = np.diag(self.confusion).astype("float64")
        predicted, support = self.confusion.sum(axis=0), self.confusion.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = np.where(predicted > 0, tp / predicted, 0.0)
            recall = np.where(support > 0, tp / support, 0.0)
            f1 = np.where(predicted + support > 0, 2 * tp / (predicted + support), 0.0)
        return pd.DataFrame({"class": [str(c) for c in classes], "precision": precision, "recall": recall, "f1": f1,
                             "support": support, "roc_auc": auc if auc is not None else self.auc()})

    def auc(self) -> list[float]:
        return [histogram_auc(p, n) for p, n in zip(self.positives, self.negatives)]

    def metrics(self, auc: list[float] | None = None) -> dict[str, float]:
        """classification_metrics' figures from the sums (`auc`: exact per-class AUCs when known)."""
        table = self.per_class(list(range(self.n_classes)), auc)
        present = [a for a in table["roc_auc"] if not np.isnan(a)]
        rows = max(self.rows, 1)
        return {
            "accuracy": float(np.trace(self.confusion) / rows),
            "precision_macro": float(table["precision"].mean()),
            "recall_macro": float(table["recall"].mean()),
            "f1_macro": float(table["f1"].mean()),
            "roc_auc_ovr": float(np.mean(present)) if present else float("nan"),
            "log_loss": self.log_loss_sum / rows,
        }


@dataclass
class RegressionTotals:
    """A regression split's moments, merged batch by batch (Chan et al.'s pairwise update, which
    stays accurate where a plain sum of squares would cancel)."""

    rows: int = 0
    abs_error: float = 0.0
    sq_error: float = 0.0
    mean: float = 0.0  # of the target
    m2: float = 0.0  # the target's sum of squared deviations

    def add(self, y: np.ndarray, predicted: np.ndarray) -> None:
        _finite(y, "target values")
        _finite(predicted, "predictions")
        err = y - predicted
        self.abs_error += float(np.abs(err).sum())
        self.sq_error += float((err**2).sum())
        n, mean = len(y), float(y.mean()) if len(y) else 0.0
        m2 = float(((y - mean) ** 2).sum())
        total = self.rows + n
        if total:
            delta = mean - self.mean
            self.m2 += m2 + delta**2 * self.rows * n / total
            self.mean += delta * n / total
        self.rows = total

    def metrics(self) -> dict[str, float]:
        """regression_metrics' figures: MAE, RMSE and R² in the target's units."""
        rows = max(self.rows, 1)
        r2 = 1.0 - self.sq_error / self.m2 if self.m2 > 0 else (1.0 if self.sq_error == 0 else 0.0)
        return {"mae": self.abs_error / rows, "rmse": (self.sq_error / rows) ** 0.5, "r2": r2}


@dataclass
class RowSample:
    """A uniform sample of at most `size` rows (bottom-k of a seeded random key per row), kept
    in the split's order; while the split has no more rows than `size`, it is the whole split."""

    size: int
    seed: int = 0
    seen: int = 0
    keys: np.ndarray = field(default_factory=lambda: np.zeros(0))
    index: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    columns: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.seen <= self.size

    def add(self, **columns: np.ndarray) -> None:
        n = len(next(iter(columns.values())))
        rng = np.random.default_rng([self.seed, self.seen])  # a batch's keys depend on where it starts only
        new_keys, new_index = rng.random(n), np.arange(self.seen, self.seen + n)
        self.seen += n
        if len(self.keys) >= self.size:  # full: only rows that beat the largest kept key can enter
            enter = new_keys < self.keys.max()
            new_keys, new_index = new_keys[enter], new_index[enter]
            columns = {c: v[enter] for c, v in columns.items()}
        keys = np.concatenate([self.keys, new_keys])
        index = np.concatenate([self.index, new_index])
        merged = {c: np.concatenate([self.columns[c], v]) if c in self.columns else v for c, v in columns.items()}
        if len(keys) > self.size:
            keep = np.sort(np.argpartition(keys, self.size - 1)[: self.size])  # the split's order
            keys, index = keys[keep], index[keep]
            merged = {c: v[keep] for c, v in merged.items()}
        self.keys, self.index, self.columns = keys, index, merged

    def __getitem__(self, column: str) -> np.ndarray:
        return self.columns[column]
