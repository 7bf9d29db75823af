"""Number formats as data.

A :class:`Format` describes a binary number format: a float ``ExMy`` (IEEE-like with inf and NaN, OCP "fn"
without inf, or with neither), a signed integer, or the exponent-only ``e8m0`` scale format. Everything a
quantizer needs (largest finite value, smallest normal / subnormal, ...) is derived from the fields.

All formats are emulated in float32, so a float format must fit inside float32: ``man_bits <= 23`` and an
exponent range inside float32's normal range.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Format", "FORMATS", "ALIASES", "SCALED_FORMAT_NAMES", "TORCH_DTYPES", "FLOAT_DTYPES", "get_format",
           "float_format", "int_format", "format_table", "torch_dtype", "valid_names"]

_KINDS = ("float", "int", "scale")


@dataclass(frozen=True)
class Format:
    """A number format.

    kind: ``"float"`` (sign, exponent, mantissa), ``"int"`` (two's complement integer) or ``"scale"``
    (unsigned, exponent only, no zero: OCP ``e8m0``).
    has_inf: the top exponent code is reserved for inf/NaN (IEEE-like, e.g. ``e5m2``, ``bf16``).
    has_nan: without ``has_inf``, NaN is the single all-ones code (OCP "fn" formats such as ``e4m3``);
    formats with neither (``e3m2``, ``e2m3``, ``e2m1``) use every code for a finite value.
    symmetric: integers only; the range is ``[-(2**(bits-1)-1), 2**(bits-1)-1]`` (no ``-2**(bits-1)``).
    """

    name: str
    kind: str
    bits: int
    exp_bits: int
    man_bits: int
    bias: int
    has_inf: bool
    has_nan: bool
    signed: bool = True
    symmetric: bool = False

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"Format.kind must be one of {_KINDS}, got {self.kind!r}")
        if self.kind == "int":
            if not 2 <= self.bits <= 24:
                raise ValueError(f"integer formats need 2 <= bits <= 24 (exact in float32), got {self.bits}")
            return
        if not 1 <= self.exp_bits <= 8:
            raise ValueError(f"float formats need 1 <= exp_bits <= 8, got {self.exp_bits}")
        if not 0 <= self.man_bits <= 23:
            raise ValueError(f"float formats need 0 <= man_bits <= 23, got {self.man_bits}")
        if self.bits != int(self.signed) + self.exp_bits + self.man_bits:
            raise ValueError(f"bits={self.bits} != sign + exp_bits + man_bits for {self.name}")
        if self.kind == "float" and self.has_inf and self.man_bits == 0:
            raise ValueError(
                f"format {self.name}: a format with inf needs man_bits >= 1 (its NaNs are the top exponent code with "
                "a non-zero mantissa, so with no mantissa bits NaN would encode as inf); use the 'fn' variant "
                f"(e{self.exp_bits}m0fn: NaN, no inf) or 'fnn' (neither)"
            )
        if self.kind == "float" and self.emax < self.emin:
            raise ValueError(
                f"format {self.name}: no normal numbers (largest exponent {self.emax} < smallest {self.emin}): "
                "with inf, or with NaN and no mantissa bits, the top exponent code is reserved, so such formats "
                "need exp_bits >= 2; with 1 exponent bit use the 'fn' (NaN, no inf, man_bits >= 1) or 'fnn' "
                "(neither) variants, e.g. e1m2fn, e1m1fnn"
            )
        if self.kind == "float" and (self.emin < -126 or self.emax > 127):
            raise ValueError(
                f"format {self.name}: exponent range [{self.emin}, {self.emax}] must lie inside float32's "
                "[-126, 127] (formats are emulated in float32); choose another bias or fewer exponent bits"
            )

    # ----- derived properties (finfo-like) -----
    @property
    def is_float(self) -> bool:
        return self.kind != "int"

    @functools.cached_property
    def emin(self) -> int:
        """Exponent of the smallest normal number (floats); 0 for integers."""
        return 1 - self.bias if self.kind == "float" else (-self.bias if self.kind == "scale" else 0)

    @functools.cached_property
    def emax(self) -> int:
        """Exponent of the largest finite number (floats); floor(log2(max)) for integers."""
        if self.kind == "int":
            return int(math.floor(math.log2(self.max)))
        top = 2**self.exp_bits - 1  # top biased exponent code
        if self.has_inf or (self.has_nan and self.man_bits == 0):
            top -= 1  # whole top binade reserved
        return top - self.bias

    @functools.cached_property
    def max(self) -> float:
        """Largest finite value."""
        if self.kind == "int":
            return float(2 ** (self.bits - 1) - 1)
        m = self.man_bits
        if self.has_nan and not self.has_inf and m > 0:
            frac = (2**m - 2) / 2**m  # all-ones mantissa in the top binade is NaN
        else:
            frac = (2**m - 1) / 2**m
        return math.ldexp(1.0 + frac, self.emax)

    @functools.cached_property
    def min(self) -> float:
        """Most negative finite value (``lowest``)."""
        if self.kind == "int":
            return -self.max if self.symmetric else float(-(2 ** (self.bits - 1)))
        return -self.max if self.signed else self.min_subnormal

    @functools.cached_property
    def min_normal(self) -> float:
        """Smallest positive normal value (1 for integers)."""
        return 1.0 if self.kind == "int" else math.ldexp(1.0, self.emin)

    @property
    def has_subnormals(self) -> bool:
        return self.kind == "float" and self.man_bits > 0

    @functools.cached_property
    def min_subnormal(self) -> float:
        """Smallest positive value (the smallest normal when there are no subnormals)."""
        if self.kind == "int":
            return 1.0
        if not self.has_subnormals:
            return self.min_normal
        return math.ldexp(1.0, self.emin - self.man_bits)

    @functools.cached_property
    def eps(self) -> float:
        """Distance from 1 to the next larger value (1 for integers)."""
        return 1.0 if self.kind == "int" else math.ldexp(1.0, -self.man_bits)

    @property
    def has_zero(self) -> bool:
        return self.kind != "scale"

    @property
    def has_negative_zero(self) -> bool:
        return self.kind == "float" and self.signed

    @property
    def num_codes(self) -> int:
        return 2**self.bits

    def describe(self) -> dict[str, Any]:
        """A dict of the fields and derived properties (one row of the format table)."""
        d = dataclasses.asdict(self)
        for k in ("max", "min_normal", "min_subnormal", "eps", "emin", "emax"):
            d[k] = getattr(self, k)
        return d

    def __str__(self) -> str:
        return self.name


def _ieee(name: str, e: int, m: int) -> Format:
    return Format(name, "float", 1 + e + m, e, m, 2 ** (e - 1) - 1, has_inf=True, has_nan=True)


FORMATS: dict[str, Format] = {
    f.name: f
    for f in [
        Format("e4m3", "float", 8, 4, 3, 7, has_inf=False, has_nan=True),  # OCP E4M3FN, max 448
        _ieee("e5m2", 5, 2),  # OCP E5M2, IEEE-like, max 57344
        Format("e3m2", "float", 6, 3, 2, 3, has_inf=False, has_nan=False),  # OCP FP6 E3M2, max 28
        Format("e2m3", "float", 6, 2, 3, 1, has_inf=False, has_nan=False),  # OCP FP6 E2M3, max 7.5
        Format("e2m1", "float", 4, 2, 1, 1, has_inf=False, has_nan=False),  # OCP FP4 E2M1, max 6
        Format("e8m0", "scale", 8, 8, 0, 127, has_inf=False, has_nan=True, signed=False),  # OCP MX scale
        Format("int8", "int", 8, 0, 7, 0, has_inf=False, has_nan=False),
        Format("int4", "int", 4, 0, 3, 0, has_inf=False, has_nan=False),
        _ieee("bf16", 8, 7),
        _ieee("fp16", 5, 10),
        _ieee("fp32", 8, 23),
    ]
}

ALIASES: dict[str, str] = {
    "fp8_e4m3": "e4m3", "float8_e4m3": "e4m3", "float8_e4m3fn": "e4m3", "e4m3fn": "e4m3", "fp8": "e4m3",
    "fp8_e5m2": "e5m2", "float8_e5m2": "e5m2",
    "fp6_e3m2": "e3m2", "float6_e3m2fn": "e3m2", "e3m2fn": "e3m2",
    "fp6_e2m3": "e2m3", "float6_e2m3fn": "e2m3", "e2m3fn": "e2m3",
    "fp4": "e2m1", "fp4_e2m1": "e2m1", "float4_e2m1fn": "e2m1", "e2m1fn": "e2m1",
    "float8_e8m0fnu": "e8m0", "e8m0fnu": "e8m0",
    "bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32",
}

# The one map from formats to the torch dtypes that hold them exactly (only for the registered format of that name:
# a renamed copy, e.g. dataclasses.replace(FORMATS["e4m3"], name="x"), takes the emulation paths).
TORCH_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr) for name, attr in (
        ("e4m3", "float8_e4m3fn"), ("e5m2", "float8_e5m2"), ("e8m0", "float8_e8m0fnu"),
        ("e2m1", "float4_e2m1fn_x2"),  # packed: two E2M1 codes per byte (low nibble first)
        ("bf16", "bfloat16"), ("fp16", "float16"), ("fp32", "float32"))
    if hasattr(torch, attr)
}

# The tensor dtypes lowprec quantizes from (and returns).
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def torch_dtype(fmt: "Format") -> torch.dtype | None:
    """The torch dtype holding exactly the registered format ``fmt`` (``float8_e4m3fn`` for e4m3, ...; e2m1 maps
    to the packed ``float4_e2m1fn_x2``), or None for every other format."""
    dt = TORCH_DTYPES.get(fmt.name)
    return dt if dt is not None and FORMATS.get(fmt.name) == fmt else None


# Names that denote a format *plus* block scaling; they resolve through lowprec.spec()/quantize(), not here.
SCALED_FORMAT_NAMES = ("mxfp8", "mxfp8_e5m2", "mxfp6", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4", "nvfp4")

_FLOAT_RE = re.compile(r"^e(\d+)m(\d+)(fn)?(?:_b(-?\d+))?$")
_QTORCH_RE = re.compile(r"^qtorch_e(\d+)m(\d+)$")
_INT_RE = re.compile(r"^int(\d+)(sym)?$")


def float_format(exp_bits: int, man_bits: int, *, bias: int | None = None, has_inf: bool = True,
                 has_nan: bool = True, name: str | None = None) -> Format:
    """A custom ``ExMy`` float with a sign bit.

    ``has_inf=True`` is IEEE-like (top exponent reserved for inf/NaN); ``has_inf=False, has_nan=True`` is the
    OCP "fn" style (only the all-ones code is NaN); both False uses every code for a finite value.
    The default bias is ``2**(exp_bits-1) - 1``. A registered format with the same parameters is returned as is.
    """
    for v, what in ((exp_bits, "exp_bits"), (man_bits, "man_bits")):
        if not isinstance(v, int) or isinstance(v, bool):
            raise TypeError(f"{what} must be an int, got {v!r}")
    if has_inf and not has_nan:
        raise ValueError("a format with inf must also have NaN (IEEE-like)")
    default_bias = 2 ** (exp_bits - 1) - 1
    b = default_bias if bias is None else int(bias)
    if name is None:
        name = f"e{exp_bits}m{man_bits}" + ("" if has_inf else "fn" if has_nan else "")
        if not has_inf and not has_nan:
            name = f"e{exp_bits}m{man_bits}fnn"  # neither inf nor NaN; rewritten below if registered
        if b != default_bias:
            name += f"_b{b}"
    fmt = Format(name, "float", 1 + exp_bits + man_bits, exp_bits, man_bits, b, has_inf=has_inf, has_nan=has_nan)
    for reg in FORMATS.values():
        if dataclasses.replace(reg, name=fmt.name) == fmt:
            return reg
    return fmt


def int_format(bits: int, *, symmetric: bool = False, name: str | None = None) -> Format:
    """A signed two's complement integer format (``symmetric`` drops the most negative code)."""
    if not isinstance(bits, int) or isinstance(bits, bool):
        raise TypeError(f"bits must be an int, got {bits!r}")
    if name is None:
        name = f"int{bits}" + ("sym" if symmetric else "")
    return Format(name, "int", bits, 0, bits - 1, 0, has_inf=False, has_nan=False, symmetric=symmetric)


def _from_qtorch(obj: Any) -> Format:
    """qtorch ``FloatingPoint(exp, man)``: no reserved codes (no inf/NaN), so max = 2**(2**E-1-bias)*(2-2**-M)
    (E4M3: 480, not OCP's 448); qtorch's own kernels round ties away from zero and turn NaN/inf into ±max,
    whereas lowprec rounds ties to even and keeps NaN as NaN."""
    e, m = int(obj.exp), int(obj.man)
    return Format(f"qtorch_e{e}m{m}", "float", 1 + e + m, e, m, 2 ** (e - 1) - 1, has_inf=False, has_nan=False)


def valid_names() -> list[str]:
    """Every registered name, alias and scaled-format name."""
    return sorted(FORMATS) + sorted(ALIASES) + list(SCALED_FORMAT_NAMES)


def get_format(fmt: str | Format | Any) -> Format:
    """Resolve a name, alias, pattern (``e3m4``, ``e4m3fn``, ``e3m2fnn``, ``e5m2_b16``, ``int6``, ``int8sym``),
    a :class:`Format` or a qtorch ``FloatingPoint`` to a :class:`Format`. Unknown names raise ``ValueError``.

    A qtorch ``FloatingPoint(exp, man)`` becomes ``qtorch_e{exp}m{man}``: bias 2**(exp-1)-1 and no reserved codes
    (no inf, no NaN: qtorch's E4M3 reaches 480, OCP's e4m3 448). lowprec then rounds ties to even and keeps NaN
    as NaN, where qtorch's own kernels round ties away from zero and turn NaN/inf into ±max."""
    if isinstance(fmt, Format):
        return fmt
    if type(fmt).__name__ == "FloatingPoint" and hasattr(fmt, "exp") and hasattr(fmt, "man"):
        return _from_qtorch(fmt)
    if not isinstance(fmt, str):
        raise TypeError(f"a format must be a name (str), a lowprec.Format or a qtorch FloatingPoint, got "
                        f"{type(fmt).__name__}")
    key = fmt.strip().lower()
    key = ALIASES.get(key, key)
    if key in FORMATS:
        return FORMATS[key]
    if key in SCALED_FORMAT_NAMES:
        raise ValueError(f"{fmt!r} is a scaled format (element format + block scales); pass it to "
                         "lowprec.spec()/quantize()/encode(), or use lowprec.spec(name).format for the element format")
    m = _FLOAT_RE.match(key)
    if m:
        e, mb, fn, b = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)
        return float_format(e, mb, bias=None if b is None else int(b), has_inf=not fn, has_nan=True)
    m = re.match(r"^e(\d+)m(\d+)fnn(?:_b(-?\d+))?$", key)
    if m:
        return float_format(int(m.group(1)), int(m.group(2)), bias=None if m.group(3) is None else int(m.group(3)),
                            has_inf=False, has_nan=False)
    m = _QTORCH_RE.match(key)
    if m:
        e, mb = int(m.group(1)), int(m.group(2))
        return Format(key, "float", 1 + e + mb, e, mb, 2 ** (e - 1) - 1, has_inf=False, has_nan=False)
    m = _INT_RE.match(key)
    if m:
        return int_format(int(m.group(1)), symmetric=bool(m.group(2)))
    raise ValueError(f"unknown format {fmt!r}; valid names: {', '.join(valid_names())}; or a pattern "
                     "eXmY (IEEE-like), eXmYfn (no inf), eXmYfnn (no inf/NaN), intN, intNsym")


