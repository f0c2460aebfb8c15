"""A folder of images, of mixed sizes and modes with broken files among them, through the real
parts (issue 17): `d2d data demo --kind images` → DVC versions the folder as a directory →
`d2d init-params` → the training flow (Prefect's test harness, a local Ray, GX, MLflow on
SQLite) → a registered champion that `mlflow.pyfunc` loads and that predicts from image bytes →
`d2d serve` → `d2d predict` → `d2d monitor` on new folders of images. Nothing is mocked."""

from __future__ import annotations

import base64
import hashlib
import io as _io
import json
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pandas as pd
import pytest
from PIL import Image

from pipeline.config import load_params
from pipeline.data import io
from tests.integration.servers import free_port, stop, wait_http
from tests.integration.test_end_to_end import run
from tests.integration.test_serve import BIN, environment

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

    # d2d serve: base64 rows and multipart uploads; bad images get a 4xx and the server stays up
    with serving(root) as url:
        files = [root / "data/raw/digits" / p for p in test["path"].head(3)]
        answer = httpx.post(f"{url}/predict", json=[{"image": base64.b64encode(f.read_bytes()).decode(),
                                                     "path": test["path"].iloc[i]} for i, f in enumerate(files)],
                            timeout=60)
        assert answer.status_code == 200, answer.text
        served = [p["label"] for p in answer.json()["predictions"]]
        assert served == pred["label"].head(3).astype(str).tolist()
        assert [p["path"] for p in answer.json()["predictions"]] == test["path"].head(3).tolist()
        upload = httpx.post(f"{url}/predict", files=[("image", (f.name, f.read_bytes(), "image/png")) for f in files],
                            timeout=60)
        assert upload.status_code == 200, upload.text
        assert [p["label"] for p in upload.json()["predictions"]] == served
        bomb = io_bytes(Image.new("L", (8000, 6000)))  # 48M pixels in a few kB: refused from its header
        for body, status in [({"image": base64.b64encode(b"not an image").decode()}, 422),
                             ({"image": "%%%"}, 422), ({"image": base64.b64encode(bomb).decode()}, 413),
                             ({"picture": "x"}, 422)]:
            refused = httpx.post(f"{url}/predict", json=body, timeout=60)
            assert refused.status_code == status, refused.text
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200
        log = wait_for_log(root / "data/inference_log", rows=6)
    assert "image" not in log.columns and {"image_sha256", "image_bytes", "out_label"} <= set(log.columns)
    assert set(log["image_sha256"]) == {hashlib.sha256(f.read_bytes()).hexdigest() for f in files}

    # d2d predict on a folder of new images, any layout: every file has a row, a bad one its error
    new = root / "incoming"
    (new / "a").mkdir(parents=True)
    for f in files:
        (new / "a" / f.name).write_bytes(f.read_bytes())
    (new / "broken.png").write_bytes(b"\x89PNG not really")
    run(["d2d", "predict", "--input", "incoming", "--output", "scored.parquet"], root)
    scored = pd.read_parquet(root / "scored.parquet")
    assert sorted(scored["path"]) == sorted(["a/" + f.name for f in files] + ["broken.png"])
    broken = scored.set_index("path").loc["broken.png"]
    assert "not an image" in broken["error"] and pd.isna(broken["label"])
    by_path = dict(zip(test["path"].head(3).map(lambda p: "a/" + Path(p).name), served))
    assert {p: str(scored.set_index("path").loc[p, "label"]) for p in by_path} == by_path

    # d2d monitor on new folders: one of new images as they come (unlabelled), one blurred
    # with class folders; the blurred one drifts and joins the image folder as a new DVC version
    raw = root / "data/raw/digits"
    originals = digest_by_file(raw)
    run(["d2d", "simulate-drift", "--kind", "none", "--rows", "80", "--seed", "1", "--no-labelled"], root)
    run(["d2d", "simulate-drift", "--kind", "blur", "--strength", "0.8", "--rows", "80", "--seed", "2"], root)
    inbox = digest(root / "data/inbox")
    sets = [a for o in overrides for a in ("--set", o)]
    out = run(["d2d", "monitor", "--set", "monitor.retrain=off", *sets], root).stdout
    assert "batch-blur-0.8-seed2" in out and "batch-none-0.5-seed1" in out, out
    ledger = {e["file"]: e for e in json.loads((root / "data/monitor/ledger.json").read_text())["batches"].values()}
    blurred, plain = ledger["batch-blur-0.8-seed2"], ledger["batch-none-0.5-seed1"]
    assert blurred["action"] == "append" and blurred["labelled"] and blurred["domain_auc"] >= 0.6, blurred
    assert not plain["labelled"] and plain["action"] in ("none", "alert") and plain["rows_valid"] == 80
    assert any("MMD" in r for r in blurred["reasons"])
    page = (root / blurred["report"]).read_text()
    assert page.count('alt="reference example"') == 8 and page.count('alt="batch example"') == 8
    assert json.loads((root / blurred["report"]).with_suffix(".json").read_text())["multivariate"]["dimensions"] > 0
    assert digest(root / "data/inbox") == inbox  # the inbox is only read
    now = digest_by_file(raw)
    assert {k: now[k] for k in originals} == originals  # no existing image changed
    added = [k for k in now if k not in originals]
    assert len(added) == blurred["rows_valid"] == 80 and all(k.split("/")[1].startswith("batch-blur-0.8-seed2-") for k in added)
    assert blurred["appended"]["md5_after"] == io.dvc_md5(raw) == io.dvc_recorded_md5(raw)


def digest_by_file(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def io_bytes(image: Image.Image) -> bytes:
    out = _io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@contextmanager
def serving(root: Path) -> Iterator[str]:
    """`d2d serve` on a free loopback port, stopped by its PID afterwards."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(root / "serve.log", "w") as out:
        proc = subprocess.Popen([str(BIN / "d2d"), "serve", "--set", f"serve.port={port}", "--set", "serve.log_flush_s=0.5"],
                                cwd=root, env=environment(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_http(f"{url}/health", 240, proc)
            deadline = time.monotonic() + 240
            while httpx.get(f"{url}/health", timeout=30).status_code != 200:  # until the app is deployed
                assert proc.poll() is None and time.monotonic() < deadline, (root / "serve.log").read_text()[-3000:]
                time.sleep(0.5)
            yield url
        finally:
            stop(proc, timeout=60)


def wait_for_log(folder: Path, rows: int) -> pd.DataFrame:
    deadline = time.monotonic() + 30
    while True:
        frame = pd.read_parquet(folder) if list(folder.glob("date=*/part-*.parquet")) else pd.DataFrame()
        if len(frame) >= rows:
            return frame
        assert time.monotonic() < deadline, f"{len(frame)} rows logged"
        time.sleep(0.2)

