"""One run: divergence detection, schedule, metrics/results schema, determinism, failures as rows, and the
end-to-end command (resume after SIGKILL, --quick)."""
from __future__ import annotations

import csv
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from studies.config import Thresholds
from studies.config import RunSpec
from studies.diagnosis import DivergenceDetector
from studies.training import METRIC_COLUMNS, RESULT_COLUMNS, execute_run, lr_at

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------- detector (pure)
def _first(det: DivergenceDetector, losses, val=False) -> tuple[int | None, str]:
    for k, v in enumerate(losses, start=1):
        r = det.val(k, v) if val else det.train(k, v)
        if r:
            return k, r
    return None, ""


def test_detector_nonfinite_losses():
    assert _first(DivergenceDetector(Thresholds()), [3.0, 2.0, float("nan")]) == (3, "nan")
    assert _first(DivergenceDetector(Thresholds()), [3.0, float("inf")]) == (2, "inf")
    assert _first(DivergenceDetector(Thresholds()), [3.0, float("-inf")]) == (2, "inf")


def test_detector_spike_needs_factor_rise_and_patience():
    t = Thresholds(spike_factor=3.0, spike_min_rise=0.1, spike_patience=2, warmup_steps=5)
    losses = [5.0, 4.0, 3.0, 2.0, 1.5, 1.2, 1.0, 1.1, 3.5, 3.6]  # 3.5 > 3*1.0 twice in a row at steps 9, 10
    assert _first(DivergenceDetector(t), losses) == (10, "spike")
    # a single-step spike that recovers is not a divergence with patience 2
    assert _first(DivergenceDetector(t), [5.0, 4, 3, 2, 1.5, 1.2, 1.0, 3.5, 1.0, 0.9, 3.5, 0.9]) == (None, "")
    # during warm-up nothing but non-finite values counts
    assert _first(DivergenceDetector(t), [5.0, 1.0, 4.0, 4.0, 4.0]) == (None, "")
    # losses approaching zero (convex tasks): 3x a tiny minimum is noise, not a spike
    tiny = [10.0] + [1e-3] * 10 + [4e-3] * 5
    assert _first(DivergenceDetector(t), tiny) == (None, "")


def test_detector_blowup_on_validation_loss():
    t = Thresholds(blowup_margin=0.1, blowup_patience=2, warmup_steps=0)
    det = DivergenceDetector(t)
    seq = [5.0, 4.0, 3.0, 5.6, 5.4, 5.7, 5.8]   # > 5.0 * 1.1 = 5.5 at 4 (reset at 5), then 6 and 7
    assert _first(det, seq, val=True) == (7, "blow-up")
    assert _first(DivergenceDetector(t), [5.0, 4.0, 5.4, 5.4, 5.4], val=True) == (None, "")


def test_detector_no_false_alarm_on_noisy_descent():
    g = torch.Generator().manual_seed(0)
    base = torch.linspace(5.0, 1.5, 400)
    noisy = (base * (1 + 0.15 * torch.randn(400, generator=g))).clamp_min(0.1).tolist()
    assert _first(DivergenceDetector(Thresholds()), noisy) == (None, "")


def test_cosine_schedule_with_warmup():
    steps, lr = 100, 1e-2
    vals = [lr_at(s, steps, lr, "cosine", 0.1) for s in range(steps)]
    assert vals[0] == pytest.approx(lr / 10) and vals[9] == pytest.approx(lr)     # linear warm-up over 10 steps
    assert vals[-1] == pytest.approx(0.1 * lr)                                   # decays to 10%
    assert all(a >= b - 1e-15 for a, b in zip(vals[9:], vals[10:]))             # monotone after warm-up
    assert lr_at(37, steps, lr, "constant", 0.1) == lr


# ------------------------------------------------------------------------------------------- real runs
def _spec(**kw) -> RunSpec:
    base = dict(task="gpt", optimizer="adamw", precision="fp32", lr=3e-3, seed=0, size="quick", steps=12,
                eval_every=4, telemetry_every=4)
    base.update(kw)
    return RunSpec(**base)


