"""`precision-sweep run --checkpoint-every N`: a sweep SIGKILLed mid-run resumes the run from its last checkpoint and
ends with the same metrics, telemetry and results row (timing excepted) as an uninterrupted sweep."""
from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
ARGS = ["run", "--quick", "--tasks", "gpt", "--optimizers", "stosignsgd", "--precisions", "fp8-all", "--seeds", "1",
        "--steps", "400", "--lrs", "0.003", "--phases", "main", "--no-report", "--workers", "1"]


def _cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "studies.cli", *ARGS, "--out", str(out), *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _row(out: Path) -> dict[str, str]:
    with open(out / "results.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    return {k: v for k, v in row.items() if k != "wall_s"}


def test_sigkill_mid_run_then_resume_is_bit_identical(tmp_path):
    ref = tmp_path / "ref"
    subprocess.run(_cmd(ref), env=_env(), cwd=REPO, check=True, capture_output=True, timeout=300)

    out = tmp_path / "killed"
    p = subprocess.Popen(_cmd(out, "--checkpoint-every", "50"), env=_env(), cwd=REPO, start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    ckpts: list[Path] = []
    while time.monotonic() < deadline and p.poll() is None and not ckpts:
        ckpts = list(out.glob("runs/*/checkpoint.pt"))
        time.sleep(0.02)
    assert ckpts, "no checkpoint appeared before the run ended"
    time.sleep(0.3)  # let it train on past the checkpoint, then kill the whole sweep (leader and workers)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    assert not (out / "results.csv").is_file() or not _row_or_none(out), "the killed run must not have finished"
    assert list(out.glob("runs/*/checkpoint.pt")), "the checkpoint must survive the kill"

    # a copy whose checkpoint carries a marker in its logged metrics: the rerun must continue from the checkpoint
    # (the marker shows up in metrics.csv), not start over (which would also end identical to the reference)
    probe = tmp_path / "probe"
    shutil.copytree(out, probe)
    (ck,) = probe.glob("runs/*/checkpoint.pt")
    state = torch.load(ck, weights_only=False)
    assert 0 < state["steps_done"] < 400
    state["metrics"][1]["loss"] = 123.25
    torch.save(state, ck)
    for folder in (out, probe):
        subprocess.run(_cmd(folder, "--checkpoint-every", "50"), env=_env(), cwd=REPO, check=True,
                       capture_output=True, timeout=300)
    with open(next(probe.glob("runs/*/metrics.csv")), newline="") as f:
        assert float(list(csv.DictReader(f))[1]["loss"]) == 123.25
    assert _row(out) == _row(ref)
    (run_id,) = [d.name for d in (ref / "runs").iterdir()]
    for name in ("metrics.csv", "telemetry.csv"):
        assert (out / "runs" / run_id / name).read_bytes() == (ref / "runs" / run_id / name).read_bytes(), name
    assert not list(out.glob("runs/*/checkpoint.pt")), "a finished run leaves no checkpoint behind"


def _row_or_none(out: Path) -> dict[str, str] | None:
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return rows[0] if rows else None
