"""Image files as a dataset (issue 17): where the images are, and what each one is.

Two layouts, as users keep them:
- class subfolders, `DIR/<label>/...` (torchvision's `ImageFolder` layout). Every file under a
  class folder is a row, so a stray text file is quarantined as "not an image" rather than
  skipped without a word; a file beside the class folders is quarantined too;
- a manifest: a CSV or Parquet file with a path column (relative to the manifest's folder), a
  label column and any extra columns.

Each file is read once and decoded once, with Pillow (what Ray Data's `read_images` uses).
The decode gives everything the checks and the image table need: format, size, mode, a
content hash (exact duplicates), a perceptual hash (near duplicates, by ImageHash), and
brightness, contrast and sharpness. A user's folder is only ever read.
"""

from __future__ import annotations

import hashlib
import io as _io
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.errors import DataError, first_line

FORMATS = ("PNG", "JPEG", "WEBP", "BMP")  # Pillow's names for .png, .jpg/.jpeg, .webp and .bmp files
SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # how a path names an image file
PATH, LABEL, REASON = "path", "label", "reason"
IMAGE = "image"  # a usable image's file bytes, as the data stages carry them (encoded, as the file was)
FACTS = ("bytes", "sha256", "format", "width", "height", "mode", "brightness", "contrast", "sharpness", "phash")


