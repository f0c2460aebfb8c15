"""The training flow: a table of contents over the pipeline's stages.

Tasks only add what Prefect is for (names, retries, logs); the work is in pipeline.stages,
the same functions the DVC stages run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from pipeline import stages
from pipeline.config import Params, load_params


@task(name="data-version")
def version_data(params: Params, root: Path) -> dict[str, Any]:
    """Record the raw data's md5 and push it to the DVC remote when it is the DVC-recorded version."""
    version = stages.run_data_version(params, root)
    get_run_logger().info("data version %s (%s): %s", version["md5"], version["path"], version["dvc"])
    return version


def _run_stage(name: str, params: Params, root: Path, **kwargs: Any) -> dict[str, Any]:
    summary = stages.STAGES[name](params, root, **kwargs)
    get_run_logger().info("%s: %s", name, {k: v for k, v in summary.items() if not isinstance(v, (dict, list))})
    return summary


@task(name="validate")
def validate(params: Params, root: Path) -> dict[str, Any]:
    return _run_stage("validate", params, root)


@task(name="clean")
def clean(params: Params, root: Path) -> dict[str, Any]:
    return _run_stage("clean", params, root)


@task(name="split")
def split(params: Params, root: Path) -> dict[str, Any]:
    return _run_stage("split", params, root)


@task(name="train")
def train(params: Params, root: Path) -> dict[str, Any]:
    return _run_stage("train", params, root)


@task(name="evaluate")
def evaluate(params: Params, root: Path) -> dict[str, Any]:
    from prefect.runtime import flow_run

    # the MLflow run and the registered version point back at this flow run
    return _run_stage("evaluate", params, root, tags={"prefect.flow_run_id": str(flow_run.id)})


# Registration talks to the tracking server; a brief outage should not waste a training run.
@task(name="register", retries=2, retry_delay_seconds=5)
def register(params: Params, root: Path) -> dict[str, Any]:
    return _run_stage("register", params, root)


@flow(name="d2d-training")
def training_flow(params_path: str = "params.yaml", overrides: list[str] | None = None, root: str = ".") -> dict[str, Any]:
    """validate → clean → split → train → evaluate → register."""
    project = Path(root).resolve()
    params = load_params(project / params_path if not Path(params_path).is_absolute() else params_path, overrides)
    data = version_data(params, project)
    validated = validate(params, project)
    cleaned = clean(params, project)
    splits = split(params, project)
    trained = train(params, project)
    metrics = evaluate(params, project)
    registered = register(params, project)
    return {
        "data": data,
        "validate": validated,
        "clean": cleaned,
        "split": splits,
        "train": trained,
        "metrics": metrics,
        "register": registered,
    }
