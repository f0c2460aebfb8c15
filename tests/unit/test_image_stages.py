"""Image files through init-params and the data stages (issue 17, points 1 and 2): a folder of
class folders, or a manifest, becomes params; validate, clean and split then check each file
once, keep every refused row with its reason, carry the image bytes to the splits, and never
touch the user's folder."""

from __future__ import annotations

import hashlib
import io as _io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline import stages
from pipeline.config import load_params
from pipeline.data import images, io
from pipeline.data.demo import write_image_folder
from pipeline.errors import ConfigError, DataError
from tests.unit.test_cli import assert_one_line, main_in_process  # at import: not under @given


def folder_digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, dict[str, list[str]]]:
    """A project made from the image demo by init-params, its data stages run once."""
    root = tmp_path_factory.mktemp("image-project")
    flawed = write_image_folder(root / "data/raw/digits", rows=300, seed=1, flaws=2)
    return root, flawed


def init_params(monkeypatch, capsys, root: Path, *args: str) -> tuple[int, str, str]:
    return main_in_process(monkeypatch, capsys, root, "init-params", *args)


def test_init_params_describes_an_image_folder(monkeypatch, capsys, project):
    root, _ = project
    code, out, err = init_params(monkeypatch, capsys, root, "--data", "data/raw/digits", "--target", "label", "--force")
    assert code in (0, None), err
    assert "image files at 32×32 RGB" in out
    params = load_params(root / "params.yaml")
    assert params.data.images is not None and params.data.images.size == 32 and params.data.images.mode == "RGB"
    assert params.data.classes == [str(d) for d in range(10)]
    assert params.data.id_column == "path" and params.data.features == [] and params.train.model == "resnet18"
    text = (root / "params.yaml").read_text()
    assert "modes found: RGB (" in text and "L (" in text  # what the files were, in the comments


def test_the_data_stages_check_each_file_and_keep_every_row_somewhere(monkeypatch, capsys, project):
    root, flawed = project
    if not (root / "params.yaml").exists():
        init_params(monkeypatch, capsys, root, "--data", "data/raw/digits", "--target", "label")
    before = folder_digest(root / "data/raw/digits")
    params = load_params(root / "params.yaml", ["validate.data_docs=false"])
    summaries = {name: stages.run(name, params, root) for name in ("validate", "clean", "split")}
    assert folder_digest(root / "data/raw/digits") == before  # a user's folder is only read

    quarantine = io.read_table(root / "data/quarantine/validate.parquet")
    reasons = dict(zip(quarantine["path"], quarantine["reason"]))
    for kind, words in [("truncated", "truncated or corrupt"), ("not_an_image", "not an image"),
                        ("too_small", "too small"), ("extreme_aspect", "extreme aspect ratio"), ("cmyk", "mode CMYK")]:
        for path in flawed[kind]:
            assert words in reasons[path], (kind, reasons.get(path))
    removed = io.read_table(root / "data/quarantine/clean.parquet")
    gone = dict(zip(removed["path"], removed["reason"]))
    for path in flawed["exact_duplicate"]:
        assert gone[path].startswith("an exact duplicate of ")
    for path in flawed["two_labels"]:
        assert gone[path].startswith("the same image under labels ")

    splits = {name: io.read_table(root / f"data/split/{name}.parquet") for name in ("train", "val", "test")}
    leaked = io.read_table(root / "data/quarantine/split.parquet")
    listed = len(images.list_folder(root / "data/raw/digits")[0])
    # every file is in exactly one place: a split, or one of the three quarantines
    placed = [*quarantine["path"], *removed["path"], *leaked["path"], *(p for s in splits.values() for p in s["path"])]
    assert sorted(placed) == sorted(set(placed)) and len(placed) == listed
    assert summaries["validate"].rows_in == listed and summaries["validate"].rows_quarantined == len(quarantine)
    assert summaries["split"].leaked_rows == len(leaked)

    # the splits carry each file's bytes as they were, so training never reads the user's folder again
    train = splits["train"]
    row = train.iloc[0]
    assert row["image"] == (root / "data/raw/digits" / row["path"]).read_bytes()
    assert set(images.FACTS) <= set(train.columns)
    # leakage: each val or test image in the leak file is near a train (or earlier val) image, and none stays in its split
    for _, r in leaked.iterrows():
        assert r["split"] in ("val", "test") and r["path"] not in set(splits[r["split"]]["path"])
        assert "leakage" in r["reason"]
    report = json.loads((root / "reports/validate.json").read_text())
    table = report["images"]
    assert table["images"] == summaries["validate"].rows_valid
    assert set(table["modes"]) == {"L", "RGB"} and sum(table["classes"].values()) == table["images"]
    assert 0 < table["brightness"]["mean"] < 1 and table["contrast"]["std"] >= 0
    state = json.loads((root / "data/split/preprocess.json").read_text())
    assert state["kind"] == "images" and state["size"] == 32 and len(state["mean"]) == len(state["std"]) == 3
    assert all(0 < m < 1 for m in state["mean"]) and all(0 < s < 1 for s in state["std"])


