"""Batches of "new data" for drift demos and tests. Rows: resampled from the digits,
unchanged or changed the way scanned digits change (brighter or fainter ink, more contrast,
sensor noise, strokes shifted or thickened). Values stay valid pixels (integers 0..16), so
validation passes them and only the drift monitor can tell. Images: a folder of digits drawn
anew as the image demo draws them, changed as photographs change (brighter, blurred, noisy,
rotated) or joined by shapes of no class."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

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


# --- image batches (issue 17): a folder of newly drawn digits, changed as photographs change ---

IMAGE_KINDS: tuple[str, ...] = ("none", "brightness", "blur", "noise", "rotation", "new_class")


def change_image(image: Any, kind: str, strength: float, rng: np.random.Generator) -> Any:
    """One image changed by `kind` (Pillow's filters), `strength` in 0..1 scaling it:
    brighter by up to 100%, a Gaussian blur of up to 2 pixels, noise of up to 40 grey levels,
    a rotation of up to 45 degrees either way."""
    from PIL import Image, ImageEnhance, ImageFilter

    if kind in ("none", "new_class") or strength == 0:
        return image
    if kind == "brightness":
        return ImageEnhance.Brightness(image).enhance(1 + strength)
    if kind == "blur":
        return image.filter(ImageFilter.GaussianBlur(radius=2 * strength))
    if kind == "noise":
        pixels = np.asarray(image, dtype=np.float32)
        noisy = pixels + rng.normal(0.0, 40 * strength, size=pixels.shape)
        return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), image.mode)
    if kind == "rotation":
        return image.rotate(float(rng.choice([-1, 1])) * 45 * strength, resample=Image.Resampling.BILINEAR)
    raise ValueError(f"unknown image drift kind {kind!r}; choose one of {', '.join(IMAGE_KINDS)}")


def new_shape(rng: np.random.Generator) -> Any:
    """An image of no digit class: an ellipse or a box outline, drawn as the digits are (grey, 24–40 pixels)."""
    from PIL import Image, ImageDraw

    side = int(rng.choice([24, 32, 40]))
    image = Image.new("L", (side, side))
    box = sorted(rng.integers(2, side // 2, size=2).tolist()) + sorted(rng.integers(side // 2, side - 2, size=2).tolist())
    draw = ImageDraw.Draw(image)
    shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
    shape((box[0], box[1], box[2], box[3]), outline=255, width=max(2, side // 10))
    return image


def write_image_batch(folder: Path, kind: str, strength: float, rows: int, seed: int, digits: int | None,
                      labelled: bool = True) -> int:
    """`rows` digits drawn anew (pipeline.data.demo.render_digit, from the first `digits` of
    scikit-learn's digits, the demo dataset's; None: all) and changed by `kind`, as an inbox batch folder:
    class folders when `labelled`, else the images directly in it. `new_class`: a share
    `strength` of the images are shapes of no class, and the batch is unlabelled (they have
    no label to give). Written beside and renamed into place, so the monitor never sees half
    a batch. Returns the number of images."""
    from sklearn.datasets import load_digits

    from pipeline.data.demo import render_digit

    if kind not in IMAGE_KINDS:
        raise ValueError(f"unknown image drift kind {kind!r}; choose one of {', '.join(IMAGE_KINDS)}")
    if folder.exists():
        raise ValueError(f"{folder} already exists: the batch goes into a new folder")
    labelled = labelled and kind != "new_class"
    rng = np.random.default_rng(seed)
    bunch = load_digits()
    picks = rng.integers(0, min(digits or len(bunch.target), len(bunch.target)), size=rows)
    building = folder.with_name(f".{folder.name}.building")
    building.mkdir(parents=True)
    for i, index in enumerate(picks):
        if kind == "new_class" and rng.random() < strength:
            image, suffix, label = new_shape(rng), ".png", "new"
        else:
            image, suffix = render_digit(bunch.images[index], rng)
            image, label = change_image(image, kind, strength, rng), str(int(bunch.target[index]))
        path = building / label / f"{i:05d}{suffix}" if labelled else building / f"{i:05d}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, quality=95) if suffix == ".jpg" else image.save(path)
    building.rename(folder)
    return rows
