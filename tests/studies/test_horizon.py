"""The horizon ladder: LR tuned at every horizon by one rule, main cells per horizon, the failure map's horizons,
runs shared between phases counted once; the convex task's loss split by kink; the failure map's counts."""
import json
import math
from collections import Counter

import pytest
import torch

from studies import horizon
from studies.config import StudyConfig
from studies.protocol import chosen_lr, choose_lrs, plan_after_tune, plan_tune, tune_grids
from studies.summary import summarize
from studies.tasks import get_task


def _cfg(**kw) -> StudyConfig:
    base = dict(tasks=["gpt"], size="quick", optimizers=["adamw", "stosignsgd"], precisions=["fp32", "fp8-all"],
                seeds=[0, 1, 2], horizons=[40, 10, 20], horizon_precisions=["fp32"],
                phases=["tune", "main", "ablation", "failure"], ablation_optimizers=["stosignsgd", "stosign-nonoise"],
                failure_precisions=["state=e4m3"], failure_optimizers=["adamw"], lrs=[1e-3, 3e-3, 1e-2])
    base.update(kw)
    return StudyConfig(**base).validate()


def _row(spec, loss, diverged=False):
    return {"run_id": spec.run_id, "phase": spec.phase, "task": spec.task, "optimizer": spec.optimizer,
            "precision": spec.precision, "lr": str(spec.lr), "seed": str(spec.seed), "config_json": spec.config_json,
            "final_val_loss": str(loss), "diverged": str(diverged), "status": "diverged" if diverged else "ok",
            "tokens": str((spec.steps or 0) * 256), "explanation": "boom" if diverged else ""}


BEST = {10: 1e-2, 20: 3e-3, 40: 1e-3}  # the synthetic optimum LR moves with the horizon


def _loss(spec):
    return 2.0 + (math.log(spec.lr) - math.log(BEST[spec.steps])) ** 2 + 1.0 / spec.steps


def test_ladder_sorted_middle_and_keys():
    cfg = _cfg()
    assert horizon.ladder(cfg) == [10, 20, 40] and horizon.middle(cfg) == 20
    assert horizon.horizon_key(cfg, "gpt", 20) == "gpt" and horizon.horizon_key(cfg, "gpt", 40) == "gpt@40"
    assert horizon.split_key("gpt@40") == ("gpt", 40) and horizon.failure_horizons(cfg) == [20, 40]
    single = _cfg(horizons=None)
    assert horizon.ladder(single) == [None] and horizon.horizon_key(single, "gpt", 250) == "gpt"


def test_tune_runs_every_horizon_for_main_optimizers_and_the_middle_for_variants():
    cfg = _cfg()
    tune = plan_tune(cfg)
    by = Counter((s.optimizer, s.steps) for s in tune)
    for h in (10, 20, 40):
        assert by["adamw", h] == 3 and by["stosignsgd", h] == 3  # the same 3-point grid at every horizon
    assert by["stosign-nonoise", 20] == 3 and sum(v for (o, _), v in by.items() if o == "stosign-nonoise") == 3
    assert {s.eval_every for s in tune if s.steps == 40} == {4}  # a tenth of the horizon
    assert set(tune_grids(cfg)) >= {("gpt@10", "fp32", "adamw"), ("gpt", "fp32", "stosign-nonoise")}


def test_main_cells_use_the_lr_tuned_at_their_own_horizon_and_share_seed_0_with_tuning():
    cfg = _cfg()
    tune = plan_tune(cfg)
    rows = [_row(s, _loss(s)) for s in tune]
    chosen = choose_lrs(cfg, rows)
    assert chosen["gpt@10"]["fp32"]["adamw"]["lr"] == BEST[10]
    assert chosen["gpt"]["fp32"]["stosignsgd"]["lr"] == BEST[20]
    assert chosen["gpt@40"]["fp32"]["adamw"]["lr"] == BEST[40]
    rest = plan_after_tune(cfg, chosen)
    main = [s for s in rest if s.phase == "main"]
    for s in main:
        assert s.lr == BEST[s.steps]
    assert Counter((s.steps, s.precision) for s in main) == {
        (10, "fp32"): 6, (20, "fp32"): 6, (20, "fp8-all"): 6, (40, "fp32"): 6}
    # a tune run at the chosen LR is the same configuration as seed 0 of its main cell: run once (reuse key)
    tune_keys = {s.reuse_key for s in tune}
    shared = [s for s in main if s.reuse_key in tune_keys]
    assert sorted((s.optimizer, s.steps, s.seed) for s in shared) == sorted(
        (o, h, 0) for o in ("adamw", "stosignsgd") for h in (10, 20, 40))
    # ablation variants at the middle horizon with their own tuned LR; failure map at its two horizons
    abl = [s for s in rest if s.phase == "ablation"]
    assert {s.steps for s in abl} == {20} and {s.lr for s in abl} == {BEST[20]}
    fail = [s for s in rest if s.phase == "failure"]
    assert Counter(s.steps for s in fail) == {20: 3, 40: 3} and all(s.lr == BEST[s.steps] for s in fail)
    task = get_task("gpt", size="quick")
    # a variant not tuned at a horizon: its base optimizer's LR there (own, base, then the middle horizon's)
    assert chosen_lr(cfg, chosen, task, "stosign-nonoise", "fp32", 40) == BEST[40]
    assert chosen_lr(cfg, chosen, task, "stosign-nonoise", "fp32", 20) == BEST[20]


