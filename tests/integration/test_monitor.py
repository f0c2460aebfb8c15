"""The drift monitor closing the loop, with the real parts: a champion trained by the training
flow (Ray, MLflow on SQLite, GX, DVC on a temporary Git repository), the Prefect test
harness, and batches from `d2d simulate-drift`'s generator. Nothing is mocked.

The order matters and is the story: no-drift batches rarely alarm, a re-run does nothing, a
corrupted batch is turned away, a shifted batch retrains exactly once."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest

from pipeline.config import load_params
from pipeline.data import io
from pipeline.data.demo import digits_frame
from pipeline.data.schema import schema_from_params
from pipeline.data.simulate import simulate_batch
from pipeline.runners.data import make_demo
from tests.integration.test_end_to_end import GIT_ID, run, small_project

pytestmark = pytest.mark.integration

RAW = "data/raw/digits.csv"


@pytest.fixture(scope="module")
def project(tmp_path_factory, prefect_harness):
    """A DVC + Git project whose champion the training flow trained (version 1)."""
    from flows.training import training_flow

    root = small_project(tmp_path_factory.mktemp("monitor"))
    saved = {k: os.environ.get(k) for k in GIT_ID}
    os.environ.update(GIT_ID)  # the monitor commits the new data version's .dvc file
    make_demo(load_params(root / "params.yaml"), root)
    run(["git", "init", "-q"], root)
    run(["dvc", "init", "-q"], root)
    run(["dvc", "remote", "add", "-d", "local", str(root.parent / "remote")], root)
    run(["dvc", "add", "-q", RAW], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-q", "-m", "project"], root)
    trained = training_flow(params_path="params.yaml", root=str(root))
    assert trained.register.promoted
    yield root
    for key, value in saved.items():
        os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def dataset_files(path: Path) -> dict[str, bytes]:
    """The raw dataset's files, by the name each has as a part (a single file: the name it keeps
    as the first part of the folder it becomes on its first append)."""
    if path.is_dir():
        return {p.relative_to(path).as_posix(): p.read_bytes() for p in io.data_parts(path)}
    return {io.first_part_name(path): path.read_bytes()}


def batches(root: Path, inbox: str, kind: str, strength: float, seeds: range, rows: int = 300) -> list[Path]:
    params = load_params(root / "params.yaml")
    schema = schema_from_params(params.data)
    source = digits_frame(schema).head(params.data.demo.rows)  # what `d2d simulate-drift` samples
    return [io.write_csv(simulate_batch(source, schema, kind, strength, rows, seed, first_id=1_000_000 + seed * rows),
                         root / inbox / f"{kind}-{seed}.csv") for seed in seeds]


def monitor(root: Path, *overrides: str) -> dict:
    from flows.monitor import monitor_flow

    return monitor_flow(params_path="params.yaml", root=str(root), overrides=["monitor.retrain=flow", *overrides])


def versions(root: Path) -> list:
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    return MlflowClient().search_model_versions("name = 'd2d-digits'")


def test_no_drift_batches_rarely_retrain_and_a_rerun_does_nothing(project):
    inbox = "data/inbox-none"
    batches(project, inbox, "none", 0.0, range(100, 120))
    # No cooldown and no rate limit: every false alarm would retrain, so retrains count alarms.
    free = [f"monitor.inbox={inbox}", "monitor.state=data/monitor-none", "monitor.cooldown_hours=0",
            "monitor.max_retrains=1000"]
    result = monitor(project, *free)
    assert len(result.batches) == 20
    alarms = [b for b in result.batches if b.decision.action != "none"]
    assert result.retrains == len(alarms) <= 2  # false-alarm rate ≤ 10%
    assert all(b.decision.drift_share < 0.5 for b in result.batches)
    ledger = io.read_json(project / "data/monitor-none/ledger.json")
    assert len(ledger["batches"]) == 20 and all((project / e["report"]).is_file() for e in ledger["batches"].values())

    # the same inbox again: nothing new, nothing appended, nothing logged twice
    raw_md5, runs = io.dvc_md5(project / RAW), monitoring_runs(project)
    again = monitor(project, *free)
    assert again.batches == () and again.retrains == 0
    assert io.read_json(project / "data/monitor-none/ledger.json") == ledger
    assert io.dvc_md5(project / RAW) == raw_md5 and monitoring_runs(project) == runs


def monitoring_runs(root: Path) -> int:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    return len(mlflow.search_runs(experiment_names=["monitoring"]))


def test_a_corrupted_batch_is_quarantined_and_not_appended(project):
    inbox = project / "data/inbox-bad"
    [path] = batches(project, "data/inbox-bad", "thicken", 0.8, range(7, 8))  # drifted: it would be appended if accepted
    bad = pd.read_csv(path)
    bad.loc[:119, "pixel_10"] = 99  # 40% of the rows out of range
    bad["pixel_3"] = bad["pixel_3"].astype(object)
    bad.loc[120:125, "pixel_3"] = "smudge"
    io.write_csv(bad, path)
    (inbox / "truncated.parquet").write_bytes(b"PAR1 not really")
    raw_md5, dvc_file, n_versions = io.dvc_md5(project / RAW), (project / f"{RAW}.dvc").read_text(), len(versions(project))

    result = monitor(project, "monitor.inbox=data/inbox-bad", "monitor.state=data/monitor-bad")
    by_batch = {b.batch: b for b in result.batches}
    assert by_batch[path.name].decision.action == "rejected" and "max_bad_row_fraction" in by_batch[path.name].decision.reasons[0]
    assert by_batch["truncated.parquet"].decision.action == "rejected" and "not a valid Parquet" in by_batch["truncated.parquet"].decision.reasons[0]
    assert result.retrains == 0
    # every row of the rejected batch is kept, each with its reason; the raw data is untouched
    [quarantined] = (project / "data/quarantine/monitor").glob(f"{path.stem}-*.parquet")
    kept = pd.read_parquet(quarantined)
    assert len(kept) == 300 and kept["reason"].str.len().gt(0).all()
    assert kept.loc[kept["id"].astype(int).isin(bad.loc[:119, "id"]), "reason"].str.contains("pixel_10").all()
    assert io.dvc_md5(project / RAW) == raw_md5 and (project / f"{RAW}.dvc").read_text() == dvc_file
    assert len(versions(project)) == n_versions
    assert (inbox / "truncated.parquet").read_bytes() == b"PAR1 not really"  # inbox files are never changed


def test_a_shifted_batch_appends_a_data_version_and_retrains_exactly_once(project):
    from mlflow import MlflowClient

    shifted = batches(project, "data/inbox-shift", "thicken", 0.8, range(1, 2))
    later = batches(project, "data/inbox-shift", "shift", 1.0, range(2, 3))  # drifted too, inside the cooldown
    os.utime(later[0], (time.time() + 5, time.time() + 5))  # processed after the first
    old_files, old_rows = dataset_files(project / RAW), len(io.read_table(project / RAW))
    old_md5, n_versions = io.dvc_md5(project / RAW), len(versions(project))

    result = monitor(project, "monitor.inbox=data/inbox-shift", "monitor.state=data/monitor-shift")
    first, second = result.batches
    assert first.batch == shifted[0].name and first.decision.action == "retrain"
    assert any(r.startswith("data drift") for r in first.decision.reasons)
    assert second.decision.action == "append" and "cooldown" in second.decision.reasons[-1]
    assert result.retrains == 1

    # exactly one new registered version, and the gate decided on it
    assert len(versions(project)) == n_versions + 1
    registered = first.register
    version = MlflowClient().get_model_version("d2d-digits", str(registered.version))
    assert version.tags["d2d.decision"] in ("promoted", "rejected") and version.tags["d2d.promotion"]
    assert version.tags["d2d.data_md5"] != old_md5  # trained on the new data version

    # both batches joined the dataset as new DVC versions, each a new part file: the raw file
    # became a folder of that name, with its bytes unchanged as the first part
    new_files = dataset_files(project / RAW)
    assert (project / RAW).is_dir() and new_files.items() >= old_files.items() and len(new_files) == len(old_files) + 2
    assert len(io.read_table(project / RAW)) - old_rows == 600
    ledger = io.read_json(project / "data/monitor-shift/ledger.json")
    by_file = {e["file"]: e for e in ledger["batches"].values()}
    appended = [by_file[shifted[0].name]["appended"], by_file[later[0].name]["appended"]]
    assert appended[0]["md5_before"] == old_md5 and appended[1]["md5_before"] == appended[0]["md5_after"]
    for md5 in (old_md5, appended[0]["md5_after"], appended[1]["md5_after"]):
        assert (project.parent / "remote/files/md5" / md5[:2] / md5[2:]).is_file()  # pushed: every version restorable
    assert io.dvc_recorded_md5(project / RAW) == io.dvc_md5(project / RAW)
    log = subprocess.run(["git", "log", "--format=%s", "-3"], cwd=project, capture_output=True, text=True).stdout
    assert log.count("d2d monitor: 300 new rows") == 2

    # the reports: HTML and JSON on disk, a run per batch in the `monitoring` experiment, the
    # Prefect artifact and the event
    summary = io.read_json(project / by_file[shifted[0].name]["report"].replace(".html", ".json"))
    assert summary["drifted"] and summary["features"][0]["drifted"]
    import mlflow

    runs = mlflow.search_runs(experiment_names=["monitoring"], filter_string="tags.`d2d.action` = 'retrain'")
    assert len(runs) == 1
    assert {a.path for a in MlflowClient().list_artifacts(runs.iloc[0]["run_id"], "drift")} == {"drift/drift.html", "drift/drift.json"}
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    found = httpx.post(f"{api}/artifacts/filter", timeout=30, json={"artifacts": {"key": {"any_": ["d2d-drift-report"]}},
                                                                   "limit": 50, "offset": 0, "sort": "CREATED_DESC"})
    found.raise_for_status()
    assert any(shifted[0].name in a["data"] and "action: **retrain**" in a["data"] for a in found.json())
    events = []
    for _ in range(20):  # events reach the server asynchronously
        got = httpx.post(f"{api}/events/filter", timeout=30, json={"filter": {"event": {"name": ["d2d.drift.detected"]}}, "limit": 50})
        got.raise_for_status()
        events = got.json()["events"]
        if len(events) >= 2:
            break
        time.sleep(0.5)
    labels = sorted(e["resource"]["d2d.retrain"] for e in events if e["payload"]["batch"].startswith(("thicken-1-", "shift-2-")))
    assert labels == ["in-process", "no"]
    assert all(e["resource"]["prefect.resource.id"] == "d2d.model.d2d-digits" for e in events)
    assert json.dumps(events)  # plain JSON, as the automation's template sees it


# --- hostile inboxes, a corrupt ledger and a kill mid-append: `d2d monitor` as a user runs it ---
# (these come last: they append to the raw file and commit, which the story above counts)


def d2d_monitor(root: Path, *overrides: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`d2d monitor` in its own process, against the test harness's Prefect server."""
    import sys

    from prefect.settings import PREFECT_API_URL

    sets = [a for o in ("monitor.retrain=event", *overrides) for a in ("--set", o)]
    return subprocess.run([str(Path(sys.executable).with_name("d2d")), "monitor", *sets], cwd=root, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), **(env or {})})


