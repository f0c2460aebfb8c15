"""The drift monitor flow: for each new batch in the inbox, screen → measure drift → report →
decide; a batch that drifted joins the dataset as a new DVC version and, when the decision
allows, the training flow runs on it.

The retrain runs one of two ways (monitor.retrain): `flow` calls the training flow here, as a
subflow, which is what embedded mode (no Prefect server) can do; `event` only emits
`d2d.drift.detected`, and the training deployment's trigger in prefect.yaml (an automation on
the server) starts a training run on a worker. `auto` picks `event` when PREFECT_API_URL is set.

Appending a batch is a write-ahead transaction in the ledger (see pipeline.monitor): a run
killed between the append and its record leaves a `pending` entry, and the next run finishes
it first: the append is not repeated; the versioning, the event and the retrain happen once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.training import _retry_worthwhile, _with_retries, training_flow
from pipeline import drift, monitor
from pipeline.config import Params, load_params
from pipeline.data import io
from pipeline.data.schema import schema_from_params
from pipeline.errors import DataError

EVENT = "d2d.drift.detected"


@task(name="load-reference", retry_condition_fn=_retry_worthwhile, cache_policy=NO_CACHE)
def load_reference(params: Params, root: Path) -> monitor.Reference:
    reference = monitor.load_reference(params, root)
    get_run_logger().info("reference: champion version %s, %d training rows", reference.champion["version"],
                          len(reference.frame))
    return reference


@task(name="inspect-batch", retry_condition_fn=_retry_worthwhile, cache_policy=NO_CACHE)
def inspect_batch(batch: monitor.Batch, params: Params, root: Path, reference: monitor.Reference,
                  known_ids: set[str]) -> tuple[monitor.Screened, dict[str, Any] | None]:
    """Validate the batch with the dataset's expectations, then measure its drift."""
    logger = get_run_logger()
    schema = schema_from_params(params.data)
    try:
        screened = monitor.screen_batch(monitor.read_batch(batch, schema), schema, params, known_ids)
    except DataError as e:  # an unreadable file is a rejected batch, not a failed monitor
        screened = monitor.Screened(0, pd.DataFrame(), pd.DataFrame(), pd.DataFrame(), False, [str(e)])
    if screened.rejected:
        logger.warning("%s: rejected (%s); %d rows quarantined", batch.name, "; ".join(screened.rejected),
                       len(screened.quarantine))
        return screened, None
    inspected = monitor.inspect_batch(screened, reference, params)
    logger.info("%s: %d rows (%d quarantined): %s", batch.name, screened.rows, len(screened.quarantine),
                "; ".join(inspected["report"].reasons))
    return screened, inspected


@task(name="publish-drift-report", retry_condition_fn=_retry_worthwhile, cache_policy=NO_CACHE)
def publish(batch: monitor.Batch, screened: monitor.Screened, inspected: dict[str, Any], decision: dict[str, Any],
            reference: monitor.Reference, params: Params, root: Path) -> Path:
    """HTML + JSON on disk, a run in the `monitoring` MLflow experiment, a Prefect artifact."""
    from prefect.artifacts import create_markdown_artifact

    from pipeline import tracking

    report: drift.DriftReport = inspected["report"]
    key = batch.key
    html, summary = monitor.write_reports(key, inspected, reference, screened, root,
                                          {"batch": batch.name, "decision": decision})
    metrics = {"drift_share": report.share, "drifted_features": float(report.features["drifted"].sum()),
               "prediction_drift_score": inspected["prediction"]["score"], "prediction_psi": inspected["prediction"]["psi"],
               "rows": float(screened.rows), "rows_quarantined": float(len(screened.quarantine))}
    if report.multivariate:
        metrics["domain_auc"] = report.multivariate["roc_auc"]
    if inspected["performance"]:
        metrics[f"batch_{inspected['performance']['metric']}"] = inspected["performance"]["batch"]
    run_id = tracking.reachable(lambda: tracking.log_drift_run(
        params.monitor.experiment, root, key, metrics,
        {"batch": batch.name, "champion_version": reference.champion["version"]},
        {"d2d.drifted": str(report.drifted).lower(), "d2d.action": decision["action"],
         "d2d.champion_version": str(reference.champion["version"])}, [html, summary], screened.valid))
    top = report.features.head(8)
    table = "\n".join(f"| {r.feature} | {r.test} | {r.score:.4g} | {r.threshold:g} | {'yes' if r.drifted else 'no'} | {r.psi:.3f} |"
                      for r in top.itertuples())
    create_markdown_artifact(
        key="d2d-drift-report",
        description=f"drift report for {batch.name}",
        markdown=f"# Drift report: {batch.name}\n\n**{'DRIFT' if report.drifted else 'no drift'}**, "
                 f"action: **{decision['action']}**\n\n" + "\n".join(f"- {r}" for r in decision["reasons"])
                 + f"\n\n| feature | test | score | threshold | drifted | PSI |\n|---|---|---|---|---|---|\n{table}\n\n"
                 f"Full report: `{html.relative_to(root)}`; MLflow run `{run_id}` in experiment "
                 f"`{params.monitor.experiment}`.\n")
    return html


