"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", arXiv 2302.06675, Algorithm 2).

Per coordinate, with decoupled weight decay λ::

    c_t     = β1·m_{t−1} + (1−β1)·g_t        (the interpolated momentum the step takes the sign of)
    θ_t     = θ_{t−1} − η·(sign(c_t) + λ·θ_{t−1})   (computed as θ·(1 − η·λ) − η·sign(c_t))
    m_t     = β2·m_{t−1} + (1−β2)·g_t        (the momentum kept, updated after the step)

m starts at 0, so the first step is −η·sign(g_1) − η·λ·θ_0 for β1 < 1. Both interpolations are computed as
``torch.lerp`` (one rounding per value, the convention of the other stosign optimizers), so in float32 they can
differ from a ``β·m + (1−β)·g`` multiply-add by an ulp; that changes a sign only where c is within rounding of 0.
``sign(0) = 0`` (``torch.sign``): a coordinate whose c is exactly 0 (a zero gradient with m = 0, or g = −β1/(1−β1)·m)
does not move except for the decay. Deterministic: no random numbers, no generator.

State per parameter: ``step`` (int) and ``exp_avg`` (m). ``foreach``: True uses torch._foreach_* ops, False a
per-tensor loop, None (default) foreach when every parameter is on a GPU; both give bit-identical results.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from .step import SignOptimizer, check_hparams, sign_step_foreach, sign_step_single

__all__ = ["Lion", "check_lion_hparams"]


def check_lion_hparams(lr: Any, betas: Any, weight_decay: Any) -> None:
    """ValueError unless lr >= 0, betas = (β1, β2) with both in [0, 1) and weight_decay >= 0."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for name, b in zip(("beta1", "beta2"), betas):
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 <= b < 1.0:
            raise ValueError(f"betas: {name} must be a number in [0, 1), got {b!r}")
    check_hparams(lr, 0.0, weight_decay)


class Lion(SignOptimizer):
    """Lion: θ ← θ − lr·(sign(β1·m + (1−β1)·g) + weight_decay·θ), then m ← β2·m + (1−β2)·g (see module doc).

    Args:
        params: parameters or param groups (every hyperparameter below may be set per group).
        lr: step size η (each coordinate moves by exactly ±lr, or 0 where c = 0, plus the decay).
        betas: (β1, β2): β1 interpolates the direction c, β2 is the decay of the momentum m kept.
        weight_decay: decoupled decay λ: θ is multiplied by 1 − lr·λ each step.
        foreach: see module doc.
        maximize: ascend instead of descend (g is negated).
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], lr: float = 1e-4,
                 betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0, *,
                 foreach: bool | None = None, maximize: bool = False) -> None:
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, foreach=foreach, maximize=bool(maximize))
        super().__init__(params, defaults, None)

    def add_param_group(self, param_group: dict) -> None:
        """Add a group (hyperparameters missing from it come from the defaults) and check its hyperparameters."""
        Optimizer.add_param_group(self, param_group)  # no random numbers: no generator
        g = self.param_groups[-1]
        check_lion_hparams(g["lr"], g["betas"], g["weight_decay"])
        g["betas"] = (float(g["betas"][0]), float(g["betas"][1]))

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One Lion step; ``closure`` (optional) re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads = self._collect(group)
            if not params:
                continue
            self._count_step(params)
            foreach = self._use_foreach(group["foreach"], params)
            if group["maximize"]:
                grads = torch._foreach_neg(grads) if foreach else [torch.neg(g) for g in grads]
            beta1, beta2 = group["betas"]
            ms = self._state_zeros("exp_avg", params)
            c = self._views("scratch", params)
            lr, wd = float(group["lr"]), float(group["weight_decay"])
            if foreach:
                torch._foreach_copy_(c, ms)
                torch._foreach_lerp_(c, grads, 1.0 - beta1)  # c = β1·m + (1−β1)·g
                sign_step_foreach(params, c, [None] * len(params), None, c, lr=lr, weight_decay=wd,
                                  buffer="instant", buffer_decay=1.0)
                torch._foreach_lerp_(ms, grads, 1.0 - beta2)  # m = β2·m + (1−β2)·g
            else:
                for i in range(len(params)):
                    torch.lerp(ms[i], grads[i], 1.0 - beta1, out=c[i])
                sign_step_single(params, c, [None] * len(params), None, c, lr=lr, weight_decay=wd,
                                 buffer="instant", buffer_decay=1.0)
                for m, g in zip(ms, grads):
                    m.lerp_(g, 1.0 - beta2)
        return loss