def test_links_in_the_inbox_are_refused_and_nothing_they_point_at_is_copied(project, tmp_path):
    inbox = project / "data/inbox-links"
    inbox.mkdir()
    secret = tmp_path / "secret.csv"  # stands for /etc/shadow or someone's key file
    secret.write_text("id,label\n1,hunter2\n")
    [staged] = batches(project, "data/outside-staging", "thicken", 0.8, range(40, 41))
    outside = staged.rename(tmp_path / staged.name)  # a drifted batch, but not in the inbox
    (inbox / "leak.csv").symlink_to(secret)
    (inbox / "outside.csv").symlink_to(outside)
    raw_md5 = io.dvc_md5(project / RAW)

    result = monitor(project, "monitor.inbox=data/inbox-links", "monitor.state=data/monitor-links")
    by_batch = {b.batch: b for b in result.batches}
    assert {b.decision.action for b in by_batch.values()} == {"refused"} and set(by_batch) == {"leak.csv", "outside.csv"}
    assert "symbolic link" in by_batch["leak.csv"].decision.reasons[0]
    # nothing was read: no quarantine file, no report, no append; the link and its target are as they were
    assert not list((project / "data/quarantine/monitor").glob("leak-*")) and not list((project / "reports/monitor").glob("leak-*"))
    assert io.dvc_md5(project / RAW) == raw_md5 and secret.read_text() == "id,label\n1,hunter2\n"
    assert (inbox / "leak.csv").is_symlink() and os.readlink(inbox / "leak.csv") == str(secret)
    ledger = io.read_json(project / "data/monitor-links/ledger.json")
    assert sorted(e["action"] for e in ledger["batches"].values()) == ["refused", "refused"]
    assert monitor(project, "monitor.inbox=data/inbox-links", "monitor.state=data/monitor-links").batches == ()