@task(name="append-batch", retry_condition_fn=_retry_worthwhile, cache_policy=NO_CACHE)
def append_batch(intent: dict[str, Any], params: Params, root: Path) -> dict[str, str]:
    """Swap in the raw file's next version (the intent the ledger holds) and version it."""
    appended = monitor.install_append(intent, params, root)
    get_run_logger().info("appended %d rows to %s: md5 %s → %s; %s; %s", intent["rows"], appended["path"],
                          appended["md5_before"][:8], appended["md5_after"][:8], appended["dvc"], appended["git"])
    return appended


@task(name="emit-drift-event", cache_policy=NO_CACHE)
def emit_drift(key: str, params: Params, decision: dict[str, Any], retrain_by: str) -> None:
    """`d2d.drift.detected` on the model's resource. Its `d2d.retrain` label says who retrains:
    `automation` is what the training deployment's trigger matches; `in-process` and `no` are
    recorded for the event feed only."""
    from prefect.events import emit_event

    emit_event(event=EVENT,
               resource={"prefect.resource.id": f"d2d.model.{params.register_.model_name}", "d2d.retrain": retrain_by},
               payload={"batch": key, "reasons": decision["reasons"], "action": decision["action"]})


@flow(name="d2d-drift-monitor")
def monitor_flow(params_path: str = "params.yaml", overrides: list[str] | None = None, root: str = ".") -> dict[str, Any]:
    """inbox → screen → drift → report → decide → (append, event, retrain)."""
    logger = get_run_logger()
    project = Path(root).resolve()
    params_file = Path(params_path) if Path(params_path).is_absolute() else project / params_path
    params = load_params(params_file, overrides)
    from prefect.settings import get_current_settings

    mode = monitor.retrain_mode(params, get_current_settings().api.url)
    logger.info("retrain mode: %s (monitor.retrain: %s)", mode, params.monitor.retrain)
    outcomes = []
    with monitor.exclusive(params, project):
        ledger = monitor.read_ledger(params, project)
        monitor.discard_stale_stages(ledger, params, project)
        retrains = 0
        for md5, entry in monitor.unfinished(ledger):  # what a killed run left half-done, first
            logger.warning("%s: finishing what a previous run recorded but did not complete (append, event, retrain)", entry["file"])
            done = _complete(md5, entry, ledger, params, project, mode)
            if done is None:  # nothing was appended: the batch is read again below, as new
                continue
            retrains += _retrain(md5, done, ledger, params, params_file, overrides, project, mode)
            outcomes.append(done)
        for md5, entry in monitor.retrains_pending(ledger):  # a retrain a killed or refused run never finished
            logger.warning("%s: the retrain decided by a previous run did not finish; running it now", entry["file"])
            done = {"batch": entry["file"], "action": entry["action"], "retrain": True, "reasons": entry["reasons"]}
            retrains += _retrain(md5, done, ledger, params, params_file, overrides, project, mode)
            outcomes.append(done)
        pending = monitor.pending_batches(params, project, ledger)
        logger.info("%d new batch(es) in %s", len(pending), params.monitor.inbox)
        if not pending:
            return {"batches": outcomes, "retrains": retrains, "mode": mode}
        reference = None
        for batch in pending:
            key = batch.key
            if batch.refused:
                logger.warning("%s: refused (%s); left untouched", batch.name, batch.refused)
                decision = {"action": "refused", "retrain": False, "reasons": [batch.refused]}
                screened = monitor.Screened(0, pd.DataFrame(), pd.DataFrame(), pd.DataFrame(), False, [batch.refused])
                ledger["batches"][batch.md5] = monitor.ledger_entry(batch, screened, decision, None, None, None, project)
                monitor.write_ledger(ledger, params, project)
                outcomes.append({"batch": batch.name, **decision})
                continue
            if reference is None:
                reference = _with_retries(load_reference, params)(params, project)
            screened, inspected = _with_retries(inspect_batch, params)(
                batch, params, project, reference, monitor.known_ids(params, project))
            ledger.setdefault("log_parts", []).extend(batch.log_parts)
            quarantine = monitor.write_quarantine(key, screened.quarantine, params, project)
            if inspected is None:
                decision = {"action": "rejected", "retrain": False, "reasons": screened.rejected}
                ledger["batches"][batch.md5] = monitor.ledger_entry(batch, screened, decision, None, None, quarantine, project)
                monitor.write_ledger(ledger, params, project)
                outcomes.append({"batch": batch.name, **decision})
                continue
            act, retrain, reasons = drift.retrain_decision(
                inspected["report"], inspected["prediction"], inspected["performance"], screened.labelled,
                monitor.retrain_times(ledger), monitor.utc_now(), params.monitor)
            retrain = retrain and mode != "off"
            action = ("retrain" if retrain else "append") if act and screened.labelled else ("alert" if act else "none")
            decision = {"action": action, "retrain": retrain, "reasons": reasons,
                        "drift_share": inspected["report"].share,
                        "domain_auc": (inspected["report"].multivariate or {}).get("roc_auc")}
            report = _with_retries(publish, params)(batch, screened, inspected, decision, reference, params, project)
            entry = monitor.ledger_entry(batch, screened, decision, report, None, quarantine, project)
            # write-ahead: what must follow (event, retrain, and for labelled rows the raw file's
            # next version, built but not yet swapped in) is recorded before any of it happens
            entry |= {"key": key, "act": act, "state": monitor.PENDING if act else monitor.COMPLETE}
            if act and screened.labelled:
                entry["append"] = monitor.stage_append(screened.raw_valid, params, project)
            ledger["batches"][batch.md5] = entry
            monitor.write_ledger(ledger, params, project)
            done = _complete(batch.md5, entry, ledger, params, project, mode)
            retrains += _retrain(batch.md5, done, ledger, params, params_file, overrides, project, mode)
            if done["retrain"] and mode == "flow":
                reference = _with_retries(load_reference, params)(params, project)  # the next batch meets the new champion
            outcomes.append(done)
    return {"batches": outcomes, "retrains": retrains, "mode": mode}


