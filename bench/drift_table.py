"""Detection table on digits: for each simulated kind and strength, the drift share, the
domain classifier's ROC-AUC and the verdict, against the 1,797 clean digits as reference.

    .venv/bin/python bench/drift_table.py
"""

from __future__ import annotations

from pipeline.config import load_params
from pipeline.data.demo import digits_frame
from pipeline.data.schema import schema_from_params
from pipeline.data.simulate import KINDS, simulate_batch
from pipeline.drift import drift_report


def main() -> None:
    params = load_params("params.yaml")
    schema = schema_from_params(params.data)
    reference = digits_frame(schema)
    print(f"reference: {len(reference)} digits; current: 500 simulated rows per cell")
    print(f"{'kind':<11} {'strength':>8} {'drift share':>11} {'domain AUC':>10}  verdict")
    for kind in KINDS:
        for strength in ((0.0,) if kind == "none" else (0.1, 0.3, 0.6)):
            batch = simulate_batch(reference, schema, kind, strength, 500, seed=7, first_id=0)
            report = drift_report(reference, batch, schema, params.drift)
            auc = report.multivariate["roc_auc"] if report.multivariate else float("nan")
            print(f"{kind:<11} {strength:>8.1f} {report.share:>11.2f} {auc:>10.3f}  {'DRIFT' if report.drifted else 'ok'}")


if __name__ == "__main__":
    main()
