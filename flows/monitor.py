"""The drift monitor flow: for each new batch in the inbox, screen → measure drift → report →
decide; a batch that drifted joins the dataset as a new DVC version and, when the decision
allows, the training flow runs on it. The steps and the decision (monitor.decide) are in
pipeline.monitor; this flow only runs them as tasks and acts on the decision.

The retrain runs one of two ways (monitor.retrain): `flow` calls the training flow here, as a
subflow, which is what embedded mode (no Prefect server) can do; `event` only emits
`d2d.drift.detected`, and the training deployment's trigger in prefect.yaml (an automation on
the server) starts a training run on a worker. `auto` picks `event` when PREFECT_API_URL is set.

Appending a batch is a write-ahead transaction in the ledger (see pipeline.monitor): a run
killed between the append and its record leaves a `pending` entry, and the next run finishes
it first: the append is not repeated; the versioning, the event and the retrain happen once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.retry import retry_worthwhile, with_retries
from flows.training import training_flow
from pipeline import monitor
from pipeline.config import Params, load_params
from pipeline.data.keys import KnownRows
from pipeline.data.schema import schema_from_params
from pipeline.errors import DataError
from pipeline.monitor import BatchDecision, BatchOutcome, Inspection, MonitorRun, Reference, Screened

EVENT = "d2d.drift.detected"


@dataclass(frozen=True)
class MonitorContext:
    """One monitor run's fixed context: its params, where they came from, the project, the retrain mode."""

    params: Params
    params_file: Path
    overrides: list[str] | None
    project: Path
    mode: str


@task(name="load-reference", retry_condition_fn=retry_worthwhile, cache_policy=NO_CACHE)
def reference_task(params: Params, root: Path) -> Reference:
    reference = monitor.load_reference(params, root)
    get_run_logger().info("reference: champion version %s, %d rows of the %s split (at most monitor.reference_rows)",
                          reference.champion["version"], len(reference.frame),
                          "test" if reference.embeddings is not None else "train")
    return reference


@task(name="inspect-batch", retry_condition_fn=retry_worthwhile, cache_policy=NO_CACHE)
def screen_and_inspect(batch: monitor.Batch, params: Params, reference: Reference,
                       known_ids: KnownRows | frozenset[str]) -> tuple[Screened, Inspection | None]:
    """Validate the batch with the dataset's expectations, then measure its drift."""
    logger = get_run_logger()
    schema = schema_from_params(params.data)
    try:
        screened = monitor.screen(batch, schema, params, known_ids)
    except DataError as e:  # an unreadable file is a rejected batch, not a failed monitor
        screened = Screened(0, pd.DataFrame(), pd.DataFrame(), pd.DataFrame(), False, [str(e)])
    if screened.rejected:
        logger.warning("%s: rejected (%s); %d rows quarantined", batch.name, "; ".join(screened.rejected),
                       len(screened.quarantine))
        return screened, None
    inspection = monitor.inspect_batch(screened, reference, params)
    logger.info("%s: %d rows (%d quarantined): %s", batch.name, screened.rows, len(screened.quarantine),
                "; ".join(inspection.drift.reasons))
    return screened, inspection


@task(name="publish-drift-report", retry_condition_fn=retry_worthwhile, cache_policy=NO_CACHE)
def publish(batch: monitor.Batch, screened: Screened, inspection: Inspection, decision: BatchDecision,
            reference: Reference, params: Params, root: Path) -> Path:
    """HTML + JSON on disk, a run in the `monitoring` MLflow experiment, a Prefect artifact."""
    from prefect.artifacts import create_markdown_artifact

    from pipeline import tracking

    report = inspection.drift
    html, summary = monitor.write_reports(batch.key, inspection, reference, screened, root,
                                          {"batch": batch.name, "decision": decision.record()})
    run_id = tracking.reachable(lambda: tracking.log_drift_run(
        params.monitor.experiment, root, batch.key, monitor.drift_metrics(inspection, screened),
        {"batch": batch.name, "champion_version": reference.champion["version"]},
        {"d2d.drifted": str(report.drifted).lower(), "d2d.action": decision.action,
         "d2d.champion_version": str(reference.champion["version"])}, [html, summary], monitor.logged_rows(screened)))
    top = report.features.head(8)
    table = "\n".join(f"| {r.feature} | {r.test} | {r.score:.4g} | {r.threshold:g} | {'yes' if r.drifted else 'no'} | {r.psi:.3f} |"
                      for r in top.itertuples())
    create_markdown_artifact(
        key="d2d-drift-report",
        description=f"drift report for {batch.name}",
        markdown=f"# Drift report: {batch.name}\n\n**{'DRIFT' if report.drifted else 'no drift'}**, "
                 f"action: **{decision.action}**\n\n" + "\n".join(f"- {r}" for r in decision.reasons)
                 + f"\n\n| feature | test | score | threshold | drifted | PSI |\n|---|---|---|---|---|---|\n{table}\n\n"
                 f"Full report: `{html.relative_to(root)}`; MLflow run `{run_id}` in experiment "
                 f"`{params.monitor.experiment}`.\n")
    return html


