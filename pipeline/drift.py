"""Drift statistics: is the current batch distributed like the reference (the champion's
training data)?

Per feature, the test a drift-tool user expects for its type and the reference's size:
numeric — Kolmogorov–Smirnov (p < ks_p) for small references, normalised Wasserstein
distance (≥ threshold) for large ones; categorical — chi-squared (p < chi2_p) for small,
Jensen–Shannon distance (≥ threshold) for large. PSI is reported for every feature. The
dataset drifts when the share of drifted features reaches `drift_share`. For wide inputs
(images) a per-feature vote is weak, so a domain classifier's ROC-AUC (reference vs
current) is the multivariate check. All vectorised over columns with numpy/scipy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from pipeline.config import DriftParams, MonitorParams
from pipeline.data.schema import Schema

QUANTILE_GRID = 1001  # the Wasserstein integral over quantiles, to well under 1% of its value


@dataclass
class DriftReport:
    features: pd.DataFrame  # feature, kind, test, score, threshold, drifted, psi; most drifted first
    share: float  # drifted features / features
    multivariate: dict[str, Any] | None
    drifted: bool
    reasons: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"drifted": self.drifted, "drift_share": round(self.share, 4),
                "drifted_features": int(self.features["drifted"].sum()), "features": len(self.features),
                "multivariate": self.multivariate, "reasons": self.reasons}


def ks_pvalues(ref: np.ndarray, cur: np.ndarray) -> np.ndarray:
    """Two-sample Kolmogorov–Smirnov p-value per column."""
    from scipy.stats import ks_2samp

    return np.atleast_1d(ks_2samp(ref, cur, axis=0).pvalue)


def _quantiles(sorted_x: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Quantiles at `u` of every column of a column-sorted array (linear interpolation)."""
    pos = u * (len(sorted_x) - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, len(sorted_x) - 1)
    w = (pos - lo)[:, None]
    return sorted_x[lo] * (1 - w) + sorted_x[hi] * w


def wasserstein_normalised(ref: np.ndarray, cur: np.ndarray, presorted: bool = False) -> np.ndarray:
    """Wasserstein-1 distance per column over the reference's standard deviation (as drift
    tools normalise it), from the quantile functions on a fine grid."""
    ref_s, cur_s = (ref, cur) if presorted else (np.sort(ref, axis=0), np.sort(cur, axis=0))
    grid = np.linspace(0.0, 1.0, QUANTILE_GRID)
    distance = np.abs(_quantiles(ref_s, grid) - _quantiles(cur_s, grid)).mean(axis=0)
    scale = ref_s.std(axis=0)
    return np.where(scale > 0, distance / np.where(scale > 0, scale, 1.0), np.where(distance > 0, np.inf, 0.0))


def psi(ref: np.ndarray, cur: np.ndarray, bins: int = 10, eps: float = 1e-4, presorted: bool = False) -> np.ndarray:
    """Population stability index per column, on the reference's quantile bins. Bin counts
    come from binary searches of the bin edges in the sorted columns."""
    ref_s, cur_s = (ref, cur) if presorted else (np.sort(ref, axis=0), np.sort(cur, axis=0))
    cuts = _quantiles(ref_s, np.linspace(0, 1, bins + 1)[1:-1])  # (bins-1) × columns
    out = np.empty(ref_s.shape[1])
    for j in range(ref_s.shape[1]):
        edges = np.unique(cuts[:, j])
        expected = np.diff(np.r_[0, np.searchsorted(ref_s[:, j], edges, side="right"), len(ref_s)]) / len(ref_s)
        actual = np.diff(np.r_[0, np.searchsorted(cur_s[:, j], edges, side="right"), len(cur_s)]) / len(cur_s)
        expected, actual = np.clip(expected, eps, None), np.clip(actual, eps, None)
        out[j] = float(np.sum((actual - expected) * np.log(actual / expected)))
    return out


