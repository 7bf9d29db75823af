"""Put a tensor onto a low-precision grid: scale -> round -> unscale, in one place.

Semantics (all formats are emulated in float32; the result has the input's dtype and device):

* ``nearest`` rounds to nearest, ties to even; ``toward_zero`` truncates; ``stochastic`` rounds up with
  probability equal to the distance to the lower neighbour divided by the gap (``rand_bits`` limits the number
  of random bits, as hardware does: the fraction is then truncated to that many bits).
* ``saturate=True`` clamps to ``±max`` (±inf too). ``saturate=False`` gives the format's own overflow: inf where
  it has inf, else NaN where it has NaN, else (FP6/FP4, integers) the value saturates anyway.
* NaN in gives NaN out, for every format (integers and FP6/FP4 included: the output is a float tensor, and a
  NaN never silently becomes a number; ml_dtypes turns NaN into 0 for FP4/FP6, we do not).
* Subnormals of the target format are honoured; ``flush_subnormals=True`` sets results whose magnitude is below
  the smallest normal to a zero of the same sign.
* ``e4m3``/``e5m2`` with ``nearest`` round with torch's native float8 casts (the hardware path; on CPU the
  e4m3 codes are widened back by exact bit arithmetic, faster than torch's CPU conversion); ``bf16``/``fp16``
  with ``nearest`` use torch's casts. Everything else uses float32 bit arithmetic that agrees with them.
* The output has the input's dtype: when a value on the format's grid (times a non-power-of-two scale) is not
  representable in that dtype (e.g. fp16 values or fp32-scaled values in a bf16 tensor), the final cast rounds it.
* Quantization is not differentiable: results carry no autograd history (``lowprec.nn`` provides
  straight-through layers).
* Stochastic rounding draws its random bits from ``generator`` (or torch's default generator): identically seeded
  generators give identical results on the same device.
"""

from __future__ import annotations

import enum
import functools
import re
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from .formats import FORMATS, Format, get_format
from . import scaling as _sc

