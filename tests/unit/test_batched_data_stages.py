"""The data stages in bounded memory (issue 16, point 2): validate, clean and split read the
raw data batch by batch, and what they write does not depend on where the batches end. A run
in batches of 400 rows must give the same rows, reasons and reports as a run in one batch."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import stages
from pipeline.config import Params, load_params
from pipeline.data import io
from pipeline.errors import DataError
from tests.conftest import REPO, make_frame
from tests.unit.test_cli import assert_one_line, main_in_process  # at import: not under @given

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
    assert len(io.data_parts(stages.path("valid", batched))) > 3  # one part per batch
    for report in ("validate_report", "clean_report", "split_report"):
        assert io.read_json(stages.path(report, whole)) == io.read_json(stages.path(report, batched))
    assert io.read_json(stages.path("preprocess", whole)) == io.read_json(stages.path("preprocess", batched))
    quarantine = table(stages.path("quarantine", batched))
    repeated = quarantine[quarantine["id"] == raw.loc[5, "id"]]
    assert len(repeated) == 2 and repeated["reason"].str.contains("id is not unique").all()


# Two integer features and a label, no id column: many rows repeat, so derived keys count them.
NO_ID = ["data.id_column=null", "data.target=y", "data.classes=[0,1]", "data.image_shape=null",
         "data.features=[{name: a, kind: numeric, dtype: int}, {name: b, kind: numeric, dtype: int}]",
         "train.model=mlp", "preprocess.scale=standard"]


def no_id_rows() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame({"a": rng.integers(0, 3, 300), "b": rng.integers(0, 3, 300), "y": rng.integers(0, 2, 300)})


def test_derived_keys_count_repeats_across_batches(tmp_path):
    """With no id column, a row's key numbers the identical rows before it in the whole file."""
    df = no_id_rows()
    sets = [*NO_ID, "data.raw=data/raw/rows.csv", "clean.drop_duplicates=false"]
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


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_the_monitor_appends_a_part_and_rewrites_nothing(tmp_path, monkeypatch, tiny_data_params, tiny_schema, suffix):
    """A raw folder of parts grows by one new part per appended batch (issue 16, point 3): the
    existing parts keep their bytes, the intent's md5 is the folder's md5 DVC will record, and
    the known-row index reads only the new part."""
    from pipeline import monitor
    from pipeline.data.keys import KnownRows

    folder = tmp_path / "data/raw/tiny"
    folder.mkdir(parents=True)
    frame = make_frame(tiny_schema, 40)
    for i in (0, 1):
        part = frame.iloc[20 * i:20 * (i + 1)]
        part.to_csv(folder / f"part-{i}.csv", index=False) if suffix == ".csv" else part.to_parquet(
            folder / f"part-{i}.parquet", index=False)
    params = Params(data=tiny_data_params.model_copy(update={"raw": Path("data/raw/tiny")}),
                    validate={"min_rows": 5, "data_docs": False}, train={"model": "mlp"})
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}
    known = monitor.known_ids(params, tmp_path)
    assert len(known) == 40 and known.isin(pd.Series(["39", "40"])).tolist() == [True, False]

    new = make_frame(tiny_schema, 5).assign(id=range(40, 45))
    intent = monitor.stage_append(new, params, tmp_path)
    assert set(folder.iterdir()) == set(before)  # staged beside the folder, not in it
    done = monitor.install_append(intent, params, tmp_path)
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in before} == before
    added = sorted(set(folder.iterdir()) - set(before))
    assert len(added) == 1 and added[0].suffix == suffix and io.data_parts(folder)[-1] == added[0]
    assert done["md5_after"] == io.dvc_md5(folder) != done["md5_before"]
    assert io.read_table(folder)["id"].tolist() == list(range(45))
    assert not monitor.append_abandoned(intent, params, tmp_path)

    def no_rebuild(*_: object) -> KnownRows:
        raise AssertionError("the index was rebuilt instead of extended")

    monkeypatch.setattr(KnownRows, "build", classmethod(no_rebuild))
    known = monitor.known_ids(params, tmp_path)
    assert len(known) == 45 and known.isin(pd.Series(["44"])).all()


NAMES = st.text(st.characters(whitelist_categories=("Ll", "Lu", "Nd"), whitelist_characters="-_. "), min_size=1,
                max_size=12)
