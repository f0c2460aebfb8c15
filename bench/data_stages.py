"""Times the data stages on N rows × 64 numeric columns (plus id and label).

Prints, for read, validate, clean and split: seconds, rows/s and the time as a multiple of a
plain pyarrow read of the same file; then the total and the process's peak memory (RSS).

    python bench/data_stages.py --rows 1000000 [--data-docs]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

FEATURES = 64
BAD_SHARE = 0.01  # rows with an out-of-range value, a null, or a duplicate: work for each rule


def generate(path: Path, rows: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 17, size=(rows, FEATURES)).astype("float64")
    bad = rng.choice(rows, size=int(rows * BAD_SHARE), replace=False)
    third = len(bad) // 3
    x[bad[:third], 5] = 99.0  # out of range
    x[bad[third : 2 * third], 9] = np.nan  # null
    df = pd.DataFrame(x, columns=[f"pixel_{i}" for i in range(FEATURES)])
    df.insert(0, "id", np.arange(rows, dtype="int64"))
    df["label"] = rng.integers(0, 10, rows)
    dups = bad[2 * third :]
    sources = rng.choice(np.setdiff1d(np.arange(rows), bad), size=len(dups), replace=False)
    df.iloc[dups, 1:] = df.iloc[sources, 1:].to_numpy()  # the same example under a new id
    df.to_parquet(path, index=False)


def params(data_docs: bool):
    from pipeline.config import load_params

    repo = Path(__file__).resolve().parents[1]
    return load_params(repo / "params.yaml", [f"validate.data_docs={str(data_docs).lower()}", "validate.min_rows=1"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--data-docs", action="store_true", help="also render GX Data Docs (the stage default)")
    ap.add_argument("--generate", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.generate:
        generate(args.generate, args.rows)
        return

    import pyarrow.parquet as pq

    from pipeline import preprocess
    from pipeline.data import io
    from pipeline.data.clean import clean
    from pipeline.data.schema import schema_from_params
    from pipeline.data.split import leaked_rows, split
    from pipeline.data.validate import validate

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "bench.parquet"
        # generated in a child process so its memory does not count as the stages' peak
        subprocess.run([sys.executable, __file__, "--rows", str(args.rows), "--generate", str(path)], check=True)
        p = params(args.data_docs)
        schema = schema_from_params(p.data)

        t = time.perf_counter()
        pq.read_table(path)
        baseline = time.perf_counter() - t

        times: dict[str, float] = {}
        t = time.perf_counter()
        raw = io.read_table(path)
        times["read"] = time.perf_counter() - t
        t = time.perf_counter()
        report = validate(raw, schema, p.validate_, Path(d) / "docs" if args.data_docs else None)
        times["validate"] = time.perf_counter() - t
        t = time.perf_counter()
        cleaned = clean(report.valid, schema, p.clean)
        times["clean"] = time.perf_counter() - t
        t = time.perf_counter()
        parts = split(cleaned.clean, schema.target, schema.id_column, p.split)
        # what the split stage also does: the leakage check and fitting the preprocessing on train
        leaked = leaked_rows(parts, schema.feature_names)
        preprocess.fit(parts.train, preprocess.preprocess_spec(schema, p.clean, p.preprocess))
        times["split"] = time.perf_counter() - t

    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    n = args.rows
    print(f"rows {n:,} × {FEATURES} features; pyarrow read {baseline:.3f} s; data docs {'on' if args.data_docs else 'off'}")
    print(f"quarantined {len(report.quarantine):,}, removed by cleaning {cleaned.report['removed']:,}, splits {parts.sizes()}, leaked rows {leaked}")
    print(f"{'stage':<10}{'seconds':>10}{'rows/s':>14}{'× pyarrow read':>16}")
    for stage, s in times.items():
        print(f"{stage:<10}{s:>10.2f}{n / s:>14,.0f}{s / baseline:>16.1f}")
    work = times["validate"] + times["clean"] + times["split"]
    print(f"validate+clean+split {work:.2f} s; all four {sum(times.values()):.2f} s; peak RSS {peak_gb:.2f} GB")


if __name__ == "__main__":
    main()
