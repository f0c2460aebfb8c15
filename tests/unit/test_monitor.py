"""The drift monitor's pieces on tiny frames: the retrain decision (signals, labels, cooldown,
rate limit), screening a batch (expectations, ids already in the dataset, rejection keeps every
row), the ledger's exactly-once inbox, appending a new raw version without touching the old
bytes, and the lock and trigger checks."""

from __future__ import annotations

import os
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from app.cli import check_triggers
from pipeline import monitor
from pipeline.config import MonitorParams, Params, load_params
from pipeline.data import io
from pipeline.data.keys import KnownRows, identity_hashes
from pipeline.drift import DriftReport, PerformanceDrift, PredictionDrift, retrain_decision
from pipeline.errors import D2DError, DataError
from tests.conftest import REPO, make_frame

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)


def report(drifted: bool) -> DriftReport:
    return DriftReport(pd.DataFrame({"drifted": [drifted]}), float(drifted), None, drifted, ["1 of 1 features drifted"])


DECAYED = PerformanceDrift("f1_macro", 0.5, 0.95, 0.02, True, "f1_macro on the batch 0.50 vs 0.95")
HELD = PerformanceDrift("f1_macro", 0.95, 0.95, 0.02, False, "f1_macro on the batch 0.95 vs 0.95")
MOVED = PredictionDrift("jensen_shannon", 0.3, 0.1, True, 0.5)


def screened(labelled: bool) -> monitor.Screened:
    return monitor.Screened(3, pd.DataFrame(), pd.DataFrame(), pd.DataFrame(), labelled, [])


@pytest.mark.parametrize("drifted, labelled, mode, action, retrain", [
    (True, True, "flow", "retrain", True),
    (True, True, "event", "retrain", True),
    (True, True, "off", "append", False),  # drift with labels: the rows join the dataset, no retrain
    (True, False, "flow", "alert", False),  # drift without labels: nothing to learn from
    (False, True, "flow", "none", False),
    (False, False, "flow", "none", False),
])
def test_the_monitor_action_follows_the_retrain_decision_labels_and_mode(drifted, labelled, mode, action, retrain):
    inspection = monitor.Inspection(report(drifted), PredictionDrift("chi2", 0.9, 0.05, False, 0.0), None)
    params = load_params(REPO / "params.yaml")
    decision = monitor.decide(inspection, screened(labelled), [], NOW, params, mode)
    assert (decision.action, decision.retrain, decision.alarm) == (action, retrain, drifted)
    assert decision.reasons and decision.drift_share == float(drifted)
    # what the ledger records, and what a later run reads back from it
    entry = {**decision.record(), "act": decision.alarm}
    assert monitor.BatchDecision.from_entry(entry) == decision


def test_a_batch_turned_away_records_only_its_action_and_reasons():
    decision = monitor.turned_away("rejected", ["3 rows left after quarantine"])
    assert decision.record() == {"action": "rejected", "retrain": False, "reasons": ["3 rows left after quarantine"]}


@pytest.mark.parametrize("drifted, prediction, performance, on_prediction, act, retrain", [
    (False, None, None, False, False, False),
    (False, None, HELD, False, False, False),
    (True, None, None, False, True, True),
    (False, None, DECAYED, False, True, True),  # decay alone is enough
    (False, MOVED, HELD, False, False, False),  # prediction drift counts only when asked to
    (False, MOVED, HELD, True, True, True),
])
def test_the_decision_follows_the_signals(drifted, prediction, performance, on_prediction, act, retrain):
    params = MonitorParams(retrain_on_prediction_drift=on_prediction)
    got = retrain_decision(report(drifted), prediction, performance, True, [], NOW, params)
    assert got[:2] == (act, retrain)
    assert got[2]


def test_unlabelled_drift_alerts_but_cannot_retrain():
    act, retrain, reasons = retrain_decision(report(True), None, None, False, [], NOW, MonitorParams())
    assert (act, retrain) == (True, False) and "no labels" in reasons[-1]


@pytest.mark.parametrize("hours_ago, retrain", [(1, False), (23.9, False), (24.1, True)])
def test_the_cooldown_holds_a_retrain_back(hours_ago, retrain):
    last = [NOW - timedelta(hours=hours_ago)]
    act, got, reasons = retrain_decision(report(True), None, None, True, last, NOW, MonitorParams(cooldown_hours=24))
    assert act and got == retrain
    assert ("cooldown" in reasons[-1]) == (not retrain)