def test_run_writes_schema_and_is_deterministic(tmp_path):
    torch.set_num_threads(1)
    spec = _spec()
    row = execute_run(spec, tmp_path / "a", target_loss=1e9)
    assert list(row) == RESULT_COLUMNS
    assert row["status"] == "ok" and row["diverged"] is False and row["steps_done"] == 12
    m = pd.read_csv(tmp_path / "a" / "runs" / spec.run_id / "metrics.csv")
    assert list(m.columns) == METRIC_COLUMNS
    assert m["step"].tolist() == list(range(13))
    assert m["val_loss"].notna().tolist() == [s % 4 == 0 for s in range(13)]
    assert (m["tokens"].diff().dropna() > 0).all() and row["tokens"] == m["tokens"].iloc[-1]
    assert row["best_val_loss"] == pytest.approx(m["val_loss"].min())
    assert row["final_val_loss"] < m["val_loss"].iloc[0]          # it learned something
    assert row["tokens_to_target"] == 0.0                          # a target above the initial loss: reached at 0
    # AdamW keeps exp_avg and exp_avg_sq in fp32 (+ one fp32 step counter per tensor): 8 bytes/param + epsilon
    assert 8.0 <= row["state_bytes_per_param"] < 8.1
    row2 = execute_run(spec, tmp_path / "b")
    m2 = pd.read_csv(tmp_path / "b" / "runs" / spec.run_id / "metrics.csv")
    pd.testing.assert_series_equal(m["loss"], m2["loss"])
    pd.testing.assert_series_equal(m["val_loss"], m2["val_loss"])
    assert math.isnan(row2["tokens_to_target"])                    # no target given


def test_run_made_to_diverge_is_stopped_and_explained(tmp_path):
    torch.set_num_threads(1)
    spec = _spec(lr=50.0, steps=40, schedule="constant", thresholds={**Thresholds().__dict__, "warmup_steps": 2})
    row = execute_run(spec, tmp_path)
    assert row["diverged"] is True and row["status"] == "diverged"
    assert row["divergence_reason"] in ("nan", "inf", "spike", "blow-up")
    assert 1 <= row["diverged_step"] < 40 and row["steps_done"] == row["diverged_step"]
    assert f"diverged at step {row['diverged_step']}" in row["explanation"]
    m = pd.read_csv(tmp_path / "runs" / spec.run_id / "metrics.csv")
    assert m["step"].iloc[-1] == row["diverged_step"]              # stopped early


def test_failure_inside_a_run_becomes_a_row(tmp_path):
    spec = _spec(task="no-such-task")
    row = execute_run(spec, tmp_path)
    assert row["status"] == "error" and row["divergence_reason"].startswith("error: ValueError")
    assert "no-such-task" in row["divergence_reason"]
    assert (tmp_path / "runs" / spec.run_id / "error.txt").read_text().startswith("Traceback")
    with pytest.raises(ValueError):
        execute_run(spec, tmp_path, debug=True)


