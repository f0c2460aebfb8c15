"""Errors a user can fix. The CLI prints their message on one line and exits 2 (1 for a
service that is down: the input was fine, the run can be repeated once it is back)."""


def first_line(e: BaseException) -> str:
    """An exception's message as one line (its type's name when it has none)."""
    return (str(e).splitlines() or [type(e).__name__])[0]


class D2DError(Exception):
    """A problem with the user's input (data, params, paths), not a bug in d2d."""

    exit_code = 2


class ConfigError(D2DError):
    """params.yaml or a --set override is invalid; the message names the key."""


class DataError(D2DError):
    """The dataset cannot be used: missing file, missing columns, too many bad rows."""


class ServiceError(D2DError):
    """A server d2d needs (MLflow, a Ray cluster) did not answer after retries with backoff."""

    exit_code = 1
