"""A folder of images, of mixed sizes and modes with broken files among them, through the real
parts (issue 17): `d2d data demo --kind images` → DVC versions the folder as a directory →
`d2d init-params` → the training flow (Prefect's test harness, a local Ray, GX, MLflow on
SQLite) → a registered champion that `mlflow.pyfunc` loads and that predicts from image bytes.
Nothing is mocked."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest

from pipeline.config import load_params
from pipeline.data import io
from tests.integration.test_end_to_end import run

pytestmark = pytest.mark.integration


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def test_an_image_folder_end_to_end(tmp_path, prefect_harness):
    import mlflow

    from flows.training import training_flow

    root = tmp_path
    run(["d2d", "data", "demo", "--kind", "images", "--out", "data/raw/digits"], root)
    run(["git", "init", "-q"], root)
    run(["dvc", "init", "-q"], root)
    run(["dvc", "remote", "add", "-d", "local", str(tmp_path / "remote")], root)
    run(["dvc", "add", "-q", "data/raw/digits"], root)  # the folder, versioned by DVC as a directory
    before = digest(root / "data/raw/digits")
    run(["d2d", "init-params", "--data", "data/raw/digits", "--target", "label"], root)
    params = load_params(root / "params.yaml")
    assert params.data.images is not None and params.train.model == "resnet18"
    # a small CNN at 16×16 for the test's time; augmentation on, as a user would set it
    overrides = ["train.model=cnn", "data.images.size=16", "train.epochs=6", "train.batch_size=32",
                 "data.images.augment.rotate=8", "data.images.augment.crop_scale=0.85",
                 "validate.data_docs=false", "register.min_test_accuracy=0.6"]
    state = training_flow(params_path="params.yaml", overrides=overrides, root=str(root), return_state=True)
    assert state.is_completed(), state.message
    result = state.result()

    assert digest(root / "data/raw/digits") == before  # the user's folder is only read
    assert result.data_version.matches_dvc and result.data_version.dvc == "pushed to the DVC remote"
    assert result.data_version.md5.endswith(".dir")
    assert result.validate.rows_quarantined == 10  # 2 each: truncated, not an image, too small, extreme aspect, CMYK
    assert result.clean.removed == 6  # 2 exact duplicates, and 2 images under two labels (both copies)
    assert result.register.promoted

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model(f"models:/{params.register_.model_name}@champion")
    test = io.read_table(root / "data/split/test.parquet")
    pred = model.predict(pd.DataFrame({"image": test["image"]}))
    accuracy = (pred["label"].astype(str).to_numpy() == test["label"].astype(str).to_numpy()).mean()
    metrics = json.loads((root / "reports/metrics.json").read_text())
    # the logged model, from bytes, scores the test split as evaluation did
    assert accuracy == pytest.approx(metrics["test_accuracy"], abs=1e-6)  # metrics.json rounds to 6 places
    assert accuracy > 0.6
    # and a file read straight from the user's folder, as a client would send it
    one = root / "data/raw/digits" / test["path"].iloc[0]
    assert model.predict(pd.DataFrame({"image": [one.read_bytes()]}))["label"].iloc[0] == pred["label"].iloc[0]

