"""Where runs execute: in this process, a local process pool (the default), or submitit jobs (Slurm, or submitit's
local executor where there is no Slurm: the same code path).

Every run goes through :func:`run_job`: it fixes the torch thread count (``threads``, the same whatever the number
of workers, so ``--workers`` never changes a number), trains, and writes the run's record
(``runs/<run_id>/result.json``, see ``studies.records``) before returning its row. An executor calls
``on_done(job, row)`` in the leader as each run finishes and returns when all have.

Processes: pool workers ignore Ctrl-C (the leader handles it), and die with their leader whatever stops it (Linux:
``PR_SET_PDEATHSIG``; elsewhere a watchdog thread that exits when the parent process is gone). On Ctrl-C or
SIGTERM the leader kills its workers (or cancels its submitit jobs) at once.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import ctypes
import math
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from studies.config import RunSpec
from studies.training import OnDevice, execute_run

__all__ = ["Job", "run_job", "error_row", "SerialExecutor", "PoolExecutor", "SubmititExecutor", "EXECUTORS",
           "make_executor", "kill_children"]

EXECUTORS = ("local", "submitit")
OnDone = Callable[["Job", dict], None]


@dataclass(frozen=True)
class Job:
    """One run to execute: its spec, the study folder, the target loss (or None), the torch threads and the
    device (``"cpu"``, ``"cuda"``: ``studies.training.OnDevice``)."""

    spec: RunSpec
    out_dir: str
    target_loss: float | None = None
    debug: bool = False
    threads: int = 1
    device: str = "cpu"
    checkpoint_every: int | None = None  # save the training state every N steps (resume after a kill)


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # only settable before the first parallel region
        torch.set_num_interop_threads(1)


def run_job(job: Job) -> dict[str, Any]:
    """Train ``job.spec`` with ``job.threads`` torch threads, write its record, return its results row."""
    import torch

    from studies.records import write_record

    prev = torch.get_num_threads()
    _set_threads(job.threads)
    try:
        par = None if job.device == "cpu" else OnDevice(job.device)
        row = execute_run(job.spec, job.out_dir, target_loss=job.target_loss, debug=job.debug, parallel=par,
                          checkpoint_every=job.checkpoint_every)
    finally:
        torch.set_num_threads(prev)
    write_record(job.out_dir, row, threads=job.threads)
    return row


def error_row(spec: RunSpec, message: str) -> dict[str, Any]:
    """The results row of a run whose job failed outside the training code (killed, timed out, lost)."""
    from studies.schema import ResultRow

    msg = " ".join(message.split())[:300]
    return ResultRow(run_id=spec.run_id, phase=spec.phase, task=spec.task, optimizer=spec.optimizer,
                     precision=spec.precision, lr=spec.lr, seed=spec.seed, steps=spec.steps, status="error",
                     divergence_reason=f"error: {msg}", explanation=f"{spec.optimizer} {spec.precision}, seed "
                     f"{spec.seed}: the job failed ({msg}).", config_json=spec.config_json).to_dict()


# --------------------------------------------------------------------------------------------- process control
def _die_with_parent() -> None:
    """Make this process exit when its parent does (any signal, including SIGKILL of the parent)."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="die-with-parent").start()


def _init_worker(threads: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the leader handles Ctrl-C and kills the workers
    _die_with_parent()
    _set_threads(threads)


def kill_children() -> int:
    """Kill this process's multiprocessing children at once (SIGKILL); return how many were alive."""
    kids = mp.active_children()
    for p in kids:
        with contextlib.suppress(OSError, ValueError):
            p.kill()
    for p in kids:
        p.join(timeout=2)
    return len(kids)


# --------------------------------------------------------------------------------------------- executors
class SerialExecutor:
    """Run the jobs one after the other in this process."""

    def run(self, jobs: Sequence[Job], on_done: OnDone) -> None:
        for job in jobs:
            on_done(job, run_job(job))


class PoolExecutor:
    """A local pool of ``workers`` spawned processes (the default executor)."""

    def __init__(self, workers: int):
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive integer, got {workers!r}")
        self.workers = workers

    def run(self, jobs: Sequence[Job], on_done: OnDone) -> None:
        if not jobs:
            return
        threads = jobs[0].threads
        ctx = mp.get_context("spawn")
        pool = cf.ProcessPoolExecutor(max_workers=min(self.workers, len(jobs)), mp_context=ctx,
                                      initializer=_init_worker, initargs=(threads,))
        try:
            futs = {pool.submit(run_job, j): j for j in jobs}
            for fut in cf.as_completed(futs):
                on_done(futs[fut], fut.result())
        except BaseException:
            kill_children()  # before shutdown: a running training step would otherwise finish first
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)