def _cli(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "studies.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_resume_after_sigkill_loses_and_duplicates_nothing(tmp_path):
    out = tmp_path / "res"
    args = ["run", "--tasks", "gpt", "--size", "quick", "--optimizers", "adamw,signum", "--precisions", "fp32",
            "--seeds", "3", "--phases", "main", "--steps", "15", "--workers", "1", "--out", str(out), "--no-report"]
    p = _cli(*args)
    t0 = time.time()
    while len(_rows(out / "results.csv")) < 2 and time.time() - t0 < 120 and p.poll() is None:
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    first = {r["run_id"]: r for r in _rows(out / "results.csv")}
    assert 2 <= len(first) < 6, "the kill should land mid-sweep"
    p = _cli(*args)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    rows = _rows(out / "results.csv")
    ids = [r["run_id"] for r in rows]
    assert len(ids) == len(set(ids)) == 6                             # every run once
    after = {r["run_id"]: r for r in rows}
    for rid, r in first.items():     # completed rows kept (targets are filled in at the end of the study)
        keep = [k for k in r if k not in ("target_loss", "tokens_to_target")]
        assert {k: after[rid][k] for k in keep} == {k: r[k] for k in keep}
        assert after[rid]["target_loss"] != "nan"
    assert {(r["optimizer"], r["seed"]) for r in rows} == {(o, str(s)) for o in ("adamw", "signum") for s in range(3)}


# ------------------------------------------------------------------------------------------- optimizers
def test_optimizer_registry_builds_every_optimizer_and_rejects_unknown_names():
    from studies.optimizers import OPTIMIZERS, make_optimizer

    for name in OPTIMIZERS:
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(64))
        opt = make_optimizer(name, [w], lr=0.01, seed=1)
        start = float((w.detach() ** 2).sum())
        for _ in range(50):
            opt.zero_grad()
            (w ** 2).sum().backward()
            opt.step()
        assert float((w.detach() ** 2).sum()) < 0.9 * start, name     # every optimizer descends on a quadratic
    with pytest.raises(ValueError, match="stosignsgd"):
        make_optimizer("nadam", [torch.nn.Parameter(torch.zeros(1))], lr=0.1)  # not registered (lion now is)
    with pytest.raises(ValueError, match="learning rate"):
        make_optimizer("adamw", [torch.nn.Parameter(torch.zeros(1))], lr=-1.0)


@pytest.mark.parametrize("name, per_param", [("adamw", 8), ("stosignsgd", 8), ("signum", 4), ("sgd", 4),
                                             ("stosign-adamw", 12)])
def test_state_bytes_per_param_closed_form(name, per_param):
    from studies.optimizers import make_optimizer
    from studies.diagnosis import state_bytes_per_param

    m = torch.nn.Linear(100, 100)                 # 10100 parameters in 2 tensors
    opt = make_optimizer(name, m.parameters(), lr=1e-3)
    m(torch.randn(4, 100)).sum().backward()
    opt.step()
    # fp32 buffers per parameter, plus AdamW's one fp32 'step' tensor per parameter tensor
    extra = 2 * 4 / 10100 if name in ("adamw", "stosign-adamw") else 0.0
    assert state_bytes_per_param(opt, 10100) == pytest.approx(per_param + extra)


def test_token_budget_sets_the_step_count(tmp_path):
    from studies.tasks import get_task

    tps = get_task("gpt", size="quick").tokens_per_step
    row = execute_run(_spec(steps=None, tokens=5 * tps + 1, eval_every=3), tmp_path, debug=True)
    assert row["steps"] == 6 and row["steps_done"] == 6 and row["tokens"] == 6 * tps   # ceil(tokens / tps)


def test_explanation_names_the_site_and_the_evidence():
    from studies.diagnosis import explain

    frame = pd.DataFrame([
        dict(step=130, site="optim:exp_avg_sq", role="state", format="e4m3:block128", flushed_frac=0.40,
             saturated_frac=0.0, zero_frac=0.93),
        dict(step=130, site="head:grad", role="grad", format="e5m2:tensor", flushed_frac=0.05, saturated_frac=0.0,
             zero_frac=0.05),
        dict(step=150, site="head:grad", role="grad", format="e5m2:tensor", flushed_frac=0.99, saturated_frac=0.0,
             zero_frac=0.99),   # after the divergence: must be ignored
    ])
    spec = _spec(precision="fp8-all", seed=1)
    site, text = explain(frame, [], spec, True, 140, "nan", "optim:exp_avg_sq")
    assert site == "optim:exp_avg_sq"
    assert text.startswith("adamw fp8-all, seed 1: diverged at step 140 (nan); before it, ")
    assert "93% of exp_avg_sq entries were zero in e4m3:block128" in text
    assert "40% of state entries at optim:exp_avg_sq flushed to zero" in text and "99%" not in text
    site, text = explain(frame, [], spec, False, None, "", None)
    assert site == "head:grad" and "did not diverge; closest site: 99% of grad entries at head:grad" in text
