"""Batch inference as a Prefect flow: one task that scores files with the pinned champion
through Ray Data (pipeline.predict), retried when a service fails."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task

from flows.retry import retry_worthwhile, with_retries
from pipeline.config import Params, load_params
from pipeline.predict import Predicted, run_predict


@task(name="batch-predict", retry_condition_fn=retry_worthwhile)
def score(params: Params, root: Path, source: Path, output: Path, force: bool = False) -> Predicted:
    result = run_predict(params, root, source, output, force)
    get_run_logger().info("scored %d rows from %d file(s) with %s → %s (%d rows with errors)", result.rows,
                          result.files, result.model, result.output, result.errors)
    return result


@flow(name="d2d-batch-predict")
def predict_flow(input: str, output: str, params_path: str = "params.yaml", overrides: list[str] | None = None,
                 root: str = ".", force: bool = False) -> Predicted:
    """input (file or folder) → the champion, via Ray Data → output file (an existing one is
    replaced only with `force`)."""
    project = Path(root).resolve()
    params = load_params(Path(params_path) if Path(params_path).is_absolute() else project / params_path, overrides)
    resolve = lambda p: Path(p) if Path(p).is_absolute() else project / p  # noqa: E731
    return with_retries(score, params)(params, project, resolve(input), resolve(output), force)
