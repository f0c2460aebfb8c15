"""The flows' retry policy: a task that talks to a service retries `flow.retries` times with
exponential backoff from `flow.retry_delay_s`; bad input and bugs are never retried."""

from __future__ import annotations

from typing import Any

from prefect.tasks import exponential_backoff

from pipeline.config import Params
from pipeline.errors import D2DError, ServiceError

# an error raised from these libraries is a service's (a server, the cluster, the network)
TRANSIENT_MODULES = ("ray.", "mlflow.", "requests.", "urllib3.", "httpx.", "dvc.")


def retry_worthwhile(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a service that failed (a server, the cluster, the network), never input that is
    wrong or a bug in a step: those fail the same way again."""
    error = state.result(raise_on_failure=False)
    if isinstance(error, D2DError):
        return isinstance(error, ServiceError)
    return isinstance(error, (ConnectionError, TimeoutError)) or type(error).__module__.startswith(TRANSIENT_MODULES)


def with_retries(t: Any, params: Params) -> Any:
    """A task that talks to a service, with the retry count and backoff from params.flow."""
    if not params.flow.retries:
        return t
    delays = exponential_backoff(backoff_factor=params.flow.retry_delay_s)(params.flow.retries)
    return t.with_options(retries=params.flow.retries, retry_delay_seconds=delays)
