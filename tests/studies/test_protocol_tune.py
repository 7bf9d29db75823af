"""The tune phase's edge extension: when an optimizer's best LR is at an edge of its grid, the next LR outward is
run (same ratio as the grid's edge spacing), up to ``tune_max_extensions`` times; resumable and shard-safe.

Settings are chosen so the outcome follows from closed-form reasoning, not noise (fp32, full-batch, deterministic):

- SignSGD (no momentum, no weight decay) on convex-l1 with a constant LR η ≤ 1.6e-4 for T = 20 steps moves
  every coordinate by exactly T·η, too little for any residual of ``Ax − b`` to change sign (checked below), so the
  objective is linear along the path: f(x_T) = f(x_0) − T·η·‖∇f(x_0)‖₁. It strictly decreases with η, so the
  highest LR tried is always the best and the grid keeps extending upward.
- Large steps on the same problem (SGD at η ≥ 1, 20 steps): the iterate jumps around the optimum with an amplitude
  growing with η, so a smaller LR is better there, and somewhere below a clear interior optimum (loss 0.20 at
  η = 0.33 against 0.27 at 0.11 and 0.39 at 1).
"""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from studies import cli
from studies.config import StudyConfig, apply_overrides, load_toml, paper_config_path
from studies.protocol import PhaseIncomplete, at_edge, next_lr, run_study
from studies.tasks import get_task

STEPS = 20


def _cfg(out, optimizers, lrs, ext, **kw) -> StudyConfig:
    base = dict(tasks=["convex-l1"], size="quick", optimizers=list(optimizers), target_optimizer=optimizers[0],
                precisions=["fp32"], phases=["tune"], steps=STEPS, lrs=list(lrs), schedule="constant", workers=1,
                tune_max_extensions=ext, out=str(out), report=False)
    base.update(kw)
    return StudyConfig(**base).validate()


def _tune_rows(out) -> pd.DataFrame:
    res = pd.read_csv(out / "results.csv")
    return res[res["phase"] == "tune"]


def _lrs(res: pd.DataFrame, opt: str, prec: str = "fp32") -> list[float]:
    return sorted(set(res.loc[(res["optimizer"] == opt) & (res["precision"] == prec), "lr"]))


# ------------------------------------------------------------------------------------------- the rule itself
def test_next_lr_rule():
    grid = [1e-3, 3e-3, 9e-3]
    assert next_lr(grid, grid, 1e-3) == 3.3e-4            # lowest is best: one step of the grid's ratio down
    assert next_lr(grid, grid, 9e-3) == 0.027             # highest is best: x3 up
    assert next_lr(grid, grid, 3e-3) is None              # interior: no extension
    assert next_lr([3.3e-4, *grid], grid, 3.3e-4) == 1.1e-4   # repeated: from the new edge, same ratio
    assert next_lr([1e-3, 2e-3], [1e-3, 2e-3], 2e-3) == 4e-3  # the grid's own spacing (x2)
    assert next_lr([5e-3], [5e-3], 5e-3) is None          # one point: no spacing to extend with
    assert at_edge(grid, 1e-3) and at_edge(grid, 9e-3) and not at_edge(grid, 3e-3) and not at_edge([1e-3], 1e-3)


