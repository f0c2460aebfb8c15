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
    from app import cli
    from pipeline import stages

    from dataclasses import replace

    def broken(params, files):
        raise RuntimeError("the disk is full\nmore detail")

    monkeypatch.setattr(stages, "STAGES", tuple(replace(s, run=broken) if s.name == "clean" else s for s in stages.STAGES))
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


def test_the_image_demo_writes_a_folder_once_and_never_over_one(project):
    out = d2d("data", "demo", "--kind", "images", "--out", "imgs", "--set", "data.demo.rows=40", cwd=project)
    assert out.returncode == 0, out.stderr
    files = [p for p in (project / "imgs").rglob("*") if p.is_file()]
    assert len(files) == 40 + 14 and {p.parent.name for p in files} == {str(d) for d in range(10)}
    assert "flawed   2 files: truncated" in out.stdout
    before = {p: p.read_bytes() for p in files}
    one_line_error(d2d("data", "demo", "--kind", "images", "--out", "imgs", cwd=project), "imgs already exists")
    assert {p: p.read_bytes() for p in files} == before
    one_line_error(d2d("data", "demo", "--kind", "video", cwd=project), "unknown demo kind 'video'")


# --- whatever the user types is printed as itself: one line, exit 2, never a traceback ---

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# what a shell can pass: any text but NUL (argv cannot hold it) and lone surrogates
ANY_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=60)
MARKUP = st.sampled_from(["[", "]", "[/]", "[bold]", "[/x]", "[red]a[/red]", "[link=x]", "\\[", ":smile:", "\n", "\r"])
HOSTILE = st.lists(st.one_of(ANY_TEXT, MARKUP), min_size=1, max_size=4).map("".join)


def main_in_process(monkeypatch, capsys, cwd: Path, *args: str) -> tuple[int, str, str]:
    from app import cli

    monkeypatch.chdir(cwd)
    monkeypatch.setattr("sys.argv", ["d2d", *args])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


def assert_one_line(code: int, out: str, err: str, *fragments: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in out + err
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize("name", ["a[b].yaml", "[/x].yaml", "x[/bold]y.yaml", "[red]p.yaml", "\\[x].yaml"])
def test_a_params_path_with_brackets_is_named_as_it_is(monkeypatch, capsys, tmp_path, name):
    code, out, err = main_in_process(monkeypatch, capsys, tmp_path, "stage", "validate", f"--params={name}")
    assert_one_line(code, out, err, f"params file not found: {name}")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=HOSTILE)
def test_any_params_path_is_one_line_and_exit_2(monkeypatch, capsys, project, text):
    assert_one_line(*main_in_process(monkeypatch, capsys, project, "stage", "validate", f"--params={text}"))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=HOSTILE)
def test_any_set_value_is_one_line_and_exit_2(monkeypatch, capsys, project, text):
    # no raw data in the project: an override that happens to be valid ends at "raw data not found"
    assert_one_line(*main_in_process(monkeypatch, capsys, project, "stage", "validate", f"--set={text}"))
    assert_one_line(*main_in_process(monkeypatch, capsys, project, "stage", "validate",
                                     f"--set=validate.max_bad_row_fraction={text}"))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=HOSTILE)
def test_any_data_path_is_one_line_and_exit_2(monkeypatch, capsys, project, text):
    assert_one_line(*main_in_process(monkeypatch, capsys, project, "stage", "validate", f"--set=data.raw={text}"))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(["data.batch_rows", "preprocess.fit_rows", "train.storage_path", "train.ingest_memory_mb",
                           "data.engine"]),
       text=st.one_of(HOSTILE, st.integers(-10**20, 10**20).map(str)))
def test_any_streaming_param_value_is_one_line_and_exit_2(monkeypatch, capsys, project, key, text):
    """The data plane's keys (issue 16): a bad value names the key; a good one ends at the
    missing raw data, one line either way."""
    assert_one_line(*main_in_process(monkeypatch, capsys, project, "stage", "validate", f"--set={key}={text}"))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=HOSTILE.filter(lambda t: t not in ("validate", "clean", "split", "train", "evaluate", "register")
                           and not t.startswith("-")))
def test_any_stage_name_is_one_line_and_exit_2(monkeypatch, capsys, project, text):
    """The name is looked up in the stage table; any other is refused with the table's choices
    (data-version, the flow's own step, is not a DVC stage either)."""
    assert_one_line(*main_in_process(monkeypatch, capsys, project, "stage", text),
                    "choose one of: validate, clean, split, train, evaluate, register")


