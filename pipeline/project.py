"""Where the project's raw data may be: inside the project folder, unless named on the command line."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.config import Params
from pipeline.errors import ConfigError

RAW = "raw"  # the raw file (params' data.raw) among a stage's files (pipeline.stages)


def inside_project(path: Path, root: Path) -> bool:
    """Whether `path` stays in the project folder both as written (no `..` or absolute path
    out of it) and where its symbolic links lead."""
    lexical = Path(os.path.normpath(os.path.abspath(path)))
    return lexical.is_relative_to(os.path.abspath(root)) and path.resolve().is_relative_to(root.resolve())


def raw_path(params: Params, root: Path) -> Path:
    """The raw file, relative to the project root. A data.raw that leaves the project (an
    absolute path, `..`, or a symlink out) is refused unless named on the command line
    (`--set data.raw=PATH`): a params file, which may be generated or shared, cannot point
    d2d at a file elsewhere on the machine."""
    raw = root / params.data.raw
    if params.raw_named_explicitly:
        return raw
    if not inside_project(raw, root):
        raise ConfigError(
            f"data.raw '{params.data.raw}' is outside the project folder {os.path.abspath(root)}: copy the file into "
            f"the project (e.g. data/raw/{raw.name}) and set data.raw to that relative path, or name it explicitly "
            f"on the command line with --set data.raw={os.path.normpath(os.path.abspath(raw))}"
        )
    return raw