__all__ = ["Rounding", "Scaling", "QuantSpec", "spec", "quantize", "quantize_with_scale", "round_to_format",
           "SCALED_FORMATS", "functional_round", "compiled_quantizer"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Rounding(str, enum.Enum):
    """Rounding mode; plain strings (``"nearest"``, ``"stochastic"``, ``"toward_zero"``) are accepted too."""

    NEAREST = "nearest"
    STOCHASTIC = "stochastic"
    TOWARD_ZERO = "toward_zero"

    @classmethod
    def parse(cls, value: "str | Rounding") -> "Rounding":
        if isinstance(value, Rounding):
            return value
        if isinstance(value, str):
            v = value.strip().lower().replace("-", "_")
            v = {"rne": "nearest", "sr": "stochastic", "tz": "toward_zero", "trunc": "toward_zero"}.get(v, v)
            for r in cls:
                if r.value == v:
                    return r
        raise ValueError(f"unknown rounding {value!r}; valid: {', '.join(r.value for r in cls)}")

    def __str__(self) -> str:
        return self.value


_SCALING_MODES = ("tensor", "channel", "block", "delayed")
_DELAYED_ALGOS = ("max", "most_recent")
_SCALE_FORMATS = ("fp32", "e8m0", "e4m3")


@dataclass(frozen=True)
class Scaling:
    """How scales are chosen before rounding (``q = round(x / scale) * scale``).

    mode: ``"tensor"`` (one scale), ``"channel"`` (one scale per index along ``axis``, amax over the other
    axes), ``"block"`` (blocks of ``block_size`` contiguous elements along ``axis``; a ragged last block is
    padded with zeros). scale_format: ``"fp32"`` (scale = amax / fmt.max), ``"e8m0"`` (power of two, OCP MX:
    2**(floor(log2(amax)) - emax_elem), clamped to 2**±127; elements saturate) or ``"e4m3"`` (NVFP4: E4M3 scale
    of (amax / fmt.max) / s_global times an fp32 tensor scale s_global = tensor_amax / (448 * fmt.max)).
    Amax is taken over finite values. Fields that do not apply to the mode are normalized to their defaults.

    ``"delayed"``: Transformer Engine's DelayedScaling, one fp32 scale per tensor taken from an amax history of
    the *previous* steps: ``scale = amax_h * 2**margin / fmt.max`` with ``amax_h`` the max of the last
    ``history_len`` amaxes (``algo="max"``) or the latest one (``algo="most_recent"``); values above the stale
    range overflow (saturate, or inf/NaN when the spec does not saturate). The history is state held by the
    caller: ``lowprec.nn`` layers keep one :class:`lowprec.DelayedScaler` per site; a plain :func:`quantize`
    call has no history and uses the current amax (a history of one), still divided by ``2**margin``.
    ``scale_format`` must be fp32. ``history_len``/``margin``/``algo`` apply to delayed scaling only.
    """

    mode: str
    axis: int = -1
    block_size: int = 32
    scale_format: str = "fp32"
    history_len: int = 1024
    margin: int = 0
    algo: str = "max"

    def __post_init__(self) -> None:
        if self.mode not in _SCALING_MODES:
            raise ValueError(f"unknown scaling mode {self.mode!r}; valid: {', '.join(_SCALING_MODES)}")
        if self.scale_format not in _SCALE_FORMATS:
            raise ValueError(f"unknown scale_format {self.scale_format!r}; valid: {', '.join(_SCALE_FORMATS)}")
        if not isinstance(self.axis, int) or isinstance(self.axis, bool):
            raise TypeError(f"Scaling.axis must be an int, got {self.axis!r}")
        bs = self.block_size
        if not isinstance(bs, int) or isinstance(bs, bool) or bs < 1:
            raise ValueError(f"invalid block size {bs!r}: must be a positive int (e.g. 16, 32, 128)")
        hl, m = self.history_len, self.margin
        if not isinstance(hl, int) or isinstance(hl, bool) or hl < 1:
            raise ValueError(f"invalid delayed-scaling history length {hl!r}: must be a positive int "
                             "(e.g. 'delayed16', 'delayed1024')")
        if not isinstance(m, int) or isinstance(m, bool) or m < 0:
            raise ValueError(f"invalid delayed-scaling margin {m!r}: must be a non-negative int (scale / 2**margin)")
        if self.algo not in _DELAYED_ALGOS:
            raise ValueError(f"unknown delayed-scaling algo {self.algo!r}; valid: {', '.join(_DELAYED_ALGOS)}")
        if self.mode == "delayed":
            if self.scale_format != "fp32":
                raise ValueError(f"delayed scaling uses fp32 scales, got scale_format={self.scale_format!r}")
        elif (hl, m, self.algo) != (1024, 0, "max"):
            raise ValueError(f"history length, margin= and algo= apply to delayed scaling only, not to "
                             f"{self.mode!r} scaling (e.g. 'e4m3:delayed16:margin=1')")
        if self.mode in ("tensor", "delayed"):
            object.__setattr__(self, "axis", -1)
        if self.mode != "block":
            object.__setattr__(self, "block_size", 32)

    def __str__(self) -> str:
        if self.mode == "block":
            s = "block%d" % self.block_size
        elif self.mode == "delayed":
            s = "delayed%d" % self.history_len
            if self.margin:
                s += f":margin={self.margin}"
            if self.algo != "max":
                s += f":algo={self.algo}"
        else:
            s = self.mode
        if self.mode not in ("tensor", "delayed") and self.axis != -1:
            s += f":axis={self.axis}"
        if self.scale_format != "fp32":
            s += f":scale={self.scale_format}"
        return s


# Named scaled formats: element format + block scaling, usable wherever a format name is.
SCALED_FORMATS: dict[str, tuple[str, Scaling]] = {
    "mxfp8": ("e4m3", Scaling("block", -1, 32, "e8m0")),
    "mxfp8_e5m2": ("e5m2", Scaling("block", -1, 32, "e8m0")),
    "mxfp6": ("e2m3", Scaling("block", -1, 32, "e8m0")),
    "mxfp6_e2m3": ("e2m3", Scaling("block", -1, 32, "e8m0")),
    "mxfp6_e3m2": ("e3m2", Scaling("block", -1, 32, "e8m0")),
    "mxfp4": ("e2m1", Scaling("block", -1, 32, "e8m0")),
    "nvfp4": ("e2m1", Scaling("block", -1, 16, "e4m3")),
}
_CANONICAL_SCALED = ("mxfp8", "mxfp8_e5m2", "mxfp6", "mxfp6_e3m2", "mxfp4", "nvfp4")


@dataclass(frozen=True)
class QuantSpec:
    """Everything that defines one quantization: format + rounding + scaling + overflow/underflow options.

    ``format`` and ``rounding`` accept names; they are normalized to :class:`Format` / :class:`Rounding`.
    Text form: see :meth:`parse` (``"e4m3:tensor"``, ``"e5m2:stochastic:block32"``, ``"mxfp8"``; delayed
    scaling: ``"e4m3:delayed16"``, ``"e4m3:delayed1024:margin=1"``, ``"e4m3:delayed1:algo=most_recent"``);
    ``str(spec)`` is canonical and ``QuantSpec.parse(str(s)) == s``.
    """

    format: Format
    rounding: Rounding = Rounding.NEAREST
    scaling: Scaling | None = None
    saturate: bool = True
    flush_subnormals: bool = False
    rand_bits: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "format", get_format(self.format))
        object.__setattr__(self, "rounding", Rounding.parse(self.rounding))
        if self.scaling is not None and not isinstance(self.scaling, Scaling):
            object.__setattr__(self, "scaling", _parse_scaling(self.scaling))
        if self.rand_bits is not None:
            if not isinstance(self.rand_bits, int) or isinstance(self.rand_bits, bool) or not 1 <= self.rand_bits <= 32:
                raise ValueError(f"rand_bits must be None or an int in [1, 32], got {self.rand_bits!r}")
        if self.format.kind == "scale" and self.scaling is not None:
            raise ValueError("the e8m0 scale format cannot itself be scaled")

    @classmethod
    def parse(cls, text: str) -> "QuantSpec":
        """Parse ``"fmt[:token...]"``. Tokens: ``nearest|stochastic|toward_zero``, ``sat|nosat``, ``flush``,
        ``tensor|channel|block<N>|delayed[<N>]``, ``axis=<int>``, ``scale=<fp32|e8m0|e4m3>``, ``randbits=<int>``,
        and for delayed scaling ``margin=<int>``, ``algo=<max|most_recent>``.
        ``fmt`` may be a scaled format name (``mxfp8``, ``mxfp6``, ``mxfp4``, ``nvfp4``).

        Delayed scaling (Transformer Engine): ``delayed<N>`` keeps an amax history of ``N`` steps (``delayed``
        alone: 1024, TE's default), e.g. ``e4m3:delayed16``, ``e4m3:delayed1024:margin=1``,
        ``e5m2:delayed1:algo=most_recent:nosat``; ``str(spec)`` always writes the length. See :class:`Scaling`
        for the rule and for what a plain ``quantize`` call does without a history."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"a spec must be a non-empty string like 'e4m3:stochastic', got {text!r}")
        parts = [p.strip() for p in text.strip().split(":")]
        name = parts[0].lower()
        kw: dict[str, Any] = {}
        mode = axis = bs = sfmt = None
        delayed_kw: dict[str, Any] = {}
        if name in SCALED_FORMATS:
            fmt_name, sc = SCALED_FORMATS[name]
            fmt = get_format(fmt_name)
            mode, axis, bs, sfmt = sc.mode, sc.axis, sc.block_size, sc.scale_format
        else:
            fmt = get_format(name)
        for tok in parts[1:]:
            t = tok.lower()
            if t in ("nearest", "stochastic", "toward_zero", "rne", "sr", "tz"):
                kw["rounding"] = Rounding.parse(t)
            elif t in ("sat", "saturate"):
                kw["saturate"] = True
            elif t in ("nosat", "nosaturate"):
                kw["saturate"] = False
            elif t in ("flush", "ftz"):
                kw["flush_subnormals"] = True
            elif t in ("tensor", "channel"):
                mode = t
            elif re.fullmatch(r"block\d+", t):
                mode, bs = "block", int(t[5:])
            elif re.fullmatch(r"delayed\d*", t):
                mode = "delayed"
                if len(t) > 7:
                    delayed_kw["history_len"] = int(t[7:])
            elif t.startswith("margin="):
                delayed_kw["margin"] = _int_token(t, "margin")
            elif t.startswith("algo="):
                delayed_kw["algo"] = t.split("=", 1)[1]
            elif t.startswith("axis="):
                axis = _int_token(t, "axis")
            elif t.startswith("scale="):
                sfmt = t.split("=", 1)[1]
            elif t.startswith("randbits=") or t.startswith("rand_bits="):
                kw["rand_bits"] = _int_token(t, "randbits")
            else:
                raise ValueError(f"unknown token {tok!r} in spec {text!r}; valid tokens: nearest, stochastic, "
                                 "toward_zero, sat, nosat, flush, tensor, channel, block<N>, delayed<N>, "
                                 "axis=<int>, scale=<fp32|e8m0|e4m3>, margin=<int>, algo=<max|most_recent>, "
                                 "randbits=<int>")
        if mode is None and (axis is not None or bs is not None or sfmt is not None or delayed_kw):
            raise ValueError(f"spec {text!r}: axis=/scale=/margin=/algo= need a scaling token (tensor, channel, "
                             "block<N>, delayed<N>)")
        if mode is not None:
            if delayed_kw and mode != "delayed":
                raise ValueError(f"spec {text!r}: margin=/algo= apply to delayed scaling only "
                                 "(e.g. 'e4m3:delayed16:margin=1')")
            kw["scaling"] = Scaling(mode, -1 if axis is None else axis, 32 if bs is None else bs,
                                    "fp32" if sfmt is None else sfmt, **delayed_kw)
        return cls(fmt, **kw)

    def __str__(self) -> str:
        head, parts = self.format.name, []
        if self.scaling is not None:
            named = next((n for n in _CANONICAL_SCALED if SCALED_FORMATS[n] == (self.format.name, self.scaling)), None)
            if named:
                head = named
            else:
                parts.append(str(self.scaling))
        if self.rounding != Rounding.NEAREST:
            parts.insert(0, self.rounding.value)
        if not self.saturate:
            parts.append("nosat")
        if self.flush_subnormals:
            parts.append("flush")
        if self.rand_bits is not None:
            parts.append(f"randbits={self.rand_bits}")
        return ":".join([head] + parts)


def _int_token(t: str, what: str) -> int:
    try:
        return int(t.split("=", 1)[1])
    except ValueError:
        raise ValueError(f"{what}= needs an integer, got {t!r}") from None


def _parse_scaling(s: Any) -> Scaling:
    if isinstance(s, Scaling):
        return s
    if isinstance(s, str):
        sp = QuantSpec.parse("fp32:" + s)
        if sp.scaling is None:
            raise ValueError(f"not a scaling: {s!r}; e.g. 'tensor', 'channel:axis=0', 'block32:scale=e8m0'")
        return sp.scaling
    raise TypeError(f"scaling must be a Scaling, a string like 'block32' or None, got {type(s).__name__}")


@functools.lru_cache(maxsize=256)
def _parse_cached(text: str) -> QuantSpec:
    return QuantSpec.parse(text)


def spec(x: "str | Format | QuantSpec", **overrides: Any) -> QuantSpec:
    """Resolve a name (``"e4m3:stochastic"``, ``"mxfp8"``), a :class:`Format` or a :class:`QuantSpec`.
    Keyword overrides that are not None replace the spec's fields (``scaling="none"`` removes scaling)."""
    if isinstance(x, QuantSpec):
        s = x
    elif isinstance(x, str):
        s = _parse_cached(x)
    else:
        s = QuantSpec(get_format(x))
    kw = {k: v for k, v in overrides.items() if v is not None}
    if "scaling" in kw:
        kw["scaling"] = None if (isinstance(kw["scaling"], str) and kw["scaling"].lower() == "none") \
            else _parse_scaling(kw["scaling"])
    if "rounding" in kw:
        kw["rounding"] = Rounding.parse(kw["rounding"])
    return replace(s, **kw) if kw else s


