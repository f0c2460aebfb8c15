"""False-alarm rate of the drift verdict: unchanged batches (`simulate-drift --kind none`)
against a reference drawn from the same digits, for a small reference (KS tests) and the
full one (Wasserstein distances), with the domain classifier on as it is for images.

    .venv/bin/python bench/false_alarms.py [batches]
"""

from __future__ import annotations

import sys
import time

import numpy as np

from pipeline.config import load_params
from pipeline.data.demo import digits_frame
from pipeline.data.schema import schema_from_params
from pipeline.data.simulate import simulate_batch
from pipeline.drift import drift_report


def main(batches: int) -> None:
    params = load_params("params.yaml")
    schema = schema_from_params(params.data)
    digits = digits_frame(schema)
    print(f"{batches} unchanged batches of 300 rows per reference; verdict = drift share ≥ {params.drift.drift_share} "
          f"or domain AUC ≥ {params.drift.domain_auc_threshold}")
    print(f"{'reference':<28} {'alarms':>6} {'rate':>6} {'max share':>9} {'max AUC':>8} {'s/batch':>8}")
    for label, rows in (("272 rows (KS; the test's)", 400), ("1257 rows (Wasserstein)", None)):
        source = digits.head(rows)
        # the reference is 70% of the source, as the train split is
        reference = source.sample(frac=0.7, random_state=0)
        shares, aucs, alarms = [], [], 0
        started = time.perf_counter()
        for seed in range(batches):
            report = drift_report(reference, simulate_batch(source, schema, "none", 0.0, 300, seed, 0), schema, params.drift)
            shares.append(report.share)
            aucs.append(report.multivariate["roc_auc"])
            alarms += report.drifted
        per = (time.perf_counter() - started) / batches
        print(f"{label:<28} {alarms:>6} {alarms / batches:>6.2f} {max(shares):>9.2f} {max(aucs):>8.3f} {per:>8.2f}")
        print(f"{'':<28} mean share {np.mean(shares):.3f}, mean AUC {np.mean(aucs):.3f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100)
