"""Compiled fast path of the rounding (``torch.compile``, inductor's CPU C++ backend), bit-identical to
:func:`lowprec.rounding.round_to_format`, its eager reference (tests/lowprec/test_fast_round.py: every code,
midpoint and the values beside it, all roundings, saturate or not, flushing, subnormals, NaN/inf, and the same
stochastic results from the same generator).

:func:`fast_round` returns None where it does not apply (the caller then runs the eager reference):

* float32 CPU tensors of at least :data:`MIN_NUMEL` elements (:data:`MIN_NUMEL_STOCHASTIC` for stochastic
  rounding; below that, eager costs no more than a compiled call);
* float formats whose grid lies within float32's normal range and whose nearest rounding is the eager magic-number
  one (``emin - man_bits - 1 >= -126``, ``emax + 24 - man_bits <= 127``, at most 22 mantissa bits): every
  8-bit-or-smaller float format and fp16; bf16 for stochastic rounding (the master rounding of ``fp8-all``);
* nearest, toward_zero and stochastic rounding. Stochastic rounding draws its random bits eagerly with
  :func:`lowprec.rounding.random_bits` from the same generator, in the same order, as the eager path.

Nearest and toward_zero run on the float32 bit patterns as integers (one read, one write, no float ops);
stochastic adds the random bits to the bit pattern as the eager path does. One compiled graph per
(format, rounding, saturate, flush, rand_bits), with a dynamic length: no recompilation per shape. The first call
of a spec compiles (seconds; inductor caches the kernel on disk). A compile failure (no C++ compiler) turns the
fast path off for the process, with one warning. ``LOWPREC_FAST=0`` in the environment, or
:func:`set_fast_path`, turns it off.
"""

from __future__ import annotations

import os
import types
import warnings
from typing import Callable

import torch

from .formats import Format, get_format
from .rounding import inf_needs_mask, overflow_value, random_bits, rounding_limit
from .spec import QuantSpec, Rounding

__all__ = ["fast_round", "fast_scaled", "fast_scaled_ok", "fast_round_ok", "set_fast_path", "fast_path_enabled",
           "fast_path_settings",
           "MIN_NUMEL", "MIN_NUMEL_STOCHASTIC"]

# below these a compiled call (~50 us here) and, for stochastic rounding, the random-bit draw (the same in both
# paths) leave no gain over eager (measured on 2 shared cores, 1 thread)
MIN_NUMEL = 1 << 18
MIN_NUMEL_STOCHASTIC = 1 << 20
_INT_MIN = -(1 << 31)
_CANONICAL_NAN = 0x7FC00000
_state = {"enabled": os.environ.get("LOWPREC_FAST", "1") != "0", "min_numel": MIN_NUMEL,
          "min_numel_stochastic": MIN_NUMEL_STOCHASTIC}
_cache: dict[tuple, Callable[..., torch.Tensor]] = {}

def _compile_errors() -> tuple[type[Exception], ...]:
    """What a failed kernel build raises (looked up only when something was raised: importing dynamo is slow)."""
    return torch._dynamo.exc.BackendCompilerFailed, torch._inductor.exc.InductorError


def _give_up(error: Exception, generator: torch.Generator | None, saved: torch.Tensor | None) -> None:
    """A kernel failed to build: turn the fast path off for the process, put the generator back where the eager
    path expects it, and say so once. Returns None (the caller's "not applicable")."""
    _state["enabled"] = False
    if saved is not None:
        generator.set_state(saved)
    warnings.warn(f"lowprec: the compiled fast path failed to build ({type(error).__name__}); using the eager "
                  f"rounding from now on", RuntimeWarning, stacklevel=3)
    return None


def set_fast_path(enabled: bool, min_numel: int | None = None, min_numel_stochastic: int | None = None) -> None:
    """Turn the compiled fast path on or off for this process. ``min_numel``: the smallest tensor it takes (for
    stochastic rounding too unless ``min_numel_stochastic`` is given); None keeps the current sizes (defaults
    :data:`MIN_NUMEL`, :data:`MIN_NUMEL_STOCHASTIC`)."""
    for v in (min_numel, min_numel_stochastic):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 2):
            raise ValueError(f"min_numel must be an integer >= 2, got {v!r}")
    _state["enabled"] = bool(enabled)
    if min_numel is not None:
        _state["min_numel"] = _state["min_numel_stochastic"] = min_numel
    if min_numel_stochastic is not None:
        _state["min_numel_stochastic"] = min_numel_stochastic


