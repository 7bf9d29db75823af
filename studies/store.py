"""Atomic file writes and the results store of a study folder.

One write rule for every file a study writes (results.csv, metrics.csv, telemetry.csv, study.json): the content
goes to a temporary file in the same folder, is flushed and fsynced, then ``os.replace``-d over the target, and
the folder is fsynced. A SIGKILL at any moment leaves either the old or the new file, never a mix.

``ResultsStore`` is ``DIR/results.csv``: one row per run id. Appending a row takes an exclusive lock on
``DIR/.results.lock`` (``filelock``, portable), reads the current rows, and rewrites the whole file atomically
through ``studies.schema`` (one encoding for writer and reader); a row whose run id is already present replaces it.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

from filelock import FileLock

from studies import schema
from studies.schema import to_strict_json

__all__ = ["RESULT_COLUMNS", "ResultsStore", "write_atomic", "write_csv_atomic", "write_json_atomic"]

csv.field_size_limit(sys.maxsize)

# The results columns, in studies.schema's order (a list, as csv.DictWriter and the tests compare it).
RESULT_COLUMNS = list(schema.RESULT_COLUMNS)


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":  # folders cannot be opened for fsync on Windows
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Replace ``path`` with ``data`` atomically (temporary file, fsync, ``os.replace``, fsync of the folder)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    mode = "wb" if isinstance(data, bytes) else "w"
    with open(tmp, mode, **({} if isinstance(data, bytes) else {"newline": ""})) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_csv_atomic(df, path: str | Path) -> None:
    """Write a pandas DataFrame as CSV (no index) atomically."""
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    write_atomic(path, buf.getvalue())


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented strict JSON (non-finite floats become null) atomically."""
    text = json.dumps(to_strict_json(obj), indent=2, sort_keys=False, allow_nan=False)
    write_atomic(path, text + "\n")


class ResultsStore:
    """``DIR/results.csv``: one row per run id, appended atomically under a file lock."""

    def __init__(self, out_dir: str | Path):
        self.dir = Path(out_dir)
        self.path = self.dir / "results.csv"
        self.lock_path = self.dir / ".results.lock"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the exclusive lock on the results file for the duration of the block."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.lock_path)):
            yield

    def rows(self) -> list[dict[str, str]]:
        """All rows as dicts of strings (empty list when there is no results file yet)."""
        if not self.path.exists():
            return []
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))

    def completed(self) -> dict[str, dict[str, str]]:
        """run_id -> row for every run that finished (status ok or diverged; failed runs are retried)."""
        return {r["run_id"]: r for r in self.rows() if r.get("status", "ok") != "error"}

    def _write(self, rows: list[dict[str, Any]]) -> None:
        """Rows (typed values or text cells as read back) -> results.csv, through the schema's encoding."""
        write_atomic(self.path, schema.results_csv_text([schema.typed_row(r) for r in rows]))

    def append(self, row: dict[str, Any]) -> None:
        """Add ``row`` (replacing any row with the same run_id) atomically."""
        with self.locked():
            rows = [r for r in self.rows() if r["run_id"] != row["run_id"]]
            rows.append(row)
            self._write(rows)

    def update(self, fn: Callable[[dict[str, str]], dict[str, Any]]) -> None:
        """Rewrite every row through ``fn`` atomically (used to fill in targets after the tune phase)."""
        with self.locked():
            self._write([fn(dict(r)) for r in self.rows()])
