"""The detection table for images (issue 17): how often each image drift detector fires, for
each `simulate-drift` image kind and strength and for several batch sizes, over repeated draws.

In a new project folder (or `--project`, one with a champion already): the image demo, `d2d
init-params` and one `d2d run`; then the monitor's own pieces on each simulated batch: the
reference the monitor loads (`monitor.load_reference`: the champion and its embeddings of the
test split), the batch folder screened as the monitor screens it, and `image_drift`. Counted
per detector: the property vote (drift.drift_share of the properties' tests), the domain
classifier on the embeddings, MMD's permutation test, and the verdict (any of them). The
`none` rows are false alarms.

    python bench/image_drift.py [--repeats 5] [--sizes 30,100,300] [--project DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.image_demo import d2d  # noqa: E402  (the same subprocess helper)

STRENGTHS = {"none": (0.0,), "new_class": (0.1, 0.3, 0.6)}
DEFAULT_STRENGTHS = (0.25, 0.5, 1.0)


def make_project(root: Path, size: int, epochs: int) -> None:
    d2d(root, "data", "demo", "--kind", "images", "--out", "data/raw/digits")
    d2d(root, "init-params", "--data", "data/raw/digits", "--target", "label")
    sets = [f"train.model=cnn", f"data.images.size={size}", f"train.epochs={epochs}", "validate.data_docs=false"]
    d2d(root, "run", *(x for kv in sets for x in ("--set", kv)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="draws per cell (twice as many for none)")
    parser.add_argument("--sizes", default="30,100,300", help="batch sizes, comma-separated")
    parser.add_argument("--project", type=Path, help="a project with an image champion (default: a new one)")
    parser.add_argument("--size", type=int, default=16, help="training size of a new project's CNN")
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    import os

    from pipeline import image_monitor, monitor
    from pipeline.config import load_params
    from pipeline.data.schema import schema_from_params
    from pipeline.data.simulate import IMAGE_KINDS, write_image_batch

    root = args.project or Path(tempfile.mkdtemp(prefix="d2d-image-drift-"))
    scratch = Path(tempfile.mkdtemp(prefix="d2d-image-batches-"))
    try:
        if args.project is None:
            started = time.perf_counter()
            make_project(root, args.size, args.epochs)
            print(f"project: {root} (cnn at {args.size}×{args.size}, {args.epochs} epochs, "
                  f"{time.perf_counter() - started:.0f} s)")
        os.chdir(root)
        # every batch size measured, however small (the monitor itself turns away batches
        # under validate.min_rows)
        params = load_params(root / "params.yaml", ["validate.min_rows=1"])
        schema = schema_from_params(params.data)
        reference = monitor.load_reference(params, root)
        model = reference.model.unwrap_python_model()
        print(f"reference: {len(reference.frame)} test images, embeddings of {reference.embeddings.shape[1]} "
              f"dimensions; domain AUC ≥ {params.drift.domain_auc_threshold:g}, MMD p < {params.drift.mmd_p:g}, "
              f"property share ≥ {params.drift.drift_share:g}")
        print(f"{'kind':<11} {'strength':>8} {'batch':>5} {'draws':>5} {'properties':>10} {'domain':>7} "
              f"{'MMD':>5} {'any':>5} {'s/batch':>8}")
        for kind in IMAGE_KINDS:
            for strength in STRENGTHS.get(kind, DEFAULT_STRENGTHS):
                for rows in sizes:
                    draws = args.repeats * (2 if kind == "none" else 1)
                    fired = np.zeros((draws, 4), bool)
                    started = time.perf_counter()
                    for d in range(draws):
                        folder = scratch / f"{kind}-{strength}-{rows}-{d}"
                        write_image_batch(folder, kind, strength, rows, seed=1000 + d, digits=params.data.demo.rows,
                                          labelled=False)
                        batch = image_monitor.screen_folder(folder, schema, params, frozenset()).valid
                        report = image_monitor.image_drift(reference.frame, reference.embeddings, batch,
                                                           image_monitor.embeddings(model, batch), params.drift)
                        m = report.multivariate
                        fired[d] = (report.share >= params.drift.drift_share, m["roc_auc"] >= m["threshold"],
                                    m["mmd_p"] < m["mmd_threshold"], report.drifted)
                        shutil.rmtree(folder)
                    rate = fired.mean(axis=0)
                    print(f"{kind:<11} {strength:>8.2f} {rows:>5} {draws:>5} {rate[0]:>10.2f} {rate[1]:>7.2f} "
                          f"{rate[2]:>5.2f} {rate[3]:>5.2f} {(time.perf_counter() - started) / draws:>8.2f}", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if args.project is None:
            print(f"(the project stays in {root} for a look at its MLflow runs; delete it when done)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
