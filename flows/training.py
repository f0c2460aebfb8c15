"""The training flow: a table of contents over the pipeline's stages.

Tasks only add what Prefect is for (names, retries, logs, artifacts); the work is in
pipeline.stages, the same functions the DVC stages run. When the project is a DVC project
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
from prefect.tasks import exponential_backoff

from pipeline import lock, stages, versioning
from pipeline.config import Params, load_params
from pipeline.data import io
from pipeline.errors import D2DError, ServiceError


TRANSIENT_MODULES = ("ray.", "mlflow.", "requests.", "urllib3.", "httpx.", "dvc.")


def _retry_worthwhile(task, task_run, state) -> bool:
    """Retry a service that failed (a server, the cluster, the network), never input that is
    wrong or a bug in a step: those fail the same way again."""
    error = state.result(raise_on_failure=False)
    if isinstance(error, D2DError):
        return isinstance(error, ServiceError)
    return isinstance(error, (ConnectionError, TimeoutError)) or type(error).__module__.startswith(TRANSIENT_MODULES)


def _stage(name: str, params: Params, root: Path, lock: str | None, params_md5: str, **kwargs: Any) -> dict[str, Any]:
    """`lock`: None to check and record the stage in dvc.lock, else why not; `params_md5`:
    params.yaml as this run read it."""
    logger = get_run_logger()
    started = time.perf_counter()
    if lock is None and versioning.stage_up_to_date(root, name):
        logger.info("%s: up to date in dvc.lock (same data, params and code); reusing its outputs", name)
        _record_time(root, name, "reused", started, started)
        return io.read_json(root / versioning.SUMMARIES[name])
    checked = time.perf_counter()
    summary = stages.STAGES[name](params, root, **kwargs)
    ran = time.perf_counter()
    if lock is None:
        if io.file_md5(root / "params.yaml") == params_md5:
            versioning.record_stage(root, name)
        else:  # dvc commit would pair these outputs with params they were not made with
            logger.warning("%s: params.yaml changed during the run; dvc.lock not updated", name)
    _record_time(root, name, "ran", started, ran, checked)
    logger.info("%s: %s (%.1f s)", name, {k: v for k, v in summary.items() if not isinstance(v, (dict, list))},
                ran - checked)
    return summary


def _record_time(root: Path, name: str, how: str, started: float, ran: float, checked: float | None = None) -> None:
    """reports/timings.json: each step's own time and the DVC bookkeeping around it, so the
    orchestration overhead (wall time minus step time) can be measured."""
    path = root / "reports/timings.json"
    timings = io.read_json(path) if path.is_file() else {}
    step = ran - checked if checked is not None else 0.0
    timings[name] = {"how": how, "step_s": round(step, 3), "dvc_s": round(time.perf_counter() - started - step, 3)}
    io.write_json(timings, path)


@task(name="data-version", retry_condition_fn=_retry_worthwhile)
def version_data(params: Params, root: Path) -> dict[str, Any]:
    """Record the raw data's md5 and push it to the DVC remote when it is the DVC-recorded version."""
    started = time.perf_counter()
    version = stages.run_data_version(params, root)
    _record_time(root, "data-version", "ran", started, time.perf_counter(), started)
    get_run_logger().info("data version %s (%s): %s", version["md5"], version["path"], version["dvc"])
    return version


@task(name="validate")
def validate(params: Params, root: Path, lock: str | None, params_md5: str) -> dict[str, Any]:
    return _stage("validate", params, root, lock, params_md5)


@task(name="clean")
def clean(params: Params, root: Path, lock: str | None, params_md5: str) -> dict[str, Any]:
    return _stage("clean", params, root, lock, params_md5)


@task(name="split")
def split(params: Params, root: Path, lock: str | None, params_md5: str) -> dict[str, Any]:
    return _stage("split", params, root, lock, params_md5)


@task(name="train", retry_condition_fn=_retry_worthwhile)
def train(params: Params, root: Path, lock: str | None, params_md5: str) -> dict[str, Any]:
    return _stage("train", params, root, lock, params_md5)


@task(name="evaluate", retry_condition_fn=_retry_worthwhile)
def evaluate(params: Params, root: Path, lock: str | None, params_md5: str) -> dict[str, Any]:
    from prefect.runtime import flow_run

    # the MLflow run and the registered version point back at this flow run
    return _stage("evaluate", params, root, lock, params_md5, tags={"prefect.flow_run_id": str(flow_run.id)})


@task(name="register", retry_condition_fn=_retry_worthwhile)
def register(params: Params, root: Path, lock: str | None, params_md5: str) -> dict[str, Any]:
    return _stage("register", params, root, lock, params_md5)


@task(name="publish-report")
def publish_report(result: dict[str, Any], root: Path) -> None:
    """The run's summary and per-class metrics as Prefect artifacts, for the UI."""
    import mlflow
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from pipeline.report import per_class_rows, run_summary

    create_markdown_artifact(key="d2d-run-summary", markdown=run_summary(result, root, mlflow.get_tracking_uri()),
                             description="validation, splits, test metrics and the promotion decision")
    rows = per_class_rows(root / "reports/per_class.csv")
    if rows:
        create_table_artifact(key="d2d-per-class-metrics", table=rows, description="test metrics per class")


def _with_retries(t: Any, params: Params) -> Any:
    """Tasks that talk to a service: retry counts and backoff from params.flow."""
    if not params.flow.retries:
        return t
    delays = exponential_backoff(backoff_factor=params.flow.retry_delay_s)(params.flow.retries)
    return t.with_options(retries=params.flow.retries, retry_delay_seconds=delays)


@flow(name="d2d-training")
def training_flow(params_path: str = "params.yaml", overrides: list[str] | None = None, root: str = ".") -> dict[str, Any]:
    """validate → clean → split → train → evaluate → register."""
    project = Path(root).resolve()
    params_file = Path(params_path) if Path(params_path).is_absolute() else project / params_path
    params = load_params(params_file, overrides)
    # Two runs in one project would write the same splits, checkpoints and dvc.lock at once.
    # On a Prefect server the deployments' concurrency_limit queues them; this lock covers
    # every other way in (`d2d run` twice, a run beside a deployment's or the monitor's retrain).
    with lock.exclusive(project / RUN_LOCK, "a training run"):
        return _train(params, params_file, project, overrides)


RUN_LOCK = ".d2d/run.lock"


def _train(params: Params, params_file: Path, project: Path, overrides: list[str] | None) -> dict[str, Any]:
    why_unrecorded = versioning.lock_mode(project, params_file, overrides or [])
    params_md5 = io.file_md5(params_file)  # what this run read
    (project / "reports/timings.json").unlink(missing_ok=True)
    if why_unrecorded:
        get_run_logger().info("every stage runs and dvc.lock is not updated: %s", why_unrecorded)
    data = _with_retries(version_data, params)(params, project)
    validated = validate(params, project, why_unrecorded, params_md5)
    cleaned = clean(params, project, why_unrecorded, params_md5)
    splits = split(params, project, why_unrecorded, params_md5)
    trained = _with_retries(train, params)(params, project, why_unrecorded, params_md5)
    metrics = _with_retries(evaluate, params)(params, project, why_unrecorded, params_md5)
    registered = _with_retries(register, params)(params, project, why_unrecorded, params_md5)
    result = {
        "data": data,
        "validate": validated,
        "clean": cleaned,
        "split": splits,
        "train": trained,
        "metrics": metrics,
        "register": registered,
    }
    publish_report(result, project)
    return result
