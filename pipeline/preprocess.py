"""Feature preprocessing fitted on the train split only: imputation, scaling, one-hot encoding,
and the one check of a row's values that every way in shares (a loaded MLflow model,
`d2d serve`, `d2d predict`).

Self-contained (numpy and pandas, no d2d imports at run time): the fitted state is plain JSON,
and this file ships inside the MLflow model, so serving transforms raw rows exactly as training
did. `preprocess_spec` runs only in d2d; the d2d types it names are imported for type checkers.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:  # never at run time: a loaded model has no d2d to import
    from pipeline.config import CleanParams, PreprocessParams
    from pipeline.data.schema import Column, Schema


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


def _column_stats(x: pd.DataFrame, scale: str) -> tuple[np.ndarray, np.ndarray]:
    """Per column, skipping nulls: (mean, population std) for `standard`, (min, max - min) for
    `minmax`; NaN for a column with no values. One column at a time: pandas' `std` over a
    700,000 x 64 train split took 3.5 s, and one float64 copy of the whole block costs seconds of
    fresh memory; this takes about 0.2 s."""
    first, second = np.full(x.shape[1], np.nan), np.full(x.shape[1], np.nan)
    for j in range(x.shape[1]):
        v = x.iloc[:, j].to_numpy(dtype="float64", na_value=np.nan)
        v = v[~np.isnan(v)]
        if not len(v):
            continue
        if scale == "standard":
            first[j], second[j] = v.mean(), v.std()
        else:
            first[j] = v.min()
            second[j] = v.max() - first[j]
    return first, second


def _fill(values: pd.Series, how: str | None, fill_value: Any) -> Any:
    if how in (None, "drop"):
        return None  # nulls were dropped (or rejected) before; at serving a null is an error
    if how == "median":
        return float(values.median()) if values.notna().any() else float(fill_value)
    if how == "most_frequent":
        mode = values.mode(dropna=True)
        return mode.iloc[0] if len(mode) else fill_value
    return fill_value


def preprocess_spec(schema: Schema, clean: CleanParams, preprocess: PreprocessParams) -> dict[str, Any]:
    """What `fit` needs, from the schema and params, as plain values (this file cannot import them)."""
    def entry(f: Column) -> dict[str, Any]:
        return {"name": f.name, "min": f.min, "max": f.max, "dtype": f.dtype,
                "impute": clean.missing.imputation(f.name, f.kind) if f.nullable else None}

    return {
        "numeric": [entry(f) for f in schema.numeric],
        "categorical": [entry(f) for f in schema.categorical],
        "scale": preprocess.scale,
        "fill_value": clean.missing.fill_value,
        "max_categories": preprocess.max_categories,
        "target": schema.target if schema.regression else None,
        # the id's type in the data is recorded, for serving to check ids against; a derived
        # row key is d2d's own, not something a client sends
        "id": None if schema.derived_key else schema.id_column,
    }


def fit(train: pd.DataFrame, spec: dict[str, Any]) -> dict[str, Any]:
    """Fit the preprocessing state on `train`.

    `spec`: {"numeric": [{"name", "min", "max", "impute"}], "categorical": [{"name", "impute"}],
    "scale": standard|minmax|range|none, "fill_value": ..., "max_categories": int}.
    """
    names = [c["name"] for c in spec["numeric"]]
    x = _numeric(train[names])
    fills = [_fill(x[c["name"]], c["impute"], spec["fill_value"]) for c in spec["numeric"]]
    scale = spec["scale"]
    if scale in ("standard", "minmax"):
        center, spread = _column_stats(x, scale)
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
    # what each way in checks a row against (check_rows): the type each raw column holds, and
    # whether a null may reach the preprocessing (it may where it is imputed)
    inputs = ([{"name": c["name"], "type": "long" if c.get("dtype") == "int" else "double", "nullable": f is not None}
               for c, f in zip(spec["numeric"], fills)]
              + [{"name": c["name"], "type": "long" if c.get("dtype") == "int" else "string",
                  "nullable": e["fill"] is not None} for c, e in zip(spec["categorical"], categorical)])
    return {
        "target": target,
        "numeric": {"names": names, "fill": fills, "center": center.tolist(), "scale": spread.tolist()},
        "categorical": categorical,
        "outputs": outputs,
        "inputs": inputs,
        "id": id_spec(train, spec.get("id")),
    }


def id_spec(train: pd.DataFrame, name: str | None) -> dict[str, str] | None:
    """The id column and the type its values have in the data (long or string), so that
    serving can refuse an id of another type; None when the data has no id column."""
    if not name or name not in train.columns:
        return None
    values = train[name]
    integral = pd.api.types.is_integer_dtype(values) and not pd.api.types.is_bool_dtype(values)
    return {"name": name, "type": "long" if integral else "string"}


IMAGE_COLUMN = "image"  # an image dataset's input: each file's bytes (pipeline.runners.image_data)


def is_images(state: dict[str, Any]) -> bool:
    """Whether the fitted preprocessing is an image dataset's (pipeline.image_transforms)."""
    return state.get("kind") == "images"


