#!/usr/bin/env bash
# Test accuracy of an MLP on a tabular dataset: scikit-learn's breast cancer data (569 rows,
# 30 numeric features, 2 classes), through the whole pipeline with `d2d init-params` + `d2d run`.
# Usage: bench/tabular_mlp.sh [WORKDIR]   (run from the repository root, after `make test` or `make run`)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$(mktemp -d)}"
mkdir -p "$work" && cd "$work"
export PATH="$repo/.venv/bin:$PATH" PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
python - <<'PY'
import pandas as pd
from sklearn.datasets import load_breast_cancer

b = load_breast_cancer(as_frame=True)
df = b.data.rename(columns=lambda c: c.replace(" ", "_"))
df.insert(0, "id", range(len(df)))
df["diagnosis"] = b.target.map({0: "malignant", 1: "benign"})
df.to_csv("cancer.csv", index=False)
PY
d2d init-params --data cancer.csv --target diagnosis --force
grep -E "^  model:" params.yaml
start=$(date +%s)
d2d run --set register.model_name=d2d-cancer --set evaluate.experiment=d2d-cancer
echo "d2d run: $(( $(date +%s) - start )) s"
python -c "import json; m = json.load(open('reports/metrics.json')); print({k: round(v, 4) for k, v in m.items() if k.startswith('test_')})"
