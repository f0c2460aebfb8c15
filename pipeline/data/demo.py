"""The embedded demo dataset: scikit-learn's handwritten digits, with a seeded, documented
share of rows corrupted so that validation and cleaning have real work to do."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.data.schema import Schema

CORRUPTIONS = ("missing_pixel", "out_of_range", "duplicate", "unknown_label")


def digits_frame(schema: Schema) -> pd.DataFrame:
    """The 1,797 digits as one row each: a stable `id`, 64 pixel columns (0..16), `label`."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    if len(schema.features) != bunch.data.shape[1]:
        raise ValueError(f"the digits have {bunch.data.shape[1]} pixels; the schema lists {len(schema.features)}")
    df = pd.DataFrame(bunch.data.astype("int64"), columns=schema.feature_names)
    if not schema.derived_key:  # with data.id_column null, d2d derives the rows' keys itself
        df.insert(0, schema.id_column, np.arange(len(df), dtype="int64"))
    df[schema.target] = bunch.target.astype("int64")
    return df


def corrupt(df: pd.DataFrame, schema: Schema, fraction: float, seed: int) -> tuple[pd.DataFrame, dict[str, list[int]]]:
    """Corrupt round(fraction × rows) distinct rows, split evenly across CORRUPTIONS.

    Returns the corrupted copy (pixels become nullable Int64 so a missing value stays an
    integer column in the CSV) and the ids corrupted per kind.
    """
    rng = np.random.default_rng(seed)
    out = df.copy()
    pixels = schema.feature_names
    out[pixels] = out[pixels].astype("Int64")
    n_bad = round(fraction * len(df))
    rows = rng.choice(len(df), size=n_bad, replace=False)
    clean_rows = np.setdiff1d(np.arange(len(df)), rows)
    manifest: dict[str, list[int]] = {}
    col = {name: out.columns.get_loc(name) for name in [*pixels, schema.target]}
    for kind, chunk in zip(CORRUPTIONS, np.array_split(rows, len(CORRUPTIONS))):
        for r in chunk:
            if kind == "missing_pixel":
                for p in rng.choice(pixels, size=rng.integers(1, 4), replace=False):
                    out.iat[r, col[p]] = pd.NA
            elif kind == "out_of_range":
                p = rng.choice(pixels)
                out.iat[r, col[p]] = int(rng.choice([-3, -1, 17, 32, 255]))
            elif kind == "duplicate":
                src = int(rng.choice(clean_rows))
                for name in [*pixels, schema.target]:
                    out.iat[r, col[name]] = out.iat[src, col[name]]
            else:  # unknown_label: a class the schema does not know
                out.iat[r, col[schema.target]] = 10
        # the ids, or the row numbers when there is no id column
        ids = out[schema.id_column].iloc[chunk] if not schema.derived_key else chunk
        manifest[kind] = sorted(int(i) for i in ids)
    return out, manifest


IMAGE_FLAWS = ("truncated", "not_an_image", "exact_duplicate", "two_labels", "too_small", "extreme_aspect", "cmyk")


def render_digit(pixels: np.ndarray, rng: np.random.Generator) -> tuple[Any, str]:
    """One 8×8 digit (values 0–16) as the image folder holds it: drawn at 24–40 pixels a side,
    in grey (L) or on a tinted background (RGB), and the suffix it is saved with (.jpg one in five)."""
    from PIL import Image

    grey = Image.fromarray((pixels * (255 / 16)).astype(np.uint8), "L")
    side = int(rng.choice([24, 32, 40]))
    image = grey.resize((side, side), Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        tint = rng.integers(0, 60, size=3)
        rgb = np.stack([np.asarray(image, np.int16)] * 3, axis=-1) + tint
        image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")
    return image, ".jpg" if rng.random() < 0.2 else ".png"


def write_image_folder(folder: Path, rows: int | None = None, seed: int = 0, flaws: int = 2) -> dict[str, list[str]]:
    """The digits as an image folder in torchvision's `ImageFolder` layout,
    `folder/<digit>/<id>.png`: each 8×8 digit drawn at 24–40 pixels a side (sizes vary, as a
    user's images do), in grey (L) or colour (RGB, a tinted background), some saved as JPEG.
    `flaws` files of each IMAGE_FLAWS kind are added among them, so that per-file validation
    has real work to do; their paths by kind are returned. Deterministic for a seed."""
    from PIL import Image
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(seed)
    bunch = load_digits()
    n = len(bunch.target) if rows is None else min(rows, len(bunch.target))
    written: list[Path] = []
    for i in range(n):
        image, suffix = render_digit(bunch.images[i], rng)
        path = folder / str(int(bunch.target[i])) / f"{i:05d}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, quality=95) if suffix == ".jpg" else image.save(path)
        written.append(path)
    flawed: dict[str, list[str]] = {kind: [] for kind in IMAGE_FLAWS}
    picks = rng.choice(len(written), size=min(len(written), flaws * len(IMAGE_FLAWS)), replace=False)
    for k, index in enumerate(picks):
        kind, source = IMAGE_FLAWS[k % len(IMAGE_FLAWS)], written[int(index)]
        label = source.parent.name
        target = folder / label / f"flaw-{kind}-{k}.png"
        if kind == "truncated":
            data = source.read_bytes()
            target = target.with_suffix(source.suffix)
            target.write_bytes(data[: len(data) * 2 // 3])
        elif kind == "not_an_image":
            target.write_text("this is a note someone saved with an image's name\n")
        elif kind == "exact_duplicate":
            target = target.with_suffix(source.suffix)
            target.write_bytes(source.read_bytes())
        elif kind == "two_labels":
            other = str((int(label) + 1) % 10)
            target = folder / other / f"flaw-{kind}-{k}{source.suffix}"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
        elif kind == "too_small":
            Image.open(source).resize((4, 4)).save(target)
        elif kind == "extreme_aspect":
            Image.open(source).resize((240, 8)).save(target)
        else:  # cmyk: a mode the model does not take and the params do not convert
            target = target.with_suffix(".jpg")
            Image.open(source).convert("CMYK").save(target)
        flawed[kind].append(target.relative_to(folder).as_posix())
    return flawed