def image_limits(state: Any) -> tuple[int, int] | None:
    """An image model's byte and pixel limits (what its validation allowed; data.images'
    defaults for a state fitted before they were recorded); None for a table's model."""
    if not isinstance(state, dict) or not is_images(state):
        return None
    return int(state.get("max_bytes", 50 * 2**20)), int(state.get("max_pixels", 40_000_000))


def extras_state(state: dict[str, Any]) -> dict[str, Any] | None:
    """An image model's fitted preprocessing of a manifest's extra columns (a table's state,
    nested under "table"), or None: the network then takes the pixels alone."""
    return state.get("table") if is_images(state) else None


def extras_spec(state: Any) -> list[dict[str, Any]]:
    """What an image model takes besides the image (a manifest's extras), as input_spec gives
    it; empty for a table's model, an image-only model or a state that is not d2d's."""
    extras = extras_state(state) if isinstance(state, dict) else None
    return input_spec(extras) if extras else []


def input_columns(state: dict[str, Any]) -> list[str]:
    if is_images(state):
        extras = extras_state(state)
        return [IMAGE_COLUMN, *(input_columns(extras) if extras else [])]
    return state["numeric"]["names"] + [c["name"] for c in state["categorical"]]


# An input's type, as MLflow names it. A JSON value for an integer column must be an int; a
# reader's frame may carry it as an integral float (pandas reads an int column with a null
# anywhere in the file as float64).
INTEGER, NUMBER = ("long", "integer"), ("long", "integer", "double", "float")
INT64_LIMIT = 2.0**63  # float64 values at or beyond it do not fit a long
F32_MAX = float(np.finfo("float32").max)


def input_spec(state: dict[str, Any]) -> list[dict[str, Any]]:
    """Each input column's name, type (long | double | string) and whether it may be null (it
    may when the preprocessing imputes it). A state fitted before the types were recorded
    describes its numeric columns as double."""
    num = state["numeric"]
    spec = state.get("inputs") or (
        [{"name": n, "type": "double", "nullable": f is not None} for n, f in zip(num["names"], num["fill"])]
        + [{"name": c["name"], "type": "string", "nullable": c["fill"] is not None} for c in state["categorical"]])
    # the largest magnitude whose scaled value is still a finite float32 (the network's input)
    limits = {n: F32_MAX / 2 * s - abs(c) for n, c, s in zip(num["names"], num["center"], num["scale"])}
    return [{**s, "limit": limits[s["name"]]} if s["name"] in limits else s for s in spec]


def _describe(value: Any) -> str:
    text = repr(value.item() if hasattr(value, "item") else value)
    return text if len(text) <= 40 else text[:37] + "..."


