"""The training flow: one Prefect task per stage of pipeline/stages.py's table, in its order.

Tasks only add what Prefect is for (names, retries, logs, artifacts); the work is in the
table's runners, the same functions the DVC stages run. When the project is a DVC project
run with its own params.yaml, each task first asks DVC whether its stage is up to date in
dvc.lock (same data, same params section, same code, outputs intact) and then reuses the
outputs; otherwise it runs the stage and records the result in dvc.lock with `dvc commit`.
So a second `d2d run` skips what did not change, `dvc repro` after a `d2d run` has nothing
to do, and a `d2d run` after `dvc repro` reuses its outputs: one record, kept by DVC.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from flows.retry import retry_worthwhile, with_retries
from pipeline import lock, stages, versioning
from pipeline.config import Params, load_params
from pipeline.data import io
from pipeline.summaries import Summary, TrainingRun


def run_or_reuse(name: str, params: Params, root: Path, why_unrecorded: str | None, params_md5: str,
                 lineage: dict[str, str]) -> Summary:
    """One stage, or its recorded outputs when DVC says it is up to date. `why_unrecorded`:
    None to check and record the stage in dvc.lock, else why not; `params_md5`: params.yaml
    as this run read it."""
    logger = get_run_logger()
    stage = stages.stage(name)
    record = stage.dvc and why_unrecorded is None
    started = time.perf_counter()
    if record and versioning.stage_up_to_date(root, name):
        logger.info("%s: up to date in dvc.lock (same data, params and code); reusing its outputs", name)
        record_time(root, name, "reused", started, started)
        return stage.summary.from_report(io.read_json(stages.path(stage.report, root)))
    checked = time.perf_counter()
    summary = stages.run(name, params, root, lineage)
    ran = time.perf_counter()
    if record:
        if io.file_md5(root / "params.yaml") == params_md5:
            versioning.record_stage(root, name)
        else:  # dvc commit would pair these outputs with params they were not made with
            logger.warning("%s: params.yaml changed during the run; dvc.lock not updated", name)
    record_time(root, name, "ran", started, ran, checked)
    logger.info("%s: %s (%.1f s)", name, summary.shown(), ran - checked)
    return summary


def record_time(root: Path, name: str, how: str, started: float, ran: float, checked: float | None = None) -> None:
    """reports/timings.json: each step's own time and the DVC bookkeeping around it, so the
    orchestration overhead (wall time minus step time) can be measured."""
    path = stages.path("timings", root)
    timings = io.read_json(path) if path.is_file() else {}
    step = ran - checked if checked is not None else 0.0
    timings[name] = {"how": how, "step_s": round(step, 3), "dvc_s": round(time.perf_counter() - started - step, 3)}
    io.write_json(timings, path)


# One task per stage, named as in the table; a stage that talks to a service retries.
STAGE_TASKS = {s.name: task(run_or_reuse, name=s.name, retry_condition_fn=retry_worthwhile if s.service else None)
               for s in stages.STAGES}


@task(name="publish-report")
def publish_report(result: TrainingRun, root: Path) -> None:
    """The run's summary and per-class metrics as Prefect artifacts, for the UI."""
    import mlflow
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from pipeline.report import per_class_rows, run_summary

    create_markdown_artifact(key="d2d-run-summary", markdown=run_summary(result, root, mlflow.get_tracking_uri()),
                             description="validation, splits, test metrics and the promotion decision")
    rows = per_class_rows(stages.path("per_class", root))
    if rows:
        create_table_artifact(key="d2d-per-class-metrics", table=rows, description="test metrics per class")


@flow(name="d2d-training")
def training_flow(params_path: str = "params.yaml", overrides: list[str] | None = None, root: str = ".") -> TrainingRun:
    """data version → validate → clean → split → train → evaluate → register."""
    project = Path(root).resolve()
    params_file = Path(params_path) if Path(params_path).is_absolute() else project / params_path
    params = load_params(params_file, overrides)
    # Two runs in one project would write the same splits, checkpoints and dvc.lock at once.
    # On a Prefect server the deployments' concurrency_limit queues them; this lock covers
    # every other way in (`d2d run` twice, a run beside a deployment's or the monitor's retrain).
    with lock.exclusive(stages.path("run_lock", project), "a training run"):
        return run_stages(params, params_file, project, overrides)


def run_stages(params: Params, params_file: Path, project: Path, overrides: list[str] | None) -> TrainingRun:
    from prefect.runtime import flow_run

    why_unrecorded = versioning.lock_mode(project, params_file, overrides or [])
    params_md5 = io.file_md5(params_file)  # what this run read
    stages.path("timings", project).unlink(missing_ok=True)
    if why_unrecorded:
        get_run_logger().info("every stage runs and dvc.lock is not updated: %s", why_unrecorded)
    # the MLflow run and the registered version point back at this flow run
    lineage = {"prefect.flow_run_id": str(flow_run.id)}
    summaries: dict[str, Any] = {}
    for stage in stages.STAGES:
        run_task = with_retries(STAGE_TASKS[stage.name], params) if stage.service else STAGE_TASKS[stage.name]
        summaries[stage.name.replace("-", "_")] = run_task(stage.name, params, project, why_unrecorded, params_md5,
                                                           lineage)
    result = TrainingRun(**summaries)
    publish_report(result, project)
    return result
