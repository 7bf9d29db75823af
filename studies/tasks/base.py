"""What every task shares: the Task recipe, the TaskRun it builds, seeds, sizes and the LR grid rule."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

__all__ = ["SIZES", "DATA_SEED", "TRAIN_FRACTION", "Task", "TaskRun", "step_seed", "check_seed", "check_step",
           "lr_grid", "sized_task", "ROUNDING_STREAM", "rounding_seed"]

SIZES = ("quick", "default", "paper")
DATA_SEED = 1234          # fixes every task's problem data (teacher, convex instance, validation windows)
TRAIN_FRACTION = 0.9      # contiguous split: first 90% of the tokens train, last 10% validate


# --------------------------------------------------------------------------------------------------- helpers

def step_seed(seed: int, step: int) -> int:
    """A well-mixed 64-bit seed for (run seed, step) — batch ``step`` is independent of earlier batches."""
    return int(np.random.SeedSequence([int(seed), 0x5EED, int(step)]).generate_state(1, np.uint64)[0])


ROUNDING_STREAM = 0x5A0D  # the optimizer's stochastic-rounding stream (states, master weights) of a run seed


def rounding_seed(seed: int) -> int:
    """A well-mixed 63-bit seed for the stochastic rounding of a run's optimizer states and master weights
    (``lowprec.optim.wrap``): it differs per run seed and from the seed of torch's default generator (which
    ``torch.manual_seed(seed)`` gives the layers' and gradients' rounding), so no two streams coincide."""
    return int(np.random.SeedSequence([int(seed), ROUNDING_STREAM]).generate_state(1, np.uint64)[0] >> 1)


def check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def check_step(step: int) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    return int(step)


def lr_grid(center: float) -> list[float]:
    """The tuning grid around a default learning rate: center/3, center, 3*center (rounded to 2 digits)."""
    return [float(f"{v:.2g}") for v in (center / 3, center, center * 3)]


# ------------------------------------------------------------------------------------------- Task / TaskRun

class TaskRun:
    """One instantiated task: a model and its data, for one seed.

    Attributes: ``model`` (the ``nn.Module`` to optimize), ``tokens_per_step`` (tokens — or examples — consumed
    by one ``train_loss`` call), ``optimal_loss`` (the known minimum of the objective, else ``None``).
    """

    model: nn.Module
    tokens_per_step: int
    optimal_loss: float | None = None

    def train_loss(self, step: int) -> torch.Tensor:
        """Differentiable scalar loss of the model on training batch ``step``."""
        raise NotImplementedError

    def val_loss(self) -> float:
        """Loss on the fixed validation set (no gradient; the model's train/eval mode is restored)."""
        raise NotImplementedError

    def compiled(self) -> "TaskRun | None":
        """A twin of this run whose ``train_loss`` / ``val_loss`` run the same model (the same parameters,
        batches and validation set) through ``torch.compile``'d forwards, or None when the task has none (the
        run stays eager). The twin's numbers equal this run's up to float reassociation inside the compiled
        graphs (``studies.training`` module docstring states the bound). Base class: None."""
        return None


@dataclass(frozen=True, eq=False)
class Task:
    """A task recipe. ``build(seed)`` returns a :class:`TaskRun`, deterministic given ``seed``.

    ``default_lrs`` and ``lr_grid`` are keyed by optimizer name (adamw, sgd, signsgd, signum, stosignsgd);
    ``config`` holds every knob that defines the task (JSON-serialisable, for run ids).
    """

    name: str
    description: str
    size: str
    default_steps: int
    eval_every: int
    default_lrs: dict[str, float]
    lr_grid: dict[str, list[float]]
    tokens_per_step: int
    config: dict
    builder: Callable[..., TaskRun] = field(repr=False)

    def build(self, seed: int, device: str | torch.device = "cpu") -> TaskRun:
        """Fresh model and data for ``seed`` (init and batch order depend on it; the problem data does not)."""
        seed = check_seed(seed)
        with torch.random.fork_rng(devices=[]):   # leave the caller's global RNG untouched
            torch.manual_seed(seed)
            return self.builder(seed=seed, device=torch.device(device), **self.config)





def sized_task(name: str, description: str, size: str, config: dict, lrs: dict[str, float],
               tokens_per_step: int, builder: Callable[..., TaskRun]) -> Task:
    """The Task of one size: ``config`` is the size's table (its ``steps`` and ``eval_every`` become the
    defaults, the rest the builder's keyword arguments); ``lrs`` the fp32 default LR per optimizer, each tuned
    over ``lr_grid`` around it."""
    c = dict(config)
    steps, every = c.pop("steps"), c.pop("eval_every")
    return Task(name, description, size, steps, every, dict(lrs), {k: lr_grid(v) for k, v in lrs.items()},
                tokens_per_step, c, builder)
