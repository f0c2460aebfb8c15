"""Feature preprocessing fitted on the train split only: imputation, scaling, one-hot encoding.

Self-contained (numpy and pandas, no d2d imports): the fitted state is plain JSON, and this
file ships inside the MLflow model, so serving transforms raw rows exactly as training did.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd


def as_category_strings(values: pd.Series) -> pd.Series:
    """Category values as strings; integral floats (an int column with nulls) lose their '.0'."""
    if values.dtype.kind == "f":
        whole = values.dropna()
        if len(whole) and (whole == np.floor(whole)).all():
            values = values.astype("Int64")
    return values.astype("string")


def _numeric(frame: pd.DataFrame) -> pd.DataFrame:
    """Columns as numbers; text that is not a number becomes NaN. Numeric columns pass as they are."""
    text = {c: pd.to_numeric(frame[c], errors="coerce") for c in frame.columns if frame[c].dtype.kind not in "biuf"}
    return frame.assign(**text) if text else frame


def _fill(values: pd.Series, how: str | None, fill_value: Any) -> Any:
    if how in (None, "drop"):
        return None  # nulls were dropped (or rejected) before; at serving a null is an error
    if how == "median":
        return float(values.median()) if values.notna().any() else float(fill_value)
    if how == "most_frequent":
        mode = values.mode(dropna=True)
        return mode.iloc[0] if len(mode) else fill_value
    return fill_value


def fit(train: pd.DataFrame, spec: dict[str, Any]) -> dict[str, Any]:
    """Fit the preprocessing state on `train`.

    `spec`: {"numeric": [{"name", "min", "max", "impute"}], "categorical": [{"name", "impute"}],
    "scale": standard|minmax|range|none, "fill_value": ..., "max_categories": int}.
    """
    names = [c["name"] for c in spec["numeric"]]
    x = _numeric(train[names])
    fills = [_fill(x[c["name"]], c["impute"], spec["fill_value"]) for c in spec["numeric"]]
    scale = spec["scale"]
    if scale == "standard":
        center, spread = x.mean().to_numpy(), x.std(ddof=0).to_numpy()
    elif scale == "minmax":
        center, spread = x.min().to_numpy(), (x.max() - x.min()).to_numpy()
    elif scale == "range":
        center = np.array([c["min"] for c in spec["numeric"]], dtype="float64")
        spread = np.array([c["max"] for c in spec["numeric"]], dtype="float64") - center
    else:
        center, spread = np.zeros(len(names)), np.ones(len(names))
    # A constant (or all-null) column scales by 1, not by 0.
    spread = np.where(np.isfinite(spread) & (spread > 0), spread, 1.0)
    center = np.where(np.isfinite(center), center, 0.0)

    categorical = []
    for c in spec["categorical"]:
        raw = train[c["name"]]
        fill = _fill(raw, c["impute"], spec["fill_value"])
        values = as_category_strings(raw.where(raw.notna(), fill) if fill is not None else raw)
        counts = values.value_counts(dropna=True)
        # Most frequent first; ties broken by value so the state is deterministic.
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: spec["max_categories"]]
        categorical.append({
            "name": c["name"],
            "fill": None if fill is None else str(as_category_strings(pd.Series([fill])).iloc[0]),
            "categories": [str(v) for v, _ in ranked],
        })
    outputs = names + [f"{c['name']}={v}" for c in categorical for v in c["categories"]]
    target = None
    if spec.get("target"):  # regression: the network learns a standardised target
        y = pd.to_numeric(train[spec["target"]], errors="coerce")
        target = {"name": spec["target"], "center": float(y.mean()), "scale": float(y.std(ddof=0)) or 1.0}
    return {
        "target": target,
        "numeric": {"names": names, "fill": fills, "center": center.tolist(), "scale": spread.tolist()},
        "categorical": categorical,
        "outputs": outputs,
    }


def input_columns(state: dict[str, Any]) -> list[str]:
    return state["numeric"]["names"] + [c["name"] for c in state["categorical"]]


def transform(df: pd.DataFrame, state: dict[str, Any]) -> np.ndarray:
    """Raw feature rows → the float32 matrix the network takes. Raises ValueError naming the
    column for a missing column, a non-number in a numeric column, or a null with no imputation."""
    missing = [c for c in input_columns(state) if c not in df.columns]
    if missing:
        raise ValueError(f"input lacks feature column(s): {', '.join(missing[:5])}")
    num = state["numeric"]
    blocks = []
    if num["names"]:
        frame = df[num["names"]]
        x = _numeric(frame).to_numpy(dtype="float64", na_value=np.nan)
        text = np.isnan(x) & frame.notna().to_numpy()
        if text.any():
            raise ValueError(f"column {num['names'][int(text.any(axis=0).argmax())]} holds a value that is not a number")
        fill = np.array([np.nan if f is None else f for f in num["fill"]], dtype="float64")
        x = np.where(np.isnan(x), fill, x)
        if np.isnan(x).any():
            raise ValueError(f"null value in column {num['names'][int(np.isnan(x).any(axis=0).argmax())]}")
        blocks.append((x - np.array(num["center"])) / np.array(num["scale"]))
    for c in state["categorical"]:
        raw = df[c["name"]]
        if c["fill"] is not None:
            raw = raw.where(raw.notna(), c["fill"])
        elif raw.isna().any():
            raise ValueError(f"null value in column {c['name']}")
        codes = pd.Categorical(as_category_strings(raw), categories=c["categories"]).codes
        onehot = np.zeros((len(df), len(c["categories"])))
        known = codes >= 0  # unseen categories stay all-zero
        onehot[np.flatnonzero(known), codes[known]] = 1.0
        blocks.append(onehot)
    return np.hstack(blocks).astype("float32") if blocks else np.zeros((len(df), 0), dtype="float32")


def scale_target(y: pd.Series, state: dict[str, Any]) -> np.ndarray:
    t = state["target"]
    return ((pd.to_numeric(y).to_numpy(dtype="float64") - t["center"]) / t["scale"]).astype("float32")


def unscale_target(y: np.ndarray, state: dict[str, Any]) -> np.ndarray:
    t = state["target"]
    return y.astype("float64") * t["scale"] + t["center"]