class SubmititExecutor:
    """submitit jobs: ``cluster="slurm"`` submits a job array (at most ``max_parallel`` running at once);
    ``cluster="local"`` runs each job as a local subprocess through submitit's local executor (at most
    ``max_parallel`` at once), the path tests and machines without Slurm take. ``partition``, ``time_min``,
    ``mem_gb`` go to Slurm; ``folder`` holds submitit's logs and pickles."""

    def __init__(self, folder: str | Path, *, cluster: str = "local", max_parallel: int = 2,
                 partition: str | None = None, time_min: int = 60, mem_gb: float | None = None,
                 poll_s: float = 0.2):
        try:
            import submitit  # noqa: F401
        except ImportError:
            raise ValueError("--executor submitit needs the submitit package: pip install 'lowprec-stosign[slurm]'"
                             ) from None
        if cluster not in ("local", "slurm"):
            raise ValueError(f"submitit cluster must be local or slurm, got {cluster!r}")
        for name, v in (("max_parallel", max_parallel), ("time_min", time_min)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if mem_gb is not None and not (mem_gb > 0 and math.isfinite(mem_gb)):
            raise ValueError(f"mem_gb must be a positive number, got {mem_gb!r}")
        self.folder, self.cluster, self.max_parallel = Path(folder), cluster, max_parallel
        self.partition, self.time_min, self.mem_gb, self.poll_s = partition, time_min, mem_gb, poll_s

    def _executor(self, threads: int):
        import submitit

        ex = submitit.AutoExecutor(folder=str(self.folder / "%j"), cluster=self.cluster)
        params: dict[str, Any] = {"timeout_min": self.time_min, "cpus_per_task": threads}
        if self.cluster == "slurm":
            params["slurm_array_parallelism"] = self.max_parallel
            if self.partition:
                params["slurm_partition"] = self.partition
            if self.mem_gb is not None:
                params["mem_gb"] = self.mem_gb
        ex.update_parameters(**params)
        return ex

    def run(self, jobs: Sequence[Job], on_done: OnDone) -> None:
        if not jobs:
            return
        ex = self._executor(jobs[0].threads)
        pending = list(jobs)
        running: list[tuple[Any, Job]] = []
        try:
            if self.cluster == "slurm":  # one array; Slurm enforces the concurrency cap
                running = list(zip(ex.map_array(run_job, pending), pending))
                pending = []
            while pending or running:
                while pending and len(running) < self.max_parallel:
                    job = pending.pop(0)
                    running.append((ex.submit(run_job, job), job))
                still = []
                for sj, job in running:
                    if not sj.done():
                        still.append((sj, job))
                        continue
                    exc = sj.exception()
                    on_done(job, error_row(job.spec, f"{type(exc).__name__}: {exc}") if exc else sj.result())
                running = still
                if running:
                    time.sleep(self.poll_s)
        except BaseException:
            for sj, _ in running:
                with contextlib.suppress(OSError, RuntimeError):  # the job may be gone already
                    sj.cancel(check=False)
            raise


def make_executor(kind: str, *, workers: int, n_jobs: int, folder: str | Path | None = None,
                  **submitit_options: Any):
    """The executor for ``kind`` ("local": serial when one worker or one job, else the process pool)."""
    if kind not in EXECUTORS:
        raise ValueError(f"unknown executor {kind!r}; valid: {', '.join(EXECUTORS)}")
    if kind == "submitit":
        return SubmititExecutor(folder or ".submitit", max_parallel=workers, **submitit_options)
    return SerialExecutor() if workers <= 1 or n_jobs <= 1 else PoolExecutor(workers)
