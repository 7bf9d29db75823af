"""`precision-sweep run --device auto|cpu|cuda`: resolution, refusal without a GPU, and the CPU numbers unchanged
by the device plumbing (oracle: the run without it). The CUDA run is marked gpu and skipped without one."""
from __future__ import annotations

import pytest
import torch

from studies.cli import main
from studies.config import RunSpec
from studies.executor import Job, run_job
from studies.training import OnDevice, execute_run, resolve_device


def _spec(**kw) -> RunSpec:
    base = dict(task="gpt", optimizer="adamw", precision="fp8-all", lr=3e-3, seed=0, size="quick", steps=6,
                eval_every=3, telemetry_every=3)
    base.update(kw)
    return RunSpec(**base)


def test_resolve_device():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="valid: auto, cpu, cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU.*valid here: auto, cpu"):
            resolve_device("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cli_device_cuda_without_gpu_exits_2_with_one_line(capsys, tmp_path):
    code = main(["run", "--quick", "--device", "cuda", "--out", str(tmp_path / "o"), "--no-report"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "cuda" in err and "valid here" in err
    assert not (tmp_path / "o").exists()          # refused before anything is built


def test_cpu_device_plumbing_changes_no_number(tmp_path):
    torch.set_num_threads(1)
    spec = _spec()
    plain = execute_run(spec, tmp_path / "a", debug=True)
    placed = execute_run(spec, tmp_path / "b", debug=True, parallel=OnDevice("cpu"))
    job = run_job(Job(spec, str(tmp_path / "c"), debug=True, threads=1, device="cpu"))
    for row in (placed, job):
        assert row["final_loss"] == plain["final_loss"] and row["best_val_loss"] == plain["best_val_loss"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_run_trains_with_native_gemms(tmp_path, monkeypatch):
    calls = []
    real = torch._scaled_mm

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(torch, "_scaled_mm", counting)
    row = run_job(Job(_spec(precision="fp8-hybrid"), str(tmp_path), debug=True, device="cuda"))
    assert row["status"] != "error" and row["final_loss"] == row["final_loss"]
    from lowprec import hardware
    if hardware.probe()["scaled_mm_cuda"][0]:
        assert calls, "no native FP8 GEMM ran on a GPU that has them"