def test_a_manifest_with_an_extra_column_is_an_image_dataset(monkeypatch, capsys, tmp_path):
    folder = tmp_path / "pics"
    write_image_folder(folder, rows=80, seed=2, flaws=0)
    rows, _ = images.list_folder(folder)
    manifest = rows.rename(columns={"path": "file", "label": "digit"}).assign(
        site=np.where(np.arange(len(rows)) % 2, "north", "south"))
    manifest.loc[len(manifest)] = {"file": "../outside.png", "digit": "1", "site": "north"}
    manifest.to_csv(folder / "manifest.csv", index=False)
    code, out, err = init_params(monkeypatch, capsys, tmp_path, "--data", "pics/manifest.csv", "--target", "digit")
    assert code in (0, None), err
    params = load_params(tmp_path / "params.yaml", ["validate.data_docs=false"])
    assert params.data.images.path_column == "file" and params.data.id_column == "file"
    assert [f.name for f in params.data.features] == ["site"]
    summary = stages.run("validate", params, tmp_path)
    assert summary.rows_in == len(manifest) and summary.rows_quarantined == 1
    quarantine = io.read_table(tmp_path / "data/quarantine/validate.parquet")
    assert quarantine["reason"].tolist() == ["a path outside the manifest's folder"]
    valid = io.read_table(tmp_path / "data/validated/valid.parquet")
    assert set(valid["site"]) == {"north", "south"} and {"file", "digit", "image"} <= set(valid.columns)


def test_too_many_bad_files_fail_validation_with_the_share(tmp_path):
    folder = tmp_path / "data/raw/few"
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
        for i in range(30):
            (folder / label / f"{i}.png").write_bytes(b"not a png" if i % 2 else _png(i))
    (tmp_path / "params.yaml").write_text(
        'data: {raw: data/raw/few, id_column: path, target: label, classes: ["a", "b"], images: {size: 16}}\n'
        "validate: {data_docs: false}\ntrain: {model: cnn}\n")
    params = load_params(tmp_path / "params.yaml")
    with pytest.raises(DataError, match=r"50\.0% of rows failed"):
        stages.run("validate", params, tmp_path)
    # the refused files are kept with their reasons even when the dataset fails
    assert len(io.read_table(tmp_path / "data/quarantine/validate.parquet")) == 30


def test_files_the_listing_refuses_are_counted_once_however_many_batches(tmp_path):
    folder = tmp_path / "data/raw/digits"
    write_image_folder(folder, rows=600, seed=4, flaws=0)  # more files than one batch of checks (256)
    (folder / "stray.png").write_bytes(_png(1))  # beside the class folders: no label
    (tmp_path / "params.yaml").write_text(
        'data: {raw: data/raw/digits, id_column: path, target: label, classes: ["0", "1", "2", "3", "4", "5", "6", '
        '"7", "8", "9"], images: {size: 16}}\nvalidate: {data_docs: false}\ntrain: {model: cnn}\n')
    summary = stages.run("validate", load_params(tmp_path / "params.yaml"), tmp_path)
    report = json.loads((tmp_path / "reports/validate.json").read_text())
    assert report["failed_rules"] == {"not a row of the image folder": 1}
    assert summary.rows_in == 601 and summary.rows_quarantined == 1