def categorical_drift(ref: pd.Series, cur: pd.Series, small: bool, params: DriftParams) -> tuple[str, float, float, bool, float]:
    """(test, score, threshold, drifted, psi) for one categorical column."""
    from scipy.spatial.distance import jensenshannon
    from scipy.stats import chisquare

    values = sorted(set(ref.dropna().astype(str)) | set(cur.dropna().astype(str)))
    r = ref.dropna().astype(str).value_counts().reindex(values, fill_value=0).to_numpy(float)
    c = cur.dropna().astype(str).value_counts().reindex(values, fill_value=0).to_numpy(float)
    p, q = r / max(r.sum(), 1), c / max(c.sum(), 1)
    pp, qq = np.clip(p, 1e-4, None), np.clip(q, 1e-4, None)
    index = float(np.sum((qq - pp) * np.log(qq / pp)))
    if small:
        # expected counts from the reference's shares (a floor keeps unseen categories testable)
        expected = np.clip(p, 1e-6, None) * c.sum()
        expected *= c.sum() / expected.sum()
        pvalue = float(chisquare(c, expected).pvalue) if len(values) > 1 else 1.0
        return "chi2", pvalue, params.chi2_p, pvalue < params.chi2_p, index
    distance = float(jensenshannon(p, q, base=2)) if len(values) > 1 else 0.0
    return "jensen_shannon", distance, params.js_threshold, distance >= params.js_threshold, index