def test_the_rate_limit_counts_retrains_in_the_window_only():
    params = MonitorParams(cooldown_hours=0, max_retrains=2, window_hours=24)
    two_recent = [NOW - timedelta(hours=2), NOW - timedelta(hours=1)]
    assert retrain_decision(report(True), None, None, True, two_recent, NOW, params)[1] is False
    one_old = [NOW - timedelta(hours=30), NOW - timedelta(hours=1)]
    assert retrain_decision(report(True), None, None, True, one_old, NOW, params)[1] is True


@pytest.fixture
def project(tmp_path, tiny_data_params, tiny_schema) -> tuple[Params, Path]:
    params = Params(data=tiny_data_params, validate={"min_rows": 5, "data_docs": False}, train={"model": "mlp"})
    io.write_csv(make_frame(tiny_schema, 30), tmp_path / tiny_data_params.raw)
    return params, tmp_path


def test_screening_quarantines_bad_rows_and_ids_already_in_the_dataset(project, tiny_schema):
    params, root = project
    batch = make_frame(tiny_schema, 20).assign(id=range(100, 120))
    batch.loc[3, "f0"] = 99  # out of the schema's range
    batch.loc[[5, 6], "id"] = [1, 2]  # ids the raw file already has
    screened = monitor.screen_batch(batch, tiny_schema, params, monitor.known_ids(params, root))
    assert not screened.rejected and screened.labelled
    assert sorted(screened.quarantine["id"].astype(int)) == [1, 2, 103]
    assert "already in the dataset" in " ".join(screened.quarantine[monitor.REASON])
    assert len(screened.valid) == len(screened.raw_valid) == 17


def test_a_corrupted_batch_is_rejected_and_every_row_kept_in_quarantine(project, tiny_schema):
    params, root = project
    batch = make_frame(tiny_schema, 20).assign(id=range(100, 120))
    batch.loc[:7, "f1"] = -5  # 40% of the rows: above validate.max_bad_row_fraction
    screened = monitor.screen_batch(batch, tiny_schema, params, monitor.known_ids(params, root))
    assert screened.rejected and "max_bad_row_fraction" in screened.rejected[0]
    assert len(screened.quarantine) == 20 and screened.valid.empty and screened.raw_valid.empty


def test_a_batch_without_the_target_is_checked_on_its_features(project, tiny_schema):
    params, root = project
    batch = make_frame(tiny_schema, 20).assign(id=range(100, 120)).drop(columns="label")
    batch.loc[0, "f2"] = 50
    screened = monitor.screen_batch(batch, tiny_schema, params, KnownRows(np.empty(0, "uint64")))
    assert not screened.labelled and not screened.rejected
    assert len(screened.valid) == 19 and "label" not in screened.valid and "label" not in screened.quarantine


def test_a_batch_missing_a_feature_is_rejected_with_the_column_named(project, tiny_schema):
    params, _ = project
    batch = make_frame(tiny_schema, 20).drop(columns="f3")
    screened = monitor.screen_batch(batch, tiny_schema, params, KnownRows(np.empty(0, "uint64")))
    assert "f3" in screened.rejected[0] and len(screened.quarantine) == 20


def test_the_inbox_gives_each_batch_once_by_content(project, tiny_schema):
    params, root = project
    inbox = root / params.monitor.inbox
    a = io.write_csv(make_frame(tiny_schema, 10), inbox / "a.csv")
    (inbox / "a-again.csv").write_bytes(a.read_bytes())  # the same batch under another name
    io.write_csv(make_frame(tiny_schema, 10, seed=1), inbox / "b.csv")
    (inbox / "notes.txt").write_text("not a batch")
    ledger = monitor.read_ledger(params, root)
    pending = monitor.pending_batches(params, root, ledger)
    assert len(pending) == 2 and {b.name for b in pending} <= {"a.csv", "a-again.csv", "b.csv"}
    ledger["batches"][pending[0].md5] = {"file": pending[0].name}
    monitor.write_ledger(ledger, params, root)
    assert [b.md5 for b in monitor.pending_batches(params, root, monitor.read_ledger(params, root))] == [pending[1].md5]


