"""Rounding onto an unscaled grid: :func:`round_to_format` (the eager reference) and :func:`functional_round`,
its out-of-place twin for ``torch.compile`` (:func:`compiled_quantizer`). The two are tested against each other bit
for bit on every code, every midpoint and beside it (tests/lowprec/test_rounding.py), as gfloat's ``round.py`` and
``round_ndarray.py`` are.

Semantics (float32 in, float32 out):

* ``nearest`` rounds to nearest, ties to even; ``toward_zero`` truncates the magnitude; ``stochastic`` rounds the
  magnitude away from zero with probability ``floor(f * 2**nb) / 2**nb``, where ``f`` in [0, 1) is the fractional
  distance of ``|x|`` from its lower-magnitude neighbour on the grid and ``nb`` the number of random bits
  (``rand_bits``, default all: 23 - M for floats, 24 for integers). One rule for floats and integers, symmetric
  in sign; it is gfloat's ``RoundMode.StochasticFastest`` with ``srnumbits = nb``.
* ``saturate=True`` clamps to ``±max`` (±inf too). ``saturate=False`` gives the format's own overflow: inf where
  it has inf, else NaN where it has NaN, else (FP6/FP4, integers) the value saturates anyway; ``toward_zero``
  follows IEEE 754: a finite value never overflows (it truncates to ±max), ±inf stays ±inf (NaN without inf).
* NaN in gives NaN out, for every format (integers and FP6/FP4 included: the output is a float tensor, and a NaN
  never silently becomes a number; ml_dtypes turns NaN into 0 for FP4/FP6, we do not).
* Subnormals of the target format are honoured; ``flush_subnormals=True`` sets results whose magnitude is below
  the smallest normal to a zero of the same sign.
* ``e4m3``/``e5m2`` with ``nearest`` round with torch's native float8 casts (:func:`round_native`; on CPU the e4m3
  codes are widened back by exact bit arithmetic, faster than torch's CPU conversion); ``bf16``/``fp16`` with
  ``nearest`` use torch's casts. Everything else uses float32 bit arithmetic that agrees with them.
* Stochastic rounding draws its random bits from ``generator`` (or torch's default generator): identically seeded
  generators give identical results on the same device.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch

from .formats import FLOAT_DTYPES, Format, get_format, torch_dtype
from .spec import QuantSpec, Rounding, spec

__all__ = ["round_to_format", "functional_round", "functional_round_ok", "compiled_quantizer", "round_native", "widen_native",
           "e4m3_to_float32", "random_bits", "check_tensor", "overflow_value", "saturation_limit",
           "rounding_limit", "inf_needs_mask"]

_F32_MAX = float(torch.finfo(torch.float32).max)


def check_tensor(x: Any) -> None:
    """Raise TypeError unless ``x`` is a float32, bfloat16 or float16 tensor (what every entry point accepts)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be a float32, bfloat16 or float16 tensor, got {x.dtype}")


def overflow_value(fmt: Format) -> float:
    """What a non-saturating overflow gives in ``fmt``: inf, else NaN, else (no special codes) ``fmt.max``."""
    if fmt.has_inf:
        return float("inf")
    if fmt.has_nan:
        return float("nan")
    return fmt.max


