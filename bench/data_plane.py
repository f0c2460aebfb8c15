"""The data plane end to end at scale: N rows × 64 features through validate → clean → split
→ train (--epochs, 2) → evaluate → register → batch predict, each stage as its own `d2d`
process in a fresh project, with the peak memory of the whole process tree.

    .venv/bin/python bench/data_plane.py --rows 1000000 [--workdir /tmp/data-plane] [--keep]
    .venv/bin/python bench/data_plane.py --rows 20000000 --parts 8 --epochs 1 --whole-run  # `d2d run` at 20M

The data is generated in chunks of --chunk rows and written as it is made (one Parquet file
with a row group per chunk, or --parts files), so the generator never holds the dataset.
Memory is sampled every 0.2 s, for the whole run and for each stage, as three peaks above
the start:
- the tree's own memory: the anonymous (private) pages summed over this process's tree (the
  `d2d` process, the Ray processes it starts, their workers), plus /dev/shm, where Ray's
  object store lives, counted once. This is the figure to read. (PSS would be the textbook
  figure, but reading it walks every process's page tables, and sampling it every 0.2 s
  halved training's throughput.)
- the RSS summed over the tree, which counts shared pages (libraries, the object store) once
  per process that maps them: an upper bound;
- the system's used memory plus /dev/shm. On this VM it moves with memory no process holds
  (in one training run MemFree fell 2.7 GiB more than the processes' anonymous pages and
  shared memory grew), so it is shown, not relied on.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:
    from pipeline.config import Params

FEATURES = 64
CLASSES = 4
REPO = Path(__file__).resolve().parents[1]


def generate(path: Path, rows: int, chunk: int, parts: int, seed: int = 0) -> None:
    """Gaussian features whose class (one of CLASSES) shifts 8 of them: learnable, not trivial."""
    rng = np.random.default_rng(seed)
    names = [f"f{i}" for i in range(FEATURES)]
    writer, part, written = None, 0, 0
    per_part = -(-rows // parts)
    while written < rows:
        n = min(chunk, rows - written, per_part - (written % per_part))
        label = rng.integers(0, CLASSES, n)
        x = rng.normal(size=(n, FEATURES)).astype("float32")
        for k in range(CLASSES):
            x[label == k, 8 * k:8 * k + 8] += 0.6
        table = pa.table({"id": np.arange(written, written + n), **{c: x[:, i] for i, c in enumerate(names)},
                          "label": label})
        if writer is None:
            target = path if parts == 1 else path / f"part-{part:05d}.parquet"
            target.parent.mkdir(parents=True, exist_ok=True)
            writer = pq.ParquetWriter(target, table.schema)
        writer.write_table(table)
        written += n
        if parts > 1 and written % per_part == 0:
            writer.close()
            writer, part = None, part + 1
    if writer is not None:
        writer.close()


MEASURES = ("tree", "rss", "system", "shm")


def shm_used() -> int:
    usage = shutil.disk_usage("/dev/shm") if Path("/dev/shm").is_dir() else None
    return usage.used if usage else 0


@dataclass
class Sampler:
    """Peak tree memory (private pages + /dev/shm), tree RSS and system memory (used +
    /dev/shm), each above the start, every 0.2 s."""

    start_used: int = field(default_factory=lambda: psutil.virtual_memory().used + shm_used())
    start_shm: int = field(default_factory=shm_used)
    peaks: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MEASURES, 0))
    stage: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MEASURES, 0))  # since the last stage_peaks()
    stop: threading.Event = field(default_factory=threading.Event)
    # at the tree's peak: /dev/shm and the largest processes' private GiB, to say what grew
    at_peak: list[tuple[str, float]] = field(default_factory=list)

    def stage_peaks(self) -> dict[str, int]:
        """The peaks since the last call (one stage's), and start over."""
        peaks, self.stage = self.stage, dict.fromkeys(MEASURES, 0)
        return peaks

    def run(self) -> None:
        me = psutil.Process()
        while not self.stop.wait(0.2):
            shm = shm_used()
            now = {"tree": shm - self.start_shm, "rss": 0, "system": psutil.virtual_memory().used + shm - self.start_used,
                   "shm": shm - self.start_shm}
            private: list[tuple[str, float]] = []
            for p in me.children(recursive=True):  # the d2d processes and Ray's, not this sampler
                try:
                    m = p.memory_info()  # /proc/PID/statm: counters, no page-table walk
                    name = p.name()
                except psutil.Error:
                    continue
                now["tree"] += m.rss - m.shared  # shared: file-backed pages and shared memory
                now["rss"] += m.rss
                private.append((name, (m.rss - m.shared) / 2**30))
            if now["tree"] > self.peaks["tree"]:
                self.at_peak = [("/dev/shm", now["shm"] / 2**30), *sorted(private, key=lambda x: -x[1])[:6]]
            for k, v in now.items():
                self.peaks[k], self.stage[k] = max(self.peaks[k], v), max(self.stage[k], v)


def d2d(project: Path, *args: str) -> float:
    """One `d2d` command in the project; its wall seconds. A failure stops the benchmark."""
    started = time.perf_counter()
    out = subprocess.run([str(Path(sys.executable).parent / "d2d"), *args], cwd=project, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"d2d {' '.join(args)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return time.perf_counter() - started


def bare_loop(project: Path, params: Params) -> list[float]:
    """Samples/s of each of `train.epochs` epochs of a plain PyTorch loop over the train split
    read with pyarrow, standardised with the fitted preprocessing's centre and scale (outside
    the timing, as d2d's featurised splits are ready before its first epoch)."""
    import json

    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from train_overhead import bare_epoch  # bench/, this script's own folder

    from pipeline import stages
    from pipeline.data.schema import schema_from_params
    from pipeline.train.models import build_model
    from pipeline.train.trainer import model_spec

    state = json.loads(stages.path("preprocess", project).read_text())
    table = pq.read_table(stages.path("train", project))
    names = state["numeric"]["names"]
    x = np.column_stack([table[c].to_numpy().astype("float32") for c in names])
    x = (x - np.asarray(state["numeric"]["center"], "float32")) / np.asarray(state["numeric"]["scale"], "float32")
    y = table["label"].to_numpy().astype("int64")
    torch.manual_seed(0)
    torch.set_num_threads(params.train.num_workers * params.train.cpus_per_worker)
    model = build_model(model_spec(schema_from_params(params.data), x.shape[1], params.train))
    opt = torch.optim.Adam(model.parameters(), lr=params.train.lr)
    loader = DataLoader(TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=params.train.batch_size,
                        shuffle=True)
    rates = []
    for _ in range(params.train.epochs):
        started = time.perf_counter()
        bare_epoch(model, opt, loader)
        rates.append(len(x) / (time.perf_counter() - started))
    return rates


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--chunk", type=int, default=250_000)
    ap.add_argument("--parts", type=int, default=1, help="Parquet files the raw data is written as (1: one file)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/data-plane"))
    ap.add_argument("--keep", action="store_true", help="keep the project folder afterwards")
    ap.add_argument("--epochs", type=int, default=2, help="training epochs (the first pays the pipeline's start-up)")
    ap.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    ap.add_argument("--cpus-per-worker", type=int, default=1,
                    help="torch threads per worker (the bare loop gets workers × this many threads)")
    ap.add_argument("--whole-run", action="store_true",
                    help="one `d2d run` (the Prefect flow, validate to register, in one process tree) instead of a "
                         "`d2d stage` process per stage")
    ap.add_argument("--skip-predict", action="store_true", help="leave out batch predict over every row")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more params for every command")
    ap.add_argument("--repeats", type=int, default=1,
                    help="train and run the bare loop this many times in turn (the training stage again each time "
                         "after the first), and compare the medians: on a shared VM one pair of runs varies by ±15%%")
    args = ap.parse_args()

    project = args.workdir
    shutil.rmtree(project, ignore_errors=True)
    project.mkdir(parents=True)
    raw = project / ("data/raw/data.parquet" if args.parts == 1 else "data/raw/data")
    started = time.perf_counter()
    generate(raw, args.rows, args.chunk, args.parts)
    print(f"generated {args.rows:,} rows × {FEATURES} features in {time.perf_counter() - started:.1f} s "
          f"({sum(f.stat().st_size for f in raw.rglob('*') if f.is_file()) if raw.is_dir() else raw.stat().st_size:,} bytes)")

    sampler = Sampler()
    threading.Thread(target=sampler.run, daemon=True).start()
    sets = ["--set", f"train.epochs={args.epochs}", "--set", "train.patience=1000", "--set", "train.model=mlp",
            "--set", "validate.data_docs=false",
            "--set", f"train.num_workers={args.workers}", "--set", f"train.cpus_per_worker={args.cpus_per_worker}",
            "--set", f"validate.max_rows={args.rows * 2}", "--set", "register.min_test_accuracy=0",
            *(x for kv in args.set for x in ("--set", kv))]
    # init-params reads the folder of parts in batches, as the stages do
    timings = {"init-params": d2d(project, "init-params", "--data", str(raw.relative_to(project)), "--target",
                                  "label", "--id", "id")}
    peaks = {"init-params": sampler.stage_peaks()}
    if args.whole_run:
        timings["d2d run"] = d2d(project, "run", *sets)
        peaks["d2d run"] = sampler.stage_peaks()
    else:
        for stage in ("validate", "clean", "split", "train", "evaluate", "register"):
            timings[stage] = d2d(project, "stage", stage, *sets)
            peaks[stage] = sampler.stage_peaks()
    if not args.skip_predict:
        timings["predict"] = d2d(project, "predict", "--input", str(raw.relative_to(project)), "--output",
                                 "predictions.parquet", *sets)
        peaks["predict"] = sampler.stage_peaks()
    sampler.stop.set()

    import pandas as pd

    from pipeline import stages
    from pipeline.config import load_params

    params = load_params(project / "params.yaml", [s for s in sets if s != "--set"])
    sizes = pd.read_json(stages.path("split_report", project), typ="series")["sizes"]
    history = pd.read_csv(stages.path("history", project))
    d2d_rates = history["samples_per_s"].astype(float).tolist()
    bare_rates = bare_loop(project, params)
    for _ in range(args.repeats - 1):  # in turn, so that both see the same drift in the machine's speed
        d2d(project, "stage", "train", *sets)
        d2d_rates += pd.read_csv(stages.path("history", project))["samples_per_s"].astype(float).tolist()
        bare_rates += bare_loop(project, params)
    accuracy = pd.read_json(stages.path("metrics", project), typ="series").get("test_accuracy")
    rows = {"init-params": args.rows, "validate": args.rows, "clean": args.rows, "split": args.rows,
            "train": sizes["train"], "evaluate": sizes["val"] + sizes["test"], "register": sizes["test"],
            "predict": args.rows, "d2d run": args.rows}
    print(f"\n{'stage':<12}{'seconds':>10}{'rows/s':>14}{'tree GiB':>10}{'tree RSS GiB':>14}{'system GiB':>12}")
    for stage, seconds in timings.items():
        p = {k: v / 2**30 for k, v in peaks[stage].items()}
        print(f"{stage:<12}{seconds:>10.1f}{rows[stage] / seconds:>14,.0f}{p['tree']:>10.2f}{p['rss']:>14.2f}{p['system']:>12.2f}")
    if not args.whole_run:
        print(f"{'validate+clean+split':<24}{sum(timings[s] for s in ('validate', 'clean', 'split')):.1f} s")
    p = {k: v / 2**30 for k, v in sampler.peaks.items()}
    print(f"peak memory: process tree (private + /dev/shm) {p['tree']:.2f} GiB (RSS {p['rss']:.2f}), "
          f"system used + /dev/shm above the start {p['system']:.2f} GiB")
    print(f"training, {params.train.num_workers} worker(s) × {params.train.cpus_per_worker} thread(s) against a bare "
          f"PyTorch loop with {params.train.num_workers * params.train.cpus_per_worker} thread(s):")
    for run, (d2d_rate, bare_rate) in enumerate(zip(d2d_rates, bare_rates)):
        print(f"  run {run // args.epochs + 1}, epoch {run % args.epochs + 1}: d2d {d2d_rate:,.0f} samples/s, "
              f"bare loop {bare_rate:,.0f} samples/s, ratio {d2d_rate / bare_rate:.3f}")
    if args.repeats > 1:
        print(f"  median of {len(d2d_rates)} epochs each: d2d {np.median(d2d_rates):,.0f} samples/s, bare loop "
              f"{np.median(bare_rates):,.0f} samples/s, ratio {np.median(d2d_rates) / np.median(bare_rates):.3f}")
    print(f"test accuracy {accuracy}")
    if not args.keep:
        shutil.rmtree(project, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
