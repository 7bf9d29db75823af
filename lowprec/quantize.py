"""THE quantization path: scale -> round -> unscale. Everything that quantizes goes through :func:`scale_and_round`.

``q = round(x / scale) * scale`` with ``scale`` the dequantization multiplier (see :mod:`lowprec.scaling`), the
rounding of :mod:`lowprec.rounding` and the spec language of :mod:`lowprec.spec`. :func:`quantize` returns the
values; :func:`quantize_with_scale` the values and their scales; ``lowprec.codecs.encode`` the codes of the same
rounded elements, and ``lowprec.DelayedScaler`` applies its history's scale through :func:`quantize_with_scale`.

Semantics beyond the rounding rules (:mod:`lowprec.rounding`):

* The result has the input's dtype and device. When a value on the format's grid (times a non-power-of-two scale)
  is not representable in that dtype (fp16 values or fp32-scaled values in a bf16 tensor), the final cast rounds
  it; with ``saturate=True`` an unscaled result never overflows the dtype: it saturates to the largest value both
  the format and the dtype hold (``bf16`` in a float16 tensor: 65280).
* A scale of 0 (only an E4M3 block scale, or a given scale, can be 0) zeroes its group (NaN stays NaN).
* Large float32 CPU tensors are rounded (and, for MX/NVFP4 block and fp32 tensor scaling, scaled, rounded and
  unscaled) by the compiled kernels of :mod:`lowprec.fast`, bit-identical to the eager path (``LOWPREC_FAST=0``
  or ``lowprec.fast.set_fast_path(False)`` turns them off).
* Quantization is not differentiable: results carry no autograd history (``lowprec.nn`` provides
  straight-through layers). Empty tensors give empty results for every spec.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import scaling as _sc
from . import fast as _fast
from .fast import fast_min_numel, fast_round, fast_scaled, fast_scaled_ok, fast_state, native_scaled_ok
from .formats import Format, torch_dtype
from .rounding import (check_tensor, compiled_quantizer, e4m3_to_float32, functional_round, functional_round_ok,
                       random_bits, round_native,
                       round_to_format, saturation_limit, widen_native)
from .spec import SCALED_FORMATS, QuantSpec, Rounding, Scaling, spec

__all__ = ["Rounding", "Scaling", "QuantSpec", "spec", "quantize", "quantize_with_scale", "quantize_with_scale_fn",
           "round_to_format",
           "SCALED_FORMATS", "functional_round", "compiled_quantizer", "Rounded", "scale_and_round",
           "native_codes_ok", "check_tensor", "e4m3_to_float32"]


@dataclass
class Rounded:
    """The scale -> round half of the path, before unscaling.

    ``elements``: ``x / scale`` rounded onto the element grid, in the scaling view (float32; a torch float8
    tensor when :func:`scale_and_round` was asked for native codes and the spec allows it). ``info``: the scales
    (None when unscaled). ``undo``: maps a tensor shaped like the view back to ``x``'s layout."""

    elements: torch.Tensor
    info: _sc.ScaleInfo | None
    undo: Callable[[torch.Tensor], torch.Tensor]


def native_codes_ok(s: QuantSpec) -> bool:
    """True when the elements of ``s`` come from one native float8 cast (:func:`lowprec.rounding.round_native`):
    nearest, registered e4m3/e5m2, no flushing, no E4M3 block scales (whose zero scales zero their block)."""
    return (s.rounding == Rounding.NEAREST and not s.flush_subnormals
            and torch_dtype(s.format) in (torch.float8_e4m3fn, torch.float8_e5m2)
            and (s.scaling is None or s.scaling.scale_format != "e4m3"))


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _round(y: torch.Tensor, s: QuantSpec, generator: torch.Generator | None) -> torch.Tensor:
    """``round_to_format`` of float32 ``y`` per ``s``: by the compiled fast path where it applies (large CPU
    tensors; bit-identical, :mod:`lowprec.fast`), else the eager reference."""
    if torch.compiler.is_compiling() and functional_round_ok(s.format, s.rounding):
        rnd = random_bits(y.shape, y.device, generator) if s.rounding == Rounding.STOCHASTIC else None
        return functional_round(y, s.format, s.rounding, saturate=s.saturate, flush_subnormals=s.flush_subnormals,
                                rand_bits=s.rand_bits, random=rnd)
    kw = dict(saturate=s.saturate, flush_subnormals=s.flush_subnormals, rand_bits=s.rand_bits, generator=generator)
    q = fast_round(y, s.format, s.rounding, **kw)
    return round_to_format(y, s.format, s.rounding, **kw) if q is None else q