def test_the_inference_log_is_read_part_by_part_once_enough_rows_arrived(project, tiny_schema):
    params, root = project  # validate.min_rows is 5
    log = root / params.serve.log_dir / "date=2026-11-23"
    log.mkdir(parents=True)
    served = make_frame(tiny_schema, 3).drop(columns="label").assign(model_version="1", out_label=0, out_probability=0.9)
    served.to_parquet(log / "part-1.parquet")
    ledger = monitor.read_ledger(params, root)
    assert monitor.pending_batches(params, root, ledger) == []  # 3 rows: too few to test, left for later
    served.to_parquet(log / "part-2.parquet")
    [batch] = monitor.pending_batches(params, root, ledger)
    assert batch.name == "inference-log" and len(batch.log_parts) == 2
    frame = monitor.read_batch(batch, tiny_schema)
    assert list(frame.columns) == ["id", *tiny_schema.feature_names] and frame["id"].is_unique  # requests repeat rows
    screened = monitor.screen_batch(frame, tiny_schema, params, KnownRows(identity_hashes(frame["id"])))
    assert not screened.labelled and not screened.rejected and len(screened.valid) == 6  # unlabelled: ids not checked
    ledger["log_parts"] = list(batch.log_parts)
    assert monitor.pending_batches(params, root, ledger) == []
    off = params.model_copy(update={"monitor": MonitorParams(read_inference_log=False)})
    assert monitor.pending_batches(off, root, {"batches": {}, "log_parts": []}) == []


def test_a_single_raw_file_becomes_a_folder_whose_first_part_it_is(tmp_path, tiny_schema):
    """Issue 16, point 3: the file's bytes are never rewritten (its first part is the same inode),
    the new rows are a part after it, and readers see the old rows, then the new."""
    raw = tmp_path / "raw.csv"
    raw.write_text("id,f0,f1,f2,f3,label\n1,abc,2,3,4,0")  # a corrupt value and no final newline
    old, inode = raw.read_bytes(), raw.stat().st_ino
    rows = make_frame(tiny_schema, 3).assign(id=[7, 8, 9])[["label", "f3", "f2", "f1", "f0", "id"]]
    staged, name = io.stage_part(rows, raw)
    assert raw.read_bytes() == old and staged.parent == tmp_path and staged.name.startswith(".raw.csv.")
    expected = io.dvc_md5_with(raw, staged, name)
    io.install_part(staged, raw, name)
    first, new = io.data_parts(raw)
    assert first == raw / "0-raw.csv" and first.read_bytes() == old and first.stat().st_ino == inode
    assert new.name == name and io.dvc_md5(raw) == expected
    back = io.read_table(raw)
    assert back["id"].tolist() == [1, 7, 8, 9] and back.loc[1:, "f0"].astype(int).tolist() == rows["f0"].tolist()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw.csv"]  # nothing left beside it


@pytest.mark.parametrize("killed_after", ["link", "move", "unlink"])
def test_a_file_becoming_a_folder_finishes_after_a_kill_at_any_step(tmp_path, tiny_schema, killed_after):
    raw = tmp_path / "raw.parquet"
    make_frame(tiny_schema, 5).to_parquet(raw, index=False)
    old = raw.read_bytes()
    staged, name = io.stage_part(make_frame(tiny_schema, 2).assign(id=[50, 51]), raw)
    building = io.building_folder(staged)
    building.mkdir()  # what install_part had done when the process died
    os.link(raw, building / io.first_part_name(raw))
    if killed_after in ("move", "unlink"):
        io.move(staged, building / name)
    if killed_after == "unlink":
        raw.unlink()
    io.install_part(staged, raw, name)
    assert (raw / "0-raw.parquet").read_bytes() == old and io.read_table(raw)["id"].tolist() == [0, 1, 2, 3, 4, 50, 51]
    assert not building.exists() and not staged.exists()


