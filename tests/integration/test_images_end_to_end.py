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
from tests.integration.servers import free_port, stop_leader, wait_http
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
            stop_leader(proc)


def wait_for_log(folder: Path, rows: int) -> pd.DataFrame:
    deadline = time.monotonic() + 30
    while True:
        frame = pd.read_parquet(folder) if list(folder.glob("date=*/part-*.parquet")) else pd.DataFrame()
        if len(frame) >= rows:
            return frame
        assert time.monotonic() < deadline, f"{len(frame)} rows logged"
        time.sleep(0.2)



def test_a_manifest_with_extra_columns_end_to_end(tmp_path, prefect_harness):
    """A manifest whose label the extra columns decide (the images are digits, unrelated to
    it): the champion can only score well by taking them. Served as JSON and as a form,
    scored by `d2d predict` from a manifest; a folder batch in the inbox is refused, kept."""
    import mlflow
    import numpy as np

    from flows.training import training_flow
    from pipeline.data import images
    from pipeline.data.demo import write_image_folder

    root = tmp_path
    folder = root / "data/raw/pics"
    write_image_folder(folder, rows=240, seed=5, flaws=0)
    rows, _ = images.list_folder(folder)
    rng = np.random.default_rng(1)
    score, site = rng.normal(size=len(rows)).round(3), rng.choice(["north", "south"], len(rows))
    outcome = np.where(score + (site == "north") > 0.5, "yes", "no")
    pd.DataFrame({"file": rows["path"], "outcome": outcome, "score": score, "site": site}).to_csv(
        folder / "manifest.csv", index=False)
    run(["d2d", "init-params", "--data", "data/raw/pics/manifest.csv", "--target", "outcome"], root)
    overrides = ["train.model=cnn", "data.images.size=16", "train.epochs=12", "train.batch_size=32",
                 "validate.data_docs=false", "register.min_test_accuracy=0.8"]
    state = training_flow(params_path="params.yaml", overrides=overrides, root=str(root), return_state=True)
    assert state.is_completed(), state.message
    assert state.result().register.promoted

    params = load_params(root / "params.yaml")
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model(f"models:/{params.register_.model_name}@champion")
    assert [c.name for c in model.metadata.get_input_schema().inputs] == ["image", "score", "site"]
    test = io.read_table(root / "data/split/test.parquet")
    pred = model.predict(test[["image", "score", "site"]])
    accuracy = (pred["label"].astype(str).to_numpy() == test["outcome"].astype(str).to_numpy()).mean()
    assert accuracy == pytest.approx(json.loads((root / "reports/metrics.json").read_text())["test_accuracy"], abs=1e-6)
    assert accuracy >= 0.85  # the digits alone say nothing about the outcome
    high = model.predict(test[["image"]].assign(score=3.0, site="north"))["label"]
    low = model.predict(test[["image"]].assign(score=-3.0, site="south"))["label"]
    assert (high == "yes").mean() > 0.9 and (low == "no").mean() > 0.9

    with serving(root) as url:
        first = test.iloc[0]
        row = {"image": base64.b64encode(first["image"]).decode(), "score": float(first["score"]), "site": first["site"]}
        answer = httpx.post(f"{url}/predict", json=[row], timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json()["predictions"][0]["label"] == str(pred["label"].iloc[0])
        upload = httpx.post(f"{url}/predict", files=[("image", ("a.png", first["image"], "image/png"))],
                            data={"score": str(first["score"]), "site": first["site"]}, timeout=60)
        assert upload.status_code == 200, upload.text
        assert upload.json()["predictions"][0]["label"] == str(pred["label"].iloc[0])
        for body, words in [({"image": row["image"], "site": "north"}, "missing column(s) score"),
                            ({**row, "score": "high"}, "column score must be double")]:
            refused = httpx.post(f"{url}/predict", json=body, timeout=60)
            assert refused.status_code == 422 and words in refused.text, refused.text
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200

    # d2d predict from a manifest with the extras; a folder has none, which is a one-line error
    test[["file", "score", "site"]].head(20).to_csv(folder / "new.csv", index=False)
    run(["d2d", "predict", "--input", "data/raw/pics/new.csv", "--output", "scored.parquet"], root)
    scored = pd.read_parquet(root / "scored.parquet")
    assert scored["label"].astype(str).tolist() == pred["label"].head(20).astype(str).tolist()
    out = subprocess.run([str(BIN / "d2d"), "predict", "--input", "data/raw/pics/0", "--output", "x.parquet"],
                         cwd=root, env=environment(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 2 and "the model also takes column(s) score, site" in out.stderr, out.stderr

    # the monitor: a batch folder cannot carry the extras, so it is refused, and kept with the reason
    batch = root / "data/inbox/batch1"
    batch.mkdir(parents=True)
    for p in test["file"].head(25):
        (batch / Path(p).name).write_bytes((folder / p).read_bytes())
    run(["d2d", "monitor", "--set", "monitor.retrain=off", *[a for o in overrides for a in ("--set", o)]], root)
    entry = next(iter(json.loads((root / "data/monitor/ledger.json").read_text())["batches"].values()))
    assert entry["action"] == "rejected" and "the model also takes column(s) score, site" in " ".join(entry["reasons"])
    kept = io.read_table(next((root / "data/quarantine/monitor").glob("batch1-*.parquet")))
    assert len(kept) == 25 and kept["reason"].str.contains("batch rejected").all()