def domain_classifier_auc(ref: np.ndarray, cur: np.ndarray, max_rows: int = 2000, seed: int = 0) -> float:
    """ROC-AUC of a classifier told to separate reference rows from current rows
    (cross-validated): 0.5 when it cannot, towards 1.0 as the batches differ."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    a = ref[rng.choice(len(ref), min(len(ref), max_rows), replace=False)]
    b = cur[rng.choice(len(cur), min(len(cur), max_rows), replace=False)]
    x = np.vstack([a, b])
    y = np.r_[np.zeros(len(a)), np.ones(len(b))]
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))
    proba = cross_val_predict(model, x, y, cv=3, method="predict_proba")[:, 1]
    return float(roc_auc_score(y, proba))


def mmd_test(ref: np.ndarray, cur: np.ndarray, permutations: int = 500, max_rows: int = 500,
             seed: int = 0) -> tuple[float, float]:
    """Maximum mean discrepancy between two samples of vectors (Gretton et al., 2012) with a
    Gaussian kernel whose width is the median distance between the pooled points, and its
    permutation-test p-value: (MMD², p). Every permutation at once: with s the ±1/n weights of
    a labelling, MMD² = sᵀKs. Written here: the libraries that ship it (alibi-detect,
    torchdrift) bring a deep-learning stack or are no longer kept, for these few lines."""
    from scipy.spatial.distance import pdist, squareform

    rng = np.random.default_rng(seed)
    a = ref[rng.choice(len(ref), min(len(ref), max_rows), replace=False)]
    b = cur[rng.choice(len(cur), min(len(cur), max_rows), replace=False)]
    pooled = np.vstack([a, b]).astype("float64")
    squared = squareform(pdist(pooled, "sqeuclidean"))
    width = float(np.median(squared[np.triu_indices(len(pooled), 1)])) or 1.0
    kernel = np.exp(-squared / width)
    n, m = len(a), len(b)
    labels = np.r_[np.zeros(n, bool), np.ones(m, bool)]
    draws = np.array([labels] + [rng.permutation(labels) for _ in range(permutations)])
    weights = np.where(draws, -1.0 / m, 1.0 / n)
    stats = np.einsum("pi,pi->p", weights @ kernel, weights)
    return float(stats[0]), float((1 + np.sum(stats[1:] >= stats[0])) / (1 + permutations))


def drift_report(reference: pd.DataFrame, current: pd.DataFrame, schema: Schema, params: DriftParams) -> DriftReport:
    """Every feature's test and verdict, the multivariate check, and the dataset's verdict."""
    return column_drift(reference, current, [f.name for f in schema.features if f.kind == "numeric"],
                        [f.name for f in schema.features if f.kind == "categorical"], params)


def column_drift(reference: pd.DataFrame, current: pd.DataFrame, numeric: list[str], categorical: list[str],
                 params: DriftParams, multivariate: bool = True) -> DriftReport:
    """Each named column's test and verdict, the domain classifier on the numeric columns
    (when `multivariate` and drift.multivariate ask for it), and the verdict."""
    small = len(reference) <= params.small_reference_rows
    rows: list[dict[str, Any]] = []
    if numeric:
        ref = reference[numeric].to_numpy(dtype="float64")
        cur = current[numeric].to_numpy(dtype="float64")
        ref_ok, cur_ok = ref[~np.isnan(ref).any(axis=1)], cur[~np.isnan(cur).any(axis=1)]
        ref_s, cur_s = np.sort(ref_ok, axis=0), np.sort(cur_ok, axis=0)  # one sort serves every statistic
        if small:
            scores, test, threshold = ks_pvalues(ref_ok, cur_ok), "ks", params.ks_p
            drifted = scores < threshold
        else:
            scores = wasserstein_normalised(ref_s, cur_s, presorted=True)
            test, threshold = "wasserstein", params.wasserstein_threshold
            drifted = scores >= threshold
        indexes = psi(ref_s, cur_s, params.psi_bins, presorted=True)
        rows += [{"feature": n, "kind": "numeric", "test": test, "score": float(s), "threshold": threshold,
                  "drifted": bool(d), "psi": float(i)} for n, s, d, i in zip(numeric, scores, drifted, indexes)]
    for name in categorical:
        test, score, threshold, drifted, index = categorical_drift(reference[name], current[name], small, params)
        rows.append({"feature": name, "kind": "categorical", "test": test, "score": score, "threshold": threshold,
                     "drifted": drifted, "psi": index})
    table = pd.DataFrame(rows)
    # most drifted first: by PSI, which every test reports on one scale
    table = table.sort_values(["drifted", "psi"], ascending=[False, False]).reset_index(drop=True)
    share = float(table["drifted"].mean()) if len(table) else 0.0
    reasons = [f"{int(table['drifted'].sum())} of {len(table)} features drifted (share {share:.2f}; "
               f"drift_share {params.drift_share:g})"]
    verdict = share >= params.drift_share
    domain = None
    if multivariate and numeric and (params.multivariate == "on" or (params.multivariate == "auto" and len(numeric) >= params.wide_features)):
        auc = domain_classifier_auc(ref_ok, cur_ok, params.domain_max_rows)
        domain = {"method": "domain_classifier", "roc_auc": round(auc, 4), "threshold": params.domain_auc_threshold,
                  "drifted": auc >= params.domain_auc_threshold}
        reasons.append(f"domain classifier ROC-AUC {auc:.3f} "
                       f"{'≥' if domain['drifted'] else '<'} {params.domain_auc_threshold:g}")
        verdict = verdict or domain["drifted"]
    return DriftReport(table, share, domain, verdict, reasons)


@dataclass(frozen=True)
class PredictionDrift:
    """The champion's outputs on the batch against its outputs on the reference."""

    test: str
    score: float
    threshold: float
    drifted: bool
    psi: float


@dataclass(frozen=True)
class PerformanceDrift:
    """The champion's metric on a labelled batch against its own test metric."""

    metric: str
    batch: float
    test: float
    tolerance: float
    decayed: bool
    reason: str