def scale_and_round(x: torch.Tensor, s: QuantSpec, generator: torch.Generator | None = None, *,
                    scale: torch.Tensor | None = None, native: bool = False, contiguous: bool = True) -> Rounded:
    """Scale ``x`` (a checked float tensor) and round it onto ``s``'s element grid: the shared first half of
    :func:`quantize` and ``lowprec.codecs.encode``. ``scale``: a given per-tensor scale (one element) instead of
    one computed from ``x``. ``native``: return float8 elements where :func:`native_codes_ok`. ``contiguous``:
    that of ``lowprec.scaling.to_scaling_view`` (``undo``'s results)."""
    check_tensor(x)
    x32 = x.detach().float()
    fmt = s.format
    fast = native and native_codes_ok(s)
    if s.scaling is None:
        el = round_native(x32, fmt, s.saturate) if fast else _round(x32, s, generator)
        return Rounded(el, None, _identity)
    view, undo = _sc.to_scaling_view(x32, s.scaling, contiguous=contiguous)
    if scale is not None:
        sc = scale.to(device=x.device, dtype=torch.float32).reshape([1] * x.dim())
        info = _sc.ScaleInfo(sc, sc)
    else:
        info = _sc.compute_scale(view, s.scaling, fmt)
    y = view / _sc.nonzero(info.scale)
    if fast:
        return Rounded(round_native(y, fmt, s.saturate), info, undo)
    el = _round(y, s, generator)
    if scale is not None or s.scaling.scale_format == "e4m3":  # the scales that can be 0 zero their group
        el = el.mul_(info.scale != 0)  # (in place: a where() would cost a fifth of an nvfp4 quantize)
    return Rounded(el, info, undo)


def _fused(x: torch.Tensor, s: QuantSpec, generator: torch.Generator | None,
           contiguous: bool = True) -> tuple[torch.Tensor, torch.Tensor, Callable] | None:
    """The whole scale -> round -> unscale by one native loop or compiled graph (:func:`lowprec.fast.fast_scaled`,
    bit-identical) where it applies: (the quantized view, its scale, undo), else None."""
    if s.scaling is None or x.numel() < fast_min_numel() or not fast_scaled_ok(s):
        return None
    check_tensor(x)
    x32 = x.detach().float()
    view, undo = _sc.to_scaling_view(x32, s.scaling, contiguous=contiguous)
    r = fast_scaled(x32, s, view, generator)
    return None if r is None else (r[0], r[1], undo)


def _unscale(r: Rounded, s: QuantSpec, dtype: torch.dtype) -> torch.Tensor:
    """The last step: elements times their scale, in ``x``'s layout and dtype (saturating within the dtype)."""
    el = r.elements if r.elements.dtype == torch.float32 else widen_native(r.elements)
    if r.info is None:
        lim = saturation_limit(s.format, dtype) if s.saturate else None
        if lim is not None:
            el = el.clamp_(-lim, lim)
        return el.to(dtype)
    return r.undo(el.mul_(r.info.scale)).to(dtype)


def quantize(x: torch.Tensor, fmt: "str | Format | QuantSpec", *, rounding: "str | Rounding | None" = None,
             saturate: bool | None = None, scaling: "Scaling | str | None" = None,
             generator: torch.Generator | None = None, flush_subnormals: bool | None = None,
             rand_bits: int | None = None) -> torch.Tensor:
    """Quantize ``x`` onto ``fmt`` (a name such as ``"e4m3"``/``"mxfp4"``, a Format or a QuantSpec).

    Keyword arguments that are not None override the spec's fields. Same shape, dtype and device as ``x``;
    every value is representable in the format times its scale (up to the final cast to bf16/fp16 inputs when a
    non-power-of-two scale is used). ``generator`` makes stochastic rounding reproducible."""
    s = spec(fmt, rounding=rounding, saturate=saturate, scaling=scaling, flush_subnormals=flush_subnormals,
             rand_bits=rand_bits)
    p = _planned(x, s, generator)
    if p is not None:
        return p[0]
    f = _fused(x, s, generator)
    if f is not None:
        return f[2](f[0]).to(x.dtype)
    return _unscale(scale_and_round(x, s, generator), s, x.dtype)


