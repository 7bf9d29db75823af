"""The stochastic sign operator and the cheap noise it runs on.

``stochastic_sign(x, bound)`` returns ``sign(x + bound * n)`` with ``n`` uniform on ``(-1, 1)``: +1 with
probability ``(1 + x/bound)/2`` and -1 otherwise, so ``E[out] = x/bound`` for ``|x| <= bound``.

Noise: ``n`` is drawn on the symmetric grid of the 32768 odd multiples of 2**-15 in (-1, 1) (``n = (r | 1)/2**15``
with ``r`` a uniform random int16). Four such int16 values come from one 64-bit draw of the generator
(``Tensor.random_`` over the full int64 range), which is ~3.5x cheaper than ``Tensor.uniform_`` on CPU. The price is a
probability resolution of 2**-15: ``E[out] == x/bound`` exactly when ``x/bound`` is a multiple of 2**-15 and
``|E[out] - x/bound| < 2**-15`` otherwise.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["stochastic_sign", "random_int16", "NOISE_SCALE"]

NOISE_SCALE = 2.0**-15
"""``n = (r | 1) * NOISE_SCALE`` for a uniform int16 ``r``: odd numerators, so ``n`` lies in (-1, 1)."""


def random_int16(numel: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None,
                 out: Tensor | None = None) -> Tensor:
    """``numel`` int16 values uniform on all 65536 values, as a 1-D view into ``out``.

    Four values come from each 64-bit draw of the generator. ``out`` (int64, at least ``ceil(numel/4)`` long) is
    reused when given, so a training loop allocates nothing. The generator advances by ``ceil(numel/4)`` 64-bit draws:
    the stream consumed depends on ``numel`` only, never on how the values are later split among tensors.
    ``noise = r | 1`` (odd values in [-32767, 32767]) times :data:`NOISE_SCALE` is uniform on a symmetric grid in
    (-1, 1) with mean exactly 0; the low bit ``r & 1`` is an independent fair coin.
    """
    words = (numel + 3) // 4
    if out is None:
        out = torch.empty(words, dtype=torch.int64, device=device)
    elif out.dtype != torch.int64 or out.numel() < words:
        raise ValueError(f"random_int16: out must be int64 with at least {words} elements, got {out.dtype} "
                         f"with {out.numel()}")
    buf = out[:words]
    buf.random_(-(2**63), None, generator=generator)  # full 64-bit range: 4 uniform int16 per draw
    return buf.view(torch.int16)[:numel]


def stochastic_sign(x: Tensor, bound: Tensor | float, generator: torch.Generator | None = None) -> Tensor:
    """Unbiased one-bit sign of ``x`` relative to ``bound``.

    Returns a tensor of x's shape and dtype with values in {-1, +1}: +1 with probability
    ``clip((1 + x/bound)/2, 0, 1)``. Semantics by case:

    - ``|x| <= bound``: ``E[out] = x/bound`` (to within 2**-15, exactly on multiples of 2**-15, see module doc).
    - ``|x| > bound`` (including ``bound == 0`` and ``x != 0``): the probability saturates (clips) and the
      output is ``sign(x)`` deterministically; ``E[out] = sign(x) != x/bound``, the estimator is biased there.
    - ``bound == 0`` and ``x == 0``: 0 (the only case that returns 0).

    ``bound`` (a tensor broadcastable to x, or a number) must be >= 0; NaN in x gives NaN. Ties ``x + bound*n == 0`` with bound > 0 are
    broken by an independent fair coin, so the output is strictly ±1 there.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"stochastic_sign: x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"stochastic_sign: x must be a floating-point tensor, got {x.dtype}")
    # compute in float32 at least, so the 2**-15 grid is represented exactly for bf16/fp16 inputs
    work = torch.promote_types(x.dtype, torch.float32)
    bound_t = torch.as_tensor(bound, device=x.device).to(work)
    try:
        shape = torch.broadcast_shapes(bound_t.shape, x.shape)
    except RuntimeError:
        shape = None
    if shape != x.shape:
        raise ValueError(f"stochastic_sign: bound of shape {tuple(bound_t.shape)} does not broadcast to x of "
                         f"shape {tuple(x.shape)}")
    if bool((bound_t < 0).any()) or bool(torch.isnan(bound_t).any()):
        raise ValueError("stochastic_sign: bound must be >= 0 everywhere (and not NaN)")
    raw = random_int16(x.numel(), x.device, generator)
    coin = (raw & 1).to(torch.float32).mul_(2).sub_(1).view(x.shape)  # independent fair ±1 (the bit `| 1` drops)
    noise = raw.bitwise_or_(1).view(x.shape)
    s = torch.addcmul(x.to(work), bound_t, noise, value=NOISE_SCALE).sign_()
    tie = (s == 0) & (bound_t > 0)
    s = torch.where(tie, coin.to(work), s)
    return s.to(x.dtype)