def format_table() -> str:
    """The registry as a fixed-width text table."""
    head = f"{'name':6} {'kind':5} {'bits':>4} {'E':>2} {'M':>2} {'bias':>4} {'inf':>3} {'nan':>3} " \
           f"{'max':>12} {'min_normal':>12} {'min_subnorm':>12} {'eps':>10}  aliases"
    lines = [head, "-" * len(head)]
    for f in FORMATS.values():
        al = ",".join(sorted(a for a, t in ALIASES.items() if t == f.name))
        lines.append(
            f"{f.name:6} {f.kind:5} {f.bits:>4} {f.exp_bits:>2} {f.man_bits:>2} {f.bias:>4} "
            f"{'y' if f.has_inf else '-':>3} {'y' if f.has_nan else '-':>3} {f.max:>12.6g} {f.min_normal:>12.6g} "
            f"{f.min_subnormal:>12.6g} {f.eps:>10.4g}  {al}"
        )
    lines.append("scaled: mxfp8 (e4m3, block 32, e8m0), mxfp8_e5m2, mxfp6 (e2m3), mxfp6_e3m2, mxfp6_e2m3, "
                 "mxfp4 (e2m1, block 32, e8m0), nvfp4 (e2m1, block 16, e4m3 scales + fp32 tensor scale)")
    return "\n".join(lines)
