"""StoSignSGD (Yu, Pan, Liu, Zhang 2026, arXiv 2604.15416, Algorithm 3) and SignSGD / Signum.

StoSignSGD, per coordinate, with decoupled weight decay::

    m_t     = β·m_{t−1} + (1−β)·g_t          (momentum=0: m_t = g_t, no buffer kept)
    G_t     = max(G_{t−1}, |m_t|)            (buffer="max", the paper's running maximum)
    n_t     ~ U(−1, 1)                        (16-bit grid, see stosign.sign)
    θ_{t+1} = θ_t − η·sign(m_t + G_t⊙n_t) − η·λ·θ_t

E[sign(m + G⊙n)] = m/G: each coordinate moves by exactly ±η (0 where G = 0) and the step is unbiased for the
preconditioned direction m/G. With fresh state G_1 = |m_1|, so the first step is exactly −η·sign(g_1) − η·λ·θ_1.

Ablations (all per param group): ``noise=False`` gives the deterministic sign(m) (Signum; with momentum=0 SignSGD);
``buffer`` = "max" (paper) | "decayed_max" (G = max(buffer_decay·G, |m|)) | "instant" (G = |m|: since |n| < 1 the
step is then sign(m) again, the control showing the buffer matters) | "tensor_max" (G = one running max of |m| per
tensor, a 0-dim state).

State per parameter: ``step`` (int), ``momentum_buffer`` (m, when momentum > 0) and ``bound`` (G, when noise is on
and buffer is not "instant"): two buffers for the paper variant. The random generator's state is saved in
``state_dict()["rng"]`` so a resumed run continues bit-identically. Scratch memory (one value of the parameter's
dtype and 2 bytes of random numbers per element, reused every step) is a workspace outside the state, freed with
``release_workspace()``.

``foreach``: True uses torch._foreach_* ops, False a per-tensor loop; None (default) picks foreach when every
parameter is on a GPU and the loop on CPU (there, torch's foreach ops are loops that allocate and are slower). Both
paths draw the same random numbers and compute bit-identical results. ``fused`` (default None: where torch.compile
works): float32 CPU parameters of >= 65,536 elements take one compiled pass per tensor (stosign.fused), also
bit-identical; on 16.8M parameters it makes the step 0.58x AdamW(foreach) instead of 1.03x (CPU time, one thread).

For bf16/fp16 parameters the state and the arithmetic are in the parameter's dtype (the torch convention), which
coarsens the probability resolution to that dtype's precision.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from .step import BUFFERS, SignOptimizer, check_hparams

__all__ = ["StoSignSGD", "SignSGD", "BUFFERS", "ABLATIONS"]

ABLATIONS: dict[str, dict[str, Any]] = {
    "paper": {},                                  # Algorithm 3: momentum 0.9, running max, noise
    "no-noise": {"noise": False},                 # deterministic sign(m) = Signum
    "no-momentum": {"momentum": 0.0},             # m = g
    "decayed-max": {"buffer": "decayed_max"},     # G = max(0.999·G, |m|)
    "instant": {"buffer": "instant"},             # G = |m| (then the step is sign(m) again)
    "tensor-max": {"buffer": "tensor_max"},       # one running max per tensor
}
"""Named StoSignSGD ablations: ``StoSignSGD(params, lr=..., **ABLATIONS[name])``. The converted base optimizers are
:class:`stosign.SignConverted` (e.g. ``SignConverted(torch.optim.AdamW(params, lr, weight_decay=0), weight_decay=λ)``)."""



class StoSignSGD(SignOptimizer):
    """StoSignSGD: θ ← θ − lr·sign(m + G⊙n) − lr·weight_decay·θ, G the running max of |m| (see module doc).

    Args:
        params: parameters or param groups (every hyperparameter below may be set per group).
        lr: step size η (each coordinate moves by exactly ±lr, or 0 where G = 0).
        momentum: β of the EMA m = β·m + (1−β)·g; 0 uses g directly.
        weight_decay: decoupled decay λ, applied as −lr·λ·θ outside the sign.
        generator: torch.Generator for the noise; None creates one per device seeded with torch.initial_seed().
        foreach: see module doc.
        fused: the compiled one-pass CPU step of stosign.fused for float32 CPU parameters of >= 65,536 elements
            (noise on, buffer "max"/"decayed_max"; bit-identical to the eager step): None (default) uses it where
            torch.compile works (else, with one warning, the eager step), True requires it, False never uses it.
        maximize: ascend instead of descend.
        noise: False gives the deterministic sign(m) (Signum).
        buffer: "max" (paper) | "decayed_max" | "instant" | "tensor_max".
        buffer_decay: factor for "decayed_max": G = max(buffer_decay·G, |m|).
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], lr: float = 1e-3, momentum: float = 0.9,
                 weight_decay: float = 0.0, *, generator: torch.Generator | None = None,
                 foreach: bool | None = None, maximize: bool = False, noise: bool = True, buffer: str = "max",
                 buffer_decay: float = 0.999, fused: bool | None = None) -> None:
        check_hparams(lr, momentum, weight_decay, buffer, buffer_decay)
        if fused not in (None, True, False):
            raise ValueError(f"fused must be None, True or False, got {fused!r}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=foreach, maximize=bool(maximize),
                        noise=bool(noise), buffer=buffer, buffer_decay=buffer_decay)
        super().__init__(params, defaults, generator)
        self._fused = fused

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        g = self.param_groups[-1]
        check_hparams(g["lr"], g["momentum"], g["weight_decay"], g["buffer"], g["buffer_decay"])

    def _sign_options(self, group: dict) -> tuple[bool, str, float]:
        return group["noise"], group["buffer"], group["buffer_decay"]


class SignSGD(SignOptimizer):
    """SignSGD: θ ← θ − lr·sign(g) − lr·weight_decay·θ; with momentum > 0 it is Signum: θ ← θ − lr·sign(m),
    m = β·m + (1−β)·g. Deterministic; state: ``step`` and, for Signum, ``momentum_buffer``."""

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], lr: float = 1e-3, momentum: float = 0.0,
                 weight_decay: float = 0.0, *, foreach: bool | None = None, maximize: bool = False) -> None:
        check_hparams(lr, momentum, weight_decay)
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=foreach, maximize=bool(maximize))
        super().__init__(params, defaults, None)

    def add_param_group(self, param_group: dict) -> None:
        Optimizer.add_param_group(self, param_group)  # no random numbers: no generator
        g = self.param_groups[-1]
        check_hparams(g["lr"], g["momentum"], g["weight_decay"])

    def _sign_options(self, group: dict) -> tuple[bool, str, float]:
        return False, "max", 1.0  # deterministic sign: no bound, no noise