def quantize_with_scale(x: torch.Tensor, spec_: "str | Format | QuantSpec",
                        generator: torch.Generator | None = None, *,
                        scale: torch.Tensor | float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Like :func:`quantize`, also returning the float32 scale broadcastable to ``x`` (None when unscaled):
    ``q = round(x / scale) * scale``. Block scales are returned expanded to ``x``'s shape.

    ``scale``: a given per-tensor scale (one element, >= 0) used instead of computing one from ``x`` (how a
    caller holding a delayed-scaling history, e.g. :meth:`lowprec.DelayedScaler.scales_for`'s ``scale_inv``,
    applies it); only for tensor or delayed scaling. A given scale of 0 gives zeros (NaN stays NaN)."""
    s = spec(spec_)
    if scale is not None:
        if s.scaling is None or s.scaling.mode not in ("tensor", "delayed"):
            raise ValueError(f"a given scale needs a spec with tensor or delayed scaling, got {s}")
        scale = torch.as_tensor(scale, dtype=torch.float32)
        if scale.numel() != 1:
            raise ValueError(f"a given scale must have one element (per-tensor), got shape {tuple(scale.shape)}")
    q, scale_fn = _quantize_scale_fn(x, s, generator, scale)
    return q, scale_fn()


def quantize_with_scale_fn(x: torch.Tensor, spec_: "str | Format | QuantSpec",
                           generator: torch.Generator | None = None, *,
                           contiguous: bool = True) -> tuple[torch.Tensor, Callable[[], torch.Tensor | None]]:
    """:func:`quantize_with_scale` as ``(q, scale_fn)``: the same values, and a function returning the same scale
    when called (block scales are expanded to ``x``'s shape only then, a full-size tensor a caller that only
    multiplies ``q`` never needs). ``contiguous=False``: ``q`` (and the scale) may be strided views in ``x``'s
    shape (blocks along a leading axis: no transposing copy; a GEMM reads either layout)."""
    return _quantize_scale_fn(x, spec(spec_), generator, None, contiguous)


# Plans: for a contiguous float32 tensor whose scaling view is a plain reshape (a tensor scale, or 1-D blocks along
# the last axis that tile it) or, in 2-D, the transpose of one (blocks along axis 0 that tile it), what _fused does
# is decided by the spec, the shape, ``contiguous`` and the fast-path settings alone: one native loop on x's rows
# (or on its native transpose's). A plan, kept per (spec, shape, contiguous, settings), runs that loop straight
# away and shapes its results as _fused and _quantize_scale_fn do (the same calls on the same rows: the same bits),
# skipping the per-call scaling view, its undo and the eligibility checks (~a third of a small quantized GEMM
# operand's time).
_PLANS: dict[tuple, Callable | None] = {}
_PLANS_MAX = 4096   # distinct layouts kept (a model with many shapes starts over rather than grow without end)


def _make_plan(x: torch.Tensor, s: QuantSpec, contiguous: bool) -> Callable | None:
    sc = s.scaling
    if sc is None or not native_scaled_ok(x, s) or not x.is_contiguous() or x.dim() == 0:
        return None
    shape = x.shape
    if (sc.mode == "block" and sc.block_rows == 1 and x.dim() == 2 and sc.axis % 2 == 0
            and shape[0] % sc.block_size == 0):
        M, K, B = shape[0], shape[1], sc.block_size

        def undo(t: torch.Tensor) -> torch.Tensor:   # (K, M) rows back to x's layout (to_scaling_view's undo)
            t = t.t()
            return t.contiguous() if contiguous else t

        def run_t(x: torch.Tensor, generator: torch.Generator | None):
            r = _fast.native_scaled_t(x.detach(), s, generator)
            if r is None:
                return None
            sc_ = r[1]
            return undo(r[0].view(K, M)), lambda: undo(sc_.view(K, M // B, 1).expand(K, M // B, B).reshape(K, M))
        return run_t
    if sc.mode == "tensor":
        rows, cols, sshape = 1, x.numel(), [1] * x.dim()

        def scale_of(sc_: torch.Tensor) -> Callable[[], torch.Tensor]:
            out = sc_.view(sshape)
            return lambda: out
    elif (sc.mode == "block" and sc.block_rows == 1 and sc.axis % x.dim() == x.dim() - 1
          and shape[-1] % sc.block_size == 0):
        rows, cols = x.numel() // sc.block_size, sc.block_size
        vshape = (*shape[:-1], shape[-1] // cols, cols)

        def scale_of(sc_: torch.Tensor) -> Callable[[], torch.Tensor]:
            return lambda: sc_.view(*vshape[:-1], 1).expand(vshape).reshape(shape)
    else:
        return None

    def run(x: torch.Tensor, generator: torch.Generator | None):
        r = _fast.native_scaled(x.detach().view(rows, cols), s, generator)
        return None if r is None else (r[0].view(shape), scale_of(r[1]))
    return run


def _planned(x: torch.Tensor, s: QuantSpec, generator: torch.Generator | None, contiguous: bool = True):
    """(q, scale_fn) by the plan for ``x``'s layout under ``s`` (above), or None (no plan, or its loop declined)."""
    check_tensor(x)
    if torch.compiler.is_compiling() or x.dtype != torch.float32 or not x.is_contiguous():
        return None
    key = (s, x.shape, x.device, contiguous, fast_state())
    plan = _PLANS.get(key, _make_plan)
    if plan is _make_plan:
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.clear()
        plan = _PLANS[key] = _make_plan(x, s, contiguous)
    return None if plan is None else plan(x, generator)


def _quantize_scale_fn(x: torch.Tensor, s: QuantSpec, generator: torch.Generator | None,
                       scale: torch.Tensor | None,
                       contiguous: bool = True) -> tuple[torch.Tensor, Callable[[], torch.Tensor | None]]:
    if scale is None:
        p = _planned(x, s, generator, contiguous)
        if p is not None:
            return p
    f = _fused(x, s, generator, contiguous) if scale is None else None
    if f is not None:
        q, sc, undo = f
        out, shape = undo(q).to(x.dtype), q.shape
    else:
        r = scale_and_round(x, s, generator, scale=scale, contiguous=contiguous)
        if r.info is None:
            return _unscale(r, s, x.dtype), lambda: None
        # the compact scales and the layout only (the function must not keep the elements alive)
        sc, shape, undo = r.info.scale, r.elements.shape, r.undo
        out = _unscale(r, s, x.dtype)
    if s.scaling.mode == "block":
        return out, lambda: undo(sc.expand(shape))
    return out, lambda: sc
