"""Image files, measured (issue 17's benchmark, the parts that exist so far): generate N
images of S×S pixels as PNG and JPEG files in class folders, then time

- the file checks (`images.list_folder` + `images.check_images`: one read and one Pillow
  decode a file, content and perceptual hashes, the dataset rules);
- the evaluation transform (decode again, `to_tensor` + `fit_size` to the training size);
- the training-time augmentation of those tensors in batches (`augment`: crop, flip,
  rotation, colour jitter) and `normalize`,

and print images/s for each and the process's peak RSS, so that memory can be compared
across N. Training, serving and drift on image files are not wired yet (issue 17).

    python bench/images.py [--images 10000] [--size 64] [--train-size 64]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def generate(folder: Path, count: int, size: int, seed: int = 0) -> None:
    """`count` smooth colour images (a few random blobs on a gradient), 10 classes, 1 in 5 a
    JPEG, written one at a time (the generator holds one image)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    for i in range(count):
        label = i % 10
        base = np.stack([x * rng.uniform(0, 255), y * rng.uniform(0, 255), (x + y) * rng.uniform(0, 127)], axis=-1)
        for _ in range(3):
            cx, cy, r = rng.uniform(0, 1, 2).tolist() + [rng.uniform(0.05, 0.3)]
            base[((x - cx) ** 2 + (y - cy) ** 2) < r * r] = rng.uniform(0, 255, 3)
        image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
        path = folder / str(label) / f"{i:07d}{'.jpg' if i % 5 == 0 else '.png'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, quality=90) if path.suffix == ".jpg" else image.save(path)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=64, help="the generated images' side")
    parser.add_argument("--train-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()

    import torch
    from PIL import Image

    from pipeline.data import images
    from pipeline.image_transforms import Augmentation, ChannelStats, augment, fit_size, normalize, to_tensor

    work = Path(tempfile.mkdtemp(prefix="d2d-images-"))
    try:
        started = time.perf_counter()
        generate(work / "data", args.images, args.size)
        disk = sum(p.stat().st_size for p in (work / "data").rglob("*") if p.is_file())
        print(f"generated {args.images:,} images of {args.size}×{args.size} ({disk / 2**20:.1f} MiB) in "
              f"{time.perf_counter() - started:.1f} s", flush=True)

        started = time.perf_counter()
        rows, refused = images.list_folder(work / "data")
        checked = images.check_images(rows, refused, work / "data", images.ImageChecks(), batch=args.batch)
        check_s = time.perf_counter() - started
        print(f"file checks: {len(checked.kept):,} kept, {len(checked.quarantine):,} quarantined, {check_s:.1f} s, "
              f"{args.images / check_s:,.0f} images/s; peak RSS {peak_rss_gib():.2f} GiB", flush=True)

        stats, how = ChannelStats(), Augmentation(crop_scale=0.6, flip=True, rotate=10, brightness=0.2, contrast=0.2)
        generator = torch.Generator().manual_seed(0)
        decode_s = augment_s = 0.0
        paths = [work / "data" / p for p in checked.kept[images.PATH]]
        for start in range(0, len(paths), args.batch):
            t0 = time.perf_counter()
            with_size = [fit_size(to_tensor(Image.open(p)), args.train_size) for p in paths[start:start + args.batch]]
            batch = torch.stack(with_size)
            stats.update(batch)
            decode_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            normalize(augment(batch.float() / 255, how, generator), [0.5] * 3, [0.25] * 3)
            augment_s += time.perf_counter() - t0
        mean, std = stats.result()
        print(f"decode + fit_size to {args.train_size}: {len(paths) / decode_s:,.0f} images/s; augment + normalize "
              f"(batches of {args.batch}): {len(paths) / augment_s:,.0f} images/s; channel means "
              f"{', '.join(f'{m:.3f}' for m in mean)}; peak RSS {peak_rss_gib():.2f} GiB", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
