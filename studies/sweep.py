"""Sweep mechanics: the results store (atomic, resumable), deterministic shards, and parallel execution.

Atomicity: ``results.csv`` is only ever replaced whole. Appending a row takes an exclusive ``fcntl`` lock on
``DIR/.results.lock``, reads the current file, writes old rows + the new row to a temporary file in the same
folder, fsyncs it and ``os.replace``-s it over ``results.csv`` (then fsyncs the folder). A SIGKILL at any moment
leaves either the old or the new file: never a half row, never a lost completed row. A row whose run_id is
already present replaces it (so each run_id appears once; only failed runs are ever re-run).
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import csv
import fcntl
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from studies.run import RESULT_COLUMNS, RunSpec, execute_run

csv.field_size_limit(sys.maxsize)


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "True" if v else "False"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else repr(v)
    return str(v)


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
        with open(self.lock_path, "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

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
        columns = list(RESULT_COLUMNS)
        for r in rows:
            columns += [k for k in r if k not in columns]
        tmp = self.dir / f".results.csv.tmp-{os.getpid()}"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns, restval="", extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({k: _fmt(v) for k, v in r.items()})
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dfd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

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


def shard(specs: Iterable[RunSpec], k: int, n: int) -> list[RunSpec]:
    """Shard K of N: the runs whose index in the list sorted by run id is K mod N (a partition for K=0..N-1)."""
    ordered = sorted(specs, key=lambda s: s.run_id)
    return [s for i, s in enumerate(ordered) if i % n == k]


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)


def _clone(store: ResultsStore, src: dict[str, Any], spec: RunSpec) -> dict[str, Any]:
    """Record ``spec`` as a copy of the finished run ``src`` that had the same configuration apart from its phase
    (runs are deterministic, so re-running it would give the same numbers)."""
    src_dir = store.dir / "runs" / str(src["run_id"])
    dst_dir = store.dir / "runs" / spec.run_id
    if src_dir.is_dir():
        dst_dir.mkdir(parents=True, exist_ok=True)
        for f in src_dir.iterdir():
            if f.is_file() and not f.name.startswith("."):
                tmp = dst_dir / f".{f.name}.tmp-{os.getpid()}"
                shutil.copyfile(f, tmp)
                os.replace(tmp, dst_dir / f.name)
    row = dict(src)
    row.update(run_id=spec.run_id, phase=spec.phase, task=spec.task, optimizer=spec.optimizer,
               precision=spec.precision, lr=spec.lr, seed=spec.seed, config_json=spec.config_json)
    return row


def _reuse_key_of_row(row: dict[str, Any]) -> str | None:
    try:
        return RunSpec.from_json(row["config_json"]).reuse_key
    except Exception:
        return None


def run_specs(specs: list[RunSpec], out_dir: str | Path, *, workers: int = 1, desc: str = "runs",
              targets: dict[str, float] | None = None, debug: bool = False, progress: bool = True) -> dict:
    """Run every spec not yet completed in ``out_dir``; return counts {"done", "skipped", "reused", "diverged",
    "errors"}.

    Specs whose configuration equals a finished run apart from the phase are recorded as copies of it. ``targets``
    (task -> target loss) fill tokens_to_target at run time. ``workers > 1`` uses a process pool (spawn) with
    ``cores // workers`` torch threads per worker.
    """
    from tqdm.auto import tqdm

    store = ResultsStore(out_dir)
    targets = targets or {}
    done = store.completed()
    by_key: dict[str, dict] = {}
    for r in done.values():
        key = _reuse_key_of_row(r)
        if key is not None:
            by_key.setdefault(key, r)
    counts = {"done": 0, "skipped": 0, "reused": 0, "diverged": 0, "errors": 0}
    leaders: list[RunSpec] = []
    followers: dict[str, list[RunSpec]] = {}
    seen: set[str] = set()
    for s in specs:
        if s.run_id in done or s.run_id in seen:
            counts["skipped"] += 1
            continue
        seen.add(s.run_id)
        if s.reuse_key in by_key:
            store.append(_clone(store, by_key[s.reuse_key], s))
            counts["reused"] += 1
        elif s.reuse_key in followers:
            followers[s.reuse_key].append(s)
        else:
            followers[s.reuse_key] = []
            leaders.append(s)
    if not leaders:
        return counts

    bar = tqdm(total=len(leaders), desc=desc, unit="run", disable=not progress, dynamic_ncols=True,
               file=sys.stderr)
    bar.set_postfix(diverged=0, failed=0)

    def record(spec: RunSpec, row: dict[str, Any]) -> None:
        store.append(row)
        counts["done"] += 1
        if str(row.get("diverged")) == "True":
            counts["diverged"] += 1
        if row.get("status") == "error":
            counts["errors"] += 1
        if row.get("status") != "error":  # a failed leader's followers stay unrun (and are retried next time)
            for f in followers.get(spec.reuse_key, []):
                store.append(_clone(store, row, f))
                counts["reused"] += 1
        bar.update(1)
        bar.set_postfix(diverged=counts["diverged"], failed=counts["errors"])

    cores = os.cpu_count() or 1
    try:
        if workers <= 1 or len(leaders) == 1:
            import torch

            prev = torch.get_num_threads()
            torch.set_num_threads(max(1, cores // max(1, workers)))
            try:
                for s in leaders:
                    record(s, execute_run(s, out_dir, target_loss=targets.get(s.task), debug=debug))
            finally:
                torch.set_num_threads(prev)
        else:
            threads = max(1, cores // workers)
            ctx = mp.get_context("spawn")
            with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                        initargs=(threads,)) as pool:
                futs = {pool.submit(execute_run, s, str(out_dir), target_loss=targets.get(s.task), debug=debug): s
                        for s in leaders}
                try:
                    for fut in cf.as_completed(futs):
                        record(futs[fut], fut.result())
                except BaseException:
                    for f in futs:
                        f.cancel()
                    raise
    finally:
        bar.close()
    return counts


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON via a temporary file and os.replace."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)
