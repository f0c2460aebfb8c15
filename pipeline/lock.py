"""One process at a time per project for work that must not interleave: an advisory lock
(fcntl) on a file in the project. The operating system releases it when the holder exits,
however it exits, so a crashed run never leaves a stale lock behind. It guards processes on
one machine (or one shared file system that supports fcntl locks)."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import D2DError


@contextmanager
def exclusive(path: Path, what: str) -> Iterator[None]:
    """Hold `path`'s lock for the block, or refuse at once (D2DError, exit 2) naming `what`
    holds it: waiting silently behind a long run would look like a hang."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "r+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = handle.read().strip()
            raise D2DError(f"{what} is already in progress in this project ({path} is locked"
                           + (f" by process {holder}" if holder.isdigit() else "") + "); wait for it to finish") from None
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))  # for the message above; the lock itself is the flock
            handle.flush()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
