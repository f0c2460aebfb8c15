"""The inference log: scored rows appended to Parquet parts under <dir>/date=YYYY-MM-DD/, off
the request path. Requests put their rows on a bounded queue; a daemon thread writes a part
every `flush_s`. Nothing is lost without a count: a row is either written, or set aside in a
dead-letter file with the reason (<dir>/_dead_letter/, which the monitor's `date=*/part-*`
glob and Parquet dataset readers skip), or dropped because the queue was full and counted.
The thread never dies on a bad part, and partitions older than `retention_days` are removed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.data import io

logger = logging.getLogger("ray.serve")

DEAD_LETTER = "_dead_letter"  # a leading "_": pyarrow's dataset discovery ignores it


@dataclass(frozen=True)
class Entry:
    """One request's rows: when it was scored, by which version, its inputs and outputs."""

    stamp: datetime
    version: str
    frame: pd.DataFrame
    out: pd.DataFrame


def _claim(name: Any, taken: set[str]) -> str:
    """A string column name not taken yet: Parquet needs unique string names, and a request's
    own columns (a feature called `timestamp`, `out_label`) keep theirs before the log's."""
    name = str(name)
    while name in taken:
        name = "_" + name
    taken.add(name)
    return name


def log_table(entries: list[Entry]) -> pd.DataFrame:
    """All queued requests as one table, built once per flush (not once per request: that cost
    the replica a tenth of its time): timestamp, model_version, the inputs, out_<outputs>."""
    taken: set[str] = set()
    inputs = [e.frame.set_axis(_names(e.frame.columns, taken, ""), axis=1) for e in entries]
    taken |= {c for f in inputs for c in f.columns}
    outputs = [e.out.set_axis(_names(e.out.columns, taken, "out_"), axis=1) for e in entries]
    taken |= {c for f in outputs for c in f.columns}
    sizes = [len(e.frame) for e in entries]
    table = pd.concat([pd.concat(inputs, ignore_index=True), pd.concat(outputs, ignore_index=True)], axis=1)
    if len(table) != sum(sizes):
        raise ValueError(f"{sum(sizes)} input rows but {len(table)} rows with the outputs")
    version, stamp = _claim("model_version", taken), _claim("timestamp", taken)
    table.insert(0, version, np.repeat([e.version for e in entries], sizes))
    table.insert(0, stamp, pd.to_datetime(np.repeat([e.stamp for e in entries], sizes), utc=True))
    return table


def _names(columns: pd.Index, taken: set[str], prefix: str) -> list[str]:
    """Unique string names for one frame's columns, avoiding `taken` (names from other frames
    with the same meaning are reused, so a column lines up across requests)."""
    mine: set[str] = set()
    names = []
    for c in columns:
        name = f"{prefix}{c}"
        while name in mine or (prefix and name in taken):
            name = "_" + name
        mine.add(name)
        names.append(name)
    return names