def fast_path_settings() -> tuple[bool, int, int]:
    """(enabled, min_numel, min_numel_stochastic): what :func:`set_fast_path` set (restore it with that call)."""
    return _state["enabled"], _state["min_numel"], _state["min_numel_stochastic"]


def fast_path_enabled() -> bool:
    """Whether :func:`fast_round` may run compiled kernels (see :func:`set_fast_path`)."""
    return _state["enabled"]


def _bits(v: float) -> int:
    """The float32 bit pattern of ``v`` (finite, >= 0) as a Python int."""
    return int(torch.tensor(v, dtype=torch.float32).view(torch.int32))


def fast_round_ok(fmt: Format, rounding: Rounding) -> bool:
    """Whether :func:`fast_round` has a kernel for ``fmt`` and ``rounding`` (module docstring)."""
    if fmt.kind != "float" or fmt.man_bits > 22:
        return False
    if rounding == Rounding.STOCHASTIC:
        return fmt.emin >= -126
    return fmt.emin - fmt.man_bits - 1 >= -126 and fmt.emax + 24 - fmt.man_bits <= 127


def _int_kernel(fmt: Format, rounding: Rounding, saturate: bool, flush: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """Nearest / toward_zero on int32 bit patterns ``b`` -> int32 bit patterns of the result.

    At a magnitude of biased exponent E the grid keeps ``d = clamp(23 - M + emin + 127 - E, 23 - M, 24)`` fewer
    low bits than float32 (more below the smallest normal: the fixed subnormal step); d = 24 is the binade just
    below the smallest subnormal (results 0 or the smallest subnormal), lower binades give 0. Nearest breaks ties
    on the lowest kept bit of the significand (the implicit bit where d = 23, as float addition does)."""
    m, emin, drop = fmt.man_bits, fmt.emin, 23 - fmt.man_bits
    lim = _bits(rounding_limit(fmt, rounding, saturate))
    max_b, min_normal_b = _bits(fmt.max), _bits(fmt.min_normal)
    sub_b, half_sub_b = _bits(2.0 ** (emin - m)), _bits(2.0 ** (emin - m - 1))
    nearest = rounding == Rounding.NEAREST
    ov = overflow_value(fmt)
    over_b = _CANONICAL_NAN if ov != ov else (0x7F800000 if ov == float("inf") else max_b)
    inf_mask = inf_needs_mask(fmt, rounding) and not saturate

    def kernel(b: torch.Tensor) -> torch.Tensor:
        sign = b & _INT_MIN
        mag = b & 0x7FFFFFFF
        a = torch.clamp(mag, max=lim)
        d = torch.clamp((drop + emin + 127) - (a >> 23), min=drop, max=24)
        keep = ~((1 << d) - 1)
        if nearest:
            odd = torch.where(d == 23, 1, (a >> d) & 1)
            t = (a + odd + ((1 << (d - 1)) - 1)) & keep
            t = torch.where(d == 24, (a > half_sub_b).to(torch.int32) * sub_b, t)
        else:
            t = torch.where(d == 24, 0, a & keep)
        if not saturate:
            over = t > max_b
            if inf_mask:
                over = over | (mag == 0x7F800000)
            t = torch.where(over, over_b, t)
        if flush:
            t = torch.where(t < min_normal_b, 0, t)
        return torch.where(mag > 0x7F800000, _CANONICAL_NAN, t) | sign

    return kernel


def _stochastic_kernel(fmt: Format, saturate: bool, flush: bool,
                       rand_bits: int | None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Stochastic rounding of float32 ``x`` with int32 random bits ``r`` (shaped like ``x``), the eager
    algorithm: magnitudes below the smallest normal are shifted up by it (a float add), the random bits are added
    to the bit pattern below the kept mantissa bits, the result truncated and shifted back."""
    m, drop, thr = fmt.man_bits, 23 - fmt.man_bits, fmt.min_normal
    nb = drop if rand_bits is None else min(rand_bits, drop)
    rmask = ((1 << nb) - 1) << (drop - nb)
    lim = rounding_limit(fmt, Rounding.STOCHASTIC, saturate)
    ov = overflow_value(fmt)
    inf_mask = inf_needs_mask(fmt, Rounding.STOCHASTIC) and not saturate

    def kernel(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        a = torch.clamp(x.abs(), max=lim)
        low = a < thr
        a2 = torch.where(low, a + thr, a)
        t = ((a2.view(torch.int32) + (r & rmask)) & ~((1 << drop) - 1)).view(torch.float32)
        q = torch.where(low, t - thr, t)
        if not saturate:
            over = q > fmt.max
            if inf_mask:
                over = over | (x.abs() == float("inf"))
            q = torch.where(over, ov, q)
        if flush:
            q = torch.where(q < fmt.min_normal, 0.0, q)
        q = torch.copysign(q, x)
        return torch.where(x != x, x, q)

    return kernel


def _compiled(key: tuple, kernel: Callable) -> Callable:
    """``torch.compile`` of ``kernel`` under its own code object (dynamo's recompile limit counts per code
    object, so each spec gets its own budget), dynamic length."""
    code = kernel.__code__.replace(co_name=f"lowprec_fast_{len(_cache)}")
    fn = types.FunctionType(code, kernel.__globals__, code.co_name, kernel.__defaults__, kernel.__closure__)
    return torch.compile(fn, fullgraph=True)  # the length is marked dynamic per call: constants stay baked in


def _dynamic(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``t`` with its size along ``dim`` marked dynamic (one graph for every length)."""
    torch._dynamo.mark_dynamic(t, dim)
    return t


def fast_round(x: torch.Tensor, fmt: Format, rounding: Rounding, *, saturate: bool = True,
               flush_subnormals: bool = False, rand_bits: int | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor | None:
    """``round_to_format(x, fmt, rounding, ...)`` by a compiled kernel, bit for bit, or None where the fast path
    does not apply (module docstring); ``x`` is float32."""
    if not _state["enabled"] or x.numel() < min(_state["min_numel"], _state["min_numel_stochastic"]):
        return None  # the common case on small tensors: out before any parsing (this runs on every quantize)
    fmt, rounding = get_format(fmt), Rounding.parse(rounding)
    if (torch.compiler.is_compiling() or x.dtype != torch.float32 or x.device.type != "cpu"
            or x.numel() < _state["min_numel_stochastic" if rounding == Rounding.STOCHASTIC else "min_numel"]
            or not fast_round_ok(fmt, rounding)):
        return None
    key = (fmt, rounding, bool(saturate), bool(flush_subnormals), rand_bits if rounding == Rounding.STOCHASTIC
           else None)
    fn = _cache.get(key)
    first = fn is None
    if first:
        if rounding == Rounding.STOCHASTIC:
            fn = _compiled(key, _stochastic_kernel(fmt, saturate, flush_subnormals, rand_bits))
        else:
            fn = _compiled(key, _int_kernel(fmt, rounding, saturate, flush_subnormals))
        _cache[key] = fn
    flat = x.detach().contiguous().view(-1)
    # the first call compiles; should that fail, the generator is put back so the eager path draws the same bits
    saved = generator.get_state() if first and generator is not None else None
    try:
        if rounding == Rounding.STOCHASTIC:
            rnd = random_bits(flat.shape, flat.device, generator)
            out = fn(_dynamic(flat), _dynamic(rnd))
        else:
            out = fn(_dynamic(flat.view(torch.int32))).view(torch.float32)
    except _compile_errors() as e:
        return _give_up(e, generator, saved)
    return out.view(x.shape)


def fast_scaled_ok(s: QuantSpec) -> bool:
    """Whether :func:`fast_scaled` has a fused kernel for ``s``: a :func:`fast_round_ok` float format with ``emax``
    in [0, 126] under 1-D block scaling with E8M0 scales and the OCP floor rule (mxfp8, mxfp6, mxfp4) or with
    E4M3 scales (nvfp4), or under fp32 tensor scaling; any rounding (stochastic with the eager random bits)."""
    sc = s.scaling
    if sc is None or not fast_round_ok(s.format, s.rounding) or not 0 <= s.format.emax <= 126:
        return False
    if sc.mode == "block":
        return sc.block_rows == 1 and (
            sc.scale_format == "e4m3" or (sc.scale_format == "e8m0" and sc.scale_rounding == "floor"))
    return sc.mode == "tensor" and sc.scale_format == "fp32"


def _scaled_kernel(s: QuantSpec) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """``v`` (groups x group length, float32; ``r``: random bits shaped like it, stochastic rounding only) ->
    (``round(v / scale) * scale``, scale): the eager path's scales (finite amax; E8M0 ``2**clamp(floor(log2 amax)
    - emax, -127, 127)`` from the amax's exponent field; E4M3 block scales times the fp32 tensor scale, whose zero
    scales zero their block; fp32 ``amax / max``, 1 where that is 0 or not finite), division, rounding, product."""
    fmt, sf = s.format, s.scaling.scale_format
    if s.rounding == Rounding.STOCHASTIC:
        sr = _stochastic_kernel(fmt, s.saturate, s.flush_subnormals, s.rand_bits)

        def round_(y: torch.Tensor, r: torch.Tensor | None) -> torch.Tensor:
            return sr(y, r)
    else:
        int_round = _int_kernel(fmt, s.rounding, s.saturate, s.flush_subnormals)

        def round_(y: torch.Tensor, r: torch.Tensor | None) -> torch.Tensor:
            return int_round(y.view(torch.int32)).view(torch.float32)

    def kernel(v: torch.Tensor, r: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        a = v.abs()
        a = torch.where((a != a) | (a == float("inf")), 0.0, a)
        amax = a.amax(dim=-1, keepdim=True) if sf != "fp32" else a.amax().reshape(1, 1)
        if sf == "e8m0":  # amax >= 0: its exponent field; subnormal or zero amax gives -127 (emax >= 0)
            exp = torch.clamp((amax.view(torch.int32) >> 23) - (127 + fmt.emax), min=-127, max=127)
            scale = torch.where(exp == -127, 0x00400000, (exp + 127) << 23).view(torch.float32)
        elif sf == "e4m3":
            g = amax.amax() / (448.0 * fmt.max)
            g = torch.where((g > 0) & (g != float("inf")), g, 1.0)
            s_blk = torch.clamp((amax / fmt.max) / g, max=448.0).to(torch.float8_e4m3fn)
            scale = s_blk.to(torch.float32) * g
        else:
            sc = amax / fmt.max
            scale = torch.where((sc > 0) & (sc != float("inf")), sc, 1.0)
        if sf == "e4m3":
            el = round_(v / torch.where(scale == 0, 1.0, scale), r) * (scale != 0)
        else:
            el = round_(v / scale, r)
        return el * scale, scale

    return kernel


def fast_scaled(x: torch.Tensor, s: QuantSpec, view: torch.Tensor,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The scale -> round -> unscale of ``quantize`` for ``view`` (``lowprec.scaling.to_scaling_view`` of float32
    ``x``) in one compiled graph, bit for bit: (the quantized view, its scale broadcastable to the view), or None
    where it does not apply (:func:`fast_scaled_ok`, size and device as for :func:`fast_round`). Stochastic
    rounding draws the random bits of the view from ``generator`` as the eager path does."""
    sto = s.rounding == Rounding.STOCHASTIC
    if (not _state["enabled"] or torch.compiler.is_compiling() or x.dtype != torch.float32
            or x.device.type != "cpu" or x.numel() < _state["min_numel_stochastic" if sto else "min_numel"]
            or not fast_scaled_ok(s)):
        return None
    key = ("scaled", s)
    fn = _cache.get(key)
    first = fn is None
    if first:
        fn = _cache[key] = _compiled(key, _scaled_kernel(s))
    block = s.scaling.mode == "block"
    v2 = view.contiguous().view(-1, view.shape[-1] if block else view.numel())
    saved = generator.get_state() if first and sto and generator is not None else None
    try:
        if sto:
            rnd = random_bits(v2.shape, v2.device, generator)
            q, scale = fn(_dynamic(v2, 0 if block else 1), _dynamic(rnd, 0 if block else 1))
        else:
            q, scale = fn(_dynamic(v2, 0 if block else 1))
    except _compile_errors() as e:
        return _give_up(e, generator, saved)
    if block:
        return q.view(view.shape), scale.view(*view.shape[:-1], 1)
    return q.view(view.shape), scale.view([1] * view.dim())
