"""The data stages in bounded memory (issue 16, point 2): validate, clean and split read the
raw data batch by batch, and what they write does not depend on where the batches end. A run
in batches of 400 rows must give the same rows, reasons and reports as a run in one batch."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import stages
from pipeline.config import Params, load_params
from pipeline.data import io
from pipeline.errors import DataError
from tests.conftest import REPO

STAGES = ("validate", "clean", "split")


def project(root: Path, raw: pd.DataFrame | None, *sets: str) -> tuple[Path, Params]:
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    params = load_params(root / "params.yaml", ["validate.data_docs=false", *sets])
    if raw is not None:
        io.write_csv(raw, root / params.data.raw)
    return root, params


def demo_raw(tmp_path: Path) -> pd.DataFrame:
    root, params = project(tmp_path / "demo", None)
    from pipeline.runners.data import make_demo

    make_demo(params, root)
    raw = pd.read_csv(root / params.data.raw)
    # an id repeated far apart (batches 1 and 4): GX sees one batch, the stage must see both
    raw.loc[1200, "id"] = raw.loc[5, "id"]
    return raw


def run_stages(root: Path, params: Params) -> dict[str, object]:
    return {name: stages.run(name, params, root) for name in STAGES}


def table(path: Path) -> pd.DataFrame:
    df = io.read_table(path)
    key = "id" if "id" in df.columns else df.columns[0]
    return df.sort_values([key, *(["reason"] if "reason" in df.columns else [])]).reset_index(drop=True)


def test_batches_give_what_one_batch_gives(tmp_path):
    raw = demo_raw(tmp_path)
    whole, p_whole = project(tmp_path / "whole", raw, "data.batch_rows=100000")
    batched, p_batched = project(tmp_path / "batched", raw, "data.batch_rows=400")
    a, b = run_stages(whole, p_whole), run_stages(batched, p_batched)
    assert a == b
    for name in ("valid", "quarantine", "clean", "removed", "train", "val", "test"):
        left, right = table(stages.path(name, whole)), table(stages.path(name, batched))
        pd.testing.assert_frame_equal(left, right, check_dtype=True)
        assert stages.path(name, batched).is_dir()
    assert len(io.parquet_parts(stages.path("valid", batched))) > 3  # one part per batch
    for report in ("validate_report", "clean_report", "split_report"):
        assert io.read_json(stages.path(report, whole)) == io.read_json(stages.path(report, batched))
    assert io.read_json(stages.path("preprocess", whole)) == io.read_json(stages.path("preprocess", batched))
    quarantine = table(stages.path("quarantine", batched))
    repeated = quarantine[quarantine["id"] == raw.loc[5, "id"]]
    assert len(repeated) == 2 and repeated["reason"].str.contains("id is not unique").all()


def test_derived_keys_count_repeats_across_batches(tmp_path):
    """With no id column, a row's key numbers the identical rows before it in the whole file."""
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"a": rng.integers(0, 3, 300), "b": rng.integers(0, 3, 300), "y": rng.integers(0, 2, 300)})
    sets = ["data.id_column=null", "data.target=y", "data.classes=[0,1]", "data.image_shape=null",
            "data.features=[{name: a, kind: numeric, dtype: int}, {name: b, kind: numeric, dtype: int}]",
            "data.raw=data/raw/rows.csv", "clean.drop_duplicates=false", "train.model=mlp", "preprocess.scale=standard"]
    whole, p_whole = project(tmp_path / "whole", df, *sets, "data.batch_rows=1000")
    batched, p_batched = project(tmp_path / "batched", df, *sets, "data.batch_rows=7")
    stages.run("validate", p_whole, whole)
    stages.run("validate", p_batched, batched)
    left = io.read_table(stages.path("valid", whole))
    right = io.read_table(stages.path("valid", batched))
    assert left["_d2d_row_key"].tolist() == right["_d2d_row_key"].tolist()
    assert left["_d2d_row_key"].is_unique


def test_raw_may_be_a_folder_of_parts(tmp_path):
    raw = demo_raw(tmp_path)
    one, p_one = project(tmp_path / "one", raw)
    parts, p_parts = project(tmp_path / "parts", None, "data.raw=data/raw/digits")
    folder = parts / "data/raw/digits"
    folder.mkdir(parents=True)
    for i, start in enumerate(range(0, len(raw), 500)):
        io.write_csv(raw.iloc[start:start + 500], folder / f"part-{i}.csv")
    assert run_stages(one, p_one)["validate"].rows_in == run_stages(parts, p_parts)["validate"].rows_in == len(raw)
    pd.testing.assert_frame_equal(table(stages.path("train", one)), table(stages.path("train", parts)))
    (folder / "extra.parquet").write_bytes(b"")
    with pytest.raises(DataError, match="mixes CSV and Parquet"):
        stages.run("validate", p_parts, parts)


def test_a_failed_gate_leaves_no_valid_rows_but_keeps_the_quarantine(tmp_path):
    raw = demo_raw(tmp_path).assign(label=3)
    root, params = project(tmp_path / "p", raw, "data.batch_rows=200")
    with pytest.raises(DataError, match="1 class"):
        stages.run("validate", params, root)
    assert not stages.path("valid", root).exists()
    assert io.parquet_rows(stages.path("quarantine", root)) > 0
    assert not [p for p in stages.path("valid", root).parent.iterdir() if p.name.startswith(".")]


def test_dvc_md5_of_a_folder_is_what_dvc_records(tmp_path):
    """A folder's md5 as `dvc add` computes it (dvc_data's Tree), checked against dvc_data itself."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    folder = tmp_path / "raw"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.csv").write_text("x\n1\n")
    (folder / "sub" / "b.csv").write_text("x\n2\n")
    fs = LocalFileSystem()
    odb = HashFileDB(fs, str(tmp_path / "cache"))
    _, meta, obj = build(odb, str(folder), fs, "md5")
    assert io.dvc_md5(folder) == obj.hash_info.value