# -------------------------------------------------------------------------------------- end to end, closed form
def test_upward_extension_matches_the_closed_form_and_stops_at_the_limit(tmp_path):
    out = tmp_path / "up"
    study = run_study(_cfg(out, ["signsgd"], [1e-5, 2e-5, 4e-5], 2), progress=False)
    res = _tune_rows(out)
    assert _lrs(res, "signsgd") == [1e-5, 2e-5, 4e-5, 8e-5, 1.6e-4]      # exactly two extensions, x2 each
    assert res["run_id"].is_unique and len(res) == 5

    # independent oracle: the linear closed form along the sign path, valid while no residual changes sign
    run = get_task("convex-l1", size="quick").build(0)
    obj = run.model.double()
    x0 = obj.x.detach().clone()
    f0 = obj()
    f0.backward()
    g = obj.x.grad.detach()
    f0v = float(f0.detach())
    r0 = (obj.A @ x0 - obj.b).abs()
    max_move = STEPS * 1.6e-4 * obj.A.abs().sum(1)          # largest change of each residual over the run
    assert bool((r0 > max_move).all())                      # no kink is crossed: the closed form holds
    for lr, v in zip(res["lr"], res["final_val_loss"]):
        assert v == pytest.approx(f0v - STEPS * lr * float(g.abs().sum()), abs=2e-6), lr

    assert study["chosen_lrs"]["convex-l1"]["fp32"]["signsgd"] == 1.6e-4
    assert study["lr_tried"]["convex-l1"]["fp32"]["signsgd"] == [1e-5, 2e-5, 4e-5, 8e-5, 1.6e-4]
    assert study["lr_at_edge"]["convex-l1"]["fp32"]["signsgd"] is True    # still at the edge after 2 extensions
    assert study["lr_grid"]["convex-l1"]["signsgd"] == [1e-5, 2e-5, 4e-5]  # the base grid is kept as such
    assert json.loads((out / "study.json").read_text())["lr_at_edge"] == study["lr_at_edge"]

    # resume: a rerun plans the same rounds from the finished runs and runs nothing
    again = run_study(_cfg(out, ["signsgd"], [1e-5, 2e-5, 4e-5], 2), progress=False)
    assert again["counts"]["tune"]["done"] == 0 and again["counts"]["tune"]["skipped"] == 5
    assert len(_tune_rows(out)) == 5
    # a larger budget on the same folder continues from where it stopped (the edge is still best)
    more = run_study(_cfg(out, ["signsgd"], [1e-5, 2e-5, 4e-5], 3), progress=False)
    assert more["counts"]["tune"]["done"] == 1
    assert more["lr_tried"]["convex-l1"]["fp32"]["signsgd"][-1] == 3.2e-4


def test_zero_extensions_keeps_the_plain_grid(tmp_path):
    out = tmp_path / "zero"
    study = run_study(_cfg(out, ["signsgd"], [1e-5, 2e-5, 4e-5], 0), progress=False)
    assert _lrs(_tune_rows(out), "signsgd") == [1e-5, 2e-5, 4e-5]
    assert study["chosen_lrs"]["convex-l1"]["fp32"]["signsgd"] == 4e-5
    assert study["lr_at_edge"]["convex-l1"]["fp32"]["signsgd"] is True


def test_downward_extension_stops_once_the_best_is_interior(tmp_path):
    out = tmp_path / "down"
    study = run_study(_cfg(out, ["sgd"], [1.0, 3.0, 10.0], 3), progress=False)
    res = _tune_rows(out)
    # 1.0 best -> 0.33 (1/3, 2 digits) best -> 0.11 worse than 0.33: stop (the third extension is not used)
    assert _lrs(res, "sgd") == [0.11, 0.33, 1.0, 3.0, 10.0]
    loss = dict(zip(res["lr"], res["final_val_loss"]))
    assert loss[0.33] < loss[0.11] and loss[0.33] < loss[1.0] < loss[3.0] < loss[10.0]   # the reason it stops
    assert study["chosen_lrs"]["convex-l1"]["fp32"]["sgd"] == 0.33
    assert study["lr_at_edge"]["convex-l1"]["fp32"]["sgd"] is False


def test_diverged_runs_count_as_worst_and_each_optimizer_follows_the_same_rule(tmp_path):
    """AdamW at LR 10 diverges on this problem (+inf score); SGD in the same study extends on its own scores."""
    out = tmp_path / "two"
    study = run_study(_cfg(out, ["adamw", "sgd"], [1.0, 3.0, 10.0], 1), progress=False)
    res = _tune_rows(out)
    assert bool(res.loc[(res["optimizer"] == "adamw") & (res["lr"] == 10.0), "diverged"].iloc[0])
    for opt in ("adamw", "sgd"):
        assert _lrs(res, opt) == [0.33, 1.0, 3.0, 10.0]          # one extension each (the limit)
        t = res[res["optimizer"] == opt].copy()
        t.loc[t["diverged"].astype(bool), "final_val_loss"] = math.inf
        best = float(t.loc[t["final_val_loss"].idxmin(), "lr"])
        assert study["chosen_lrs"]["convex-l1"]["fp32"][opt] == best == 0.33
        assert study["lr_at_edge"]["convex-l1"]["fp32"][opt] is True   # budget spent, still the lowest


