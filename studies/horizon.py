"""The horizon ladder of a study: which run lengths exist, which is the middle one, and how results are keyed.

A study with ``horizons = [h1, h2, ...]`` (steps) runs its tune and main phases at every horizon, with the LR
tuned at each horizon by the same grid rule (``studies.protocol``). The *middle* horizon (the median of the sorted
ladder, the lower one of the two middle ones for an even count) is where the ablation and rounding phases run and
where the target loss comes from; the other horizons use ``horizon_precisions`` (default: the main precisions).
Results of the middle horizon are keyed by the plain task name, the others by ``"task@steps"`` (``horizon_key``),
so a single-horizon study (``horizons = None``) keeps its keys.
"""
from __future__ import annotations

import json
from typing import Any

from studies.config import StudyConfig

__all__ = ["ladder", "middle", "horizon_key", "split_key", "row_steps", "row_key", "precisions_at",
           "failure_horizons", "eval_every_at"]


def ladder(cfg: StudyConfig) -> list[int | None]:
    """The horizons (steps) sorted ascending, or ``[None]`` for a single-horizon study (cfg.steps / tokens)."""
    return sorted(set(cfg.horizons)) if cfg.horizons else [None]


def middle(cfg: StudyConfig) -> int | None:
    """The middle horizon: the median of the ladder (the lower middle one for an even count); None without one."""
    hs = ladder(cfg)
    return hs[(len(hs) - 1) // 2]


def horizon_key(cfg: StudyConfig, task: str, steps: int | None) -> str:
    """The key of ``task``'s results at ``steps``: the task name at the middle horizon (and in single-horizon
    studies), ``"task@steps"`` elsewhere on the ladder."""
    if not cfg.horizons or steps is None or steps == middle(cfg):
        return task
    return f"{task}@{int(steps)}"


def split_key(key: str) -> tuple[str, int | None]:
    """Inverse of ``horizon_key`` up to the middle horizon: ``"gpt@1000"`` -> ("gpt", 1000), ``"gpt"`` -> ("gpt",
    None)."""
    task, sep, steps = key.partition("@")
    return (task, int(steps)) if sep else (task, None)


def row_steps(row: dict[str, Any]) -> int | None:
    """The configured step count of a results row (from its config_json; None: the task's default or tokens)."""
    try:
        v = json.loads(row["config_json"]).get("steps")
    except (KeyError, TypeError, ValueError):
        v = row.get("steps")
    try:
        return int(v) if v not in (None, "") else None
    except (TypeError, ValueError):
        return None


def row_key(cfg: StudyConfig, row: dict[str, Any]) -> str:
    """``horizon_key`` of a results row."""
    return horizon_key(cfg, row["task"], row_steps(row))


def precisions_at(cfg: StudyConfig, main: list[str], steps: int | None) -> list[str]:
    """The main-phase precisions at horizon ``steps``: all of ``main`` at the middle horizon, else
    ``horizon_precisions`` (kept in the order given; None: ``main``)."""
    if steps == middle(cfg) or cfg.horizon_precisions is None:
        return list(main)
    return list(cfg.horizon_precisions)


def failure_horizons(cfg: StudyConfig) -> list[int | None]:
    """The failure map's horizons: ``failure_horizons``, else the two longest of the ladder (or the one run
    length of a single-horizon study)."""
    if cfg.failure_horizons:
        return sorted(set(cfg.failure_horizons))
    return ladder(cfg)[-2:]


def eval_every_at(cfg: StudyConfig, steps: int | None) -> int | None:
    """Evaluation interval at a horizon: the study's ``eval_every``, else a tenth of a ladder horizon (None, the
    task's default, in single-horizon studies)."""
    if cfg.eval_every is not None or steps is None or not cfg.horizons:
        return cfg.eval_every
    return max(1, int(steps) // 10)
