"""Scale selection: per-tensor, per-channel and per-block scales (fp32, E8M0 or E4M3).

Convention: ``q = round(x / scale) * scale`` (the scale is the dequantization multiplier). Amax is taken over
finite values only, so a NaN or inf element stays NaN/inf (subject to the element format's overflow rule) instead
of poisoning every scale. An all-zero (or empty) tensor or block gets a finite, non-zero scale (never NaN); only an
E4M3 block scale can be 0 (it then zeroes its block), and :func:`nonzero` is the one guard that divides by it.
Imports the spec language and the formats only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from .formats import FORMATS, Format
from .spec import Scaling

__all__ = ["ScaleInfo", "compute_scale", "to_scaling_view", "finite_amax", "nonzero", "e8m0_exponent", "pow2"]

_E4M3 = FORMATS["e4m3"]


@dataclass
class ScaleInfo:
    """``scale``: float32, broadcastable to the scaling view (see :func:`to_scaling_view`).
    ``codes``: how the scale is stored (uint8 E8M0/E4M3 codes, or the float32 scale itself).
    ``global_scale``: the float32 tensor scale multiplying E4M3 block scales (None otherwise)."""

    scale: torch.Tensor
    codes: torch.Tensor
    global_scale: torch.Tensor | None = None


def finite_amax(x: torch.Tensor, dim: Any = None, keepdim: bool = False) -> torch.Tensor:
    """max |x| over finite values (NaN and ±inf count as 0); 0 for an empty tensor or group."""
    a = x.abs().nan_to_num_(nan=0.0, posinf=0.0)
    if a.numel() == 0:  # amax of nothing raises; the sum of nothing is the 0 of the right shape
        return a.sum() if dim is None and not keepdim else a.sum(dim=tuple(range(a.dim())) if dim is None else dim,
                                                                 keepdim=keepdim)
    if dim is None:
        return a.amax() if not keepdim else a.amax(dim=tuple(range(a.dim())), keepdim=True)
    return a.amax(dim=dim, keepdim=keepdim)


def _norm_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"scaling axis {axis} is out of range for a tensor with {ndim} dimension(s)")
    return axis % ndim


def to_scaling_view(x: torch.Tensor, scaling: Scaling, *,
                    contiguous: bool = True) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """Arrange ``x`` so that one scale per group broadcasts over it; returns ``(view, undo)``.
    ``contiguous=False``: ``undo`` may return a strided view in ``x``'s shape (blocks along a leading axis: no
    transposing copy), the same values.

    tensor/channel: ``x`` itself. block: ``axis`` moved last, padded with zeros to a multiple of ``block_size``,
    reshaped to ``(..., n_blocks, block_size)``; ``undo`` maps a tensor of that shape back to ``x``'s layout.
    2-D blocks (``block_rows = R > 1``): ``axis`` moved last, the other dimensions flattened to rows, both padded
    with zeros (to multiples of R and ``block_size``), then ``(row_tiles, col_tiles, R * block_size)``."""
    if scaling.mode != "block":
        if scaling.mode == "channel":
            if x.dim() == 0:
                raise ValueError("channel scaling needs a tensor with at least one dimension")
            _norm_axis(scaling.axis, x.dim())
        return x, (lambda t: t)
    if x.dim() == 0:
        raise ValueError("block scaling needs a tensor with at least one dimension")
    ax = _norm_axis(scaling.axis, x.dim())
    bs = scaling.block_size
    if scaling.block_rows > 1:
        return _tile_view(x, ax, scaling.block_rows, bs, contiguous)
    last = ax == x.dim() - 1
    xm = x if last else x.movedim(ax, -1)
    length = xm.shape[-1]
    pad = (-length) % bs
    if pad:
        xm = torch.nn.functional.pad(xm, (0, pad))
    lead = xm.shape[:-1]
    view = xm.reshape(*lead, (length + pad) // bs, bs)
    if last and not pad:   # the common case: undo is a reshape (the slice and movedim below are identities)
        shape = x.shape

        def undo_reshape(t: torch.Tensor) -> torch.Tensor:
            t = t.reshape(shape)
            return t.contiguous() if contiguous else t
        return view, undo_reshape

    def undo(t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(*lead, length + pad)[..., :length].movedim(-1, ax)
        return t.contiguous() if contiguous else t

    return view, undo


def _tile_view(x: torch.Tensor, ax: int, r: int, c: int,
               contiguous: bool) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    xm = x.movedim(ax, -1)
    lead, length = xm.shape[:-1], xm.shape[-1]
    x2 = xm.reshape(-1, length)
    rows = x2.shape[0]
    pr, pc = (-rows) % r, (-length) % c
    if pr or pc:
        x2 = torch.nn.functional.pad(x2, (0, pc, 0, pr))
    R, C = rows + pr, length + pc
    view = x2.reshape(R // r, r, C // c, c).transpose(1, 2).reshape(R // r, C // c, r * c)

    def undo(t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(R // r, C // c, r, c).transpose(1, 2).reshape(R, C)[:rows, :length]
        t = t.reshape(*lead, length).movedim(-1, ax)
        return t.contiguous() if contiguous else t

    return view, undo


def _group_amax(view: torch.Tensor, scaling: Scaling) -> torch.Tensor:
    if scaling.mode in ("tensor", "delayed"):
        return finite_amax(view, keepdim=True)
    if scaling.mode == "channel":
        ax = _norm_axis(scaling.axis, view.dim())
        dims = tuple(d for d in range(view.dim()) if d != ax)
        if not dims:
            return view.abs().nan_to_num_(nan=0.0, posinf=0.0)
        return finite_amax(view, dim=dims, keepdim=True)
    return finite_amax(view, dim=-1, keepdim=True)


def nonzero(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` with zeros replaced by 1: the divisor for ``x / scale`` (the one zero-scale guard)."""
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def _ceil_log2(a: torch.Tensor) -> torch.Tensor:
    m, e = torch.frexp(a)  # a = m * 2**e, m in [0.5, 1): log2(a) is an integer iff m == 0.5
    return e - (m == 0.5).to(e.dtype)