SUFFIXES = st.sampled_from([".csv", ".parquet", ".tsv", ".txt", ".json", ""])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.tuples(NAMES, SUFFIXES, st.one_of(st.binary(max_size=200), st.just(b"id,x\n1,2\n"))),
                      min_size=0, max_size=4))
def test_any_folder_of_parts_is_one_line_and_exit_2(monkeypatch, capsys, tmp_path_factory, parts):
    """Hostile raw folders (any names, any bytes, mixed formats, none at all): validate
    answers with one line and exit 2, never a traceback (the params want the digits'
    columns, so no folder generated here can pass)."""
    root = tmp_path_factory.mktemp("parts")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    folder = root / "data/raw/parts"
    folder.mkdir(parents=True)
    for name, suffix, data in parts:
        (folder / f"{name}{suffix}").write_bytes(data)
    code, out, err = main_in_process(monkeypatch, capsys, root, "stage", "validate", "--set=data.raw=data/raw/parts",
                                     "--set=validate.data_docs=false")
    assert_one_line(code, out, err)


def test_shared_copy_is_made_once_per_version(tmp_path):
    """train.storage_path: a split folder is copied once per content md5; a copy without its
    marker (interrupted) is made again. A local folder stands in for s3:// (no bucket here)."""
    split = tmp_path / "train.parquet"
    split.mkdir()
    for i in range(2):
        pd.DataFrame({"x": [i, i + 1]}).to_parquet(split / f"part-{i}.parquet")
    storage = tmp_path / "shared"
    target = Path(io.shared_copy(split, str(storage)))
    assert target.parent.parent == storage / "datasets" and target.name == "train.parquet"
    pd.testing.assert_frame_equal(io.read_table(target), io.read_table(split))
    stamp = (target / "part-0.parquet").stat().st_mtime_ns
    assert Path(io.shared_copy(split, str(storage))) == target
    assert (target / "part-0.parquet").stat().st_mtime_ns == stamp  # not copied again
    (target.parent / "COMPLETE").unlink()
    (target / "part-1.parquet").unlink()
    assert Path(io.shared_copy(split, str(storage))) == target and (target / "part-1.parquet").is_file()
    pd.DataFrame({"x": [9]}).to_parquet(split / "part-2.parquet")  # a new version, a new copy
    assert Path(io.shared_copy(split, str(storage))) != target


def test_leakage_across_batches_fails_the_split_and_names_the_rows(tmp_path):
    """Duplicates kept (clean.drop_duplicates: false) land in two splits: the split stage
    fails naming the first leaked rows' ids, and writes no split."""
    raw = demo_raw(tmp_path)
    root, params = project(tmp_path / "p", raw, "data.batch_rows=400", "clean.drop_duplicates=false")
    stages.run("validate", params, root)
    stages.run("clean", params, root)
    with pytest.raises(DataError, match=r"rows share their exact features with a row in another split \(id \d+, \d+, \d+, \.\.\.\)"):
        stages.run("split", params, root)
    assert not any(stages.path(name, root).exists() for name in ("train", "val", "test"))


def _parts(root: Path, raw: pd.DataFrame, rows: int) -> None:
    folder = root / "data/raw/parts"
    folder.mkdir(parents=True)
    for i, start in enumerate(range(0, len(raw), rows)):
        io.write_csv(raw.iloc[start:start + rows], folder / f"part-{i}.csv")


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance for the module's engine=ray tests: the stages use the Ray that is up."""
    from pipeline.config import TrainParams
    from pipeline.ray_runtime import ray_session

    with ray_session(TrainParams(), cpus_needed=2):
        yield