def test_the_flows_own_step_is_not_a_dvc_stage(monkeypatch, capsys, project):
    assert_one_line(*main_in_process(monkeypatch, capsys, project, "stage", "data-version"),
                    "'data-version' is a step of the flow, not a DVC stage")


@pytest.mark.parametrize("name", ["a" * 300 + ".yaml", "x/" * 3000 + "p.yaml"])
def test_an_impossible_params_path_is_a_plain_error(monkeypatch, capsys, tmp_path, name):
    assert_one_line(*main_in_process(monkeypatch, capsys, tmp_path, "stage", "validate", f"--params={name}"))


def test_a_params_file_that_is_not_text_is_a_plain_error(monkeypatch, capsys, tmp_path):
    (tmp_path / "params.yaml").write_bytes(b"\xff\xfe\x00\x81 binary")
    assert_one_line(*main_in_process(monkeypatch, capsys, tmp_path, "stage", "validate"), "params.yaml")


def test_the_temporary_prefect_server_runs_without_a_long_lived_server_s_services(monkeypatch):
    """`d2d run`, `monitor` and `predict` turn off the scheduler, late runs, automations ... of the
    temporary server Prefect starts when no PREFECT_API_URL is set, but never a value the
    user's environment already gives."""
    from prefect.settings import Settings

    from app import cli

    for service in cli.TEMPORARY_SERVER_OFF:  # set, then removed: monkeypatch undoes both, so
        monkeypatch.setenv(f"PREFECT_SERVER_SERVICES_{service}_ENABLED", "unset")  # what the
        monkeypatch.delenv(f"PREFECT_SERVER_SERVICES_{service}_ENABLED")  # helper sets goes too
    monkeypatch.setenv("PREFECT_SERVER_SERVICES_FOREMAN_ENABLED", "true")  # the user's own
    cli.lean_temporary_server()
    services = Settings().server.services  # what a server started from this environment reads
    assert not services.scheduler.enabled and not services.late_runs.enabled and not services.triggers.enabled
    assert not services.repossessor.enabled and not services.db_vacuum.enabled
    assert services.foreman.enabled
    assert services.event_persister.enabled and services.task_run_recorder.enabled  # the run's own records


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(["train.pretrained", "train.freeze", "train.unfreeze_epoch", "train.backbone_lr_scale"]),
       text=st.one_of(HOSTILE, st.integers(-10**20, 10**20).map(str)))
def test_any_transfer_learning_value_is_one_line_and_exit_2(monkeypatch, capsys, project, key, text):
    """Issue 17's params (with a resnet, where they apply): a bad value names the key, a good
    one ends at the missing raw data, one line either way."""
    assert_one_line(*main_in_process(monkeypatch, capsys, project, "stage", "validate", "--set=train.model=resnet18",
                                     f"--set={key}={text}"))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=HOSTILE.filter(lambda t: t not in ("table", "images") and not t.startswith("-")))
def test_any_demo_kind_is_one_line_and_exit_2(monkeypatch, capsys, project, kind):
    assert_one_line(*main_in_process(monkeypatch, capsys, project, "data", "demo", f"--kind={kind}"), "unknown demo kind")
    assert not (project / "data").exists()  # nothing written


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(["params.yaml", ".", "..", "/", "/proc/self", "params.yaml/x"]) | HOSTILE.filter(
    lambda t: not t.startswith("-")))
def test_any_demo_out_folder_writes_a_new_folder_or_is_one_line_and_exit_2(monkeypatch, capsys, project, name):
    """--out is a path the user types: an existing file or folder is refused (a user's folder
    is never changed), an impossible one is one line and exit 2, and otherwise the folder is
    written."""
    import shutil

    before = {p: p.read_bytes() for p in project.rglob("*") if p.is_file()}
    out = project / name
    existed = out.exists()
    code, stdout, err = main_in_process(monkeypatch, capsys, project, "data", "demo", "--kind=images",
                                        f"--out={name}", "--set=data.demo.rows=20")
    assert not [p for p in project.iterdir() if p.name.startswith(".")]  # no half-written folder left
    if existed or code:
        assert_one_line(code, stdout, err)
    else:
        assert code in (0, None) and sum(1 for p in out.rglob("*") if p.is_file()) == 20 + 14
        shutil.rmtree(out)
    assert {p: p.read_bytes() for p in project.rglob("*") if p.is_file() and p in before} == before