def random_bits(n_shape: torch.Size, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """int32 tensor of shape ``n_shape`` with 31 uniformly random low bits (cheap: 64-bit random_ viewed as int32);
    the bits stochastic rounding draws (eager and compiled alike)."""
    n = 1
    for d in n_shape:
        n *= d
    r64 = torch.empty((n + 1) // 2, dtype=torch.int64, device=device).random_(generator=generator)
    return r64.view(torch.int32)[:n].view(n_shape)


def _stochastic_float(a: torch.Tensor, fmt: Format, rand_bits: int | None,
                      generator: torch.Generator | None) -> torch.Tensor:
    """Stochastic rounding of non-negative float32 ``a`` (NaN allowed, no inf) onto ``fmt``'s grid, in place.

    Adds a uniform random integer below the kept mantissa bits to the float32 bit pattern, then truncates: exact
    SR with 23-M random bits in the format's normal range (a carry moves into the next binade correctly).
    Values in the subnormal range are shifted up by 2**emin first, so they share the lowest binade's absolute
    resolution 2**(emin-23) (the shift itself rounds to that resolution), and shifted back afterwards.

    Two full-size buffers only (``a`` and the random bits; allocation dominates on CPU): the random buffer first
    holds the subnormal mask, which is then kept in ``a``'s free sign bit (+ shifted, - not shifted)."""
    m = fmt.man_bits
    drop = 23 - m
    thr = fmt.min_normal
    r64 = torch.empty((a.numel() + 1) // 2, dtype=torch.int64, device=a.device)
    rf = r64.view(torch.float32)[: a.numel()].view(a.shape)
    torch.lt(a, thr, out=rf)  # 1.0 where a is in the subnormal range
    a.add_(rf, alpha=thr)  # (also quiets signalling NaNs)
    a.view(torch.int32).clamp_(max=0x7FC00000)  # canonical NaN: adding random bits cannot carry out of it
    rf.sub_(0.5)
    torch.copysign(a, rf, out=a)  # sign bit: + shifted, - not shifted (integer SR works on either sign)
    if m == 0:
        nan = torch.isnan(a)
    r64.random_(generator=generator)
    r = r64.view(torch.int32)[: a.numel()].view(a.shape)
    nb = drop if rand_bits is None else min(rand_bits, drop)
    if nb == drop:
        r &= (1 << drop) - 1
    else:  # only the top `nb` of the dropped bits are random: the fraction is truncated to nb bits
        r &= ((1 << nb) - 1) << (drop - nb)
    bits = a.view(torch.int32)
    bits += r
    bits &= ~((1 << drop) - 1)
    # undo: shifted (a >= 0) -> a - thr (exact), not shifted (a < 0) -> -a; i.e. max(-a, a - thr)
    torch.sub(a, thr, out=rf)
    a.neg_()
    torch.maximum(a, rf, out=a)
    if m == 0:  # the carry could turn NaN into another value
        a.masked_fill_(nan, float("nan"))
    return a


def _toward_zero_float(a: torch.Tensor, fmt: Format) -> torch.Tensor:
    drop = 23 - fmt.man_bits
    a.add_(0.0)  # quiets signalling NaNs (e.g. from bf16), so that masking mantissa bits cannot make them inf
    bits = a.view(torch.int32) & ~((1 << drop) - 1)
    return _subnormals_and_nan(a, bits.view(torch.float32), fmt, torch.trunc)


def _subnormals_and_nan(a: torch.Tensor, q: torch.Tensor, fmt: Format, round_int) -> torch.Tensor:
    """Finish a bit-masked rounding ``q`` of non-negative ``a``: below the target's smallest normal the grid is the
    fixed step 2**(emin - M), rounded there by ``round_int`` (torch.trunc or torch.round, half to even); with no
    mantissa bits (M = 0) masking cannot keep a NaN, so NaN is put back."""
    m = fmt.man_bits
    if fmt.emin > -126:
        up = 2.0 ** (m - fmt.emin)
        sub = round_int(a * up).mul_(1.0 / up)
        q = torch.where(a < fmt.min_normal, sub, q)
    if m == 0:
        q = torch.where(torch.isnan(a), a, q)
    return q


def _nearest_float(a: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Round-to-nearest-even of non-negative float32 ``a`` (NaN allowed, a <= 2**(emax+1)), in place."""
    m = fmt.man_bits
    if fmt.emax + 24 - m <= 127 and m <= 22:
        # magic-number rounding: adding C = 2**(max(e, emin) + 23 - M) makes float32 round at the target ulp
        c_bits = a.view(torch.int32) & 0x7F800000
        c_bits.clamp_(min=(fmt.emin + 127) << 23)
        c_bits += (23 - m) << 23
        c = c_bits.view(torch.float32)
        a += c
        a -= c
        return a
    drop = 23 - m
    a.add_(0.0)  # quiets signalling NaNs, so that rounding mantissa bits cannot make them inf
    bits = a.view(torch.int32)
    bits.clamp_(max=0x7FC00000)  # canonical NaN: the rounding increment cannot carry out of it
    t = (bits >> drop) & 1
    t += (1 << (drop - 1)) - 1 if drop > 0 else 0
    t += bits
    t &= ~((1 << drop) - 1)
    return _subnormals_and_nan(a, t.view(torch.float32), fmt, torch.round)


def _round_int(x: torch.Tensor, fmt: Format, rounding: Rounding, rand_bits: int | None,
               generator: torch.Generator | None) -> torch.Tensor:
    """Integers: nearest (half to even), toward zero, or stochastic on the magnitude (the module's one SR rule)."""
    lo, hi = fmt.min, fmt.max
    if rounding == Rounding.NEAREST:
        q = torch.round(x)
    elif rounding == Rounding.TOWARD_ZERO:
        q = torch.trunc(x)
    else:
        # exact: P(away from zero) = floor(f * 2**nb) / 2**nb with nb random bits (24 by default), f = |x| -
        # floor(|x|), exact in float32 once |x| is clamped near the range; NaN passes through clamp and floor
        a = x.abs().clamp_(max=hi + 2)
        q = torch.floor(a)
        frac = a.sub_(q)
        nb = 24 if rand_bits is None else min(rand_bits, 24)
        u = (random_bits(x.shape, x.device, generator) & ((1 << 24) - 1)) >> (24 - nb)
        u = u.to(torch.float32).add_(1.0).mul_(2.0**-nb)  # (k + 1) / 2**nb, k uniform in [0, 2**nb)
        q += u <= frac
        q = torch.copysign(q, x, out=q)
    q = q.clamp_(lo, hi)
    return q.add_(0.0)  # integers have no negative zero




_E8M0_AS_FLOAT = Format("e8m0_as_float", "float", 9, 8, 0, 127, has_inf=False, has_nan=True)


def _round_scale_format(x: torch.Tensor, fmt: Format, rounding: Rounding, saturate: bool,
                        rand_bits: int | None, generator: torch.Generator | None) -> torch.Tensor:
    """e8m0: powers of two 2**-127 .. 2**127 (no zero, no sign); zero, negative values and NaN give NaN.
    Nearest rounds ties up (as ml_dtypes does for float8_e8m0fnu), also between 2**-127 and 2**-126 (float32
    subnormals); positive values below 2**-127 give 2**-127."""
    a = torch.where(x > 0, x, torch.full_like(x, float("nan")))
    a.clamp_(max=fmt.max if saturate else _F32_MAX)
    bits = a.view(torch.int32)
    if rounding == Rounding.NEAREST:
        t = bits + (1 << 22)  # ties round up (away from zero), as ml_dtypes does for e8m0
        t &= ~((1 << 23) - 1)
        q = t.view(torch.float32)
        # float32 subnormals: the bit trick sends [2**-127, 2**-126) to 2**-126; the tie is 1.5 * 2**-127
        sub = torch.where(a >= 1.5 * 2.0**-127, torch.full_like(a, 2.0**-126), torch.full_like(a, 2.0**-127))
        q = torch.where(a < 2.0**-126, sub, q)
    elif rounding == Rounding.TOWARD_ZERO:
        q = (bits & ~((1 << 23) - 1)).view(torch.float32)
    else:
        # below 2**-126, round 2 * a (a normal float32, exactly) and halve the result (exact)
        low = a < 2.0**-126
        q = _stochastic_float(torch.where(low, a * 2.0, a).clamp_(min=2.0**-126), _E8M0_AS_FLOAT, rand_bits,
                              generator)
        q = torch.where(low, q * 0.5, q)
    q = q.clamp(min=2.0**-127)
    q = q.masked_fill_(q > fmt.max, float("nan"))
    return torch.where(torch.isnan(a), a, q)


def round_to_format(x: torch.Tensor, fmt: Format, rounding: Rounding = Rounding.NEAREST, *,
                    saturate: bool = True, flush_subnormals: bool = False, rand_bits: int | None = None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Round float32 ``x`` onto ``fmt``'s grid (no scaling; see the module docstring). Returns a new float32
    tensor."""
    fmt, rounding = get_format(fmt), Rounding.parse(rounding)
    x = x.detach()
    if fmt.kind == "int":
        return _round_int(x, fmt, rounding, rand_bits, generator)
    if fmt.kind == "scale":
        return _round_scale_format(x, fmt, rounding, saturate, rand_bits, generator)
    dt = torch_dtype(fmt)
    if dt == torch.float32:
        return x.clone()
    if rounding == Rounding.NEAREST and dt in _FLOAT8:
        q = widen_native(round_native(x, fmt, saturate))
    elif rounding == Rounding.NEAREST and dt in (torch.bfloat16, torch.float16):
        q = x.to(dt).to(torch.float32)  # overflow gives ±inf
        if saturate:
            q.clamp_(-fmt.max, fmt.max)
    else:
        a = x.abs()
        a.clamp_(max=rounding_limit(fmt, rounding, saturate))
        if rounding == Rounding.NEAREST:
            q = _nearest_float(a, fmt)
        elif rounding == Rounding.TOWARD_ZERO:
            q = _toward_zero_float(a, fmt)
        else:
            q = _stochastic_float(a, fmt, rand_bits, generator)
        if not saturate:
            over = q > fmt.max
            if inf_needs_mask(fmt, rounding):
                over |= torch.isinf(x)
            q = q.masked_fill_(over, overflow_value(fmt))
        q = torch.copysign(q, x, out=q)
    if flush_subnormals:
        q = torch.where(q.abs() < fmt.min_normal, q * 0.0, q)
    return q



_FLOAT8 = tuple(getattr(torch, a) for a in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, a))


@functools.lru_cache(maxsize=None)
def saturation_limit(fmt: Format, dtype: torch.dtype) -> float | None:
    """The largest value on ``fmt``'s grid that a ``dtype`` tensor holds too, when ``fmt.max`` exceeds the dtype's
    max (bf16 values in a float16 tensor: 65280, not 65504); else None (no clamp needed; fp32, the identity,
    never needs one)."""
    if dtype == torch.float32 or fmt.max <= torch.finfo(dtype).max or torch_dtype(fmt) == torch.float32:
        return None
    dt_fmt = get_format({torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype])
    t = torch.tensor([min(fmt.max, torch.finfo(dtype).max)])
    for _ in range(2):  # truncate onto both grids (binary floats: the coarser grid's value lies on the finer one)
        t = round_to_format(t, fmt, Rounding.TOWARD_ZERO)
        t = round_to_format(t, dt_fmt, Rounding.TOWARD_ZERO)
    return float(t)


def rounding_limit(fmt: Format, rounding: Rounding, saturate: bool) -> float:
    """Magnitudes are clamped to this before rounding: ±max when saturating and for toward_zero (IEEE: a finite
    value truncates to ±max, never overflows), else 2**(emax+1), where every rounding overflows."""
    if saturate or rounding == Rounding.TOWARD_ZERO:
        return fmt.max
    return min(2.0 ** (fmt.emax + 1), _F32_MAX)


def inf_needs_mask(fmt: Format, rounding: Rounding) -> bool:
    """Without saturation, ±inf must be put back explicitly where the clamp to :func:`rounding_limit` does not
    overflow."""
    return rounding == Rounding.TOWARD_ZERO or fmt.emax + 1 > 127


def e4m3_to_float32(f8: torch.Tensor) -> torch.Tensor:
    """``f8.to(torch.float32)`` for a ``torch.float8_e4m3fn`` tensor, bit for bit (tested on all 256 codes).

    On CPU torch's widening conversion is a scalar loop (about 3x slower than the rounding cast itself), so the
    code's 7 magnitude bits are moved to float32's exponent/mantissa fields and rescaled by 2**120 (the bias
    difference; subnormal codes land on float32 subnormals and scale exactly). Elsewhere: torch's conversion."""
    if f8.device.type != "cpu" or f8.numel() == 0:
        return f8.to(torch.float32)
    out = torch.empty(f8.shape, dtype=torch.float32)
    bits = out.view(torch.int32)
    bits.copy_(f8.view(torch.int8))  # sign-extended code
    bits <<= 20
    bits &= -0x78100000  # 0x87F00000: the sign bit and the code's EEEE.MMM at float32 bits 26..20
    out *= 2.0**120
    lo, hi = torch.aminmax(out)
    if bool(hi >= 480.0) or bool(lo <= -480.0):  # NaN codes (S.1111.111) came out as ±480
        out.masked_fill_(out == 480.0, float("nan"))
        out.masked_fill_(out == -480.0, -float("nan"))  # keep the NaN's sign bit, as torch does
    return out


def round_native(x: torch.Tensor, fmt: Format, saturate: bool) -> torch.Tensor:
    """Round-to-nearest of float32 ``x`` onto registered e4m3/e5m2 as a torch float8 tensor (its ``view(uint8)``
    are the codes): the one native cast, used by :func:`round_to_format` and by ``lowprec.codecs``."""
    dt = torch_dtype(fmt)
    if dt not in _FLOAT8:
        raise ValueError(f"round_native needs e4m3 or e5m2, got {fmt.name}")
    if dt == torch.float8_e4m3fn:
        # torch's CPU cast saturates (inf -> 448); make it explicit elsewhere (CUDA casts do not saturate)
        f8 = (x if x.device.type == "cpu" else x.clamp(-fmt.max, fmt.max)).to(dt)
        if not saturate:
            # overflow iff |x| > 464 (the tie 464 rounds to 448, mantissa even); inf included: the NaN code
            f8.view(torch.uint8).masked_fill_(x.abs() > 464.0, 0x7F)
        return f8
    return (x.clamp(-fmt.max, fmt.max) if saturate else x).to(dt)  # the e5m2 cast itself overflows to ±inf


def widen_native(f8: torch.Tensor) -> torch.Tensor:
    """``f8.to(torch.float32)`` for a float8 tensor (e4m3 by :func:`e4m3_to_float32`)."""
    return e4m3_to_float32(f8) if f8.dtype == torch.float8_e4m3fn else f8.to(torch.float32)


def functional_round_ok(fmt: Format, rounding: Rounding) -> bool:
    """Whether :func:`functional_round` handles ``fmt`` with ``rounding`` (float formats, <= 22 mantissa bits;
    for nearest, ``emax <= 103 + man_bits``)."""
    return fmt.kind == "float" and fmt.man_bits <= 22 and not (
        rounding == Rounding.NEAREST and fmt.emax + 24 - fmt.man_bits > 127)


def functional_round(x: torch.Tensor, fmt: Format, rounding: Rounding = Rounding.NEAREST, *, saturate: bool = True,
                     flush_subnormals: bool = False, rand_bits: int | None = None,
                     random: torch.Tensor | None = None) -> torch.Tensor:
    """The twin of :func:`round_to_format` for float formats, written without in-place ops for ``torch.compile``.

    Same results as :func:`round_to_format` (tested to the bit on every code and midpoint). Stochastic rounding uses ``random``, int32
    random bits shaped like ``x`` (drawn as the eager path draws them: same generator state, same result), or,
    when None, ``torch.randint`` from torch's global RNG. Float formats with at most 22 mantissa bits only."""
    fmt = get_format(fmt)
    rounding = Rounding.parse(rounding)
    if not functional_round_ok(fmt, rounding):
        raise ValueError(f"functional_round supports float formats with <= 22 mantissa bits (and, for nearest, "
                         f"emax <= 103 + man_bits), got {fmt.name} with {rounding.value}")
    m, drop = fmt.man_bits, 23 - fmt.man_bits
    a = x.abs().clamp(max=rounding_limit(fmt, rounding, saturate))
    if rounding == Rounding.NEAREST:
        c = ((a.view(torch.int32) & 0x7F800000).clamp(min=(fmt.emin + 127) << 23) + ((23 - m) << 23))
        c = c.view(torch.float32)
        q = (a + c) - c
    elif rounding == Rounding.TOWARD_ZERO:
        q = (a.view(torch.int32) & ~((1 << drop) - 1)).view(torch.float32)
        if fmt.emin > -126:  # at emin = -126 the bit mask is right for float32 subnormals too
            up = 2.0 ** (m - fmt.emin)
            q = torch.where(a < fmt.min_normal, torch.trunc(a * up) * (1.0 / up), q)
    else:
        shift = (a < fmt.min_normal).to(torch.float32) * fmt.min_normal
        a2 = a + shift
        nb = drop if rand_bits is None else min(rand_bits, drop)
        if random is None:
            random = torch.randint(0, 2**31 - 1, a.shape, dtype=torch.int32, device=a.device)
        r = random & (((1 << nb) - 1) << (drop - nb))
        q = ((a2.view(torch.int32) + r) & ~((1 << drop) - 1)).view(torch.float32) - shift
        if m == 0:
            q = torch.where(torch.isnan(a), a, q)
    if not saturate:
        over = q > fmt.max
        if inf_needs_mask(fmt, rounding):
            over = over | torch.isinf(x)
        q = torch.where(over, torch.full_like(q, overflow_value(fmt)), q)
    q = torch.copysign(q, x)
    if flush_subnormals:
        q = torch.where(q.abs() < fmt.min_normal, q * 0.0, q)
    return torch.where(torch.isnan(x), x, q)  # explicit: compiled clamp/min need not propagate NaN


def compiled_quantizer(fmt: "str | Format | QuantSpec", **overrides: Any) -> Callable[..., torch.Tensor]:
    """A ``torch.compile``'d quantizer ``f(x, generator=None) -> Tensor`` for one unscaled float spec: the bit
    arithmetic is fused into one loop; random bits are drawn outside it exactly as :func:`quantize` draws them,
    so results equal ``quantize(x, spec, generator=...)`` bit for bit. Compiles on first call (seconds); each
    spec is one more graph of the same function, so beyond torch's recompile limit (default 8 specs per process)
    further quantizers run eagerly, with the same results."""
    s = spec(fmt, **overrides)
    if s.scaling is not None:
        raise ValueError("compiled_quantizer supports unscaled specs; use quantize() for scaled ones")
    f, r, sat, fl, rb = s.format, s.rounding, s.saturate, s.flush_subnormals, s.rand_bits
    functional_round(torch.zeros(1), f, r, saturate=sat, flush_subnormals=fl, rand_bits=rb)  # validate now

    def core(x: torch.Tensor, random: torch.Tensor | None, lim: float | None) -> torch.Tensor:
        q = functional_round(x.float(), f, r, saturate=sat, flush_subnormals=fl, rand_bits=rb, random=random)
        return (q if lim is None else q.clamp(-lim, lim)).to(x.dtype)

    compiled = torch.compile(core, dynamic=False)

    def quantizer(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        check_tensor(x)
        x = x.detach()
        rnd = random_bits(x.shape, x.device, generator) if r == Rounding.STOCHASTIC else None
        return compiled(x, rnd, saturation_limit(f, x.dtype) if sat else None)  # (the limit: outside the graph)

    return quantizer