@dataclass(frozen=True)
class ImageChecks:
    """What a usable image is. `mode` is the mode the model takes; `convert` lists the modes
    turned into it (RGBA → RGB drops alpha, L → RGB repeats the grey level); any other mode
    is quarantined."""

    mode: str = "RGB"
    convert: tuple[str, ...] = ("RGBA", "L", "LA", "P", "RGB")
    min_side: int = 8
    max_aspect: float = 10.0
    max_pixels: int = 40_000_000  # a decompression bomb is refused before it is decoded
    max_bytes: int = 50 * 2**20


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def list_folder(root: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every file under `root`'s class folders as (path relative to root, label), in path
    order; and the files that cannot be rows, with their reasons: a file beside the class
    folders (no label), or a symbolic link that leads out of the folder."""
    rows, refused = [], []
    top = root.resolve()
    for path in sorted(p for p in root.rglob("*") if not p.is_dir()):
        relative = path.relative_to(root)
        if _hidden(relative):
            continue
        name = relative.as_posix()
        if len(relative.parts) < 2:
            refused.append((name, None, "not in a class folder: put it in DIR/<label>/"))
        elif not path.resolve().is_relative_to(top):
            refused.append((name, relative.parts[0], "a symbolic link that leads out of the image folder"))
        elif path.is_file():
            rows.append((name, relative.parts[0]))
    if not rows:
        raise DataError(f"{root} holds no files in class folders: expected {root}/<label>/<image>")
    return (pd.DataFrame(rows, columns=[PATH, LABEL]),
            pd.DataFrame(refused, columns=[PATH, LABEL, REASON]))


def read_manifest(manifest: Path, path_column: str, label_column: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A manifest's rows (its path column renamed `path`, its label column `label`, the other
    columns kept), and the rows whose path is empty or leads out of the manifest's folder,
    with their reasons."""
    from pipeline.data import io

    frame = io.read_table(manifest)
    missing = [c for c in (path_column, label_column) if c not in frame.columns]
    if missing:
        raise DataError(f"{manifest}: no column {missing[0]!r} (columns: {', '.join(map(str, frame.columns[:10]))})")
    frame = frame.rename(columns={path_column: PATH, label_column: LABEL})
    top = manifest.parent.resolve()
    paths = frame[PATH].astype("string")

    def why(value: Any) -> str | None:
        if pd.isna(value) or not str(value).strip():
            return "no path"
        target = Path(str(value))
        try:
            if target.is_absolute() or not (top / target).resolve().is_relative_to(top):
                return "a path outside the manifest's folder"
        except (ValueError, OSError) as e:  # a NUL byte, a name too long for the system
            return f"not a file path: {first_line(e)[:100]}"
        return None

    reasons = paths.map(why)
    bad = reasons.notna()
    refused = frame[bad].assign(**{REASON: reasons[bad]})
    return frame[~bad].assign(**{PATH: paths[~bad].astype(str)}).reset_index(drop=True), refused.reset_index(drop=True)


def inspect(data: bytes, checks: ImageChecks) -> tuple[dict[str, Any], str | None]:
    """One image file's facts (FACTS) and, when it cannot be used, why. Decoded once: the
    header first, so a decompression bomb is refused before its pixels are."""
    from PIL import Image, UnidentifiedImageError

    facts: dict[str, Any] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    if not data:
        return facts, "an empty file"
    if (why := _too_large(len(data), checks)) is not None:
        return facts, why
    try:
        image = Image.open(_io.BytesIO(data))
    except UnidentifiedImageError:
        return facts, "not an image (Pillow cannot identify it)"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return facts, f"unreadable: {first_line(e)[:200]}"
    width, height = image.size
    facts |= {"format": image.format, "width": width, "height": height, "mode": image.mode}
    if image.format not in FORMATS:
        return facts, f"a {image.format} file: expected PNG, JPEG, WebP or BMP"
    if width * height > checks.max_pixels:
        return facts, f"{width}×{height} is {width * height:,} pixels, over the limit of {checks.max_pixels:,}"
    if image.mode not in checks.convert and image.mode != checks.mode:
        return facts, f"mode {image.mode}: expected {checks.mode} (or one of {', '.join(checks.convert)}, converted)"
    try:
        image.load()  # the pixels: a truncated or corrupt file fails here
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return facts, f"truncated or corrupt: {first_line(e)[:200]}"
    if min(width, height) < checks.min_side:
        return facts, f"too small: {width}×{height}, the model needs at least {checks.min_side} pixels a side"
    if max(width, height) / min(width, height) > checks.max_aspect:
        return facts, f"extreme aspect ratio: {width}×{height} (over {checks.max_aspect:g}:1)"
    return facts | _appearance(image), None


def _appearance(image: Any) -> dict[str, Any]:
    """Brightness and contrast (the mean and standard deviation of the grey levels, 0–1),
    sharpness (the variance of their Laplacian, scipy's: the usual blur measure, low when
    blurred) and the perceptual hash, from one greyscale copy."""
    import imagehash
    from scipy import ndimage

    grey = image.convert("L")
    levels = np.asarray(grey, dtype=np.float32) / 255.0
    return {"brightness": float(levels.mean()), "contrast": float(levels.std()),
            "sharpness": float(ndimage.laplace(levels).var()), "phash": str(imagehash.phash(grey))}


def _too_large(size: int, checks: ImageChecks) -> str | None:
    if size <= checks.max_bytes:
        return None
    return f"{size / 2**20:.1f} MiB, over the limit of {checks.max_bytes / 2**20:.0f} MiB"


def read_file(path: Path, checks: ImageChecks) -> tuple[bytes, str | None]:
    """A file's bytes, unless it is missing, not a regular file or over the size limit."""
    try:
        size = path.stat().st_size
        if not path.is_file():
            return b"", "not a regular file"
        if (why := _too_large(size, checks)) is not None:
            return b"", why
        return path.read_bytes(), None
    except OSError as e:
        return b"", f"cannot be read: {e.strerror or type(e).__name__}"
    except ValueError as e:  # a NUL byte in the name
        return b"", f"not a file path: {first_line(e)[:100]}"


def inspect_files(rows: pd.DataFrame, root: Path, checks: ImageChecks, batch: int = 256,
                  keep_bytes: bool = False) -> Iterator[pd.DataFrame]:
    """`rows` (a `path` relative to `root`, a label, extras) in batches, each row with its
    facts and its reason (null when the image is usable); with `keep_bytes`, a usable image's
    file bytes too (IMAGE), so that the file is read once. Threads overlap the reads and
    decodes (Pillow releases the GIL while it decodes)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(relative: str) -> dict[str, Any]:
        data, why = read_file(root / relative, checks)
        if why is not None:
            return {REASON: why}
        facts, why = inspect(data, checks)
        return {**facts, REASON: why, **({IMAGE: data} if keep_bytes and why is None else {})}

    columns = [*FACTS, *([IMAGE] if keep_bytes else []), REASON]
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) + 2)) as pool:
        for start in range(0, len(rows), batch):
            chunk = rows.iloc[start:start + batch].reset_index(drop=True)
            found = pd.DataFrame(list(pool.map(one, chunk[PATH])), columns=columns)
            yield pd.concat([chunk, found], axis=1)


def duplicate_reasons(inspected: pd.DataFrame) -> pd.Series:
    """Why a usable image is not kept though it decodes: the same bytes as another file with
    the same label (the copy whose path sorts first is kept, whatever the rows' order), or the
    same bytes under two labels (no copy is kept: which label is right is the user's call).
    Null for the images kept."""
    usable = inspected[REASON].isna().to_numpy()
    paths, labels = inspected[PATH].astype(str).to_numpy(), inspected[LABEL].astype(str).to_numpy()
    copies: dict[str, list[int]] = {}
    for at, digest in enumerate(inspected["sha256"].to_numpy()):
        if usable[at]:
            copies.setdefault(digest, []).append(at)
    reasons = np.full(len(inspected), None, dtype=object)
    for group in (sorted(g, key=lambda at: paths[at]) for g in copies.values() if len(g) > 1):
        named = sorted(set(labels[group]))
        if len(named) > 1:
            reasons[group] = f"the same image under labels {', '.join(named[:5])}: " + ", ".join(paths[group[:3]])
        else:
            reasons[group[1:]] = f"an exact duplicate of {paths[group[0]]}"
    return pd.Series(reasons, index=inspected.index, dtype="string")


def near_duplicates(left: Iterable[str], right: Iterable[str], max_distance: int = 4) -> list[tuple[int, int, int]]:
    """Pairs (i, j, distance) of perceptual hashes from two sets within `max_distance` bits:
    near-duplicate images, such as the same photo resized or re-encoded. In (i, j) order.

    Multi-index hashing (Norouzi et al., 2012): cut the 64 bits into max_distance + 1
    chunks; two hashes within max_distance bits agree exactly on at least one chunk, so only
    the pairs that share a chunk's value are compared. At 100,000 images this replaced a
    comparison of every pair (100 s of the split stage) with a few sorted lookups. Left rows
    go a block at a time, which bounds the candidates held when many hashes collide."""
    a, b = _hash_bits(left), _hash_bits(right)
    if len(a) == 0 or len(b) == 0:
        return []
    if max_distance >= 16:  # chunks under 4 bits select nearly everything: compare every pair
        return _every_pair(a, b, max_distance)
    edges = np.linspace(0, 64, max_distance + 2).astype(np.uint64)
    chunks = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        mask = np.uint64((1 << int(hi - lo)) - 1)
        keys = (b >> lo) & mask
        order = np.argsort(keys, kind="stable")
        chunks.append((lo, mask, keys[order], order))
    found: list[np.ndarray] = []
    for start in range(0, len(a), NEAR_BLOCK):
        block = a[start:start + NEAR_BLOCK]
        candidates = []
        for lo, mask, keys, order in chunks:
            wanted = (block >> lo) & mask
            first, last = np.searchsorted(keys, wanted, "left"), np.searchsorted(keys, wanted, "right")
            counts = last - first
            rows = np.repeat(np.arange(len(block)), counts)
            within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
            candidates.append((rows + start) * len(b) + order[np.repeat(first, counts) + within])
        pairs = np.unique(np.concatenate(candidates))
        i, j = pairs // len(b), pairs % len(b)
        distance = np.bitwise_count(a[i] ^ b[j])
        found.append(np.column_stack([i, j, distance])[distance <= max_distance])
    return [(int(i), int(j), int(d)) for i, j, d in np.concatenate(found)]


NEAR_BLOCK = 1024  # left hashes looked up at a time


def _every_pair(a: np.ndarray, b: np.ndarray, max_distance: int) -> list[tuple[int, int, int]]:
    pairs = []
    for i, row in enumerate(a):
        distance = np.bitwise_count(row ^ b)
        pairs.extend((i, int(j), int(distance[j])) for j in np.flatnonzero(distance <= max_distance))
    return pairs


def _hash_bits(hashes: Iterable[str]) -> np.ndarray:
    return np.array([int(h, 16) for h in hashes], dtype=np.uint64)


def image_table(kept: pd.DataFrame) -> dict[str, Any]:
    """The image table of `reports/validate.json`: sizes, modes, formats, per-class counts,
    and brightness, contrast and sharpness (mean, standard deviation, range) of the kept images."""
    if kept.empty:
        return {"images": 0}

    def spread(column: str) -> dict[str, float]:
        values = kept[column].astype(float)
        return {"mean": round(float(values.mean()), 4), "std": round(float(values.std(ddof=0)), 4),
                "min": round(float(values.min()), 4), "max": round(float(values.max()), 4)}

    sizes = (kept["width"].astype(int).astype(str) + "×" + kept["height"].astype(int).astype(str)).value_counts()
    return {
        "images": len(kept),
        "classes": {str(k): int(v) for k, v in kept[LABEL].astype(str).value_counts().sort_index().items()},
        "sizes": {k: int(v) for k, v in sizes.head(20).items()},
        "distinct_sizes": int(len(sizes)),
        "width": spread("width"), "height": spread("height"),
        "modes": {str(k): int(v) for k, v in kept["mode"].value_counts().items()},
        "formats": {str(k): int(v) for k, v in kept["format"].value_counts().items()},
        "brightness": spread("brightness"), "contrast": spread("contrast"), "sharpness": spread("sharpness"),
    }


def training_size(widths: pd.Series, heights: pd.Series) -> int:
    """A square training size for these images: the median short side, rounded down to a
    multiple of 8 and kept within 32–224 (the sizes small CNNs and ResNets are trained at)."""
    short = float(np.median(np.minimum(widths.astype(float), heights.astype(float))))
    return int(min(224, max(32, math.floor(short / 8) * 8)))


def request_problem(data: bytes, max_bytes: int, max_pixels: int) -> tuple[int, str] | None:
    """Why an image sent to the model cannot be scored, as an HTTP status and a message: 413
    over the byte or pixel limit (a decompression bomb is refused from its header, before its
    pixels are decoded), 422 not a decodable image. None: it decodes."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > max_bytes:
        return 413, f"{len(data):,} bytes, over the model's limit of {max_bytes:,}"
    try:
        with Image.open(_io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                return 413, f"{width}×{height} is {width * height:,} pixels, over the model's limit of {max_pixels:,}"
            image.load()
    except UnidentifiedImageError:
        return 422, "not an image (Pillow cannot identify it)"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return 422, f"not a decodable image: {first_line(e)[:160]}"
    return None


def logged_facts(data: bytes) -> dict[str, Any]:
    """What the inference log keeps of an image instead of its bytes: its content hash and size."""
    return {"image_sha256": hashlib.sha256(data).hexdigest(), "image_bytes": len(data)}