@task(name="append-batch", retry_condition_fn=retry_worthwhile, cache_policy=NO_CACHE)
def append_batch(intent: dict[str, Any], params: Params, root: Path) -> dict[str, str]:
    """Move the raw dataset's new part in (the intent the ledger holds) and version it."""
    appended = monitor.install_append(intent, params, root)
    get_run_logger().info("appended %d rows to %s: md5 %s → %s; %s; %s", intent["rows"], appended["path"],
                          appended["md5_before"][:8], appended["md5_after"][:8], appended["dvc"], appended["git"])
    return appended


@task(name="emit-drift-event", cache_policy=NO_CACHE)
def emit_drift(key: str, params: Params, decision: BatchDecision, retrain_by: str) -> None:
    """`d2d.drift.detected` on the model's resource, labelled with who retrains (monitor.retrain_by)."""
    from prefect.events import emit_event

    emit_event(event=EVENT,
               resource={"prefect.resource.id": f"d2d.model.{params.register_.model_name}", "d2d.retrain": retrain_by},
               payload={"batch": key, "reasons": list(decision.reasons), "action": decision.action})


@flow(name="d2d-drift-monitor")
def monitor_flow(params_path: str = "params.yaml", overrides: list[str] | None = None, root: str = ".") -> MonitorRun:
    """inbox → screen → drift → report → decide → (append, event, retrain)."""
    from prefect.settings import get_current_settings

    logger = get_run_logger()
    project = Path(root).resolve()
    params_file = Path(params_path) if Path(params_path).is_absolute() else project / params_path
    params = load_params(params_file, overrides)
    mode = monitor.retrain_mode(params, get_current_settings().api.url)
    run = MonitorContext(params, params_file, overrides, project, mode)
    logger.info("retrain mode: %s (monitor.retrain: %s)", run.mode, params.monitor.retrain)
    with monitor.exclusive(params, project):
        ledger = monitor.read_ledger(params, project)
        monitor.discard_stale_stages(ledger, params, project)
        outcomes = finish_previous(ledger, run)
        pending = monitor.pending_batches(params, project, ledger)
        logger.info("%d new batch(es) in %s", len(pending), params.monitor.inbox)
        reference = None
        for batch in pending:
            if not batch.refused and reference is None:
                reference = with_retries(reference_task, params)(params, project)
            outcome = process_batch(batch, ledger, run, reference)
            if outcome.decision.retrain and run.mode == "flow":  # the next batch meets the new champion
                reference = with_retries(reference_task, params)(params, project)
            outcomes.append(outcome)
    return MonitorRun(tuple(outcomes), sum(o.decision.retrain for o in outcomes), run.mode)


def finish_previous(ledger: dict[str, Any], run: MonitorContext) -> list[BatchOutcome]:
    """What killed or refused runs left half-done: appends recorded but not completed, then
    retrains decided but never finished."""
    logger = get_run_logger()
    outcomes = []
    for md5, entry in monitor.unfinished(ledger):
        logger.warning("%s: finishing what a previous run recorded but did not complete (append, event, retrain)", entry["file"])
        done = complete(md5, entry, ledger, run)
        if done is not None:  # None: nothing was appended, and the batch is read again below, as new
            outcomes.append(retrain(md5, done, ledger, run))
    for md5, entry in monitor.retrains_pending(ledger):
        logger.warning("%s: the retrain decided by a previous run did not finish; running it now", entry["file"])
        outcomes.append(retrain(md5, BatchOutcome(entry["file"], BatchDecision.from_entry(entry)), ledger, run))
    return outcomes