def prediction_drift(reference_labels: pd.Series, current_labels: pd.Series, params: DriftParams,
                     numeric: bool = False) -> PredictionDrift:
    """Has the champion's output distribution moved? The same test as a feature of the output's
    type, on its predictions (labels, or values for regression) for the reference and the batch."""
    small = len(reference_labels) <= params.small_reference_rows
    if numeric:
        ref = reference_labels.to_numpy("float64")[:, None]
        cur = current_labels.to_numpy("float64")[:, None]
        if small:
            test, score, threshold = "ks", float(ks_pvalues(ref, cur)[0]), params.ks_p
            drifted = score < threshold
        else:
            test, score, threshold = "wasserstein", float(wasserstein_normalised(ref, cur)[0]), params.wasserstein_threshold
            drifted = score >= threshold
        index = float(psi(ref, cur, params.psi_bins)[0])
    else:
        test, score, threshold, drifted, index = categorical_drift(reference_labels, current_labels, small, params)
    return PredictionDrift(test, round(score, 6), threshold, bool(drifted), round(index, 6))


def performance_drift(batch_metric: float, test_metric: float, tolerance: float, name: str) -> PerformanceDrift:
    """The champion's metric on a labelled batch against its own test metric (higher is better)."""
    return PerformanceDrift(name, round(batch_metric, 6), round(test_metric, 6), tolerance,
                            batch_metric < test_metric - tolerance,
                            f"{name} on the batch {batch_metric:.4f} vs {test_metric:.4f} on the test split "
                            f"({batch_metric - test_metric:+.4f}; tolerance {tolerance:g})")


class RetrainDecision(NamedTuple):
    """`alarm`: the batch shows drift or decay, so it joins the dataset (when labelled) and
    d2d.drift.detected is emitted; `retrain`: a retrain may run now, which needs labels to
    learn from and is held back by the cooldown and the maximum rate; `reasons`: why."""

    alarm: bool
    retrain: bool
    reasons: list[str]


def retrain_decision(
    drift: DriftReport, prediction: PredictionDrift | None, performance: PerformanceDrift | None, labelled: bool,
    retrains: list[datetime], now: datetime, params: MonitorParams,
) -> RetrainDecision:
    """Whether the batch raises an alarm and whether a retrain may run now, with the reasons."""
    signals = []
    if drift.drifted:
        signals.append("data drift: " + "; ".join(drift.reasons))
    if performance is not None and performance.decayed:
        signals.append("performance decay: " + performance.reason)
    if prediction is not None and prediction.drifted and params.retrain_on_prediction_drift:
        signals.append(f"prediction drift: {prediction.test} {prediction.score:.4g} (threshold {prediction.threshold:g})")
    if not signals:
        return RetrainDecision(False, False, ["no drift and no decay: " + "; ".join(drift.reasons)])
    reasons = list(signals)
    if not labelled:
        return RetrainDecision(True, False, reasons + ["no retrain: the batch has no labels to learn from"])
    recent = sorted(t for t in retrains if t > now - timedelta(hours=params.window_hours))
    if retrains and now - max(retrains) < timedelta(hours=params.cooldown_hours):
        return RetrainDecision(True, False, reasons + [
            f"no retrain: cooldown, the last retrain was at {max(retrains):%Y-%m-%d %H:%M} UTC "
            f"(cooldown_hours {params.cooldown_hours:g})"])
    if len(recent) >= params.max_retrains:
        return RetrainDecision(True, False, reasons + [f"no retrain: {len(recent)} retrains in the last "
                                                       f"{params.window_hours:g} h (max_retrains {params.max_retrains})"])
    return RetrainDecision(True, True, reasons + ["retrain"])