def _png(seed: int) -> bytes:
    out = _io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize("overrides, key", [
    (["data.images.size=4"], "data.images.size"),
    (["data.images.mode=CMYK"], "data.images.mode"),
    (["data.images.near_duplicate_distance=65"], "data.images.near_duplicate_distance"),
    (["data.images.path_column=file"], "id_column is the path column"),
    (["data.image_shape=[3,32,32]"], "not image_shape"),
    (["train.model=mlp"], "does not take images"),
])
def test_bad_image_params_name_the_key(tmp_path, overrides, key):
    (tmp_path / "params.yaml").write_text(
        'data: {raw: data/raw/x, id_column: path, target: label, classes: ["a", "b"], images: {}}\ntrain: {model: cnn}\n')
    with pytest.raises(ConfigError, match=key.replace("[", r"\[")):
        load_params(tmp_path / "params.yaml", overrides)


IMAGE_KEYS = ["size", "mode", "convert", "min_side", "max_aspect", "max_pixels", "max_bytes", "near_duplicate_distance",
              "path_column"]
hostile = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    st.text(max_size=30), st.lists(st.text(max_size=5), max_size=3))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(IMAGE_KEYS), value=hostile)
def test_any_value_of_an_image_key_loads_or_is_one_line_naming_it(monkeypatch, capsys, tmp_path, key, value):
    (tmp_path / "params.yaml").write_text(
        'data: {raw: data/raw/x, id_column: path, target: label, classes: ["a", "b"], images: {}}\n'
        "validate: {data_docs: false}\ntrain: {model: cnn}\n")
    code, out, err = main_in_process(monkeypatch, capsys, tmp_path, "stage", "validate",
                                     "--set", f"data.images.{key}={json.dumps(value)}")
    # the raw folder does not exist: a value that loads reaches that error; one that does not names its key
    assert_one_line(code, out, err)
    assert f"data.images.{key}" in err or "raw data not found" in err or "id_column is the path column" in err, err


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(paths=st.lists(st.one_of(st.text(max_size=40), st.sampled_from(["../x.png", "/etc/passwd", "", " ", "a/../../b.png",
                                                                        "0/00001.png", "0", "."])), min_size=1, max_size=8))
def test_any_manifest_paths_are_kept_or_quarantined_never_an_exception(tmp_path_factory, paths):
    root = tmp_path_factory.mktemp("manifest")
    folder = root / "pics"
    write_image_folder(folder, rows=20, seed=0, flaws=0)
    listed = images.list_folder(folder)[0]
    pd.DataFrame({"path": [*paths, *listed["path"]], "label": ["0"] * len(paths) + listed["label"].tolist()}).to_csv(
        folder / "m.csv", index=False)
    (root / "params.yaml").write_text(
        'data: {raw: pics/m.csv, id_column: path, target: label, classes: ["0", "1", "2", "3", "4", "5", "6", "7", '
        '"8", "9"], images: {}}\n'
        "validate: {data_docs: false, min_rows: 1, max_bad_row_fraction: 1.0}\ntrain: {model: cnn}\n")
    summary = stages.run("validate", load_params(root / "params.yaml"), root)
    valid = io.read_table(root / "data/validated/valid.parquet")
    quarantine = io.read_table(root / "data/quarantine/validate.parquet")
    assert summary.rows_in == len(paths) + 20 == len(valid) + len(quarantine)
    assert quarantine["reason"].notna().all()
    assert all((folder / p).resolve().is_relative_to(folder.resolve()) for p in valid["path"])