# --------------------------------------------------------------------------------------------------------
# rounding onto an unscaled grid (float32 in, float32 out)
# --------------------------------------------------------------------------------------------------------

_NATIVE_F8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
_NATIVE_16 = {"bf16": torch.bfloat16, "fp16": torch.float16}
_F32_MAX = float(torch.finfo(torch.float32).max)


def _overflow_value(fmt: Format) -> float:
    if fmt.has_inf:
        return float("inf")
    if fmt.has_nan:
        return float("nan")
    return fmt.max


def _random_bits(n_shape: torch.Size, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """int32 tensor of shape ``n_shape`` with 31 uniformly random low bits (cheap: 64-bit random_ viewed as int32)."""
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
    lo, hi = fmt.min, fmt.max
    if rounding == Rounding.NEAREST:
        q = torch.round(x)
    elif rounding == Rounding.TOWARD_ZERO:
        q = torch.trunc(x)
    else:
        # exact: P(up) = floor(frac * 2**nb) / 2**nb with nb random bits (24 by default); frac = x - floor(x) is
        # exact in float32 once x is clamped near the range; NaN passes through clamp and floor
        xc = torch.clamp(x, lo - 1, hi + 1)
        q = torch.floor(xc)
        frac = xc - q
        nb = 24 if rand_bits is None else min(rand_bits, 24)
        u = (_random_bits(x.shape, x.device, generator) & ((1 << 24) - 1)) >> (24 - nb)
        u = u.to(torch.float32).add_(1.0).mul_(2.0**-nb)  # (k + 1) / 2**nb, k uniform in [0, 2**nb)
        q += u <= frac
    q = q.clamp_(lo, hi)
    return q.add_(0.0)  # integers have no negative zero


_E8M0_AS_FLOAT = Format("e8m0_as_float", "float", 9, 8, 0, 127, has_inf=False, has_nan=True)


def _round_scale_format(x: torch.Tensor, fmt: Format, rounding: Rounding, saturate: bool,
                        rand_bits: int | None, generator: torch.Generator | None) -> torch.Tensor:
    """e8m0: powers of two 2**-127 .. 2**127 (no zero, no sign); zero, negative values and NaN give NaN.
    Nearest rounds ties up (as ml_dtypes does for float8_e8m0fnu); values below 2**-127 give
    2**-127; stochastic rounding treats values below 2**-126 as 2**-126."""
    a = torch.where(x > 0, x, torch.full_like(x, float("nan")))
    a.clamp_(max=fmt.max if saturate else _F32_MAX)
    bits = a.view(torch.int32)
    if rounding == Rounding.NEAREST:
        t = bits + (1 << 22)  # ties round up (away from zero), as ml_dtypes does for e8m0
        t &= ~((1 << 23) - 1)
        q = t.view(torch.float32)
    elif rounding == Rounding.TOWARD_ZERO:
        q = (bits & ~((1 << 23) - 1)).view(torch.float32)
    else:
        q = _stochastic_float(a.clamp_(min=2.0**-126), _E8M0_AS_FLOAT, rand_bits, generator)
    q = q.clamp(min=2.0**-127)
    q = q.masked_fill_(q > fmt.max, float("nan"))
    return torch.where(torch.isnan(a), a, q)


def round_to_format(x: torch.Tensor, fmt: Format, rounding: Rounding = Rounding.NEAREST, *,
                    saturate: bool = True, flush_subnormals: bool = False, rand_bits: int | None = None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Round float32 ``x`` onto ``fmt``'s grid (no scaling). Returns a new float32 tensor."""
    fmt, rounding = get_format(fmt), Rounding.parse(rounding)
    x = x.detach()
    if fmt.kind == "int":
        return _round_int(x, fmt, rounding, rand_bits, generator)
    if fmt.kind == "scale":
        return _round_scale_format(x, fmt, rounding, saturate, rand_bits, generator)
    if fmt.name == "fp32":
        return x.clone()
    if rounding == Rounding.NEAREST and fmt.name in _NATIVE_F8 and fmt == FORMATS[fmt.name]:
        q = _native_f8(x, fmt, saturate)
    elif rounding == Rounding.NEAREST and fmt.name in _NATIVE_16 and fmt == FORMATS[fmt.name]:
        q = x.to(_NATIVE_16[fmt.name]).to(torch.float32)  # overflow gives ±inf
        if saturate:
            q.clamp_(-fmt.max, fmt.max)
    else:
        a = x.abs()
        limit = fmt.max if saturate else min(2.0 ** (fmt.emax + 1), _F32_MAX)
        a.clamp_(max=limit)
        if rounding == Rounding.NEAREST:
            q = _nearest_float(a, fmt)
        elif rounding == Rounding.TOWARD_ZERO:
            q = _toward_zero_float(a, fmt)
        else:
            q = _stochastic_float(a, fmt, rand_bits, generator)
        if not saturate:
            q = q.masked_fill_(q > fmt.max, _overflow_value(fmt))
        q = torch.copysign(q, x, out=q)
    if flush_subnormals:
        q = torch.where(q.abs() < fmt.min_normal, q * 0.0, q)
    return q


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


def _native_f8(x: torch.Tensor, fmt: Format, saturate: bool) -> torch.Tensor:
    dt = _NATIVE_F8[fmt.name]
    if fmt.name == "e4m3":
        # torch's CPU cast saturates (inf -> 448); make it explicit elsewhere (CUDA casts do not saturate)
        xx = x if x.device.type == "cpu" else x.clamp(-fmt.max, fmt.max)
        q = e4m3_to_float32(xx.to(dt))
        if not saturate:
            # overflow iff |x| > 464 (the tie 464 rounds to 448, mantissa even); inf included
            q = q.masked_fill_(x.abs() > 464.0, float("nan"))
        return q
    q = x.to(dt).to(torch.float32)  # the e5m2 cast does not saturate: overflow gives ±inf
    return q.clamp_(-fmt.max, fmt.max) if saturate else q


def functional_round(x: torch.Tensor, fmt: Format, rounding: Rounding = Rounding.NEAREST, *, saturate: bool = True,
                     flush_subnormals: bool = False, rand_bits: int | None = None,
                     random: torch.Tensor | None = None) -> torch.Tensor:
    """The float-format rounding of :func:`round_to_format` written without in-place ops, for ``torch.compile``.

    Same results as :func:`round_to_format` (tested to the bit). Stochastic rounding uses ``random``, int32
    random bits shaped like ``x`` (drawn as the eager path draws them: same generator state, same result), or,
    when None, ``torch.randint`` from torch's global RNG. Float formats with at most 22 mantissa bits only."""
    fmt = get_format(fmt)
    rounding = Rounding.parse(rounding)
    if fmt.kind != "float" or fmt.man_bits > 22 or (
            rounding == Rounding.NEAREST and fmt.emax + 24 - fmt.man_bits > 127):
        raise ValueError(f"functional_round supports float formats with <= 22 mantissa bits (and, for nearest, "
                         f"emax <= 103 + man_bits), got {fmt.name} with {rounding.value}")
    m, drop = fmt.man_bits, 23 - fmt.man_bits
    limit = fmt.max if saturate else min(2.0 ** (fmt.emax + 1), _F32_MAX)
    a = x.abs().clamp(max=limit)
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
        q = torch.where(q > fmt.max, torch.full_like(q, _overflow_value(fmt)), q)
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

    def core(x: torch.Tensor, random: torch.Tensor | None) -> torch.Tensor:
        return functional_round(x.float(), f, r, saturate=sat, flush_subnormals=fl, rand_bits=rb,
                                random=random).to(x.dtype)

    compiled = torch.compile(core, dynamic=False)

    def quantizer(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_tensor(x)
        x = x.detach()
        rnd = _random_bits(x.shape, x.device, generator) if r == Rounding.STOCHASTIC else None
        return compiled(x, rnd)

    return quantizer


# --------------------------------------------------------------------------------------------------------
# the one path: scale -> round -> unscale
# --------------------------------------------------------------------------------------------------------

def _check_tensor(x: Any) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be a float32, bfloat16 or float16 tensor, got {x.dtype}")


def _quantize(x: torch.Tensor, s: QuantSpec, generator: torch.Generator | None,
              want_scale: bool, given: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    _check_tensor(x)
    x = x.detach()
    x32 = x.float() if x.dtype != torch.float32 else x
    fmt = s.format
    if s.scaling is None:
        q = round_to_format(x32, fmt, s.rounding, saturate=s.saturate, flush_subnormals=s.flush_subnormals,
                            rand_bits=s.rand_bits, generator=generator)
        return q.to(x.dtype), None
    view, undo = _sc.to_scaling_view(x32, s.scaling)
    if given is not None:
        scale = given.to(device=x.device, dtype=torch.float32).reshape([1] * x.dim())
    else:
        scale = _sc.compute_scale(view, s.scaling, fmt).scale      # broadcastable to view
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)  # an E4M3 block scale of 0 zeroes its block
    q = round_to_format(view / safe, fmt, s.rounding, saturate=s.saturate,
                        flush_subnormals=s.flush_subnormals, rand_bits=s.rand_bits, generator=generator)
    q = undo(q.mul_(scale)).to(x.dtype)
    if not want_scale:
        return q, None
    return q, (undo(scale.expand_as(view)) if s.scaling.mode == "block" else scale)


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
    return _quantize(x, s, generator, want_scale=False)[0]


def quantize_with_scale(x: torch.Tensor, spec_: "str | Format | QuantSpec",
                        generator: torch.Generator | None = None, *,
                        scale: torch.Tensor | float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Like :func:`quantize`, also returning the float32 scale broadcastable to ``x`` (None when unscaled):
    ``q = round(x / scale) * scale``. Block scales are returned expanded to ``x``'s shape.

    ``scale``: a given per-tensor scale (one element, positive) used instead of computing one from ``x`` (how a
    caller holding a delayed-scaling history, e.g. :meth:`lowprec.DelayedScaler.scales_for`'s ``scale_inv``,
    applies it); only for tensor or delayed scaling. A scale of 0 acts as 1."""
    s = spec(spec_)
    if scale is not None:
        if s.scaling is None or s.scaling.mode not in ("tensor", "delayed"):
            raise ValueError(f"a given scale needs a spec with tensor or delayed scaling, got {s}")
        scale = torch.as_tensor(scale, dtype=torch.float32)
        if scale.numel() != 1:
            raise ValueError(f"a given scale must have one element (per-tensor), got shape {tuple(scale.shape)}")
    return _quantize(x, s, generator, want_scale=True, given=scale)