def e8m0_exponent(amax: torch.Tensor, fmt: Format, rounding: str = "floor") -> torch.Tensor:
    """The MX shared exponent of float32 ``amax`` for ``rounding`` (``Scaling.scale_rounding``; torchao's
    ``ScaleCalculationMode``): floor (OCP): ``floor(log2(amax)) - emax_elem``; ceil: ``ceil(log2(amax)) -
    emax_elem``; even: amax rounded half-up to the element's mantissa bits (on its float32 bits), then floor;
    rceil: ``ceil(log2(amax / fmt.max))`` (the quotient in float32). Clamped to [-127, 127]; -127 where
    amax == 0."""
    if rounding == "floor":
        _, e = torch.frexp(amax)  # floor(log2(amax)) = e - 1
        exp = e - 1 - fmt.emax
    elif rounding == "ceil":
        exp = _ceil_log2(amax) - fmt.emax
    elif rounding == "even":
        bits = amax.view(torch.int32) + (1 << (22 - fmt.man_bits))
        exp = ((bits >> 23) & 0xFF) - 127 - fmt.emax
    elif rounding == "rceil":
        exp = _ceil_log2(amax / fmt.max)
    else:
        raise ValueError(f"unknown scale rounding {rounding!r}")
    exp = exp.to(torch.int32).clamp_(-127, 127)
    return torch.where(amax > 0, exp, torch.full_like(exp, -127))


def pow2(exp: torch.Tensor) -> torch.Tensor:
    """2**exp as float32 (exact, including 2**-127)."""
    return torch.exp2(exp.to(torch.float64)).to(torch.float32)


def compute_scale(view: torch.Tensor, scaling: Scaling, fmt: Format) -> ScaleInfo:
    """Scales for ``view`` (from :func:`to_scaling_view`) so that each group's amax maps to ``fmt.max``.

    ``"delayed"`` scaling has no history here: the current tensor amax is used (a history of one), divided by
    ``2**margin`` (scale ``amax * 2**margin / fmt.max``); :class:`lowprec.DelayedScaler` holds a real history.
    fp32 scales for element formats whose max is within float32's rounding of float32's max (emax 127: bf16,
    fp32) are kept normal (>= 2**-126) and rounded up where needed, so that ``x / scale`` stays finite."""
    amax = _group_amax(view, scaling).to(torch.float32)
    if scaling.scale_format == "e8m0":
        exp = e8m0_exponent(amax, fmt, scaling.scale_rounding)
        return ScaleInfo(pow2(exp), (exp + 127).to(torch.uint8))
    if scaling.scale_format == "e4m3":
        t_amax = finite_amax(view)
        g = t_amax / (_E4M3.max * fmt.max)
        g = torch.where((g > 0) & torch.isfinite(g), g, torch.ones_like(g)).to(torch.float32)
        s_blk = ((amax / fmt.max) / g).clamp_(max=_E4M3.max).to(torch.float8_e4m3fn)
        return ScaleInfo(s_blk.to(torch.float32) * g, s_blk.view(torch.uint8), g)
    s = amax / fmt.max
    if scaling.mode == "delayed":  # no history here: the current amax (a history of one), with the margin
        s = s * 2.0 ** scaling.margin
    if fmt.emax >= 127:
        # amax / s may round above float32's max (x / s = inf) and a subnormal s loses bits: keep s normal and
        # step it up one ulp where amax / s would exceed fmt.max
        s = s.clamp_(min=2.0**-126)
        s = torch.where(amax / s > fmt.max, torch.nextafter(s, torch.full_like(s, float("inf"))), s)
    s = torch.where((s > 0) & torch.isfinite(s), s, torch.ones_like(s))
    return ScaleInfo(s, s)
