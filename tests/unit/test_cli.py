"""The CLI as a user runs it: a subprocess of the installed `d2d` script."""

import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipeline.data.io import file_md5
from tests.conftest import REPO

D2D = str(Path(sys.executable).with_name("d2d"))


def d2d(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([D2D, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


def test_help_lists_the_commands(project):
    out = d2d("--help", cwd=project)
    assert out.returncode == 0
    for command in ("run", "stage", "data"):
        assert command in out.stdout


def one_line_error(out: subprocess.CompletedProcess, *fragments: str) -> None:
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("error:")
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in out.stderr + out.stdout


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["stage", "validate", "--params", "nope.yaml"], ["params file not found", "nope.yaml"]),
        (["run", "--set", "train.epocs=3"], ["unknown key 'train.epocs'"]),
        (["run", "--set", "split.train=2"], ["split.train"]),
        (["stage", "validate"], ["raw data not found", "d2d data demo"]),
        (["stage", "clean"], ["not found", "valid.parquet"]),
        (["stage", "fly"], ["unknown stage 'fly'"]),
    ],
)
def test_user_errors_are_one_line_and_exit_2(project, args, fragments):
    one_line_error(d2d(*args, cwd=project), *fragments)


def test_missing_target_column(project):
    assert d2d("data", "demo", cwd=project).returncode == 0
    raw = project / "data/raw/digits.csv"
    pd.read_csv(raw).drop(columns=["label"]).to_csv(raw, index=False)
    before = file_md5(raw)
    one_line_error(d2d("stage", "validate", cwd=project), "lacks required column", "label")
    assert file_md5(raw) == before  # raw data is never modified


def test_debug_shows_the_traceback(project):
    out = d2d("--debug", "stage", "validate", "--params", "nope.yaml", cwd=project)
    assert out.returncode != 0
    assert "Traceback" in out.stderr and "ConfigError" in out.stderr


def test_validation_gate_failure_keeps_quarantine(project):
    """Too many bad rows: the run stops with exit 2, and the bad rows are kept with reasons."""
    assert d2d("data", "demo", cwd=project).returncode == 0
    out = d2d("stage", "validate", "--set", "validate.max_bad_row_fraction=0.01", cwd=project)
    one_line_error(out, "validation failed", "validate.max_bad_row_fraction=0.01")
    quarantine = pd.read_parquet(project / "data/quarantine/validate.parquet")
    assert len(quarantine) == 41 and quarantine["reason"].str.len().gt(0).all()
    assert not (project / "data/validated/valid.parquet").exists()


def test_a_step_that_fails_for_another_reason_is_one_line_and_exit_1(monkeypatch, capsys):
    from pipeline import cli, stages

    def broken(params, root):
        raise RuntimeError("the disk is full\nmore detail")

    monkeypatch.setitem(stages.STAGES, "clean", broken)
    monkeypatch.setattr("sys.argv", ["d2d", "stage", "clean", "--params", str(REPO / "params.yaml")])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "RuntimeError: the disk is full" in err[0] and "--debug" in err[0]
    monkeypatch.setattr("sys.argv", ["d2d", "stage", "clean", "--debug", "--params", str(REPO / "params.yaml")])
    with pytest.raises(RuntimeError):
        cli.main()


def test_simulate_drift_writes_a_labelled_batch_to_the_inbox(project):
    out = d2d("simulate-drift", "--kind", "thicken", "--strength", "0.4", "--rows", "25", "--seed", "3", cwd=project)
    assert out.returncode == 0, out.stderr
    batch = pd.read_csv(project / "data/inbox/batch-thicken-0.4-seed3.csv")
    assert len(batch) == 25 and batch["id"].is_unique and batch["label"].between(0, 9).all()
    one_line_error(d2d("simulate-drift", "--kind", "blur", cwd=project), "unknown drift kind 'blur'")
