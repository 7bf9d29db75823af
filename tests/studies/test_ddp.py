"""One run under torchrun (studies.ddp): 2 gloo processes on CPU launched with ``python -m torch.distributed.run``.

Oracles: the parameters' SHA-256 recomputed here from rank 0's saved model; the loss of the first step recomputed
here as the mean of the task's batches 0 and 1 (the sharding rule) on the freshly built model; the bytes on the
wire from closed forms (ring all-reduce 2(W−1)/W·4n per step; 1-bit payload ceil(n/8) + 4·ceil(n/1024)); and a
world-size-1 DDP run that must reproduce the single-process run exactly.
"""
import csv
import datetime
import hashlib
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as dist

from studies.ddp import DDPRunSpec, main, run_ddp
from studies.config import RunSpec
from studies.training import RESULT_COLUMNS, execute_run
from studies.tasks import get_task

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(out: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "studies.ddp", "--threads", "1", "--device", "cpu",
           "--out", str(out), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def _rows(out: Path) -> list[dict]:
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def _sha256(state: dict) -> str:
    """Independent of studies.ddp.param_digest's code: the same definition (name, then raw bytes, in order)."""
    h = hashlib.sha256()
    for name, t in state.items():
        h.update(name.encode())
        h.update(bytes(t.contiguous().view(-1).view(torch.uint8).tolist()))
    return h.hexdigest()


def test_two_ranks_sign_comm_gpt_fp8(tmp_path):
    steps = 20
    p = _torchrun(tmp_path, "--task", "gpt", "--size", "quick", "--optimizer", "stosignsgd", "--precision",
                  "fp8-all", "--lr", "1e-2", "--steps", str(steps), "--comm", "sign", "--save-model")
    assert p.returncode == 0, p.stderr[-3000:]
    rows = _rows(tmp_path)
    assert len(rows) == 1
    row = rows[0]
    assert list(row)[:len(RESULT_COLUMNS)] == RESULT_COLUMNS
    assert row["status"] == "ok" and row["steps_done"] == str(steps) and row["phase"] == "ddp"
    cfg = json.loads(row["config_json"])
    assert cfg["world_size"] == 2 and cfg["comm"] == "sign"
    tps = get_task("gpt", size="quick").tokens_per_step
    assert int(row["tokens"]) == steps * 2 * tps  # the global batch is 2x the task's

    run_dir = tmp_path / "runs" / row["run_id"]
    m = pd.read_csv(run_dir / "metrics.csv")
    assert len(m) == steps + 1
    train = m["loss"].dropna()
    assert train.tail(5).mean() < train.head(3).mean() - 0.5, train.tolist()  # ~4.6 -> ~3.5 observed
    val = m["val_loss"].dropna()
    assert val.iloc[-1] < val.iloc[0] - 0.5

    # replicas: rank 1's digest equals the hash (computed here) of rank 0's saved parameters
    state = torch.load(run_dir / "model.pt")
    names = [k for k, _ in get_task("gpt", size="quick").build(0).model.named_parameters()]
    named = {k: state[k] for k in names}
    digests = json.loads((run_dir / "replicas.json").read_text())["param_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1] == _sha256(named)
    assert row["replicas_identical"] == "True"

    # bytes: one bucket of n coordinates per step (the quick GPT is far below DDP's 25 MB bucket)
    n = sum(v.numel() for v in named.values())
    assert int(row["comm_allreduce_bytes"]) == steps * 4 * n  # 2(W-1)/W * 4n with W = 2
    assert int(row["comm_bytes_sent"]) == steps * (math.ceil(n / 8) + 4 * math.ceil(n / 1024))
    assert float(row["comm_ratio"]) < 1 / 25


def test_two_ranks_fp32_divergence_sharding_and_resume(tmp_path):
    args = ("--task", "mlp", "--size", "quick", "--optimizer", "sgd", "--precision", "fp32", "--lr", "1000",
            "--steps", "40")
    p = _torchrun(tmp_path, *args)
    assert p.returncode == 0, p.stderr[-3000:]  # both ranks stopped at the same step (else: hang or crash)
    (row,) = _rows(tmp_path)
    assert row["diverged"] == "True" and row["status"] == "diverged"
    assert row["divergence_reason"] in ("spike", "blow-up", "nan", "inf")
    k = int(row["diverged_step"])
    assert 0 < k < 40 and int(row["steps_done"]) == k

    # the step-1 loss is the mean over ranks of the task's batches 0 (rank 0) and 1 (rank 1) at the init
    trun = get_task("mlp", size="quick").build(0)
    with torch.no_grad():
        expect = (float(trun.train_loss(0)) + float(trun.train_loss(1))) / 2
    m = pd.read_csv(tmp_path / "runs" / row["run_id"] / "metrics.csv")
    assert m.loc[m["step"] == 1, "loss"].item() == pytest.approx(expect, rel=1e-6)

    # fp32 all-reduce: 4n bytes per backward pass (a nan/inf loss stops before the backward)
    n = sum(p.numel() for p in trun.model.parameters())
    backward = k - (1 if row["divergence_reason"] in ("nan", "inf") else 0)
    assert int(row["comm_bytes_sent"]) == int(row["comm_allreduce_bytes"]) == backward * 4 * n

    # rerunning the same command is a no-op: still one row
    p = _torchrun(tmp_path, *args)
    assert p.returncode == 0 and "nothing to do" in p.stderr
    assert len(_rows(tmp_path)) == 1


def test_world_size_one_reproduces_the_single_process_run(tmp_path):
    """DDP with one rank (batch index = step, mean = identity) must give the sweep's run exactly."""
    torch.set_num_threads(1)
    common = dict(task="gpt", optimizer="adamw", precision="fp8-hybrid", lr=3e-3, seed=1, size="quick", steps=8)
    ref = execute_run(RunSpec(**common), tmp_path / "single", debug=True)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        row = run_ddp(DDPRunSpec(**common, world_size=1, comm="fp32"), tmp_path / "ddp")
    finally:
        dist.destroy_process_group()
    assert row["run_id"] != ref["run_id"]  # world_size/comm are part of the configuration
    a = pd.read_csv(tmp_path / "single" / "runs" / ref["run_id"] / "metrics.csv")
    b = pd.read_csv(tmp_path / "ddp" / "runs" / row["run_id"] / "metrics.csv")
    pd.testing.assert_frame_equal(a, b)
    assert row["final_loss"] == ref["final_loss"] and row["comm_bytes_sent"] == 0  # W = 1: nothing sent
    assert row["replicas_identical"] is True


def test_command_line_errors(monkeypatch, capsys):
    for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(v, raising=False)
    assert main(["--task", "gpt"]) == 2
    assert "torchrun" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    assert main(["--task", "nope"]) == 2
    assert "valid tasks" in capsys.readouterr().err
    assert main(["--optimizer", "adam"]) == 2
    assert "valid" in capsys.readouterr().err
    assert main(["--threshold", "spike=3"]) == 2
    assert "spike_factor" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--comm", "int8"])
    assert e.value.code == 2
    assert "sign-majority" in capsys.readouterr().err


def test_timeout_reaches_the_process_group(monkeypatch):
    """--timeout SECONDS is the collectives' timeout (was a fixed 10 minutes); bad values are exit-2 errors."""
    import datetime

    import studies.ddp as ddp

    seen = {}

    class Stop(Exception):
        pass

    def fake_init(backend, timeout):
        seen["backend"], seen["timeout"] = backend, timeout
        raise Stop

    monkeypatch.setattr(ddp.dist, "init_process_group", fake_init)
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(Stop):
        ddp.main(["--device", "cpu", "--threads", "1", "--timeout", "42.5"])
    assert seen == {"backend": "gloo", "timeout": datetime.timedelta(seconds=42.5)}
    with pytest.raises(Stop):
        ddp.main(["--device", "cpu", "--threads", "1"])
    assert seen["timeout"] == datetime.timedelta(minutes=10)
    for bad in ("0", "-1", "x"):
        with pytest.raises(SystemExit) as e:
            ddp.main(["--timeout", bad])
        assert e.value.code == 2
