"""Errors a user can fix. The CLI prints their message on one line and exits 2."""


class D2DError(Exception):
    """A problem with the user's input (data, params, paths), not a bug in d2d."""


class ConfigError(D2DError):
    """params.yaml or a --set override is invalid; the message names the key."""


class DataError(D2DError):
    """The dataset cannot be used: missing file, missing columns, too many bad rows."""
