"""Sweep mechanics: deterministic shards, reuse of equal runs, and execution into a results folder.

Each finished run has its record (``runs/<run_id>/result.json``, ``studies.records``) and its row in
``studies.store.ResultsStore`` (atomic, resumable); each run id appears once and only failed runs are ever re-run.
Runs execute through ``studies.executor`` (this process, a process pool, or submitit jobs) with a fixed torch
thread count per run, so the number of workers never changes a number.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any, Iterable

from studies.config import RunSpec
from studies.executor import Job, make_executor
from studies.records import RECORD_NAME, rebuild_results, write_record
from studies.store import ResultsStore

__all__ = ["shard", "run_specs"]


def shard(specs: Iterable[RunSpec], k: int, n: int) -> list[RunSpec]:
    """Shard K of N: the runs whose index in the list sorted by run id is K mod N (a partition for K=0..N-1)."""
    ordered = sorted(specs, key=lambda s: s.run_id)
    return [s for i, s in enumerate(ordered) if i % n == k]


def _clone(store: ResultsStore, src: dict[str, Any], spec: RunSpec) -> dict[str, Any]:
    """Record ``spec`` as a copy of the finished run ``src`` that had the same configuration apart from its phase
    (runs are deterministic, so re-running it would give the same numbers)."""
    src_dir = store.dir / "runs" / str(src["run_id"])
    dst_dir = store.dir / "runs" / spec.run_id
    if src_dir.is_dir():
        dst_dir.mkdir(parents=True, exist_ok=True)
        for f in src_dir.iterdir():
            if f.is_file() and not f.name.startswith(".") and f.name != RECORD_NAME:  # the clone gets its own
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
    except (KeyError, TypeError, ValueError):  # json.JSONDecodeError is a ValueError
        return None


def run_specs(specs: list[RunSpec], out_dir: str | Path, *, workers: int = 1, desc: str = "runs",
              targets: dict[str, float] | None = None, debug: bool = False, progress: bool = True,
              threads: int = 1, executor: str = "local", executor_options: dict[str, Any] | None = None,
              device: str = "cpu", checkpoint_every: int | None = None) -> dict:
    """Run every spec not yet completed in ``out_dir`` (on ``device``: ``studies.training.OnDevice``); return
    counts {"done", "skipped", "reused", "diverged",
    "errors"}.

    Specs whose configuration equals a finished run apart from the phase are recorded as copies of it. ``targets``
    (task -> target loss) fill tokens_to_target at run time. ``executor`` "local" runs in this process
    (``workers`` 1) or a process pool of ``workers`` (spawn); "submitit" submits jobs (``executor_options``: see
    ``studies.executor.SubmititExecutor``; ``workers`` caps how many run at once). Every run uses ``threads``
    torch threads. A damaged or duplicated results.csv row is rebuilt from its record first (a note on stderr).
    """
    from tqdm.auto import tqdm

    for note in rebuild_results(out_dir):
        print(f"precision-sweep: {note}", file=sys.stderr)
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

    def add(row: dict[str, Any]) -> None:
        write_record(out_dir, row, threads=threads)
        store.append(row)

    for s in specs:
        if s.run_id in done or s.run_id in seen:
            counts["skipped"] += 1
            continue
        seen.add(s.run_id)
        if s.reuse_key in by_key:
            add(_clone(store, by_key[s.reuse_key], s))
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

    def record(job: Job, row: dict[str, Any]) -> None:
        spec = job.spec
        write_record(out_dir, row, threads=job.threads)
        store.append(row)
        counts["done"] += 1
        if str(row.get("diverged")) == "True":
            counts["diverged"] += 1
        if row.get("status") == "error":
            counts["errors"] += 1
        if row.get("status") != "error":  # a failed leader's followers stay unrun (and are retried next time)
            for f in followers.get(spec.reuse_key, []):
                add(_clone(store, row, f))
                counts["reused"] += 1
        bar.update(1)
        bar.set_postfix(diverged=counts["diverged"], failed=counts["errors"])

    jobs = [Job(s, str(out_dir), targets.get(s.task), debug, threads, device, checkpoint_every) for s in leaders]
    options = dict(executor_options or {})
    folder = options.pop("folder", None) or Path(out_dir) / ".submitit"
    runner = make_executor(executor, workers=workers, n_jobs=len(jobs), folder=folder, **options)
    try:
        runner.run(jobs, record)
    finally:
        bar.close()
    return counts
