"""Sweep mechanics: deterministic shards, reuse of equal runs, and parallel execution into a results store.

Rows go to ``studies.store.ResultsStore`` (atomic, resumable: see that module); each run id appears once and
only failed runs are ever re-run.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import multiprocessing as mp
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Iterable

from studies.config import RunSpec
from studies.training import execute_run
from studies.store import ResultsStore

__all__ = ["shard", "run_specs"]


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