def test_shards_synchronise_every_extension_round(tmp_path):
    cfg = _cfg(tmp_path / "sh", ["signsgd", "sgd"], [1e-5, 2e-5, 4e-5], 2)
    passes, finished = 0, set()
    while len(finished) < 2:
        passes += 1
        assert passes <= 6
        for k in (0, 1):
            try:
                study = run_study(cfg, shard_kn=(k, 2), progress=False)
                finished.add(k)
            except PhaseIncomplete:
                pass
    res = _tune_rows(tmp_path / "sh")
    assert res["run_id"].is_unique
    ref_out = tmp_path / "ref"
    ref = run_study(_cfg(ref_out, ["signsgd", "sgd"], [1e-5, 2e-5, 4e-5], 2), progress=False)
    assert sorted(res["run_id"]) == sorted(_tune_rows(ref_out)["run_id"])    # same runs as without shards
    assert study["lr_tried"] == ref["lr_tried"] and study["chosen_lrs"] == ref["chosen_lrs"]
    for opt in ("signsgd", "sgd"):          # tiny steps: linear regime for both, so two upward extensions
        assert study["lr_tried"]["convex-l1"]["fp32"][opt] == [1e-5, 2e-5, 4e-5, 8e-5, 1.6e-4]


def test_tune_per_precision_extends_each_precision_on_its_own(tmp_path):
    """fp32: the linear regime above (upward). Master weights stored in bf16 with nearest rounding: an update of
    at most 4e-5 is below half the gap to either bf16 neighbour of every coordinate (8 significant bits: for
    |x| >= 2^-5 both gaps are >= 2^-13, half of it 6.1e-5 > 4e-5), so the weights never move, every LR scores the
    same, the tie goes to the smallest LR and the grid extends downward."""
    legacy = "fp32+master=bf16:nearest"   # the old '+' form: translated once at the edge, recorded as `low`
    low = "fp32,master=bf16:nearest"
    x0 = get_task("convex-l1", size="quick").build(0).model.x.detach()
    assert float(x0.abs().min()) >= 2.0 ** -5                  # premise of the no-movement argument
    out = tmp_path / "pp"
    with pytest.warns(DeprecationWarning, match="old '\\+' form"):
        study = run_study(_cfg(out, ["signsgd"], [1e-5, 2e-5, 4e-5], 2, precisions=["fp32", legacy],
                               tune_per_precision=True), progress=False)
    res = _tune_rows(out)
    assert _lrs(res, "signsgd", "fp32") == [1e-5, 2e-5, 4e-5, 8e-5, 1.6e-4]
    assert _lrs(res, "signsgd", low) == [2.5e-6, 5e-6, 1e-5, 2e-5, 4e-5]
    assert res.loc[res["precision"] == low, "final_val_loss"].nunique() == 1      # the weights never moved
    assert study["chosen_lrs"]["convex-l1"]["fp32"]["signsgd"] == 1.6e-4
    assert study["chosen_lrs"]["convex-l1"][low]["signsgd"] == 2.5e-6
    assert study["lr_at_edge"]["convex-l1"] == {"fp32": {"signsgd": True}, low: {"signsgd": True}}


# ------------------------------------------------------------------------------------ config, CLI, report
def test_config_cli_and_toml_expose_the_limit(tmp_path):
    assert StudyConfig().tune_max_extensions == 1
    assert apply_overrides(StudyConfig(), load_toml(paper_config_path())).tune_max_extensions == 2
    args = cli.build_parser().parse_args(["run", "--tune-max-extensions", "0"])
    assert cli.config_from_args(args).tune_max_extensions == 0
    with pytest.raises(ValueError, match="tune_max_extensions"):
        StudyConfig(tune_max_extensions=-1).validate()
    with pytest.raises(ValueError, match="tune_max_extensions"):
        apply_overrides(StudyConfig(), {"tune_max_extensions": "two"})
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["run", "--tune-max-extensions", "-1"])


def test_report_shows_the_tried_lrs_and_flags_an_edge(tmp_path):
    from studies.report import lr_rows as _lr_rows

    out = tmp_path / "rep"
    study = run_study(_cfg(out, ["adamw", "signsgd"], [1e-5, 2e-5, 4e-5], 1), progress=False)
    table = _lr_rows(study).set_index("optimizer")
    assert table.loc["signsgd", "LRs tried @ fp32"].split(", ")[-1] == "8.000e-05"
    assert table.loc["signsgd", "chosen LR @ fp32"].endswith("(at edge of grid)")
    interior = run_study(_cfg(tmp_path / "int", ["sgd"], [1.0, 3.0, 10.0], 3), progress=False)
    assert "edge" not in _lr_rows(interior).set_index("optimizer").loc["sgd", "chosen LR @ fp32"]
