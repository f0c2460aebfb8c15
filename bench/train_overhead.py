"""Ray Train's cost over a bare PyTorch loop, in one run.

The same model, data, batch size, optimizer and thread count (1), each epoch = train + score
the validation split; the Ray path streams the splits from Ray Datasets into the workers
(get_dataset_shard) and reports and checkpoints every epoch, as d2d does.
Steady-state throughput is train rows / wall seconds per epoch, over epochs 2..N.

    python bench/train_overhead.py [--rows 60000] [--epochs 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd


def make_data(rows: int, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Digits resampled with pixel noise to `rows` rows (the default CNN's real input shape)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(bunch.target), rows)
    x = np.clip(bunch.data[pick] + rng.normal(0, 1.0, (rows, 64)), 0, 16)
    df = pd.DataFrame(x, columns=[f"pixel_{i}" for i in range(64)]).assign(id=np.arange(rows), label=bunch.target[pick])
    cut = int(rows * 0.85)
    return df.iloc[:cut], df.iloc[cut:]


def bare_epoch(model, opt, loader) -> None:
    """One epoch of the plain PyTorch loop every baseline here times: cross-entropy, one step a batch."""
    from torch import nn

    model.train()
    for xb, yb in loader:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()


def bare_loop(x, y, xv, yv, spec, params) -> list[float]:
    """Wall seconds per epoch of a plain PyTorch loop: the baseline."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from pipeline.train.loop import evaluate_split
    from pipeline.train.models import build_model

    torch.manual_seed(params.seed)
    torch.set_num_threads(params.cpus_per_worker)
    model = build_model(spec)
    opt = torch.optim.Adam(model.parameters(), lr=params.lr)
    loader = DataLoader(TensorDataset(torch.tensor(x), torch.tensor(y)), batch_size=params.batch_size, shuffle=True)
    xv, yv = torch.tensor(xv), torch.tensor(yv)
    times = []
    for _ in range(params.epochs):
        t = time.perf_counter()
        bare_epoch(model, opt, loader)
        evaluate_split(model, xv, yv, regression=False)
        times.append(time.perf_counter() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=60_000)
    ap.add_argument("--epochs", type=int, default=5)
    args = ap.parse_args()

    import ray
    import ray.data

    from pipeline.config import TrainParams, load_params
    from pipeline.data.schema import schema_from_params
    from pipeline.train.trainer import features_and_labels, model_spec, train

    repo = Path(__file__).resolve().parents[1]
    schema = schema_from_params(load_params(repo / "params.yaml").data)
    train_df, val_df = make_data(args.rows)
    state = {"numeric": {"names": schema.feature_names, "fill": [None] * 64, "center": [0.0] * 64, "scale": [16.0] * 64},
             "categorical": [], "outputs": schema.feature_names, "target": None}
    params = TrainParams(epochs=args.epochs, patience=args.epochs, num_workers=1, cpus_per_worker=1)
    x, y = features_and_labels(train_df, schema, state)
    xv, yv = features_and_labels(val_df, schema, state)
    spec = model_spec(schema, x.shape[1], params)

    bare = bare_loop(x, y, xv, yv, spec, params)
    bare_rate = len(x) / np.mean(bare[1:])

    t = time.perf_counter()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    init_s = time.perf_counter() - t
    results = {}
    with tempfile.TemporaryDirectory() as d:
        for workers in (1, 2):
            p = params.model_copy(update={"num_workers": workers})
            fit_called = time.time()
            result = train(ray.data.from_pandas(train_df), ray.data.from_pandas(val_df), schema, state, p, Path(d))
            h = result.history
            per_epoch = np.diff(np.r_[h["wall_end"].iloc[0] - h["epoch_s"].iloc[0], h["wall_end"].to_numpy()])
            results[workers] = {
                "rate": len(x) / np.mean(per_epoch[1:]),
                "startup": h["loop_started"].iloc[0] - fit_called,
                "first_epoch_done": h["wall_end"].iloc[0] - fit_called,
            }
    ray.shutdown()

    one, two = results[1], results[2]
    print(f"{args.rows:,} rows (train {len(x):,}), CNN {spec.channels}, batch {params.batch_size}, "
          f"1 thread per worker, {args.epochs} epochs; steady state = epochs 2..{args.epochs}")
    print(f"bare PyTorch loop:         {bare_rate:10,.0f} samples/s")
    print(f"Ray Train, 1 worker:       {one['rate']:10,.0f} samples/s   ratio to bare {one['rate'] / bare_rate:.3f}")
    print(f"Ray Train, 2 workers:      {two['rate']:10,.0f} samples/s   ×{two['rate'] / one['rate']:.2f} vs 1 worker")
    print(f"start-up: ray.init {init_s:.1f} s; fit() to the worker loop {one['startup']:.1f} s "
          f"(1 worker), to the end of epoch 1 {one['first_epoch_done']:.1f} s")


if __name__ == "__main__":
    main()