@lru_cache(maxsize=64)
def _index(names: tuple[str, ...]) -> pd.Index:
    """Column labels built once per model: pandas builds an Index of 64 strings in 0.1 ms,
    as long as the rest of a 1-row request's check."""
    return pd.Index(names)


def _as_numbers(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """A column as float64 (NaN for a null) and the mask of values that are not numbers at
    all (text, booleans, lists)."""
    if values.dtype.kind == "b":
        return np.full(len(values), np.nan), values.notna().to_numpy()
    if values.dtype.kind in "iuf":  # numpy, pandas nullable and Arrow-backed numbers alike
        return values.to_numpy(dtype="float64", na_value=np.nan), np.zeros(len(values), dtype=bool)
    raw = values.astype(object).to_numpy()
    present = ~pd.isna(values).to_numpy()
    flags = np.fromiter((isinstance(v, (bool, np.bool_)) for v in raw), dtype=bool, count=len(raw))
    x = pd.to_numeric(pd.Series(np.where(flags, None, raw), dtype=object), errors="coerce").to_numpy(dtype="float64")
    return x, present & (np.isnan(x) | flags)


Problems = list[tuple[np.ndarray, int, str]]  # (rows, the input's position in the spec, what is wrong)
NULL = "is null and the model has no imputation for it"


def check_numbers(x: np.ndarray, numbers: list[dict[str, Any]], text: np.ndarray | None = None) -> Problems:
    """The value checks of numeric inputs, on a float64 matrix (rows × `numbers`, NaN for a
    null; `text` marks values that were not numbers at all)."""
    limit = np.array([s.get("limit", np.inf) for s in numbers])
    integer = np.array([s["type"] in INTEGER for s in numbers], dtype=bool)
    with np.errstate(invalid="ignore"):
        big = ~(np.abs(x) <= limit)  # NaN, ±inf and finite values past the limit
        # Clean doubles, the usual case, cost two passes over the block: training featurises
        # every batch of every epoch through here.
        if text is None and not integer.any() and not big.any():
            return []
        nan = np.isnan(x)
        nullable = np.array([bool(s.get("nullable")) for s in numbers])
        finite = ~nan & np.isfinite(x)
        too_big = integer & finite & (np.abs(x) >= INT64_LIMIT)
        checks = [(~finite & ~nan, "is not a finite number"),
                  (integer & finite & (x != np.floor(x)), "is not an integer"),
                  (too_big, "is out of range for a long (64-bit integer)"),
                  (finite & ~too_big & big,
                   "is out of range for the model (its scaled value overflows a 32-bit float)"),
                  (nan & ~nullable if text is None else nan & ~text & ~nullable, NULL)]
    if text is not None:
        checks.insert(0, (text, "is not a number"))
    problems: Problems = []
    for mask, what in checks:
        if mask.any():
            problems += [(mask[:, j], j, what) for j in np.flatnonzero(mask.any(axis=0))]
    return problems


def _messages(n: int, problems: list[tuple[np.ndarray, str, str]], value: Any) -> np.ndarray:
    """One message per row ("" when it passed): its first bad column in the model's order,
    with the value (problems must be in that order)."""
    errors = np.full(n, "", dtype=object)
    for rows, name, what in reversed(problems):
        for i in np.flatnonzero(rows):
            shown = "" if what == NULL else f": {_describe(value(i, name))}"
            errors[i] = f"column {name}{shown} {what}"
    return errors


def _model_types(values: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """An integer column (integral and in range now) as int64 where no null is left to impute."""
    return values.astype("int64") if spec["type"] in INTEGER and not np.isnan(values).any() else values


def _numeric_frame(x: np.ndarray, spec: list[dict[str, Any]], index: Any = None) -> pd.DataFrame:
    """Checked rows of numeric inputs only as the model takes them, as one block where the
    types agree (a frame from 64 separate columns costs ten times as much)."""
    labels = _index(tuple(s["name"] for s in spec))
    integer = [s["type"] in INTEGER for s in spec]
    if all(integer) and not np.isnan(x).any():
        return pd.DataFrame(x.astype("int64"), columns=labels, index=index)
    if not any(integer):
        return pd.DataFrame(x, columns=labels, index=index)
    return pd.DataFrame({s["name"]: _model_types(x[:, j], s) for j, s in enumerate(spec)}, index=index)


def check_matrix(x: np.ndarray, spec: list[dict[str, Any]]) -> tuple[pd.DataFrame, np.ndarray]:
    """check_rows for a float64 matrix of numeric inputs only, in the spec's order (serving
    builds one from a request's JSON): no frame is built until the rows have passed."""
    problems = check_numbers(x, spec)
    if not problems:
        return _numeric_frame(x, spec), np.full(len(x), "", dtype=object)
    names = [s["name"] for s in spec]
    bad = np.zeros(len(x), dtype=bool)
    for rows, _, _ in problems:
        bad |= rows
    errors = _messages(len(x), [(r, names[j], w) for r, j, w in sorted(problems, key=lambda f: f[1])],
                       lambda i, name: x[i, names.index(name)])
    return _numeric_frame(x[~bad], spec, np.flatnonzero(~bad)), errors


def _number_block(frame: pd.DataFrame, labels: list[str], names: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
    """The named columns as one float64 matrix (NaN for a null), and the mask of values that
    are not numbers at all (None when every column is numeric)."""
    kinds = dict(zip(labels, (t.kind for t in frame.dtypes)))
    if all(kinds[name] in "iuf" for name in names):  # plain numbers: one conversion of the block
        return (frame if labels == names else frame[names]).to_numpy(dtype="float64", na_value=np.nan), None
    pairs = [_as_numbers(frame[name]) for name in names]
    n = len(frame)
    return (np.column_stack([p[0] for p in pairs]).reshape(n, len(names)),
            np.column_stack([p[1] for p in pairs]).reshape(n, len(names)))


def check_rows(frame: pd.DataFrame, spec: list[dict[str, Any]]) -> tuple[pd.DataFrame, np.ndarray]:
    """The one check of raw rows against the model's inputs, for every way in.

    Returns the rows that pass, with each numeric column as the model takes it (an integer
    column as int64 when it holds no null, float64 otherwise; the frame's index is kept), and
    one message per input row ("" when it passes) that names the column and the value: a
    value that is not a number, is not finite, is not integral or does not fit a long in an
    integer column, is too large for the network's float32 input, or a null where the model
    has no imputation for it. A missing column is a problem of the whole input: ValueError.
    """
    labels = frame.columns.tolist()  # plain strings: pandas' Index of them is slow to search
    present = set(labels)
    missing = [s["name"] for s in spec if s["name"] not in present]
    if missing:
        raise ValueError(f"input lacks feature column(s): {', '.join(map(str, missing[:5]))}"
                         + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    n = len(frame)
    numbers = [s for s in spec if s["type"] in NUMBER]
    names = [s["name"] for s in numbers]
    columns: dict[str, np.ndarray] = {}
    problems: list[tuple[np.ndarray, str, str]] = []
    if numbers:
        x, text = _number_block(frame, labels, names)
        problems += [(rows, names[j], what) for rows, j, what in check_numbers(x, numbers, text)]
        columns |= {name: x[:, j] for j, name in enumerate(names)}
    for s in spec:
        if s["type"] not in NUMBER:
            values = frame[s["name"]]
            columns[s["name"]] = values.to_numpy()
            null = values.isna().to_numpy()
            if not s.get("nullable") and null.any():
                problems.append((null, s["name"], NULL))
    good = np.ones(n, dtype=bool)
    for rows, _, _ in problems:
        good &= ~rows
    order = {s["name"]: i for i, s in enumerate(spec)}
    problems.sort(key=lambda f: order[f[1]])  # a row names its first bad column in the model's order
    errors = _messages(n, problems, lambda i, name: frame[name].iloc[i])
    if len(numbers) == len(spec):
        return _numeric_frame(x[good], spec, frame.index[good]), errors
    kept = {s["name"]: _model_types(columns[s["name"]][good], s) if s["type"] in NUMBER else columns[s["name"]][good]
            for s in spec}
    return pd.DataFrame(kept, index=frame.index[good]), errors


def first_error(errors: np.ndarray) -> tuple[int, str] | None:
    """The first row that failed check_rows and its message; None when every row passed."""
    bad = np.flatnonzero(errors != "")
    return None if not len(bad) else (int(bad[0]), str(errors[bad[0]]))


def transform(df: pd.DataFrame, state: dict[str, Any]) -> np.ndarray:
    """Raw feature rows → the float32 matrix the network takes. Raises ValueError naming the
    row and column of the first value check_rows refuses, or a missing column. An image
    dataset's rows carry each file's bytes: decoded, fitted to the training size and
    normalised (`image_transforms.network_inputs`)."""
    if is_images(state):
        try:  # inside a logged model, code_paths puts image_transforms.py on sys.path
            from image_transforms import network_inputs
        except ImportError:  # in d2d itself
            from pipeline.image_transforms import network_inputs

        if IMAGE_COLUMN not in df.columns:
            raise ValueError(f"missing column {IMAGE_COLUMN}")
        extras = extras_state(state)
        # the extras are checked first: a bad value fails before any image is decoded
        tail = transform(df, extras) if extras else None
        pixels = network_inputs(df[IMAGE_COLUMN].tolist(), state)
        # pixels first, then the extras' columns: the network splits its input at C·H·W
        return pixels if tail is None else np.concatenate([pixels, tail], axis=1)
    spec = input_spec(state)
    num = state["numeric"]
    if not state["categorical"] and [s["name"] for s in spec] == num["names"] and all(s["type"] in NUMBER for s in spec):
        # Numeric inputs only (training featurises every batch of every epoch here): the
        # checks and the scaling share one float64 block, with no checked frame in between.
        labels = df.columns.tolist()
        if set(num["names"]) <= set(labels):
            x, text = _number_block(df, labels, num["names"])
            if not check_numbers(x, spec, text):
                return _scaled(x, num)
    checked, errors = check_rows(df, spec)
    problems = first_error(errors)
    if problems is not None:
        raise ValueError(f"row {problems[0]}: {problems[1]}")
    df = checked
    blocks = []
    if num["names"]:
        k = len(num["names"])
        # check_rows returns the numeric inputs first, in order: a slice, not a 64-name lookup (0.3 ms)
        x = (df.iloc[:, :k] if df.columns[:k].tolist() == num["names"] else df[num["names"]]).to_numpy(dtype="float64")
        blocks.append(_scaled(x, num))
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


def _scaled(x: np.ndarray, num: dict[str, Any]) -> np.ndarray:
    """Checked numeric inputs (float64, NaN for a null) imputed and standardised, as float32."""
    nan = np.isnan(x)
    if nan.any():
        fill = np.array([np.nan if f is None else f for f in num["fill"]], dtype="float64")
        x = np.where(nan, fill, x)
        if np.isnan(x).any():
            raise ValueError(f"null value in column {num['names'][int(np.isnan(x).any(axis=0).argmax())]}")
    scaled = np.subtract(x, np.array(num["center"]))  # a new array: x may be a view of the caller's frame
    scaled /= np.array(num["scale"])
    return scaled.astype("float32")


def scale_target(y: pd.Series, state: dict[str, Any]) -> np.ndarray:
    t = state["target"]
    return ((pd.to_numeric(y).to_numpy(dtype="float64") - t["center"]) / t["scale"]).astype("float32")


def unscale_target(y: np.ndarray, state: dict[str, Any]) -> np.ndarray:
    t = state["target"]
    return y.astype("float64") * t["scale"] + t["center"]
