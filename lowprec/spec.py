"""The spec language: :class:`Rounding`, :class:`Scaling`, :class:`QuantSpec`, their text form and :func:`spec`.

Data and parsing only (no kernels): ``str(QuantSpec.parse(t))`` is canonical and ``QuantSpec.parse(str(s)) == s``.
"""

from __future__ import annotations

import enum
import functools
import re
from dataclasses import dataclass, replace
from typing import Any

from .formats import Format, get_format

__all__ = ["Rounding", "Scaling", "QuantSpec", "SCALED_FORMATS", "SCALE_ROUNDINGS", "spec", "parse_scaling"]


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
SCALE_ROUNDINGS = ("floor", "ceil", "even", "rceil")


@dataclass(frozen=True)
class Scaling:
    """How scales are chosen before rounding (``q = round(x / scale) * scale``).

    mode: ``"tensor"`` (one scale), ``"channel"`` (one scale per index along ``axis``, amax over the other
    axes), ``"block"`` (blocks of ``block_size`` contiguous elements along ``axis``; a ragged last block is
    padded with zeros). scale_format: ``"fp32"`` (scale = amax / fmt.max), ``"e8m0"`` (power of two, OCP MX:
    2**(floor(log2(amax)) - emax_elem), clamped to 2**±127; elements saturate) or ``"e4m3"`` (NVFP4: E4M3 scale
    of (amax / fmt.max) / s_global times an fp32 tensor scale s_global = tensor_amax / (448 * fmt.max)).
    Amax is taken over finite values. ``axis`` is reset to -1 for tensor/delayed scaling and ``block_size`` to 32
    for every mode but block (so equal scalings compare equal); history_len/margin/algo off delayed are an error.

    2-D blocks (``block_rows > 1``, text ``block<R>x<C>``, e.g. ``block16x16`` or DeepSeek-V3's ``block128x128``):
    tiles of ``block_rows`` x ``block_size`` elements, ``block_size`` along ``axis`` and ``block_rows`` along the
    other dimensions flattened (for a 2-D tensor, the other axis); ragged tiles are padded with zeros. A square
    tile groups the same elements whatever ``axis`` is, so a matrix and its transpose are quantized alike
    (Transformer Engine's reason for 16x16 NVFP4 weight tiles). ``block1x<C>`` is ``block<C>``.

    ``scale_rounding`` (E8M0 scales only; torchao's ``ScaleCalculationMode``): how the power-of-two scale is
    chosen from a block's amax. ``"floor"`` (OCP MX v1.0, the default): ``2**(floor(log2(amax)) - emax_elem)``,
    elements above the format's max saturate; ``"ceil"``: ``2**(ceil(log2(amax)) - emax_elem)``; ``"even"``:
    amax first rounded to the element format's mantissa width (half up), then floor; ``"rceil"`` (NVIDIA's,
    as in cuBLAS / TE MXFP8): ``2**ceil(log2(amax / fmt.max))``, so nothing saturates. Text ``scale_round=ceil``.

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
    block_rows: int = 1
    scale_rounding: str = "floor"

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
        br = self.block_rows
        if not isinstance(br, int) or isinstance(br, bool) or br < 1:
            raise ValueError(f"invalid block rows {br!r}: must be a positive int (e.g. 'block16x16')")
        if br != 1 and self.mode != "block":
            raise ValueError(f"2-D blocks (block<R>x<C>) need block scaling, not {self.mode!r}")
        if self.scale_rounding not in SCALE_ROUNDINGS:
            raise ValueError(f"unknown scale rounding {self.scale_rounding!r}; valid: {', '.join(SCALE_ROUNDINGS)}")
        if self.scale_rounding != "floor" and self.scale_format != "e8m0":
            raise ValueError(f"scale_round={self.scale_rounding} applies to E8M0 (MX) scales only, not to "
                             f"{self.scale_format!r} scales (e.g. 'mxfp8:scale_round=rceil')")
        if self.mode in ("tensor", "delayed"):
            object.__setattr__(self, "axis", -1)
        if self.mode != "block":
            object.__setattr__(self, "block_size", 32)

    def __str__(self) -> str:
        if self.mode == "block":
            s = "block%d" % self.block_size if self.block_rows == 1 else f"block{self.block_rows}x{self.block_size}"
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
        if self.scale_rounding != "floor":
            s += f":scale_round={self.scale_rounding}"
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
            object.__setattr__(self, "scaling", parse_scaling(self.scaling))
        if self.rand_bits is not None:
            if not isinstance(self.rand_bits, int) or isinstance(self.rand_bits, bool) or not 1 <= self.rand_bits <= 32:
                raise ValueError(f"rand_bits must be None or an int in [1, 32], got {self.rand_bits!r}")
        if self.format.kind == "scale" and self.scaling is not None:
            raise ValueError("the e8m0 scale format cannot itself be scaled")
        if self.scaling is not None and self.scaling.scale_format == "e4m3" and self.format.max > 2.0**64:
            # the fp32 global scale tensor_amax / (448 * fmt.max) would underflow float32 and zero every block
            raise ValueError(f"E4M3 block scales (NVFP4-style) need an element format with max <= 2**64, got "
                             f"{self.format.name} (max {self.format.max:.4g}); use scale=e8m0 or fp32 scales")

    @classmethod
    def parse(cls, text: str) -> "QuantSpec":
        """Parse ``"fmt[:token...]"``. Tokens: ``nearest|stochastic|toward_zero``, ``sat|nosat``, ``flush``,
        ``tensor|channel|block<N>|block<R>x<C>|delayed[<N>]``, ``axis=<int>``, ``scale=<fp32|e8m0|e4m3>``,
        ``scale_round=<floor|ceil|even|rceil>`` (E8M0 scales), ``randbits=<int>``, and for delayed scaling
        ``margin=<int>``, ``algo=<max|most_recent>``.
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
        extra_kw: dict[str, Any] = {}
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
            elif re.fullmatch(r"block\d+x\d+", t):
                rows, cols = t[5:].split("x")
                mode, bs, extra_kw["block_rows"] = "block", int(cols), int(rows)
            elif t.startswith("scale_round="):
                extra_kw["scale_rounding"] = t.split("=", 1)[1]
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
                                 "toward_zero, sat, nosat, flush, tensor, channel, block<N>, block<R>x<C>, "
                                 "delayed<N>, axis=<int>, scale=<fp32|e8m0|e4m3>, "
                                 "scale_round=<floor|ceil|even|rceil>, margin=<int>, algo=<max|most_recent>, "
                                 "randbits=<int>")
        if mode is None and (axis is not None or bs is not None or sfmt is not None or delayed_kw):
            raise ValueError(f"spec {text!r}: axis=/scale=/margin=/algo= need a scaling token (tensor, channel, "
                             "block<N>, delayed<N>)")
        if mode is not None:
            if delayed_kw and mode != "delayed":
                raise ValueError(f"spec {text!r}: margin=/algo= apply to delayed scaling only "
                                 "(e.g. 'e4m3:delayed16:margin=1')")
            kw["scaling"] = Scaling(mode, -1 if axis is None else axis, 32 if bs is None else bs,
                                    "fp32" if sfmt is None else sfmt, **delayed_kw, **extra_kw)
        elif extra_kw:
            raise ValueError(f"spec {text!r}: scale_round= needs block scaling with E8M0 scales "
                             "(e.g. 'mxfp8:scale_round=rceil')")
        return cls(fmt, **kw)

    def __str__(self) -> str:
        # computed once per spec object (every quantized GEMM operand names its spec for telemetry); kept outside
        # the dataclass fields, so equality, hashing and dataclasses.replace are unaffected
        text = self.__dict__.get("_text")
        if text is None:
            text = self._text_form()
            object.__setattr__(self, "_text", text)
        return text

    def _text_form(self) -> str:
        head, parts = self.format.name, []
        sc = self.scaling
        if sc is not None:
            plain = replace(sc, block_rows=1, scale_rounding="floor")
            named = next((n for n in _CANONICAL_SCALED if SCALED_FORMATS[n] == (self.format.name, plain)), None)
            if named:
                head = named
                if sc.block_rows != 1:
                    parts.append(f"block{sc.block_rows}x{sc.block_size}")
                if sc.scale_rounding != "floor":
                    parts.append(f"scale_round={sc.scale_rounding}")
            else:
                parts.append(str(sc))
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


def parse_scaling(s: Any) -> Scaling:
    """A :class:`Scaling` from itself or its text (``"tensor"``, ``"channel:axis=0"``, ``"block32:scale=e8m0"``)."""
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
            else parse_scaling(kw["scaling"])
    if "rounding" in kw:
        kw["rounding"] = Rounding.parse(kw["rounding"])
    return replace(s, **kw) if kw else s
