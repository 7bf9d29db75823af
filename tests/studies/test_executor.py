"""Executors and processes: submitit's local executor gives the same results as the process pool on a study with a
tune phase (tune -> LR extension -> main end to end); workers die with their leader; Ctrl-C and SIGTERM stop the
sweep and its workers within seconds, with a message, and a stop that wedges still ends at the CLI's deadline.

Oracles: the process pool's folder (runs are deterministic: every number must match, wall time aside); the
kernel's process table (/proc) for which processes are alive."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from studies.config import StudyConfig
from studies.executor import SubmititExecutor, make_executor
from studies.protocol import run_study

LINUX = sys.platform.startswith("linux")


def _cfg(out, **kw) -> StudyConfig:
    base = dict(tasks=["convex-l1"], size="quick", optimizers=["signsgd", "sgd"], target_optimizer="sgd",
                precisions=["fp32", "bf16"], seeds=[0], phases=["tune", "main"], lrs=[0.01, 0.03], steps=5,
                schedule="constant", tune_max_extensions=1, workers=2, out=str(out), report=False)
    base.update(kw)
    return StudyConfig(**base).validate()


def test_submitit_local_executor_matches_the_process_pool(tmp_path):
    small = dict(optimizers=["sgd"])                          # 2 grid + 1 extension + 1 main job (fp32 is reused)
    pool = run_study(_cfg(tmp_path / "pool", **small), progress=False)
    sub = run_study(_cfg(tmp_path / "sub", **small), progress=False, executor="submitit",
                    executor_options={"cluster": "local", "folder": tmp_path / "jobs"})
    assert pool["status"] == sub["status"] == "complete"
    assert sub["counts"]["tune"]["done"] == 3 and sub["counts"]["main"]["done"] == 1   # grid, extension, main
    assert sub["lr_tried"] == pool["lr_tried"] and sub["chosen_lrs"] == pool["chosen_lrs"]
    a = pd.read_csv(tmp_path / "pool" / "results.csv").drop(columns="wall_s")
    b = pd.read_csv(tmp_path / "sub" / "results.csv").drop(columns="wall_s")
    assert set(a["phase"]) == {"tune", "main"} and (a["status"] == "ok").all()
    pd.testing.assert_frame_equal(a, b)
    assert any((tmp_path / "jobs").rglob("*_result.pkl"))          # they really were submitit jobs


def test_executor_options_are_checked_once(tmp_path):
    with pytest.raises(ValueError, match="max_parallel"):
        SubmititExecutor(tmp_path, max_parallel=0)
    with pytest.raises(ValueError, match="cluster"):
        SubmititExecutor(tmp_path, cluster="pbs")
    with pytest.raises(ValueError, match="unknown executor"):
        make_executor("ray", workers=1, n_jobs=1)


# ------------------------------------------------------------------------------------------- processes
def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[1]) == pid:
                out.append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:].split()[0] not in ("Z", "X")    # a zombie has stopped running


def _start(tmp_path) -> tuple[subprocess.Popen, list[int]]:
    """A leader running a long 2-worker sweep; returns it and its worker processes once both are training."""
    out = tmp_path / "long"
    p = subprocess.Popen([sys.executable, "-m", "studies.cli", "run", "--tasks", "gpt", "--size", "quick",
                          "--optimizers", "adamw,signum", "--precisions", "fp32", "--seeds", "1", "--phases", "main",
                          "--steps", "100000", "--workers", "2", "--out", str(out), "--no-report"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (out / "runs").is_dir() and len(list((out / "runs").iterdir())) >= 2:
            break
        assert p.poll() is None, p.communicate()
        time.sleep(0.2)
    else:
        p.kill()
        pytest.fail("the workers did not start")
    kids = [k for k in _children(p.pid) if "resource_tracker" not in Path(f"/proc/{k}/cmdline").read_text()]
    assert len(kids) >= 2, kids
    return p, kids


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.time() + timeout
    while time.time() < deadline and any(_alive(k) for k in pids):
        time.sleep(0.05)
    return [k for k in pids if _alive(k)]


@pytest.mark.skipif(not LINUX, reason="reads /proc")
def test_killing_only_the_leader_leaves_no_worker_alive(tmp_path):
    p, kids = _start(tmp_path)
    os.kill(p.pid, signal.SIGKILL)                                   # like an OOM kill: no handler runs
    p.wait(timeout=10)
    assert _wait_gone(kids, 5) == []


@pytest.mark.skipif(not LINUX, reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_stop_within_seconds_with_a_message(tmp_path, sig):
    p, kids = _start(tmp_path)
    t0 = time.perf_counter()
    os.kill(p.pid, sig)
    _, err = p.communicate(timeout=30)
    took = time.perf_counter() - t0
    assert p.returncode == 130 and "interrupted" in err and "Traceback" not in err
    print(f"stopped {took:.2f} s after the signal")
    assert took < 4, took                                           # ~2 s target; slack for a loaded machine
    assert _wait_gone(kids, 2) == []


_WEDGED = """
import sys, time
import studies.cli as cli

def wedged(args, argv):
    try:
        print("ready", flush=True)   # inside the try: a signal that lands during the print is caught here too
        time.sleep(60)
    except KeyboardInterrupt:
        time.sleep(60)   # an orderly stop that never ends (as a wedged worker pool would)
    return 0

cli._cmd_run = wedged
sys.exit(cli.main(["run", "--quick"]))
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_wedged_stop_still_ends_within_the_deadline_with_a_message(sig):
    from studies.cli import STOP_DEADLINE_S

    p = subprocess.Popen([sys.executable, "-c", _WEDGED], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    t0 = time.perf_counter()
    os.kill(p.pid, sig)
    _, err = p.communicate(timeout=30)
    took = time.perf_counter() - t0
    assert p.returncode == 130 and "interrupted" in err and "Traceback" not in err
    assert STOP_DEADLINE_S <= took < STOP_DEADLINE_S + 3, took
