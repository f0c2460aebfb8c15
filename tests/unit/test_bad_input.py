"""Every bad input a user can hand d2d gets one line naming the problem and exit code 2,
no traceback, and nothing written over. Each case runs the real `d2d` in a subprocess."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.data.io import file_md5
from tests.conftest import REPO
from tests.unit.test_cli import d2d, one_line_error


@pytest.fixture
def project(tmp_path: Path) -> Path:
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    assert d2d("data", "demo", cwd=tmp_path).returncode == 0
    return tmp_path


def tabular(path: Path, n: int = 60, **columns) -> Path:
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"id": range(n), "x": rng.normal(size=n), "y": rng.integers(0, 2, n)})
    for name, values in columns.items():
        df[name] = values
    df.to_csv(path, index=False)
    return path


def set_raw(project: Path, transform) -> Path:
    raw = project / "data/raw/digits.csv"
    transform(raw)
    return raw


def outputs(project: Path) -> list[Path]:
    return sorted(p for p in (project / "data").rglob("*") if p.is_file() and "raw" not in p.parts)


CASES = {
    "missing file": (lambda p: p.unlink(), ["raw data not found", "dvc pull"]),
    "empty file": (lambda p: p.write_bytes(b""), ["is empty"]),
    "not a CSV": (lambda p: p.write_bytes(b'id,a\n1,"unclosed\n' + bytes(range(256)) * 4), ["is not a valid CSV file"]),
    "header only": (lambda p: p.write_text(p.read_text().splitlines()[0] + "\n"), ["has no rows"]),
    "no target column": (lambda p: pd.read_csv(p).drop(columns="label").to_csv(p, index=False), ["lacks required column", "label"]),
    "single class": (lambda p: pd.read_csv(p).assign(label=3).to_csv(p, index=False), ["has 1 class(es)"]),
    "numeric column of text": (
        lambda p: pd.read_csv(p).assign(pixel_5="dark").to_csv(p, index=False),
        ["column pixel_5 is declared numeric but 100% of its values are text"],
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_raw_data(project, case):
    transform, fragments = CASES[case]
    raw = set_raw(project, transform)
    before = file_md5(raw) if raw.exists() else None
    one_line_error(d2d("stage", "validate", cwd=project), *fragments)
    assert (file_md5(raw) if raw.exists() else None) == before  # raw data is never modified
    assert not (project / "data/validated/valid.parquet").exists()


def test_bad_parquet(project):
    (project / "bad.parquet").write_bytes(b"PAR1 not really")
    one_line_error(d2d("init-params", "--data", "bad.parquet", "--target", "y", "--out", "p.yaml", cwd=project), "not a valid Parquet file")
    assert not (project / "p.yaml").exists()


@pytest.mark.parametrize(
    "rows, fragment",
    [(12, "class 0 has 2 rows: too few to stratify"), (3, "too few")],
)
def test_too_few_rows_to_split(project, rows, fragment):
    # the first `rows` digits, none corrupted, so validation passes and the split is what fails
    overrides = [f"data.demo.rows=20", "data.demo.corrupt_fraction=0", "validate.min_rows=1"]
    assert d2d("data", "demo", *sum((["--set", o] for o in overrides), []), cwd=project).returncode == 0
    raw = project / "data/raw/digits.csv"
    pd.read_csv(raw).head(rows).to_csv(raw, index=False)
    sets = sum((["--set", o] for o in overrides), [])
    assert d2d("stage", "validate", *sets, cwd=project).returncode == 0
    assert d2d("stage", "clean", *sets, cwd=project).returncode == 0
    one_line_error(d2d("stage", "split", *sets, cwd=project), fragment)
    assert not (project / "data/split/train.parquet").exists()


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda r: r["split"].update(train=0.8), "train + val + test must be 1.0"),
        (lambda r: r["clean"].update(dedupe=True), "unknown key 'clean.dedupe'"),
        (lambda r: r["validate"].update(engine="ray"), "unknown key 'validate.engine': it is now data.engine"),
    ],
)
def test_bad_params_file(project, mutate, fragment):
    raw = yaml.safe_load((project / "params.yaml").read_text())
    mutate(raw)
    (project / "bad.yaml").write_text(yaml.safe_dump(raw))
    one_line_error(d2d("run", "--params", "bad.yaml", cwd=project), fragment)
    assert outputs(project) == []


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--target", "nope"], "target column 'nope' is not in the file"),
        (["--target", "same"], "has a single class"),
        (["--target", "y", "--id", "nope"], "id column 'nope' is not in the file"),
        (["--target", "y", "--image-shape", "1,x"], "expected C,H,W"),
    ],
)
def test_init_params_bad_input(tmp_path, args, fragment):
    tabular(tmp_path / "t.csv", same=1)
    one_line_error(d2d("init-params", "--data", "t.csv", *args, cwd=tmp_path), fragment)
    assert not (tmp_path / "params.yaml").exists()


def test_init_params_does_not_overwrite(tmp_path):
    tabular(tmp_path / "t.csv")
    (tmp_path / "params.yaml").write_text("mine\n")
    one_line_error(d2d("init-params", "--data", "t.csv", "--target", "y", cwd=tmp_path), "exists; pass --force")
    assert (tmp_path / "params.yaml").read_text() == "mine\n"