def _histogram_png(ref: pd.Series, cur: pd.Series, title: str) -> str:
    """Overlaid histograms of one feature, as a base64 PNG for an HTML page."""
    import base64
    import io as stdio

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 2.6))
    if pd.api.types.is_numeric_dtype(ref):
        both = pd.concat([ref, cur]).dropna()
        bins = np.histogram_bin_edges(both, bins=min(30, max(5, both.nunique())))
        ax.hist(ref.dropna(), bins=bins, alpha=0.55, density=True, label="reference")
        ax.hist(cur.dropna(), bins=bins, alpha=0.55, density=True, label="current")
    else:
        shares = pd.DataFrame({"reference": ref.astype(str).value_counts(normalize=True),
                               "current": cur.astype(str).value_counts(normalize=True)}).fillna(0)
        shares.plot.bar(ax=ax, alpha=0.8)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = stdio.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def _thumbnail(data: bytes, side: int = 72) -> str:
    """An image file's bytes as a small PNG data URI (its aspect kept), for an HTML page."""
    import base64
    import io as stdio

    from PIL import Image

    with Image.open(stdio.BytesIO(data)) as image:
        image.thumbnail((side, side))
        small = image.convert("RGB") if image.mode not in ("RGB", "L") else image.copy()
    if max(small.size) < side:  # tiny images (the demo's digits) are enlarged to be seen, not blurred
        factor = side // max(small.size) or 1
        small = small.resize((small.width * factor, small.height * factor), Image.NEAREST)
    buffer = stdio.BytesIO()
    small.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _examples_html(examples: tuple[list[bytes], list[bytes]] | None) -> str:
    if not examples:
        return ""
    rows = "".join(f"<p>{name}</p><div>" + "".join(f'<img alt="{name} example" src="{_thumbnail(d)}">' for d in images)
                   + "</div>" for name, images in zip(("reference", "batch"), examples))
    return f"<h2>Example images</h2>{rows}"


def report_html(report: DriftReport, reference: pd.DataFrame, current: pd.DataFrame, top: int = 6,
                prediction: PredictionDrift | None = None, performance: PerformanceDrift | None = None,
                notes: list[str] | None = None, examples: tuple[list[bytes], list[bytes]] | None = None) -> str:
    """One self-contained page: the verdict and its reasons, the champion's prediction and
    performance drift, overlaid histograms of the most drifted features, and every feature's
    test, score and PSI (most drifted first); for images, example images of the reference and
    the batch (`examples`: their file bytes)."""
    import html

    verdict = "DRIFT" if report.drifted else "no drift"
    colour = "#b00020" if report.drifted else "#1b5e20"
    figures = "".join(
        f'<img alt="{html.escape(r.feature)}" src="data:image/png;base64,'
        f'{_histogram_png(reference[r.feature], current[r.feature], f"{r.feature}: {r.test} {r.score:.3g}, PSI {r.psi:.3f}")}">'
        for r in report.features.head(top).itertuples())
    rows = "".join(
        f"<tr{' class=drift' if r.drifted else ''}><td>{html.escape(r.feature)}</td><td>{r.kind}</td><td>{r.test}</td>"
        f"<td>{r.score:.4g}</td><td>{r.threshold:g}</td><td>{'yes' if r.drifted else 'no'}</td><td>{r.psi:.4f}</td></tr>"
        for r in report.features.itertuples())
    lines = list(report.reasons)
    if prediction is not None:
        lines.append(f"champion's predictions: {prediction.test} {prediction.score:.4g} (threshold "
                     f"{prediction.threshold:g}, PSI {prediction.psi:.3f}): {'drifted' if prediction.drifted else 'stable'}")
    if performance is not None:
        lines.append(("performance decayed: " if performance.decayed else "performance held: ") + performance.reason)
    lines += notes or []
    reasons = "".join(f"<li>{html.escape(reason)}</li>" for reason in lines)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>d2d drift report</title><style>
body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:3px 8px}}
tr.drift{{background:#fde7e9}} .verdict{{color:{colour};font-size:1.6em}} img{{margin:4px}}</style></head><body>
<h1>Drift report</h1><p class="verdict">{verdict}</p><ul>{reasons}</ul>
<p>reference {len(reference):,} rows, current {len(current):,} rows</p>
{_examples_html(examples)}<h2>Most drifted features</h2><div>{figures}</div>
<h2>Every feature</h2><table><tr><th>feature</th><th>kind</th><th>test</th><th>score</th><th>threshold</th>
<th>drifted</th><th>PSI</th></tr>{rows}</table></body></html>
"""