def process_batch(batch: monitor.Batch, ledger: dict[str, Any], run: MonitorContext,
                  reference: Reference | None) -> BatchOutcome:
    """One new batch: refused unread, rejected by the checks, or measured and decided on; its
    ledger entry is written before anything the decision entails (write-ahead)."""
    params, project = run.params, run.project
    if batch.refused:
        get_run_logger().warning("%s: refused (%s); left untouched", batch.name, batch.refused)
        decision = monitor.turned_away("refused", [batch.refused])
        screened = Screened(0, pd.DataFrame(), pd.DataFrame(), pd.DataFrame(), False, [batch.refused])
        return record_turned_away(batch, screened, decision, None, ledger, run)
    screened, inspection = with_retries(screen_and_inspect, params)(
        batch, params, reference, monitor.known_ids(params, project))
    ledger.setdefault("log_parts", []).extend(batch.log_parts)
    quarantine = monitor.write_quarantine(batch.key, screened.quarantine, params, project)
    if inspection is None:
        return record_turned_away(batch, screened, monitor.turned_away("rejected", screened.rejected), quarantine,
                                  ledger, run)
    decision = monitor.decide(inspection, screened, monitor.retrain_times(ledger), monitor.utc_now(), params, run.mode)
    report = with_retries(publish, params)(batch, screened, inspection, decision, reference, params, project)
    # write-ahead: what must follow is recorded before any of it happens
    entry = monitor.open_entry(batch, screened, decision, report, quarantine, params, project)
    ledger["batches"][batch.md5] = entry
    monitor.write_ledger(ledger, params, project)
    done = complete(batch.md5, entry, ledger, run)
    if done is None:  # only a part a killed run built can be gone; this run built it just now
        raise RuntimeError(f"{batch.name}: the raw dataset's new part vanished before it was moved in")
    return retrain(batch.md5, done, ledger, run)


def record_turned_away(batch: monitor.Batch, screened: Screened, decision: BatchDecision, quarantine: Path | None,
                       ledger: dict[str, Any], run: MonitorContext) -> BatchOutcome:
    ledger["batches"][batch.md5] = monitor.ledger_entry(batch, screened, decision, None, None, quarantine, run.project)
    monitor.write_ledger(ledger, run.params, run.project)
    return BatchOutcome(batch.name, decision)


def complete(md5: str, entry: dict[str, Any], ledger: dict[str, Any], run: MonitorContext) -> BatchOutcome | None:
    """The rest of a batch's transaction, after its entry is in the ledger: the append (when
    the entry holds one), the event, the retrain's place in the rate limit, and the entry's
    completion. Called again by the next run on an entry a killed run left pending. None when
    the append never happened and its next version is gone: the entry is dropped so that the
    batch is read again as new (nothing of it is in the dataset)."""
    params, project = run.params, run.project
    intent = entry.get("append")
    if entry["state"] == monitor.PENDING and intent:
        if monitor.append_abandoned(intent, params, project):
            del ledger["batches"][md5]
            monitor.write_ledger(ledger, params, project)
            return None
        entry["appended"] = with_retries(append_batch, params)(intent, params, project)
    decision = BatchDecision.from_entry(entry)
    if decision.alarm:
        emit_drift(entry.get("key") or entry["file"], params, decision, monitor.retrain_by(decision, run.mode))
    warnings = monitor.push_warnings(entry.get("appended"), intent)
    for warning in warnings:
        get_run_logger().warning("%s: %s", entry["file"], warning)
    monitor.close_entry(ledger, entry, decision, warnings, run.mode)
    # recorded before the retrain runs: a failed retrain must not make the batch count twice,
    # and its retrain_state (pending until the training flow returns) makes the next run retry it
    monitor.write_ledger(ledger, params, project)
    return BatchOutcome(entry["file"], decision, tuple(warnings))


def retrain(md5: str, done: BatchOutcome, ledger: dict[str, Any], run: MonitorContext) -> BatchOutcome:
    """Run the retrain a completed batch decided on (in this process in `flow` mode; the
    deployment's trigger runs it in `event` mode). In flow mode the entry's retrain_state
    turns `done` only once the training flow has returned."""
    from dataclasses import replace

    if not done.decision.retrain:
        return done
    logger = get_run_logger()
    if run.mode != "flow":
        logger.info("%s: %s emitted; the training deployment's trigger runs the retrain", done.batch, EVENT)
        return done
    logger.info("%s: retraining on the new data version", done.batch)
    trained = training_flow(params_path=str(run.params_file), overrides=run.overrides, root=str(run.project))
    monitor.retrain_done(ledger, md5)
    monitor.write_ledger(ledger, run.params, run.project)
    return replace(done, register=trained.register)
