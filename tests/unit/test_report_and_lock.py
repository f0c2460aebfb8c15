"""The run summary people read in the Prefect UI, and when a run may use dvc.lock."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.report import per_class_rows, run_summary
from pipeline.summaries import Cleaned, DataVersion, Evaluated, Registered, SplitSizes, Trained, TrainingRun, Validated
from pipeline.versioning import lock_mode

RESULT = TrainingRun(
    data_version=DataVersion("data/raw/digits.csv", "abc", "abc", True, "pushed to the DVC remote"),
    validate=Validated(passed=True, reasons=(), rows_in=100, rows_valid=96, rows_quarantined=4, bad_row_fraction=0.04,
                       expectations=10, expectations_failed=2, data_md5="abc", data_path="data/raw/digits.csv",
                       data_docs="reports/data_docs/index.html"),
    clean=Cleaned(rows_in=96, rows_out=93, removed=3),
    split=SplitSizes({"train": 65, "val": 14, "test": 14}, "stratified", 42, 0, 64),
    train=Trained(epochs_run=3, best_epoch=2, best_val_loss=0.1, train_seconds=1.0, num_workers=2),
    evaluate=Evaluated({"test_accuracy": 0.95, "test_f1_macro": 0.94, "val_accuracy": 0.9}, "r1", "models:/m-1"),
    register=Registered("m", 2, False, 1, ("test_accuracy 0.9500 meets register.min_test_accuracy=0.9",
                                           "worse beyond the tolerance")),
)


def test_the_summary_has_every_section_and_the_reasons(tmp_path):
    text = run_summary(RESULT, tmp_path, "sqlite:///mlflow.db")
    for part in ("## Validation", "passed: 8/10 expectations met", "4 quarantined", "3 removed by cleaning",
                 "| train | 65 |", "| accuracy | 0.9500 |", "not promoted (champion: version 1)",
                 "- worse beyond the tolerance", "MLflow run `r1` on `sqlite:///mlflow.db`", "models:/m/2",
                 str(tmp_path / "reports/data_docs/index.html")):
        assert part in text, part
    assert "val_accuracy" not in text and "| val_accuracy" not in text


def test_per_class_rows(tmp_path):
    assert per_class_rows(tmp_path / "missing.csv") == []
    pd.DataFrame({"class": ["a"], "f1": [0.123456], "support": [3]}).to_csv(tmp_path / "p.csv", index=False)
    assert per_class_rows(tmp_path / "p.csv") == [{"class": "a", "f1": 0.1235, "support": 3}]


def test_the_lock_is_used_only_for_the_project_s_own_params(tmp_path: Path):
    assert lock_mode(tmp_path, tmp_path / "params.yaml", []) == "not a DVC project"
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    assert lock_mode(tmp_path, tmp_path / "params.yaml", []) is None
    assert "--set overrides" in lock_mode(tmp_path, tmp_path / "params.yaml", ["train.lr=0.1"])
    assert "other.yaml" in lock_mode(tmp_path, tmp_path / "other.yaml", [])