def _complete(md5: str, entry: dict[str, Any], ledger: dict[str, Any], params: Params, project: Path,
              mode: str) -> dict[str, Any] | None:
    """The rest of a batch's transaction, after its entry is in the ledger: the append (when
    the entry holds one), the event, the retrain's place in the rate limit, and the entry's
    completion. Called again by the next run on an entry a killed run left pending. None when
    the append never happened and its next version is gone: the entry is dropped so that the
    batch is read again as new (nothing of it is in the dataset)."""
    logger = get_run_logger()
    intent = entry.get("append")
    if entry["state"] == monitor.PENDING and intent:
        staged = monitor.raw_path(params, project).with_name(intent["staged"])
        if io.file_md5(monitor.raw_path(params, project)) == intent["md5_before"] and not staged.is_file():
            del ledger["batches"][md5]
            monitor.write_ledger(ledger, params, project)
            return None
        entry["appended"] = _with_retries(append_batch, params)(intent, params, project)
    decision = {"action": entry["action"], "retrain": entry["retrain"], "reasons": entry["reasons"],
                "drift_share": entry.get("drift_share"), "domain_auc": entry.get("domain_auc")}
    key = entry.get("key") or entry["file"]
    if entry.get("act"):
        emit_drift(key, params, decision, ("automation" if mode == "event" else "in-process") if entry["retrain"] else "no")
    if entry["retrain"]:
        ledger["retrains"].append({"at": monitor.utc_now().isoformat(timespec="seconds"), "batch": key, "by": mode})
    warnings = monitor.push_warnings(entry.get("appended"), intent)
    for warning in warnings:
        logger.warning("%s: %s", entry["file"], warning)
    entry |= {"state": monitor.COMPLETE, "warnings": warnings,
              **({"retrain_state": monitor.PENDING} if entry["retrain"] and mode == "flow" else {})}
    # recorded before the retrain runs: a failed retrain must not make the batch count twice,
    # and its retrain_state (pending until the training flow returns) makes the next run retry it
    monitor.write_ledger(ledger, params, project)
    return {"batch": entry["file"], **decision, "warnings": warnings}


def _retrain(md5: str, done: dict[str, Any], ledger: dict[str, Any], params: Params, params_file: Path,
             overrides: list[str] | None, project: Path, mode: str) -> int:
    """Run the retrain a completed batch decided on (in this process in `flow` mode; the
    deployment's trigger runs it in `event` mode). Returns how many retrains it counts. In flow
    mode the entry's retrain_state turns `done` only once the training flow has returned."""
    if not done["retrain"]:
        return 0
    logger = get_run_logger()
    if mode == "flow":
        logger.info("%s: retraining on the new data version", done["batch"])
        trained = training_flow(params_path=str(params_file), overrides=overrides, root=str(project))
        done["register"] = trained["register"]
        ledger["batches"][md5]["retrain_state"] = "done"
        monitor.write_ledger(ledger, params, project)
    else:
        logger.info("%s: %s emitted; the training deployment's trigger runs the retrain", done["batch"], EVENT)
    return 1
