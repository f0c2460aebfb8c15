"""Time to compute the full drift report (per-feature tests, PSI, the domain classifier)
for N current rows × 64 features against an N-row reference.

    .venv/bin/python bench/drift.py --rows 100000
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

from pipeline.config import DataParams, DriftParams
from pipeline.data.schema import schema_from_params
from pipeline.drift import drift_report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--shift", type=float, default=0.0, help="added to every current feature, in stds")
    args = parser.parse_args()
    schema = schema_from_params(DataParams(features=[{"prefix": "pixel_", "count": 64, "dtype": "float"}],
                                           classes=[0, 1]))
    rng = np.random.default_rng(0)
    cols = schema.feature_names
    reference = pd.DataFrame(rng.normal(size=(args.rows, 64)), columns=cols)
    current = pd.DataFrame(rng.normal(args.shift, 1.0, size=(args.rows, 64)), columns=cols)
    started = time.perf_counter()
    report = drift_report(reference, current, schema, DriftParams())
    seconds = time.perf_counter() - started
    print(f"{args.rows:,} current × 64 features vs {args.rows:,} reference rows: {seconds:.2f} s; "
          f"test {report.features['test'].iloc[0]}, drift share {report.share:.2f}, "
          f"domain classifier ROC-AUC {report.multivariate['roc_auc']:.3f}, drifted {report.drifted}")


if __name__ == "__main__":
    main()
