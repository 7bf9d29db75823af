"""Optimizer registry for the precision sweep: name -> constructor with fixed, documented defaults.

Fairness rules (the same for every optimizer, so only the update rule differs):
- ``WEIGHT_DECAY = 0.0`` for all optimizers. The study's runs are short, where weight decay hardly matters, and
  torch's SGD couples weight decay into the gradient (L2) while AdamW and the sign methods decouple it; zero
  removes that confound.
- Momentum / first-moment coefficient 0.9 everywhere (AdamW ``beta1``, SGD ``momentum``, Signum and StoSignSGD
  ``momentum``). AdamW's ``beta2 = 0.95`` (the usual LLM setting, GPT-2/nanoGPT), ``eps = 1e-8``.
- Each optimizer's learning rate comes from the study (tuned per optimizer on the same grid budget).
- Randomized optimizers (the StoSignSGD family) draw their noise from a ``torch.Generator`` seeded by the run.

torch's AdamW and SGD run their ``foreach`` implementation (one multi-tensor kernel per operation instead of a
Python loop over parameters; torch's default on CUDA, not on the CPU). On the CPU it gives the same bits as the
per-tensor loop (``tests/studies/test_optimizers.py`` checks it); an AdamW step over the tiny GPT's tensor shapes
measured ~25% faster (1.97 -> 1.51 ms).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

__all__ = ["WEIGHT_DECAY", "MOMENTUM", "ADAMW_BETAS", "ADAMW_EPS", "LION_BETAS", "OptimizerEntry", "OPTIMIZERS",
           "ABLATION_VARIANTS", "check_optimizer", "make_optimizer", "base_optimizer", "default_lr"]

WEIGHT_DECAY = 0.0
MOMENTUM = 0.9
ADAMW_BETAS = (0.9, 0.95)
ADAMW_EPS = 1e-8


@dataclass(frozen=True)
class OptimizerEntry:
    """One registered optimizer: a constructor and a one-line description."""

    name: str
    description: str
    build: Callable[[Iterable[torch.nn.Parameter], float, torch.Generator], torch.optim.Optimizer]
    base: str  # the optimizer whose tuned LR it uses when it is not tuned itself (ablation variants)


def _torch_adamw(params, lr: float) -> torch.optim.AdamW:
    """torch's foreach AdamW; its step runs natively where that gives torch's bits (``lowprec.adamw``)."""
    from lowprec.adamw import NativeAdamW

    return NativeAdamW(params, lr=lr, betas=ADAMW_BETAS, eps=ADAMW_EPS, weight_decay=WEIGHT_DECAY, foreach=True)


def _adamw(params, lr, gen):
    return _torch_adamw(params, lr)


def _sgd(params, lr, gen):
    return torch.optim.SGD(params, lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, foreach=True)


def _signsgd(params, lr, gen):
    import stosign

    return stosign.SignSGD(params, lr=lr, momentum=0.0, weight_decay=WEIGHT_DECAY)


def _signum(params, lr, gen):
    import stosign

    return stosign.SignSGD(params, lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


LION_BETAS = (0.9, 0.99)  # the Lion paper's defaults (Chen et al. 2023)


def _lion(params, lr, gen):
    import stosign

    return stosign.Lion(params, lr=lr, betas=LION_BETAS, weight_decay=WEIGHT_DECAY)


def _stosign(**kw):
    def build(params, lr, gen):
        import stosign

        args = dict(momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, noise=True, buffer="max")
        args.update(kw)
        return stosign.StoSignSGD(params, lr=lr, generator=gen, **args)

    return build


def _stosign_adamw(params, lr, gen):
    import stosign

    return stosign.SignConverted(_torch_adamw(params, lr), noise=True, buffer="max", generator=gen)


_ENTRIES = [
    OptimizerEntry("adamw", "torch AdamW, betas (0.9, 0.95), eps 1e-8", _adamw, "adamw"),
    OptimizerEntry("sgd", "torch SGD with momentum 0.9", _sgd, "sgd"),
    OptimizerEntry("signsgd", "SignSGD: -lr*sign(g), no momentum", _signsgd, "signsgd"),
    OptimizerEntry("signum", "Signum: -lr*sign(m), momentum 0.9", _signum, "signum"),
    OptimizerEntry("lion", "Lion: -lr*sign(0.9 m + 0.1 g), m <- 0.99 m + 0.01 g", _lion, "lion"),
    OptimizerEntry("stosignsgd", "StoSignSGD (paper Alg. 3): -lr*sign(m + G*n), G = running max |m|",
                   _stosign(), "stosignsgd"),
    OptimizerEntry("stosign-nonoise", "ablation: StoSignSGD without noise (= Signum)",
                   _stosign(noise=False), "stosignsgd"),
    OptimizerEntry("stosign-instant", "ablation: StoSignSGD with G = |m| now (no max buffer)",
                   _stosign(buffer="instant"), "stosignsgd"),
    OptimizerEntry("stosign-decaymax", "ablation: StoSignSGD with a decayed max buffer (decay 0.999)",
                   _stosign(buffer="decayed_max", buffer_decay=0.999), "stosignsgd"),
    OptimizerEntry("stosign-tensormax", "ablation: StoSignSGD with one max per tensor",
                   _stosign(buffer="tensor_max"), "stosignsgd"),
    OptimizerEntry("stosign-nomomentum", "ablation: StoSignSGD without momentum (m = g)",
                   _stosign(momentum=0.0), "stosignsgd"),
    OptimizerEntry("stosign-adamw", "ablation: stochastic sign conversion of AdamW's update",
                   _stosign_adamw, "stosignsgd"),
]

OPTIMIZERS: dict[str, OptimizerEntry] = {e.name: e for e in _ENTRIES}
ABLATION_VARIANTS = ("stosign-nonoise", "stosign-instant", "stosign-decaymax", "stosign-nomomentum",
                     "stosign-adamw")


def check_optimizer(name: str) -> str:
    """Return ``name`` if registered, else raise ValueError listing the valid names."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
    return name


def make_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float, *,
                   generator: torch.Generator | None = None, seed: int = 0) -> torch.optim.Optimizer:
    """Build optimizer ``name`` over ``params`` with learning rate ``lr`` and the registry's fixed defaults.

    ``generator`` (or a CPU generator seeded with ``seed``) feeds the randomized optimizers.
    """
    entry = OPTIMIZERS[check_optimizer(name)]
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"learning rate must be a positive number, got {lr!r}")
    if generator is None:
        generator = torch.Generator().manual_seed(int(seed))
    return entry.build(list(params), float(lr), generator)


def base_optimizer(name: str) -> str:
    """The optimizer whose tuned learning rate ``name`` uses (itself, or stosignsgd for the ablation variants)."""
    return OPTIMIZERS[check_optimizer(name)].base


def default_lr(task: Any, optimizer: str) -> float:
    """The fp32 default learning rate of ``optimizer`` on ``task`` (a ``studies.tasks.Task``): its own entry in
    ``task.default_lrs``, else its base optimizer's; ValueError naming the known ones if neither exists."""
    lrs = task.default_lrs
    if optimizer in lrs:
        return float(lrs[optimizer])
    base = base_optimizer(optimizer)
    if base in lrs:
        return float(lrs[base])
    raise ValueError(f"task {task.name!r} has no default learning rate for {optimizer!r} "
                     f"(known: {', '.join(lrs)}); pass --lrs")
