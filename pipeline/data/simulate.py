"""Labelled batches of "new data" for drift demos and tests: rows resampled from the digits,
unchanged or changed the way scanned digits change (brighter or fainter ink, more contrast,
sensor noise, strokes shifted or thickened). Values stay valid pixels (integers 0..16), so
validation passes them and only the drift monitor can tell."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd

from pipeline.data.schema import Schema

Kind = Literal["none", "brightness", "contrast", "noise", "shift", "thicken"]
KINDS: tuple[str, ...] = ("none", "brightness", "contrast", "noise", "shift", "thicken")
PIXEL_MAX = 16


def _images(x: np.ndarray, shape: list[int]) -> np.ndarray:
    return x.reshape(len(x), *shape)


def change(x: np.ndarray, kind: str, strength: float, shape: list[int], rng: np.random.Generator) -> np.ndarray:
    """Apply one kind of change to float pixel rows; `strength` in 0..1 scales it."""
    if kind == "none" or strength == 0:
        return x
    if kind == "brightness":  # more ink everywhere there is ink
        return np.where(x > 0, x + strength * 8, x)
    if kind == "contrast":
        return (x - PIXEL_MAX / 2) * (1 + 2 * strength) + PIXEL_MAX / 2
    if kind == "noise":
        return x + rng.normal(0.0, strength * 6, size=x.shape)
    images = _images(x, shape)
    if kind == "shift":  # strokes moved right by 1..2 pixels
        pixels = max(1, round(2 * strength))
        moved = np.zeros_like(images)
        moved[..., pixels:] = images[..., :-pixels]
        return moved.reshape(len(x), -1)
    if kind == "thicken":  # a 3×3 max filter, blended in by strength
        padded = np.pad(images, [(0, 0)] * (images.ndim - 2) + [(1, 1), (1, 1)])
        h, w = images.shape[-2:]
        dilated = np.max([padded[..., i:i + h, j:j + w] for i in range(3) for j in range(3)], axis=0)
        return ((1 - strength) * images + strength * dilated).reshape(len(x), -1)
    raise ValueError(f"unknown drift kind {kind!r}; choose one of {', '.join(KINDS)}")


def simulate_batch(
    source: pd.DataFrame, schema: Schema, kind: str, strength: float, rows: int, seed: int, first_id: int
) -> pd.DataFrame:
    """`rows` labelled rows resampled from `source` (raw digits), changed by `kind`, with new ids from `first_id`."""
    if kind not in KINDS:
        raise ValueError(f"unknown drift kind {kind!r}; choose one of {', '.join(KINDS)}")
    if not schema.image_shape:
        raise ValueError("simulated drift needs image-shaped data (data.image_shape)")
    rng = np.random.default_rng(seed)
    picked = source.iloc[rng.integers(0, len(source), size=rows)].reset_index(drop=True)
    x = picked[schema.feature_names].to_numpy(dtype="float64")
    changed = np.clip(np.rint(change(x, kind, strength, list(schema.image_shape), rng)), 0, PIXEL_MAX).astype("int64")
    out = pd.DataFrame(changed, columns=schema.feature_names)
    if not schema.derived_key:  # without an id column, d2d derives each row's key itself
        out.insert(0, schema.id_column, np.arange(first_id, first_id + rows, dtype="int64"))
    out[schema.target] = picked[schema.target].to_numpy()
    return out