def test_the_data_stages_on_ray_actors_give_what_one_process_gives(tmp_path, local_ray):
    """data.engine=ray (what auto picks on a cluster): Ray actors on a local Ray instance take
    the part files side by side in all three stages (validate with a GX context each). Every
    output, the quarantines with their reasons (an id repeated across parts, a duplicate that
    names a row in an earlier part), the reports and the fitted preprocessing are the one
    process's, in the same order."""
    raw = demo_raw(tmp_path)
    # a duplicate far from its first row: clean's actor for the later part must name the id
    raw.loc[1250, [c for c in raw.columns if c != "id"]] = raw.loc[7, [c for c in raw.columns if c != "id"]]
    sets = ("data.raw=data/raw/parts", "data.batch_rows=300")
    local, p_local = project(tmp_path / "local", None, *sets, "data.engine=local")
    on_ray, p_ray = project(tmp_path / "ray", None, *sets, "data.engine=ray", "validate.data_docs=true")
    for root in (local, on_ray):
        _parts(root, raw, 450)
    from dataclasses import replace

    ran = run_stages(local, p_local), run_stages(on_ray, p_ray)
    assert ran[0]["validate"] == replace(ran[1]["validate"], data_docs=None)
    assert ran[0]["clean"] == ran[1]["clean"] and ran[0]["split"] == ran[1]["split"]
    for name in ("valid", "quarantine", "clean", "removed", "train", "val", "test"):
        pd.testing.assert_frame_equal(io.read_table(stages.path(name, local)), io.read_table(stages.path(name, on_ray)))
    assert len(io.data_parts(stages.path("train", on_ray))) > 3  # the actors' parts, one per input part at least
    for report in ("validate_report", "clean_report", "split_report", "preprocess"):
        left, right = (io.read_json(stages.path(report, r)) for r in (local, on_ray))
        assert left == {k: v for k, v in right.items() if k != "data_docs"}
    quarantine = io.read_table(stages.path("quarantine", on_ray))
    assert (quarantine["id"] == raw.loc[5, "id"]).sum() == 2  # rows 5 and 1200: parts 0 and 2
    removed = io.read_table(stages.path("removed", on_ray))
    assert removed.loc[removed["id"] == raw.loc[1250, "id"], "reason"].tolist() == [f"duplicate of id {raw.loc[7, 'id']}"]
    index = (stages.path("data_docs", on_ray) / "index.html").read_text()
    assert "worker-0/index.html" in index and (stages.path("data_docs", on_ray) / "worker-0" / "index.html").exists()


def test_validate_on_ray_counts_derived_keys_over_the_whole_dataset(tmp_path, local_ray):
    df = no_id_rows()
    sets = [*NO_ID, "data.raw=data/raw/parts", "data.batch_rows=40"]
    local, p_local = project(tmp_path / "local", None, *sets, "data.engine=local")
    on_ray, p_ray = project(tmp_path / "ray", None, *sets, "data.engine=ray")
    for root in (local, on_ray):
        _parts(root, df, 70)
    stages.run("validate", p_local, local)
    stages.run("validate", p_ray, on_ray)
    keys = [io.read_table(stages.path("valid", r))["_d2d_row_key"] for r in (local, on_ray)]
    assert keys[0].tolist() == keys[1].tolist() and keys[1].is_unique


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 40), max_size=12), floats=st.lists(st.booleans(), max_size=12),
       rows=st.integers(1, 60))
def test_coalesced_batches_keep_every_row_and_type(sizes, floats, rows):
    """Small batches joined up to `rows` rows: the same rows in the same order, no batch over
    `rows` unless it came that way, and a batch whose types differ never joined (no value is
    converted: an int column stays int beside a float one)."""
    batches = [pd.DataFrame({"a": np.arange(n, dtype="float64" if i < len(floats) and floats[i] else "int64")})
               for i, n in enumerate(sizes)]
    out = list(io.coalesced(iter(batches), rows))
    joined = pd.concat(out, ignore_index=True) if out else pd.DataFrame({"a": []})
    expected = [v for b in batches for v in b["a"].tolist()]
    assert joined["a"].tolist() == expected and sum(map(len, out)) == len(expected)
    assert all(len(b) <= rows or len(b) in {len(x) for x in batches} for b in out)
    assert len(out) <= len(batches)
    quarters = [pd.DataFrame({"a": np.arange(25)})] * 4
    assert [len(b) for b in io.coalesced(iter(quarters), 50)] == [50, 50]
    assert [len(b) for b in io.coalesced(iter([*quarters[:2], quarters[0].head(1)]), 50)] == [50, 1]
    for b in out:  # each output is a run of inputs of one type
        assert b["a"].dtype in (np.dtype("int64"), np.dtype("float64"))
    ints = [b for b in out if b["a"].dtype == "int64"]
    assert sum(map(len, ints)) == sum(len(b) for b in batches if b["a"].dtype == "int64")