def test_a_corrupt_ledger_stops_the_monitor_with_one_line_and_is_kept(project):
    state = project / "data/monitor-corrupt"
    state.mkdir()
    (state / "ledger.json").write_text('{"batches": {"abc": {"file": "a.cs')  # truncated mid-write by something else
    out = d2d_monitor(project, "monitor.state=data/monitor-corrupt")
    assert out.returncode == 2, out.stderr[-3000:]
    [line] = [l for l in out.stderr.splitlines() if l.startswith("error:")]
    assert "is corrupt (not valid JSON" in line and "ledger.json.corrupt-" in line and "to recover" in line
    assert "Traceback" not in out.stderr + out.stdout
    [aside] = state.glob("ledger.json.corrupt-*")
    assert aside.read_text() == '{"batches": {"abc": {"file": "a.cs'
    again = d2d_monitor(project, "monitor.state=data/monitor-corrupt")  # no silent fresh start
    assert again.returncode == 2 and "set aside as corrupt" in again.stderr


def test_a_monitor_killed_right_after_the_append_finishes_the_batch_exactly_once(project):
    [path] = batches(project, "data/inbox-kill", "thicken", 0.8, range(30, 31))
    ids = set(pd.read_csv(path)["id"])
    old_files, old_md5 = dataset_files(project / RAW), io.dvc_md5(project / RAW)
    commits = int(subprocess.run(["git", "rev-list", "--count", "HEAD"], cwd=project, capture_output=True, text=True).stdout)
    sets = ["monitor.inbox=data/inbox-kill", "monitor.state=data/monitor-kill", "monitor.cooldown_hours=0"]

    killed = d2d_monitor(project, *sets, env={"D2D_FAULT_DRILL": "monitor-after-append"})
    assert killed.returncode == 137, killed.stderr[-3000:]
    # killed between the two steps: the rows are in the raw file, the ledger says only that they were to be
    [entry] = io.read_json(project / "data/monitor-kill/ledger.json")["batches"].values()
    assert entry["state"] == "pending" and entry["append"]["md5_before"] == old_md5
    assert io.dvc_md5(project / RAW) == entry["append"]["md5_after"] and (project / entry["report"]).is_file()
    assert io.dvc_recorded_md5(project / RAW) == old_md5  # not versioned yet

    finished = d2d_monitor(project, *sets)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "finishing what a previous run recorded" in finished.stdout + finished.stderr
    raw = io.read_table(project / RAW)
    assert raw["id"].isin(ids).sum() == len(ids) == 300  # the batch's rows, once
    assert dataset_files(project / RAW).items() >= old_files.items()  # every old byte as it was
    ledger = io.read_json(project / "data/monitor-kill/ledger.json")
    [entry] = ledger["batches"].values()
    assert entry["state"] == "complete" and entry["action"] == "retrain" and entry["appended"]["md5_after"] == io.dvc_md5(project / RAW)
    assert (project / entry["report"]).is_file() and (project / entry["report"].replace(".html", ".json")).is_file()
    assert [r["batch"] for r in ledger["retrains"]] == [entry["key"]]  # one retrain decision
    assert io.dvc_recorded_md5(project / RAW) == io.dvc_md5(project / RAW)  # versioned by the re-run
    log = subprocess.run(["git", "log", "--format=%s", "-1"], cwd=project, capture_output=True, text=True).stdout
    assert int(subprocess.run(["git", "rev-list", "--count", "HEAD"], cwd=project, capture_output=True, text=True).stdout) == commits + 1
    assert log.strip() == "d2d monitor: 300 new rows in data/raw/digits.csv"
    assert not list((project / RAW).parent.glob(".*.next")) and not list((project / RAW).parent.glob(".*.dir"))

    # and once more: nothing is pending, nothing is new, nothing changes
    raw_md5 = io.dvc_md5(project / RAW)
    third = d2d_monitor(project, *sets)
    assert third.returncode == 0 and "no new batches" in third.stdout
    assert io.dvc_md5(project / RAW) == raw_md5 and io.read_json(project / "data/monitor-kill/ledger.json") == ledger


