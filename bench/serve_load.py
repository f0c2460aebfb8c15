"""Load on `d2d serve`: closed-loop clients on loopback, bounded in requests and in time.

Starts `d2d serve` in this project (the champion must exist: `make run`), sends 1-row and
256-row requests from C concurrent clients, each sending its next request when the last one
returned, and prints p50/p99 latency and throughput beside the bare model's predict time for
the same rows in one process (the floor the server adds its overhead to). Stops the server.

    .venv/bin/python bench/serve_load.py [--clients 8] [--requests 2000] [--seconds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd

from pipeline import stages


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, extra: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open("reports/serve_load.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "d2d"), "serve", "--set", f"serve.port={port}", *extra],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert proc.poll() is None, "d2d serve exited; see reports/serve_load.log"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError("d2d serve did not come up in 240 s")


async def closed_loop(url: str, body: list[dict] | None, clients: int, requests: int, seconds: float) -> dict[str, float]:
    """`body` None: GET (the health route, Ray Serve's own floor with no model and no JSON)."""
    latencies: list[float] = []
    failures = 0
    stop_at = time.perf_counter() + seconds
    sent = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal sent, failures
        while sent < requests and time.perf_counter() < stop_at:
            sent += 1
            t0 = time.perf_counter()
            reply = await (http.get(url) if body is None else http.post(url, json=body))
            latencies.append(time.perf_counter() - t0)
            failures += reply.status_code != 200

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        for _ in range(min(20, requests)):  # warm-up, not counted
            await (http.get(url) if body is None else http.post(url, json=body))
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {"requests": len(ms), "failures": failures, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "rps": len(ms) / wall, "rows_per_s": len(ms) * len(body or []) / wall}


def bare_model_ms(rows: pd.DataFrame, repeats: int = 200) -> float:
    """Median time of the champion's own pyfunc predict on these rows, in this process."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{Path('mlflow.db').resolve()}")
    model = mlflow.pyfunc.load_model("models:/d2d-digits@champion")
    rows = rows.astype({c.name: c.type.to_numpy() for c in model.metadata.get_input_schema().inputs
                        if hasattr(c.type, "to_numpy")})  # as the server casts (`any` columns: the model checks them)
    model.predict(rows)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.predict(rows)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--set", action="append", default=[], help="serve.* overrides for d2d serve")
    args = parser.parse_args()

    test = pd.read_parquet(stages.path("test", Path.cwd()))
    features = [c for c in test.columns if c.startswith("pixel_")]
    port = free_port()
    extra = [x for s in args.set for x in ("--set", s)] + ["--set", "serve.log_dir=reports/serve_load_log"]
    proc = start_server(port, extra)
    try:
        url = f"http://127.0.0.1:{port}/predict"
        print(f"d2d serve on 127.0.0.1:{port}; {args.clients} closed-loop clients; at most {args.requests} requests "
              f"or {args.seconds:g} s per size; {os.cpu_count()} CPUs")
        print(f"{'rows/request':>12} {'requests':>8} {'fail':>4} {'p50 ms':>7} {'p99 ms':>7} {'req/s':>7} {'rows/s':>8} "
              f"{'bare model ms':>13} {'p50/bare':>8}")
        for n in (1, 256):
            rows = test[features].sample(n, replace=n > len(test), random_state=0).astype("int64")
            budget = args.requests if n == 1 else max(50, args.requests // 8)
            got = asyncio.run(closed_loop(url, rows.to_dict("records"), args.clients, budget, args.seconds))
            bare = bare_model_ms(rows)
            print(f"{n:>12} {got['requests']:>8} {got['failures']:>4} {got['p50_ms']:>7.1f} {got['p99_ms']:>7.1f} "
                  f"{got['rps']:>7.1f} {got['rows_per_s']:>8.0f} {bare:>13.2f} {got['p50_ms'] / bare:>8.1f}")
        got = asyncio.run(closed_loop(f"http://127.0.0.1:{port}/health", None, args.clients, args.requests, args.seconds))
        print(f"{'GET /health':>12} {got['requests']:>8} {got['failures']:>4} {got['p50_ms']:>7.1f} {got['p99_ms']:>7.1f} "
              f"{got['rps']:>7.1f}   (Ray Serve's proxy and replica hop alone, no model)")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


if __name__ == "__main__":
    main()
