"""The training loop (studies.training): telemetry steps, LR schedule, sampled-only probes, clear errors, failures
vs bugs, and NaN in a packed state recorded as a divergence. Oracles: step arithmetic, the closed-form cosine
schedule, and the run's own stopping rule stated in the test."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from studies.config import RunSpec, Thresholds
from studies.training import execute_run


def _spec(**kw) -> RunSpec:
    base = dict(task="gpt", optimizer="adamw", precision="fp32", lr=3e-3, seed=0, size="quick", steps=12,
                eval_every=4, telemetry_every=4)
    base.update(kw)
    return RunSpec(**base)


def _files(tmp_path, spec):
    d = tmp_path / "runs" / spec.run_id
    return pd.read_csv(d / "metrics.csv"), pd.read_csv(d / "telemetry.csv", keep_default_na=False)


def test_telemetry_steps_match_training_steps(tmp_path):
    torch.set_num_threads(1)
    spec = _spec(precision="fp8-all")
    row = execute_run(spec, tmp_path)
    assert row["status"] == "ok"
    _, tel = _files(tmp_path, spec)
    optim = tel[tel["site"].str.startswith("optim:")]
    # the optimizer runs at training steps 1..12 and is sampled every 4th: its rows are at 4, 8, 12 exactly
    assert sorted(set(optim["step"])) == [4, 8, 12]
    assert set(tel.loc[tel["sampled"].astype(str) == "True", "step"]) <= {0, 4, 8, 12}
    # layer sites are sampled at the initial evaluation (step 0) and in the forward pass of steps 4, 8, 12
    layer = tel[~tel["site"].str.startswith("optim:")]
    assert {0, 4, 8, 12} <= set(layer["step"])


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_logged_learning_rate_follows_the_schedule(tmp_path, schedule):
    torch.set_num_threads(1)
    lr, steps, warm_frac = 4e-3, 20, 0.1
    spec = _spec(schedule=schedule, lr=lr, steps=steps, warmup_frac=warm_frac, eval_every=10)
    execute_run(spec, tmp_path)
    m, _ = _files(tmp_path, spec)
    got = m["lr"].tolist()[1:]
    if schedule == "constant":
        want = [lr] * steps
    else:  # linear warm-up over 2 steps, then cosine from lr down to lr/10 at the last step
        want = [lr * (s + 1) / 2 for s in range(2)]
        want += [lr * (0.1 + 0.45 * (1 + math.cos(math.pi * (s - 2) / (steps - 3)))) for s in range(2, steps)]
    assert got == pytest.approx(want, rel=1e-12)


def test_update_ratio_and_lost_updates_only_on_sampled_steps(tmp_path):
    torch.set_num_threads(1)
    spec = _spec(steps=10, telemetry_every=4)
    execute_run(spec, tmp_path)
    m, _ = _files(tmp_path, spec)
    sampled = [4, 8, 10]                               # every 4th step and the last one
    assert m.loc[m["update_ratio"].notna(), "step"].tolist() == sampled
    assert m.loc[m["lost_update_frac"].notna(), "step"].tolist() == sampled
    assert (m.loc[m["update_ratio"].notna(), "update_ratio"] > 0).all()
    assert m.loc[m["grad_norm"].notna(), "step"].tolist() == list(range(1, 11))   # every step


def test_bad_names_fail_clearly():
    with pytest.raises(ValueError, match="fp8-all"):        # names the valid presets
        _spec(precision="fp9-everything")


def test_bad_optimizer_is_an_error_row_naming_the_valid_ones(tmp_path):
    row = execute_run(_spec(optimizer="nadam"), tmp_path)  # not registered (lion now is)
    assert row["status"] == "error"
    assert "nadam" in row["divergence_reason"] and "stosignsgd" in row["divergence_reason"]


def test_a_bug_is_not_swallowed_as_an_error_row(tmp_path, monkeypatch):
    import studies.tasks

    def broken(*args, **kw):
        raise TypeError("a bug, not a failed run")

    monkeypatch.setattr(studies.tasks, "get_task", broken)
    with pytest.raises(TypeError, match="a bug"):
        execute_run(_spec(), tmp_path)


def test_nan_reaching_a_packed_state_is_a_divergence(tmp_path, monkeypatch):
    """A NaN gradient at step 3 reaches AdamW's states, stored in e2m1 (no NaN code): the run must be recorded as
    diverged (the NaN update makes the next loss NaN: step 4), never as an error."""
    torch.set_num_threads(1)
    from studies.tasks import get_task

    cls = type(get_task("gpt", size="quick").build(0))
    clean = cls.train_loss

    def poisoned(self, step):
        loss = clean(self, step)
        if step == 2:                                 # training step 3
            w = next(self.model.parameters())
            loss = loss + (w - w.detach()).abs().sqrt().sum()   # adds 0 to the loss, NaN to the gradient
        return loss

    monkeypatch.setattr(cls, "train_loss", poisoned)
    spec = _spec(precision="fp32,state=e2m1", steps=8, thresholds={**Thresholds().__dict__, "warmup_steps": 0})
    row = execute_run(spec, tmp_path)
    assert row["status"] == "diverged", row["divergence_reason"]
    assert row["divergence_reason"] == "nan" and row["diverged_step"] == 4
    assert "diverged at step 4 (nan)" in row["explanation"]
    assert row["divergence_site"] in ("optim:exp_avg", "optim:exp_avg_sq")   # where the NaN first showed
    assert "held NaN/inf that its format e2m1 cannot store at step 3" in row["explanation"]


@pytest.mark.parametrize("optimizer, precision", [("stosignsgd", "fp8-all"), ("adamw", "nvfp4")])
def test_resume_from_checkpoint_is_bit_identical(tmp_path, monkeypatch, optimizer, precision):
    """A run stopped after step 10 (checkpoints every 4 steps) resumes from step 8 and ends with the files and
    row of an uninterrupted run: packed states, stochastic-rounding and optimizer generators, telemetry and the
    detector all continue."""
    import studies.training as T

    torch.set_num_threads(1)
    spec = _spec(optimizer=optimizer, precision=precision, steps=12, telemetry_every=3, eval_every=5)
    ref = execute_run(spec, tmp_path / "ref", debug=True)

    class Killed(BaseException):  # not a run failure: it propagates, as a kill would stop the process
        pass

    clean, calls, stop_at = T.train_step, [], [10]

    def stopped(run, step):
        calls.append(step)
        if step in stop_at:          # only the first run is stopped
            stop_at.clear()
            raise Killed
        return clean(run, step)

    monkeypatch.setattr(T, "train_step", stopped)
    with pytest.raises(Killed):
        execute_run(spec, tmp_path / "cut", debug=True, checkpoint_every=4)
    run_dir = tmp_path / "cut" / "runs" / spec.run_id
    assert (run_dir / T.CHECKPOINT_NAME).is_file()
    calls.clear()
    row = execute_run(spec, tmp_path / "cut", debug=True, checkpoint_every=4)
    assert calls == [8, 9, 10, 11]                        # resumed after step 8, not restarted
    assert not (run_dir / T.CHECKPOINT_NAME).exists()
    assert {k: v for k, v in row.items() if k != "wall_s"} == {k: v for k, v in ref.items() if k != "wall_s"}
    for name in ("metrics.csv", "telemetry.csv"):
        assert (run_dir / name).read_bytes() == (tmp_path / "ref" / "runs" / spec.run_id / name).read_bytes(), name
