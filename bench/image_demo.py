"""The image demo end to end, measured (issue 17's benchmark: the demo folder's accuracy,
training images/s and serving latency for one image).

In a new project folder: `d2d data demo --kind images`, `d2d init-params`, one `d2d run`
with the model and size given here, then `d2d serve` on a free loopback port and N requests
of one image each (base64 JSON, one at a time, as a client would send them). Prints the
test accuracy, each stage's seconds, training's images/s per epoch, and the requests'
latency percentiles. The server is stopped by its PID.

    python bench/image_demo.py [--model cnn] [--size 32] [--epochs 12] [--requests 200]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BIN = Path(sys.executable).parent


def d2d(root: Path, *args: str) -> float:
    started = time.perf_counter()
    out = subprocess.run([str(BIN / "d2d"), *args], cwd=root, capture_output=True, text=True, env=env())
    if out.returncode:
        sys.exit(f"d2d {' '.join(args)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return time.perf_counter() - started


def env() -> dict[str, str]:
    out = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    out.pop("MLFLOW_TRACKING_URI", None)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_latency(root: Path, images: list[bytes], requests: int) -> list[float]:
    """Seconds per request of one base64 image each, against `d2d serve` on loopback."""
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([str(BIN / "d2d"), "serve", "--set", f"serve.port={port}"], cwd=root, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit("d2d serve did not come up")
            time.sleep(0.5)
        bodies = [{"image": base64.b64encode(data).decode()} for data in images]
        with httpx.Client(timeout=30) as client:
            for body in bodies[:20]:  # warm-up: the first requests pay for lazy imports
                client.post(f"{url}/predict", json=body)
            times = []
            for i in range(requests):
                started = time.perf_counter()
                answer = client.post(f"{url}/predict", json=bodies[i % len(bodies)])
                times.append(time.perf_counter() - started)
                if answer.status_code != 200:
                    sys.exit(f"request {i}: {answer.status_code} {answer.text[:300]}")
        return times
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="d2d-image-demo-"))
    try:
        d2d(root, "data", "demo", "--kind", "images", "--out", "data/raw/digits")
        d2d(root, "init-params", "--data", "data/raw/digits", "--target", "label")
        sets = [f"train.model={args.model}", f"data.images.size={args.size}", f"train.epochs={args.epochs}",
                "validate.data_docs=false", *args.set]
        seconds = d2d(root, "run", *(x for kv in sets for x in ("--set", kv)))
        metrics = json.loads((root / "reports/metrics.json").read_text())
        timings = json.loads((root / "reports/timings.json").read_text())
        import pandas as pd

        history = pd.read_csv(root / "reports/history.csv")["samples_per_s"].tolist()
        validate = json.loads((root / "reports/validate.json").read_text())
        print(f"d2d run: {seconds:.1f} s ({args.model}, {args.size}×{args.size}, {args.epochs} epochs, {' '.join(args.set)})")
        print(f"  images {validate['rows_in']}, quarantined {validate['rows_quarantined']}")
        print("  stages: " + ", ".join(f"{k} {v['step_s']:.1f} s" for k, v in timings.items()
                                       if isinstance(v, dict) and "step_s" in v))
        print(f"  training images/s per epoch: {', '.join(f'{r:,.0f}' for r in history)} "
              f"(median {np.median(history):,.0f})")
        print(f"  test accuracy {metrics['test_accuracy']:.4f}, macro F1 {metrics['test_f1_macro']:.4f}")
        test = pd.read_parquet(root / "data/split/test.parquet")
        times = np.array(serve_latency(root, test["image"].tolist(), args.requests)) * 1000
        print(f"serving, {args.requests} requests of one image (base64 JSON, one at a time): "
              f"p50 {np.percentile(times, 50):.1f} ms, p95 {np.percentile(times, 95):.1f} ms, "
              f"max {times.max():.1f} ms")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