def test_single_horizon_studies_keep_their_keys_and_steps():
    cfg = _cfg(horizons=None, steps=7)
    tune = plan_tune(cfg)
    assert {s.steps for s in tune} == {7} and {s.eval_every for s in tune} == {None}
    chosen = choose_lrs(cfg, [_row(s, 1.0 + s.lr) for s in tune])
    assert set(chosen) == {"gpt"}


def test_failure_map_counts_with_wilson_interval():
    cfg = _cfg()
    specs = [s for s in plan_after_tune(cfg, {}) if s.phase == "failure"]
    rows = [_row(s, 3.0, diverged=(s.steps == 40 and s.seed < 2)) for s in specs]
    cell = summarize(cfg, rows)["failure_map"]["gpt"]["state=e4m3"]["adamw"]
    assert (cell["k"], cell["n"]) == (2, 6)
    assert cell["per_horizon"]["20"]["k"] == 0 and cell["per_horizon"]["40"]["k"] == 2
    z2 = 1.959963984540054 ** 2  # Wilson interval of 2/6 (closed form)
    centre, half = (2 / 6 + z2 / 12) / (1 + z2 / 6), 1.959963984540054 * math.sqrt(
        (2 / 6) * (4 / 6) / 6 + z2 / 144) / (1 + z2 / 6)
    assert (cell["lo"], cell["hi"]) == pytest.approx((centre - half, centre + half), rel=1e-12)
    assert len(cell["explanations"]) == 2 and all("boom" in e for e in cell["explanations"])


@pytest.mark.parametrize("name", ["convex-l1", "convex-l1-weak"])
def test_convex_loss_parts_sum_and_signsgd_never_moves_the_stalled_term(name):
    import stosign

    run = get_task(name, size="quick").build(0)
    parts = run.loss_parts()
    assert parts["stalled"] + parts["reducible"] == pytest.approx(run.val_loss(), rel=1e-6)
    assert parts["stalled"] > 0
    opt = stosign.SignSGD(run.model.parameters(), lr=1e-2, momentum=0.0)
    for step in range(200):  # the docstring's theorem: sign(g) = σ1 (1, -1), so u + v never changes
        opt.zero_grad()
        run.train_loss(step).backward()
        opt.step()
    after = run.loss_parts()
    assert after["reducible"] < parts["reducible"]
    assert after["stalled"] == pytest.approx(parts["stalled"], rel=1e-4)
    eps = 0.02 if name.endswith("weak") else 0.25
    A = run.model.A
    assert float(A[1, 0] / A[0, 0]) == pytest.approx(eps)


def test_cli_horizons_and_steps():
    from studies.cli import build_parser, config_from_args

    def cfg(*argv):
        return config_from_args(build_parser().parse_args(["run", *argv]))

    assert cfg().horizons == [100, 200, 400]                       # the default study's ladder
    assert cfg("--steps", "40").horizons is None                   # one run length: the one given
    assert cfg("--horizons", "10,30").horizons == [10, 30]
    assert cfg("--steps", "40", "--horizons", "10,30").horizons == [10, 30]
    with pytest.raises(SystemExit):
        cfg("--horizons", "10,x")


def test_summary_reads_the_speedup_off_adamws_curve_and_states_the_claims():
    # AdamW's end-of-schedule loss follows L(T) = 3 - 0.25 ln T over the ladder; StoSignSGD at every horizon
    # reaches the loss AdamW reaches with 2x its tokens; seed offsets are shared (paired): speedup exactly 2.
    cfg = _cfg(phases=["main"], lrs=None, horizon_precisions=["fp32", "fp8-all"])
    offs = {0: -0.02, 1: 0.0, 2: 0.03}
    rows = []
    for s in plan_after_tune(cfg, {}):
        tokens = s.steps * 256
        t_eff = tokens * (2.0 if s.optimizer == "stosignsgd" else 1.0)
        rows.append(_row(s, 3.0 - 0.25 * math.log(t_eff) + offs[s.seed]))
    summ = summarize(cfg, rows)
    for prec in ("fp32", "fp8-all"):
        for e in summ["ladder"]["gpt"][prec]["stosignsgd"]:
            sp = e["speedup"]
            if e["steps"] == 40:  # the longest horizon is beyond AdamW's curve (AdamW never got that low)
                assert sp["status"] == "beyond AdamW's range" and sp["speedup"] == "inf"
            else:
                assert sp["speedup"] == pytest.approx(2.0) and (sp["lo"], sp["hi"]) == pytest.approx((2.0, 2.0))
                assert sp["verdict"] == "faster than AdamW"
    d = summ["vs_fp32"]["gpt"]["fp8-all"]["adamw"]
    assert d["n"] == 3 and d["delta"] == pytest.approx(0.0, abs=1e-12)  # identical losses: no change
    (line,) = [c for c in summ["claims"] if c.startswith("[gpt, fp8-all]")]
    assert "diverged adamw 0/3 vs stosignsgd 0/3" in line and "disagree: adamw never diverged" in line
    assert "faster': insufficient evidence (beyond AdamW's range)" in line  # a bound is not a value