def test_appending_rows_without_a_column_fails_and_leaves_the_file(tmp_path):
    raw = tmp_path / "raw.csv"
    raw.write_text("id,x,label\n1,2,0\n")
    with pytest.raises(DataError, match="lack column"):
        io.stage_part(pd.DataFrame({"id": [2], "label": [1]}), raw)
    assert raw.read_text() == "id,x,label\n1,2,0\n" and [p.name for p in tmp_path.iterdir()] == ["raw.csv"]


def test_a_second_monitor_run_is_refused_while_one_holds_the_lock(project):
    params, root = project
    with monitor.exclusive(params, root):
        with pytest.raises(D2DError, match="in progress"):
            with monitor.exclusive(params, root):
                pass
    with monitor.exclusive(params, root):  # released
        pass


@pytest.mark.parametrize("retrain, api_url, mode", [("auto", None, "flow"), ("auto", "http://127.0.0.1:4200/api", "event"),
                                                    ("flow", "http://127.0.0.1:4200/api", "flow"), ("off", None, "off")])
def test_the_retrain_mode(project, retrain, api_url, mode):
    params, _ = project
    assert monitor.retrain_mode(params.model_copy(update={"monitor": MonitorParams(retrain=retrain)}), api_url) == mode


def test_deploy_refuses_a_trigger_for_another_model(tmp_path):
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    check_triggers(REPO / "prefect.yaml", REPO / "params.yaml")  # the shipped pair agrees
    spec["deployments"][0]["triggers"][0]["match"]["prefect.resource.id"] = "d2d.model.other"
    (tmp_path / "prefect.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(D2DError, match="d2d.model.other"):
        check_triggers(tmp_path / "prefect.yaml", REPO / "params.yaml")


def test_a_bare_off_in_yaml_turns_retraining_off(repo_params):
    from pipeline.config import apply_overrides, params_from_dict

    raw = apply_overrides(repo_params.as_dict(), ["monitor.retrain=off"])
    assert params_from_dict(raw).monitor.retrain == "off"


# --- the inbox is read only as regular files in it; the monitor's files are the owner's ---

def test_links_and_other_non_files_in_the_inbox_are_refused_unread(project, tiny_schema):
    params, root = project
    inbox = root / params.monitor.inbox
    inbox.mkdir(parents=True)
    secret = root / "secret.csv"
    secret.write_text("id,password\n1,hunter2\n")
    outside = io.write_csv(make_frame(tiny_schema, 10), root / "elsewhere/batch.csv")
    (inbox / "passwd.csv").symlink_to(secret)
    (inbox / "batch.csv").symlink_to(outside)  # a real batch, but through a link
    (inbox / "dangling.parquet").symlink_to(root / "nothing-here.parquet")
    os.mkfifo(inbox / "pipe.csv")  # reading it would block the monitor forever
    os.link(secret, inbox / "hard.csv")  # another name for the secret, not a symbolic link
    io.write_csv(make_frame(tiny_schema, 10), inbox / "fine.csv")
    pending = {b.name: b for b in monitor.pending_batches(params, root, monitor.read_ledger(params, root))}
    assert set(pending) == {"passwd.csv", "batch.csv", "dangling.parquet", "pipe.csv", "hard.csv", "fine.csv"}
    assert "other hard links" in pending["hard.csv"].refused
    assert not pending["fine.csv"].refused
    for name in ("passwd.csv", "batch.csv", "dangling.parquet"):
        assert "symbolic link" in pending[name].refused and name in pending[name].refused
    assert "not a regular file" in pending["pipe.csv"].refused
    with pytest.raises(DataError, match="symbolic link"):  # checked again right before reading
        monitor.read_batch(pending["passwd.csv"], tiny_schema)
    # a refused entry is keyed by its name and link, so it is recorded once, not every run
    again = {b.name: b.md5 for b in monitor.pending_batches(params, root, monitor.read_ledger(params, root))}
    assert again == {name: b.md5 for name, b in pending.items()}
    assert secret.read_text() == "id,password\n1,hunter2\n"


def test_a_file_swapped_for_a_link_after_listing_is_not_read(project, tiny_schema):
    params, root = project
    inbox = root / params.monitor.inbox
    path = io.write_csv(make_frame(tiny_schema, 10), inbox / "b.csv")
    [batch] = monitor.pending_batches(params, root, monitor.read_ledger(params, root))
    path.unlink()
    path.symlink_to(root / params.data.raw)
    with pytest.raises(DataError, match="symbolic link"):
        monitor.read_batch(batch, tiny_schema)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_quarantine_and_ledger_are_readable_by_their_owner_only(project, tiny_schema):
    params, root = project
    path = monitor.write_quarantine("b-1234", make_frame(tiny_schema, 3).assign(reason="x"), params, root)
    assert mode(path) == 0o600 and mode(path.parent) == 0o700
    monitor.write_ledger({"batches": {}, "retrains": []}, params, root)
    ledger = root / params.monitor.state / "ledger.json"
    assert mode(ledger) == 0o600
    with monitor.exclusive(params, root):
        assert mode(ledger.parent) == 0o700
    # ordinary outputs keep what the umask gives any new file
    assert mode(io.write_csv(make_frame(tiny_schema, 3), root / "out.csv")) == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --- a corrupt ledger is set aside and the run stops; never a silent fresh start ---

@pytest.mark.parametrize("content, problem", [
    (b"", "not valid JSON"),
    (b'{"batches": {"abc": {"file": "a.csv"', "not valid JSON"),  # truncated
    (b"\xff\xfe\x00garbage", "not valid JSON"),
    (b"{}", "batches"),
    (b"[]", "the whole file"),
    (b"null", "the whole file"),
    (b'{"batches": [], "retrains": []}', "batches"),
    (b'{"batches": {"abc": 3}, "retrains": []}', "batches.abc"),
    (b'{"batches": {"abc": {"file": 7}}, "retrains": []}', "batches.abc.file"),
    (b'{"batches": {"abc": {"file": "a.csv", "state": "weird"}}, "retrains": []}', "batches.abc.state"),
    (b'{"batches": {}, "retrains": {}}', "retrains"),
    (b'{"batches": {}, "retrains": [{"at": 5}]}', "retrains.0.at"),
    (b'{"batches": {}, "retrains": [{"at": "yesterday"}]}', "retrains.0.at"),
    (b'{"batches": {}, "retrains": [{"at": "2026-11-23T12:00:00"}]}', "time zone"),
    (b'{"batches": {}, "retrains": [], "log_parts": [1]}', "log_parts.0"),
    # a pending entry the next run could not finish (these gave a KeyError, exit 1)
    (b'{"batches": {"abc": {"file": "a.csv", "state": "pending"}}, "retrains": []}', "needs its action"),
    (b'{"batches": {"abc": {"file": "a.csv", "state": "pending", "action": "retrain", "retrain": true, '
     b'"reasons": [], "append": {}}}, "retrains": []}', "batches.abc.append.staged"),
    (b'{"batches": {"abc": {"file": "a.csv", "retrain_state": "maybe"}}, "retrains": []}', "retrain_state"),
    (b"[" * 100_000, "nested too deeply"),  # a RecursionError, not a traceback
])
def test_a_corrupt_ledger_is_set_aside_and_the_run_stops(project, content, problem):
    params, root = project
    ledger = root / params.monitor.state / "ledger.json"
    ledger.parent.mkdir(parents=True)
    ledger.write_bytes(content)
    with pytest.raises(D2DError) as e:
        monitor.read_ledger(params, root)
    message = str(e.value)
    assert "corrupt" in message and problem in message and "to recover" in message and "\n" not in message
    [aside] = ledger.parent.glob("ledger.json.corrupt-*")
    assert aside.read_bytes() == content and not ledger.exists() and aside.name in message
    # the next run does not start an empty ledger behind the user's back
    with pytest.raises(D2DError, match="set aside as corrupt"):
        monitor.read_ledger(params, root)
    aside.unlink()  # the user's decision: start afresh
    assert monitor.read_ledger(params, root)["batches"] == {}


def test_a_ledger_from_before_write_ahead_still_reads(project):
    params, root = project
    old = {"batches": {"abc": {"file": "a.csv", "action": "none", "appended": None}},
           "retrains": [{"at": "2026-11-23T12:00:00+00:00", "batch": "a-abc", "by": "flow"}], "log_parts": []}
    monitor.write_ledger(old, params, root)
    assert monitor.read_ledger(params, root) == old and monitor.unfinished(old) == []


# --- appending is a transaction: staged, recorded, installed; repeating it appends once ---

def test_installing_a_staged_append_twice_appends_once(project, tiny_schema, monkeypatch):
    params, root = project
    raw = root / params.data.raw
    old = raw.read_bytes()
    assert len(monitor.known_ids(params, root)) == 30  # the index of the single file
    rows = make_frame(tiny_schema, 4).assign(id=range(500, 504))
    intent = monitor.stage_append(rows, params, root)
    assert raw.read_bytes() == old  # nothing is moved in before the ledger records the intent
    assert intent["md5_before"] == io.file_md5(raw) and intent["part"]
    first = monitor.install_append(intent, params, root)
    again = monitor.install_append(intent, params, root)  # a re-run after a kill
    assert first["md5_after"] == again["md5_after"] == io.dvc_md5(raw)
    assert (raw / io.first_part_name(raw)).read_bytes() == old and io.read_table(raw)["id"].tolist().count(503) == 1
    assert not list(raw.parent.glob(".*.next")) and not list(raw.parent.glob(".*.dir"))
    assert not monitor.append_abandoned(intent, params, root)

    def no_rebuild(*_: object) -> KnownRows:
        raise AssertionError("the index was rebuilt instead of extended by the new part")

    monkeypatch.setattr(KnownRows, "build", classmethod(no_rebuild))  # the file became its folder's first part
    known = monitor.known_ids(params, root)
    assert len(known) == 34 and known.isin(pd.Series(["503", "504"])).tolist() == [True, False]


def test_installing_over_a_raw_file_that_changed_meanwhile_is_refused(project, tiny_schema):
    params, root = project
    raw = root / params.data.raw
    intent = monitor.stage_append(make_frame(tiny_schema, 4).assign(id=range(500, 504)), params, root)
    with raw.open("a") as f:
        f.write("999,1,1,1,1,0\n")
    changed = raw.read_bytes()
    with pytest.raises(D2DError, match="changed while a batch was being appended"):
        monitor.install_append(intent, params, root)
    assert raw.read_bytes() == changed


def test_stale_next_versions_are_discarded_but_a_pending_one_is_kept(project, tiny_schema):
    params, root = project
    raw = root / params.data.raw
    kept = monitor.stage_append(make_frame(tiny_schema, 2).assign(id=[700, 701]), params, root)
    stale = monitor.stage_append(make_frame(tiny_schema, 2).assign(id=[800, 801]), params, root)
    ledger = {"batches": {"m": {"file": "a.csv", "state": monitor.PENDING, "append": kept}}, "retrains": []}
    monitor.discard_stale_stages(ledger, params, root)
    assert raw.with_name(kept["staged"]).is_file() and not raw.with_name(stale["staged"]).exists()
    half_built = io.building_folder(raw.with_name(stale["staged"]))  # a killed run's folder, never recorded
    half_built.mkdir()
    os.link(raw, half_built / io.first_part_name(raw))
    monitor.discard_stale_stages(ledger, params, root)
    assert not half_built.exists() and raw.is_file() and raw.with_name(kept["staged"]).is_file()
    assert monitor.unfinished(ledger) == [("m", ledger["batches"]["m"])]


@pytest.mark.parametrize("retrain, mode, label, state", [
    (True, "flow", "in-process", "pending"),  # pending until the training flow returns
    (True, "event", "automation", None),  # the deployment's trigger retrains
    (False, "flow", "no", None),
])
def test_closing_an_entry_records_the_retrain_once_and_who_runs_it(retrain, mode, label, state):
    decision = monitor.BatchDecision("retrain" if retrain else "append", retrain, ("data drift",), True)
    ledger = {"batches": {}, "retrains": [], "log_parts": []}
    entry = {"file": "b.csv", "key": "b-1234abcd", "state": monitor.PENDING}
    assert monitor.retrain_by(decision, mode) == label
    monitor.close_entry(ledger, entry, decision, ["a warning"], mode)
    assert entry["state"] == monitor.COMPLETE and entry["warnings"] == ["a warning"]
    assert entry.get("retrain_state") == state
    assert [r["batch"] for r in ledger["retrains"]] == (["b-1234abcd"] if retrain else [])
    if state:
        monitor.retrain_done({"batches": {"m": entry}}, "m")
        assert entry["retrain_state"] == "done"
