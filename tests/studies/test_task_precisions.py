"""Per-task main-phase precisions and the tasks that get the ablation and rounding phases."""
from collections import Counter

import pytest

from studies.config import StudyConfig, apply_overrides, default_config
from studies.protocol import plan_after_tune, plan_tune


def _cfg(**kw) -> StudyConfig:
    base = dict(tasks=["gpt", "moe"], size="quick", optimizers=["adamw", "stosignsgd"],
                precisions=["fp32", "bf16", "fp8-all"], seeds=[0, 1],
                phases=["tune", "main", "ablation", "rounding"],
                ablation_optimizers=["stosignsgd", "stosign-nonoise"])
    base.update(kw)
    return StudyConfig(**base).validate()


def test_task_precisions_and_phase_tasks_shape_the_plan():
    cfg = _cfg(task_precisions={"moe": ["fp32", "fp8-all-unscaled"]}, ablation_tasks=["gpt"], rounding_tasks=["gpt"])
    specs = plan_after_tune(cfg, chosen={})
    main = Counter((s.task, s.precision) for s in specs if s.phase == "main")
    # gpt: 3 precisions x 2 optimizers x 2 seeds; moe: its own 2 precisions x 2 optimizers x 2 seeds
    assert main == {("gpt", "fp32"): 4, ("gpt", "bf16"): 4, ("gpt", "fp8-all"): 4,
                    ("moe", "fp32"): 4, ("moe", "fp8-all-unscaled"): 4}
    assert {s.task for s in specs if s.phase in ("ablation", "rounding")} == {"gpt"}
    # tuning covers both tasks (once, at fp32): adamw, stosignsgd and the ablation variant, each its own grid
    assert Counter(s.task for s in plan_tune(cfg)) == {"gpt": 9, "moe": 9}


def test_without_overrides_every_task_gets_every_phase():
    specs = plan_after_tune(_cfg(), chosen={})
    assert {s.task for s in specs if s.phase == "ablation"} == {"gpt", "moe"}
    assert {s.task for s in specs if s.phase == "rounding"} == {"gpt", "moe"}
    assert Counter(s.task for s in specs if s.phase == "main") == {"gpt": 12, "moe": 12}


def test_tune_per_precision_uses_the_task_precisions():
    cfg = _cfg(task_precisions={"moe": ["fp8-all"]}, tune_per_precision=True)
    tuned = Counter((s.task, s.precision) for s in plan_tune(cfg))
    assert set(tuned) == {("gpt", "fp32"), ("gpt", "bf16"), ("gpt", "fp8-all"), ("moe", "fp8-all")}


@pytest.mark.parametrize("values, message", [
    ({"task_precisions": {"mlp": ["fp32"]}}, "not a task of this study"),
    ({"task_precisions": {"moe": ["fp99"]}}, "fp99"),
    ({"ablation_tasks": ["convex-l1"]}, "not a task of this study"),
    ({"task_precisions": ["fp32"]}, "expected a table"),
])
def test_bad_values_name_what_is_valid(values, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(_cfg(), values).validate()


def test_per_task_precisions_keep_the_moe_at_reduced_precisions():
    cfg = apply_overrides(default_config(), {"tasks": "gpt,moe", "task_precisions": {"moe": ["fp32", "fp8-all"]},
                                             "ablation_tasks": ["gpt"], "rounding_tasks": ["gpt"]}).validate()
    specs = plan_after_tune(cfg, chosen={})
    assert {s.precision for s in specs if s.phase == "main" and s.task == "moe" and s.steps == 200} == {
        "fp32", "fp8-all"}
    assert {s.task for s in specs if s.phase in ("ablation", "rounding")} == {"gpt"}


def test_choosing_tasks_resets_the_defaults_per_task_settings():
    cfg = apply_overrides(default_config(), {"tasks": "gpt"}).validate()
    assert cfg.task_precisions == {} and cfg.ablation_tasks is None and cfg.rounding_tasks is None
    kept = apply_overrides(default_config(), {"tasks": "moe", "task_precisions": {"moe": ["fp32"]}}).validate()
    assert kept.task_precisions == {"moe": ["fp32"]}