def test_a_retrain_that_could_not_run_stays_pending_and_the_next_monitor_runs_it(project):
    """A retrain decided while another training run holds the project's lock fails loudly and
    stays `pending` in the ledger (it used to be recorded as done and lost); the next monitor
    run trains it, once."""
    from pipeline import lock, stages

    batches(project, "data/inbox-busy", "thicken", 0.8, range(40, 41))
    sets = ["monitor.inbox=data/inbox-busy", "monitor.state=data/monitor-busy", "monitor.cooldown_hours=0"]
    before = len(versions(project))
    with lock.exclusive(stages.path("run_lock", project), "a test's training run"):
        with pytest.raises(Exception, match="training run is already in progress"):
            monitor(project, *sets)
    [entry] = io.read_json(project / "data/monitor-busy/ledger.json")["batches"].values()
    assert (entry["state"], entry["action"], entry["retrain_state"]) == ("complete", "retrain", "pending")
    assert len(versions(project)) == before

    resumed = monitor(project, *sets)
    assert resumed.retrains == 1
    [entry] = io.read_json(project / "data/monitor-busy/ledger.json")["batches"].values()
    assert entry["retrain_state"] == "done" and len(versions(project)) == before + 1

    again = monitor(project, *sets)
    assert again.retrains == 0 and len(versions(project)) == before + 1
