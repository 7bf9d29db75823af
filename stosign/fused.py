"""A fused CPU kernel for StoSignSGD's step (``torch.compile``, inductor's C++ backend), bit-identical to the eager path.

One pass per parameter reads g, m, G, θ and the noise and writes m, G, θ::

    m ← lerp(m, g, 1−β)          as ATen's lerp: fma(w or w−1, g − m, m or g), one rounding
    G ← max(G·decay, |m|)        (decay = 1 for buffer="max": G·1 = G exactly)
    θ ← θ·(1 − lr·λ) + sign(fma(G, n, m))·(−lr)

where n = k·2**-15 is the odd int16 noise k as float32 (exact). The eager path's ``addcmul(m, G, k, value=2**-15)``
rounds once (ATen's CPU kernel contracts to an FMA: ``m + (2**-15·G)·k``), so ``fma(G, n, m)`` has the same exact
value and the same rounding; inductor is told the FMA explicitly (``prims.fma``) and compiles with
``-ffp-contract=off``, so nothing else is fused. The one difference: where 2**-15·G underflows (G < 2**-111) the
eager product loses bits and this one does not.

The kernel is used for float32 CPU parameters of at least :data:`FUSED_MIN_NUMEL` elements with noise on and
buffer "max" or "decayed_max" (smaller tensors gain nothing over the call overhead). It is compiled once per
(momentum on/off, maximize) with dynamic sizes on first use; if torch.compile fails it is never tried again in
this process and :func:`fused_kernel` returns None (the caller runs the eager path).
"""
from __future__ import annotations

import subprocess
import warnings
from typing import Callable

import torch
from torch import Tensor

from .sign import NOISE_SCALE

__all__ = ["FUSED_MIN_NUMEL", "fused_kernel", "fusable"]

FUSED_MIN_NUMEL = 1 << 16
"""Parameters with fewer elements take the eager path."""

_KERNELS: dict[tuple[bool, bool], Callable[..., bool]] = {}
_BROKEN: list[str] = []  # the reason torch.compile failed, once it has


def _step(p: Tensor, g: Tensor, m: Tensor | None, G: Tensor, n: Tensor, w: Tensor, decay: Tensor, c: Tensor,
          neg_lr: Tensor, maximize: bool) -> None:
    fma = torch.ops.prims.fma
    if maximize:
        g = -g
    if m is not None:
        small = w.abs() < 0.5
        d = fma(torch.where(small, w, w - 1), g - m, torch.where(small, m, g))  # ATen's lerp(m, g, w)
        m.copy_(d)
    else:
        d = g
    bound = torch.maximum(G * decay, d.abs())
    x = fma(bound, n * NOISE_SCALE, d)
    G.copy_(bound)
    p.copy_(p * c + torch.sign(x) * neg_lr)


def fusable(p: Tensor, grad: Tensor) -> bool:
    """Whether the fused kernel handles this parameter (float32, CPU, contiguous, >= FUSED_MIN_NUMEL elements)."""
    return (p.device.type == "cpu" and p.dtype == torch.float32 and grad.dtype == torch.float32
            and p.numel() >= FUSED_MIN_NUMEL and p.is_contiguous() and grad.is_contiguous())


# One top-level function per (momentum, maximize): dynamo keeps a separate cache for each, so one compiled graph
# each (dynamic sizes, no_grad) never meets the recompile limit.
def _step_00(p: Tensor, g: Tensor, G: Tensor, *a: Tensor) -> None:
    _step(p, g, None, G, *a, False)


def _step_01(p: Tensor, g: Tensor, G: Tensor, *a: Tensor) -> None:
    _step(p, g, None, G, *a, True)


def _step_10(*a: Tensor) -> None:
    _step(*a, False)


def _step_11(*a: Tensor) -> None:
    _step(*a, True)


_VARIANTS = {(False, False): _step_00, (False, True): _step_01, (True, False): _step_10, (True, True): _step_11}


def _broken(exc: BaseException) -> None:
    _BROKEN.append(f"{type(exc).__name__}: {str(exc)[:200]}")
    warnings.warn(f"stosign: torch.compile failed, StoSignSGD uses its eager step ({_BROKEN[0]})", RuntimeWarning,
                  stacklevel=4)


def fused_kernel(momentum: bool, maximize: bool, required: bool = False) -> Callable[..., bool] | None:
    """The compiled kernel ``k(p, g, m, G, n, w, decay, c, neg_lr) -> bool`` (flat contiguous float32 tensors that do
    not overlap, 0-dim float32 scalars; m is ignored without momentum), compiled and tried on a small input on first use; None when
    torch.compile does not work here (``required=True`` raises RuntimeError instead).

    The kernel runs the compiled graph or nothing: if dynamo would have to recompile (a guard failed), it returns
    False without touching its arguments and the caller runs the eager step (dynamo's silent fallback to eager
    execution of this function would not be bit-identical: the eager ``prims.fma`` is not fused)."""
    key = (bool(momentum), bool(maximize))
    k = _KERNELS.get(key)
    if k is not None:
        return k
    if not _BROKEN:
        compiled = torch.compile(_VARIANTS[key], dynamic=True, fullgraph=True)

        def kernel(p: Tensor, g: Tensor, m: Tensor, G: Tensor, n: Tensor, w: Tensor, decay: Tensor, c: Tensor,
                   neg_lr: Tensor) -> bool:
            # detached: no autograd view of a Parameter reaches dynamo's guards
            ts = [t.detach() for t in ((p, g, m, G, n) if key[0] else (p, g, G, n))]
            try:
                with torch.no_grad(), torch.compiler.set_stance("fail_on_recompile"):
                    compiled(*ts, w, decay, c, neg_lr)
            except RuntimeError as exc:  # torch._dynamo.exc.RecompileError: a guard failed, nothing ran
                if "recompil" not in str(exc).lower():
                    raise
                return False
            return True

        probe = [torch.zeros(64) for _ in range(5 if key[0] else 4)]
        scalars = [torch.tensor(v, dtype=torch.float32) for v in (0.1, 1.0, 1.0, -1e-3)]
        try:
            with torch.no_grad():
                compiled(*probe, *scalars)
        except (RuntimeError, OSError, ImportError, subprocess.SubprocessError) as exc:
            # dynamo/inductor errors are RuntimeErrors; a missing or failing C++ compiler OSError/subprocess
            _broken(exc)
        else:
            _KERNELS[key] = kernel
            return kernel
    if required:
        raise RuntimeError(f"StoSignSGD(fused=True): torch.compile does not work here ({_BROKEN[0]})")
    return None
