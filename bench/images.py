"""Image files through the real stages, measured (issue 17's benchmark): generate N images of
S×S pixels as PNG and JPEG files in class folders, make a project of them with `d2d
init-params`, then run `d2d stage validate`, `clean`, `split` and `train` as their own
processes, as `dvc repro` does, with the peak memory of the whole process tree (bench/data_plane.py's
sampler: private pages summed over the tree, plus /dev/shm where Ray's object store lives).

Prints each stage's seconds and images/s, training's images/s per epoch (the train stage's
history), and the peaks, so that memory can be compared across N: it must not grow with the
image count. The project is deleted afterwards.

With --train-seconds S the train stage is stopped after S seconds (an epoch of 100k images of
224² takes hours on CPUs), and training's rate is read from the progress lines its rank 0
prints each minute.

    python bench/images.py [--images 10000] [--size 64] [--train-size 64] [--model cnn] [--epochs 1]
                           [--train-seconds S] [--workdir DIR [--train-only]]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from data_plane import Sampler, d2d  # bench/, this script's own folder


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


PROGRESS = re.compile(r"epoch (\d+)/\d+: ([\d,]+) samples on rank 0 in (\d+) s \(([\d,.]+)/s on each of (\d+) workers\)")


def train_for(project: Path, sets: list[str], seconds: float) -> tuple[float, re.Match | None, bool]:
    """`d2d stage train`, stopped after `seconds` (SIGTERM to the process group it leads, then
    SIGKILL): its wall seconds, its last progress line (rank 0's samples and rate), and
    whether it had to be stopped."""
    log = project / "bench_train.log"
    started, stopped = time.perf_counter(), False
    with open(log, "w") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "d2d"), "stage", "train", *sets], cwd=project,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            if proc.wait(timeout=seconds):
                sys.exit(f"d2d stage train failed ({proc.returncode}):\n{log.read_text()[-3000:]}")
        except subprocess.TimeoutExpired:
            stopped = True
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    elapsed = time.perf_counter() - started
    found = list(PROGRESS.finditer(log.read_text()))
    return elapsed, found[-1] if found else None, stopped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=64, help="the generated images' side")
    parser.add_argument("--train-size", type=int, default=64)
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workdir", type=Path, help="where the project is made and kept (default: a temporary "
                                                     "folder, deleted afterwards)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a params override for every stage, e.g. train.cache_features=stream")
    parser.add_argument("--train-seconds", type=float,
                        help="stop the train stage after this many seconds and report its progress so far")
    parser.add_argument("--train-only", action="store_true",
                        help="run the train stage alone in --workdir, a project an earlier run made and kept")
    args = parser.parse_args()
    if args.train_only and not (args.workdir and (args.workdir / "data/split/preprocess.json").exists()):
        parser.error("--train-only needs --workdir, a project an earlier run of this benchmark kept")

    import pandas as pd

    from pipeline import stages

    project = args.workdir or Path(tempfile.mkdtemp(prefix="d2d-images-"))
    try:
        started = time.perf_counter()
        if not args.train_only:
            generate(project / "data/raw/images", args.images, args.size)
        disk = sum(p.stat().st_size for p in (project / "data/raw/images").rglob("*") if p.is_file())
        args.images = sum(1 for p in (project / "data/raw/images").rglob("*") if p.is_file())
        print(f"{'kept' if args.train_only else 'generated'} {args.images:,} images of {args.size}×{args.size} "
              f"({disk / 2**20:.1f} MiB) in {time.perf_counter() - started:.1f} s", flush=True)
        sets = [f"data.images.size={args.train_size}", f"train.model={args.model}", f"train.epochs={args.epochs}",
                f"train.batch_size={args.batch_size}", "train.patience=1000", "validate.data_docs=false",
                "register.min_test_accuracy=0", *args.set]
        sets = [x for kv in sets for x in ("--set", kv)]
        sampler = Sampler()
        threading.Thread(target=sampler.run, daemon=True).start()
        timings, peaks = {}, {}
        if not args.train_only:
            timings["init-params"] = d2d(project, "init-params", "--data", "data/raw/images", "--target", "label")
            peaks["init-params"] = sampler.stage_peaks()
        progress, stopped = None, False
        for stage in ("train",) if args.train_only else ("validate", "clean", "split", "train"):
            if stage == "train" and args.train_seconds:
                timings[stage], progress, stopped = train_for(project, sets, args.train_seconds)
            else:
                timings[stage] = d2d(project, "stage", stage, *sets)
            peaks[stage] = sampler.stage_peaks()
            print(f"{stage}: {timings[stage]:.1f} s", flush=True)
        sampler.stop.set()
        sizes = pd.read_json(stages.path("split_report", project), typ="series")["sizes"]
        trained = sizes["train"] * args.epochs
        if args.train_seconds:  # rank 0's samples, times the workers: their shards are equal
            trained = int(progress[2].replace(",", "")) * int(progress[5]) if progress else 0
        counts = {"init-params": args.images, "validate": args.images, "clean": args.images, "split": args.images,
                  "train": trained}
        print(f"\n{'stage':<12}{'seconds':>9}{'images/s':>10}{'tree GiB':>10}{'tree RSS GiB':>14}")
        for stage, seconds in timings.items():
            p = {k: v / 2**30 for k, v in peaks[stage].items()}
            print(f"{stage:<12}{seconds:>9.1f}{counts[stage] / seconds:>10,.0f}{p['tree']:>10.2f}{p['rss']:>14.2f}")
        if not args.train_only:
            prep = sum(timings[s] for s in ("validate", "clean", "split"))
            print(f"validate + clean + split: {prep:.1f} s, {args.images / prep:,.0f} images/s")
        if args.train_seconds:
            rate = (f"{float(progress[4].replace(',', '')) * int(progress[5]):,.1f} images/s "
                    f"({progress[2]} on rank 0 of {progress[5]} in {progress[3]} s of epoch {progress[1]})"
                    if progress else "no progress line yet")
            print(f"training ({args.model} at {args.train_size}×{args.train_size}, {sizes['train']:,} images an epoch), "
                  f"{'stopped after' if stopped else 'finished in'} {timings['train']:.0f} s: {rate}")
        else:
            history = pd.read_csv(stages.path("history", project))
            print(f"training ({args.model} at {args.train_size}×{args.train_size}, {sizes['train']:,} images an epoch): "
                  + ", ".join(f"{r:,.0f}" for r in history["samples_per_s"]) + " images/s per epoch")
        p = {k: v / 2**30 for k, v in sampler.peaks.items()}
        print(f"peak memory: process tree (private + /dev/shm) {p['tree']:.2f} GiB (RSS {p['rss']:.2f}); "
              f"/dev/shm's own peak {p['shm']:.2f} GiB")
        print("at the peak, GiB: " + ", ".join(f"{name} {gib:.2f}" for name, gib in sampler.at_peak))
    finally:
        if args.workdir is None:
            shutil.rmtree(project, ignore_errors=True)


if __name__ == "__main__":
    main()
