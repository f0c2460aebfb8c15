"""A data.raw outside the project is read only when the user names it on the command line
(--set data.raw=PATH), never because a params file (which may be generated or shared) says so."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_params
from pipeline.errors import ConfigError
from pipeline.project import raw_path
from tests.conftest import REPO
from tests.unit.test_cli import d2d, one_line_error


def project_with_raw(root: Path, raw: str) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["raw"] = raw
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root / "params.yaml"


@pytest.mark.parametrize("raw", ["/etc/passwd", "../outside.csv", "data/../../outside.csv"])
def test_a_params_file_cannot_point_outside_the_project(tmp_path, raw):
    root = tmp_path / "project"
    params = load_params(project_with_raw(root, raw))
    with pytest.raises(ConfigError, match=r"data\.raw .* is outside the project folder.*--set data\.raw="):
        raw_path(params, root)


def test_a_symlink_out_of_the_project_is_outside(tmp_path):
    root = tmp_path / "project"
    params = load_params(project_with_raw(root, "data/raw/digits.csv"))
    (tmp_path / "elsewhere.csv").write_text("id\n1\n")
    (root / "data/raw").mkdir(parents=True)
    os.symlink(tmp_path / "elsewhere.csv", root / "data/raw/digits.csv")
    with pytest.raises(ConfigError, match="outside the project"):
        raw_path(params, root)


def test_inside_the_project_and_named_explicitly_are_allowed(tmp_path):
    root = tmp_path / "project"
    path = project_with_raw(root, "data/raw/digits.csv")
    assert raw_path(load_params(path), root) == root / "data/raw/digits.csv"
    (root / "data/raw").mkdir(parents=True)
    os.symlink("digits.csv", root / "data/raw/link.csv")  # a link that stays inside
    assert raw_path(load_params(path, ["data.raw=data/raw/link.csv"]), root).name == "link.csv"
    outside = tmp_path / "shared/customers.csv"
    named = load_params(path, [f"data.raw={outside}"])
    assert named.raw_named_explicitly and raw_path(named, root) == outside


def test_the_cli_refuses_it_in_one_line_and_reads_it_when_named(tmp_path):
    root = tmp_path / "project"
    project_with_raw(root, str(tmp_path / "digits.csv"))
    assert d2d("data", "demo", "--set", f"data.raw={tmp_path / 'digits.csv'}", cwd=root).returncode == 0
    one_line_error(d2d("stage", "validate", cwd=root), "data.raw", "outside the project folder", "--set data.raw=")
    assert not (root / "data/validated").exists()
    named = d2d("stage", "validate", "--set", f"data.raw={tmp_path / 'digits.csv'}", cwd=root)
    assert named.returncode == 0, named.stderr


def test_init_params_writes_a_path_in_the_project(tmp_path):
    root = tmp_path / "project"
    root.mkdir()
    shutil.copy(REPO / "tests/unit/test_raw_path.py", root / "unused.txt")  # a project folder with things in it
    import pandas as pd

    frame = pd.DataFrame({"x": range(60), "y": [0, 1] * 30})
    frame.to_csv(root / "customers.csv", index=False)
    frame.to_csv(tmp_path / "outside.csv", index=False)
    # the README flow: the CSV in the project folder, named relatively or absolutely
    for data in ("customers.csv", str(root / "customers.csv")):
        out = d2d("init-params", "--data", data, "--target", "y", "--force", cwd=root)
        assert out.returncode == 0, out.stderr
        assert load_params(root / "params.yaml").data.raw == Path("customers.csv")
    # a file outside: the params name its place in the project, and the user is told what to do
    out = d2d("init-params", "--data", "../outside.csv", "--target", "y", "--force", cwd=root)
    assert out.returncode == 0, out.stderr
    assert load_params(root / "params.yaml").data.raw == Path("data/raw/outside.csv")
    told = " ".join(out.stdout.split())
    assert "outside the project folder" in told and "data/raw/outside.csv" in told and "--set data.raw=" in told