def _plain(value: Any) -> Any:
    """A JSON value for a logged cell: numpy scalars as Python, non-finite floats and other
    objects as their text (the dead letter must never fail on what it is given)."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (datetime, date, pd.Timestamp)):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return repr(value)


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """A frame's rows as dicts of JSON values, without pandas' own (and fallible) serializer."""
    names = _names(frame.columns, set(), "")
    return [dict(zip(names, map(_plain, row))) for row in frame.itertuples(index=False, name=None)]


class InferenceLog:
    """Scored rows to Parquet parts, with a bounded queue, a dead letter and retention; see the
    module docstring. `stats()` is what /health reports."""

    def __init__(self, folder: Path, flush_s: float, max_queued_rows: int = 100_000,
                 retention_days: int | None = None) -> None:
        self.folder, self.flush_s = folder, flush_s
        self.max_queued_rows, self.retention_days = max_queued_rows, retention_days
        self._pending: deque[Entry] = deque()
        self._lock = threading.Lock()
        self._queued = 0
        self.counts = {"written_rows": 0, "dead_letter_rows": 0, "dead_letter_parts": 0, "dropped_rows": 0,
                       "lost_rows": 0, "write_errors": 0}
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="inference-log", daemon=True)
        self.thread.start()

    def add(self, frame: pd.DataFrame, out: pd.DataFrame, version: str) -> bool:
        """Queue a request's rows; False (and counted) when the queue is full. The request
        pays for a lock and an append only."""
        rows = len(frame)
        with self._lock:
            if self._queued + rows > self.max_queued_rows:
                self.counts["dropped_rows"] += rows
                return False
            self._pending.append(Entry(datetime.now(timezone.utc), version, frame, out))
            self._queued += rows
        return True

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {**self.counts, "queued_rows": self._queued, "writer_alive": self.thread.is_alive()}

    def _count(self, key: str, n: int) -> None:
        with self._lock:
            self.counts[key] += n

    def _run(self) -> None:
        while not self.stopping.wait(self.flush_s):
            self._step()
        self._step()

    def _step(self) -> None:
        """One flush and the retention sweep; an error is logged and counted, never raised, so
        the thread outlives any part."""
        try:
            self.flush()
            self.remove_expired()
        except Exception:  # the dead letter's own write failed too (a full disk): keep going
            self._count("write_errors", 1)
            logger.exception("inference log: a flush failed")

    def flush(self) -> None:
        with self._lock:
            entries, self._pending = list(self._pending), deque()
            self._queued = 0
        entries = [e for e in entries if len(e.frame)]
        if not entries:
            return
        by_day: dict[str, list[Entry]] = {}
        for e in entries:
            by_day.setdefault(e.stamp.strftime("%Y-%m-%d"), []).append(e)
        for day, group in by_day.items():
            try:
                self._write(day, log_table(group))
                self._count("written_rows", sum(len(e.frame) for e in group))
            except Exception as e:
                if len(group) == 1:
                    self._dead_letter(day, group[0], e)
                    continue
                # one request spoilt the part (7 and "seven" in one column): write each on its
                # own, so only what cannot be written at all is set aside
                for one in group:
                    try:
                        self._write(day, log_table([one]))
                        self._count("written_rows", len(one.frame))
                    except Exception as error:
                        self._dead_letter(day, one, error)

    def _write(self, day: str, table: pd.DataFrame) -> None:
        """A part under a unique name, written to a hidden temporary file in the same folder and
        renamed into place: a reader never sees half a file, and two writers never share one."""
        # the requests' rows: readable by the owner only
        io.write_parquet(table, self.folder / f"date={day}" / f"part-{time.time_ns()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.parquet",
                         private=True)

    def _dead_letter(self, day: str, entry: Entry, error: Exception) -> None:
        """The request's rows as JSON lines, each with the reason, in an owner-only file; when
        even that fails, the rows are counted as lost and the error is logged."""
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:500]
        rows = len(entry.frame)
        try:
            inputs, outputs = _records(entry.frame), _records(entry.out)
            io.private_dir(self.folder / DEAD_LETTER)
            path = self.folder / DEAD_LETTER / f"date={day}" / f"dead-{time.time_ns()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
            lines = [json.dumps({"reason": reason, "timestamp": entry.stamp.isoformat(), "model_version": entry.version,
                                 "inputs": row, "outputs": outputs[i] if i < len(outputs) else None}, allow_nan=False)
                     for i, row in enumerate(inputs)]
            io.write_text("".join(line + "\n" for line in lines), path, private=True)
        except Exception:
            self._count("lost_rows", rows)
            logger.exception("inference log: %d rows could not be written (%s) nor dead-lettered", rows, reason)
            return
        self._count("dead_letter_rows", rows)
        self._count("dead_letter_parts", 1)
        logger.error("inference log: %d rows set aside in %s: %s", rows, path, reason)

    def remove_expired(self, today: date | None = None) -> list[Path]:
        """Remove date= partitions (and dead letters) older than retention_days; [] when kept forever."""
        if self.retention_days is None:
            return []
        oldest = (today or datetime.now(timezone.utc).date()) - timedelta(days=self.retention_days)
        removed = []
        for parent in (self.folder, self.folder / DEAD_LETTER):
            if not parent.is_dir():
                continue
            for partition in parent.glob("date=*"):
                try:
                    day = date.fromisoformat(partition.name.removeprefix("date="))
                except ValueError:
                    continue  # not ours: left alone
                if day < oldest and partition.is_dir() and not partition.is_symlink():
                    io.remove(partition)
                    removed.append(partition)
        if removed:
            logger.info("inference log: removed %d partitions older than %d days", len(removed), self.retention_days)
        return removed

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=30)
