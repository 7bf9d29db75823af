"""Integer codes for quantized tensors: ``encode`` -> :class:`Encoded` -> ``decode``.

Codes are the formats' bit patterns: for ``e4m3``/``e5m2`` exactly those of ``torch.float8_e4m3fn`` /
``torch.float8_e5m2``; for ``e2m1`` those of OCP FP4, packed two per byte like ``torch.float4_e2m1fn_x2``
(the first element in the low nibble, bits 3..0; the second in bits 7..4). Integers are two's complement.
Formats of up to 8 bits use uint8 codes (6-bit formats one per byte); bf16/fp16 use int16 and fp32 int32 codes.
Block/channel scales are stored in their own format: uint8 E8M0 codes (exponent + 127), uint8 E4M3 codes plus a
float32 ``global_scale``, or float32 values. ``decode(encode(x, spec))`` equals ``quantize(x, spec)`` exactly
(for stochastic rounding: with identically seeded generators).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from . import scaling as _sc
from .formats import FORMATS, Format
from .quantize import _NATIVE_F8, QuantSpec, Rounding, _check_tensor, e4m3_to_float32, round_to_format, spec as _spec

__all__ = ["Encoded", "encode", "decode", "element_scale", "values_to_codes", "codes_to_values", "pack_nibbles", "unpack_nibbles"]

_WIDE = {"bf16": (torch.bfloat16, torch.int16), "fp16": (torch.float16, torch.int16),
         "fp32": (torch.float32, torch.int32)}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _is_registered(fmt: Format, name: str) -> bool:
    return fmt.name == name and fmt == FORMATS[name]


def values_to_codes(v: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Bit patterns of float32 values that already lie on ``fmt``'s grid (uint8; int16/int32 for 16/32-bit)."""
    for name, dt in _NATIVE_F8.items():
        if _is_registered(fmt, name):
            return v.to(dt).view(torch.uint8)
    for name, (dt, it) in _WIDE.items():
        if _is_registered(fmt, name):
            return v.to(dt).view(it).clone()
    if fmt.kind != "float" or fmt.bits > 8:
        if fmt.kind == "int":
            if torch.isnan(v).any():
                raise ValueError(f"cannot encode NaN in {fmt.name}: the format has no NaN code")
            c = v.to(torch.int32) & ((1 << fmt.bits) - 1)
            return c.to(torch.uint8) if fmt.bits <= 8 else c
        if fmt.kind == "scale":
            e = torch.round(torch.log2(v)).nan_to_num_(nan=128.0, posinf=128.0)
            return (e + 127).clamp_(0, 255).to(torch.uint8)
    if not fmt.has_nan and torch.isnan(v).any():
        raise ValueError(f"cannot encode NaN in {fmt.name}: the format has no NaN code")
    m, nb = fmt.man_bits, fmt.bits
    a = v.abs()
    bits = a.view(torch.int32)
    e_field = (bits >> 23) - 127 + fmt.bias
    mag = (e_field << m) | ((bits >> (23 - m)) & ((1 << m) - 1))
    if fmt.emin > -126:
        sub = (a * 2.0 ** (-fmt.emin) * 2.0**m).to(torch.int32)
        mag = torch.where(a < fmt.min_normal, sub, mag)
    top_exp = (1 << fmt.exp_bits) - 1
    if fmt.has_inf:
        mag = torch.where(torch.isinf(a), torch.full_like(mag, top_exp << m), mag)
        nan_code = (top_exp << m) | (1 << (m - 1) if m > 0 else 0)
    else:
        nan_code = (1 << (nb - 1)) - 1
    if fmt.has_nan:
        mag = torch.where(torch.isnan(a), torch.full_like(mag, nan_code), mag)
    code = mag | (torch.signbit(v).to(torch.int32) << (nb - 1))
    return code.to(torch.uint8) if nb <= 8 else code


def codes_to_values(c: torch.Tensor, fmt: Format) -> torch.Tensor:
    """float32 values of bit patterns (inverse of :func:`values_to_codes`)."""
    for name, dt in _NATIVE_F8.items():
        if _is_registered(fmt, name):
            if name == "e5m2":
                return c.view(dt).to(torch.float32)
            if c.device.type != "cpu" or c.numel() >= _SMALL:
                return e4m3_to_float32(c.view(dt))
            break  # few codes on CPU: the table (the fixed cost of e4m3_to_float32 dominates small tensors)
    for name, (dt, it) in _WIDE.items():
        if _is_registered(fmt, name):
            return c.view(dt).to(torch.float32)
    if c.dtype == torch.uint8 and fmt.bits <= 8:
        return _lookup(c, _table(fmt, c.device))
    return _codes_to_values_arith(c, fmt)


# Formats of up to 8 bits decode by a 256-entry table lookup (one gather instead of a dozen elementwise passes).
# The table is the format's own code -> value map, computed once by the bit arithmetic below, so the lookup
# gives the same bits (NaN payloads included). Keyed by the Format (frozen dataclass) and the device.
_TABLES: dict[tuple[Format, str], torch.Tensor] = {}
_SMALL = 1 << 16  # below this many e4m3 codes on CPU the table beats lowprec.quantize.e4m3_to_float32
_PAIR_TABLES: dict[tuple[Format, str], torch.Tensor] = {}


def _table(fmt: Format, device: torch.device) -> torch.Tensor:
    key = (fmt, str(device))
    t = _TABLES.get(key)
    if t is None:
        t = _TABLES[key] = _codes_to_values_arith(torch.arange(256, dtype=torch.uint8), fmt).to(device)
    return t


def _pair_table(fmt: Format, device: torch.device) -> torch.Tensor:
    """Table for packed 4-bit codes: entry b holds the float32 values of byte b's low and high nibble, in that
    order, as one int64 (gathering one 8-byte word per byte is much faster than gathering rows of a (256, 2)
    table; an integer gather copies the bits as they are)."""
    key = (fmt, str(device))
    t = _PAIR_TABLES.get(key)
    if t is None:
        b = torch.arange(256, dtype=torch.uint8)
        nib = torch.stack([b & 0xF, b >> 4], dim=-1)
        vals = _codes_to_values_arith(nib, fmt).contiguous()  # (256, 2) float32
        t = _PAIR_TABLES[key] = vals.view(torch.int64).reshape(256).to(device)
    return t


def _lookup(c: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``table[c]`` for uint8 codes ``c`` (index_select on int32 indices: the fastest gather on CPU)."""
    return torch.index_select(table, 0, c.reshape(-1).to(torch.int32)).reshape(c.shape)


def _codes_to_values_arith(c: torch.Tensor, fmt: Format) -> torch.Tensor:
    ci = c.to(torch.int32) & ((1 << fmt.bits) - 1)
    if fmt.kind == "int":
        half = 1 << (fmt.bits - 1)
        return torch.where(ci >= half, ci - (1 << fmt.bits), ci).to(torch.float32)
    if fmt.kind == "scale":
        v = _sc.pow2(ci - 127)
        return torch.where(ci == 255, torch.full_like(v, float("nan")), v)
    m, nb = fmt.man_bits, fmt.bits
    sign = (ci >> (nb - 1)) & 1
    mag = ci & ((1 << (nb - 1)) - 1)
    e_field = mag >> m
    man = mag & ((1 << m) - 1)
    normal = (((e_field - fmt.bias + 127) << 23) | (man << (23 - m))).view(torch.float32)
    subn = man.to(torch.float32) * fmt.min_subnormal
    val = torch.where(e_field == 0, subn, normal)
    top_exp = (1 << fmt.exp_bits) - 1
    if fmt.has_inf:
        special = e_field == top_exp
        val = torch.where(special & (man == 0), torch.full_like(val, float("inf")), val)
        val = torch.where(special & (man != 0), torch.full_like(val, float("nan")), val)
    elif fmt.has_nan:
        val = torch.where(mag == (1 << (nb - 1)) - 1, torch.full_like(val, float("nan")), val)
    return torch.where(sign.bool(), -val, val)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes (uint8, any shape) two per byte along the flattened order: element 2i in the low nibble,
    2i+1 in the high nibble (torch.float4_e2m1fn_x2's layout); an odd count is padded with a zero nibble."""
    flat = codes.reshape(-1)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return (flat[0::2] & 0xF) | ((flat[1::2] & 0xF) << 4)


def unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles` (flat uint8 tensor of ``numel`` codes)."""
    out = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(-1)
    return out[:numel]


@functools.lru_cache(maxsize=256)
def _spec_text(s: QuantSpec) -> str:
    return str(s)


@dataclass
class Encoded:
    """An encoded tensor. ``codes``: format bit patterns (4-bit formats two per byte when ``packed``);
    ``scale``: stored scales (None when unscaled), ``global_scale``: fp32 tensor scale of E4M3-scaled specs."""

    codes: torch.Tensor
    scale: torch.Tensor | None
    spec: QuantSpec
    shape: torch.Size
    dtype: torch.dtype
    global_scale: torch.Tensor | None = None
    packed: bool = False

    @property
    def nbytes(self) -> int:
        """Bytes of codes plus scales."""
        n = self.codes.numel() * self.codes.element_size()
        for t in (self.scale, self.global_scale):
            if t is not None:
                n += t.numel() * t.element_size()
        return n

    def to_dict(self) -> dict[str, Any]:
        """Only tensors and plain Python values (safe for ``torch.load(weights_only=True)``)."""
        return {"codes": self.codes, "scale": self.scale, "global_scale": self.global_scale,
                "spec": _spec_text(self.spec), "shape": list(self.shape),
                "dtype": str(self.dtype).replace("torch.", ""), "packed": self.packed}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Encoded":
        return cls(codes=d["codes"], scale=d["scale"], spec=_spec(d["spec"]), shape=torch.Size(d["shape"]),
                   dtype=_DTYPES[d["dtype"]], global_scale=d.get("global_scale"), packed=bool(d["packed"]))


def _native_f8_fast(s: QuantSpec) -> bool:
    """True when ``values_to_codes(round_to_format(y, ...))`` is one native float8 cast of ``y`` (see below)."""
    f = s.format
    return (s.rounding == Rounding.NEAREST and not s.flush_subnormals and f.name in _NATIVE_F8
            and _is_registered(f, f.name) and (s.saturate or f.name == "e5m2"))


def _native_f8_codes(y: torch.Tensor, fmt: Format, saturate: bool) -> torch.Tensor:
    """Codes of float32 ``y`` rounded to nearest onto e4m3 (saturating) or e5m2, by a single cast.

    Equal to ``values_to_codes(round_to_format(y, fmt, "nearest", saturate=...), fmt)``: that path casts ``y``
    to float8, widens the result to float32 (saturating e5m2 by a clamp) and casts it back; every code a float32
    -> float8 cast produces (NaN gives the canonical 0x7F/0xFF) survives the widening and re-cast unchanged, so
    the first cast's codes are the answer. Saturating e5m2 clamps ``y`` to ±max before the cast instead of
    after (the same codes: values beyond ±max, inf included, round to ±max or ±inf, which the clamp sends to
    ±max). e4m3 on CPU saturates in the cast; elsewhere ``y`` is clamped first, as round_to_format does."""
    if fmt.name == "e4m3":
        yy = y if y.device.type == "cpu" else y.clamp(-fmt.max, fmt.max)
        return yy.to(torch.float8_e4m3fn).view(torch.uint8)
    yy = y.clamp(-fmt.max, fmt.max) if saturate else y
    return yy.to(torch.float8_e5m2).view(torch.uint8)


def encode(x: torch.Tensor, fmt: "str | Format | QuantSpec", *, rounding: Any = None, scaling: Any = None,
           saturate: bool | None = None, generator: torch.Generator | None = None, pack: bool = True) -> Encoded:
    """Quantize ``x`` and return its codes and scales (see the module docstring for the layout)."""
    _check_tensor(x)
    x = x.detach()
    s = _spec(fmt, rounding=rounding, scaling=scaling, saturate=saturate)
    fmt_ = s.format
    x32 = x.float() if x.dtype != torch.float32 else x
    kw = dict(saturate=s.saturate, flush_subnormals=s.flush_subnormals, rand_bits=s.rand_bits, generator=generator)
    scale = glob = None
    native = _native_f8_fast(s)
    if s.scaling is None:
        if native:
            return Encoded(_native_f8_codes(x32, fmt_, s.saturate), None, s, x.shape, x.dtype, None, False)
        q = round_to_format(x32, fmt_, s.rounding, **kw)
    else:
        view, undo = _sc.to_scaling_view(x32, s.scaling)
        info = _sc.compute_scale(view, s.scaling, fmt_)
        scale, glob = info.codes, info.global_scale
        if s.scaling.mode == "block":
            scale = scale.squeeze(-1)
        if s.scaling.scale_format == "e4m3":
            # only E4M3 scales can be 0 (fp32 scales of 0 become 1, E8M0 scales are >= 2**-127)
            safe = torch.where(info.scale == 0, torch.ones_like(info.scale), info.scale)
            q = round_to_format(view / safe, fmt_, s.rounding, **kw)
            q = undo(torch.where(info.scale == 0, q * 0.0, q))  # an E4M3 block scale of 0 zeroes its block
        elif native:
            codes = undo(_native_f8_codes(view / info.scale, fmt_, s.saturate))
            return Encoded(codes, scale, s, x.shape, x.dtype, glob, False)
        else:
            q = undo(round_to_format(view / info.scale, fmt_, s.rounding, **kw))
    codes = values_to_codes(q, fmt_)
    packed = bool(pack and fmt_.bits == 4)
    if packed:
        codes = pack_nibbles(codes)
    return Encoded(codes, scale, s, x.shape, x.dtype, glob, packed)


def decode(enc: Encoded) -> torch.Tensor:
    """Values of an :class:`Encoded` (shape and dtype of the original tensor)."""
    s, fmt = enc.spec, enc.spec.format
    n = 1
    for d in enc.shape:
        n *= d
    if enc.packed and enc.codes.dtype == torch.uint8:
        # unpack and decode at once: byte b -> (value of its low nibble, value of its high nibble)
        pairs = _lookup(enc.codes.reshape(-1), _pair_table(fmt, enc.codes.device))
        v = pairs.view(torch.float32)[:n].reshape(enc.shape)
    else:
        codes = unpack_nibbles(enc.codes, n) if enc.packed else enc.codes
        v = codes_to_values(codes.reshape(enc.shape), fmt)
    if s.scaling is None:
        return v.to(enc.dtype)
    view, undo = _sc.to_scaling_view(v, s.scaling)
    scale = _stored_scale(enc)
    if _is_registered(fmt, "fp32"):  # v is a view of the int32 codes
        return undo(view * scale).to(enc.dtype)
    return undo(view.mul_(scale)).to(enc.dtype)  # v is a fresh tensor: scale it in place


def _stored_scale(enc: Encoded) -> torch.Tensor:
    """The float32 scales of a scaled :class:`Encoded`, broadcastable to its scaling view."""
    scaling = enc.spec.scaling
    sf = scaling.scale_format
    if sf == "e8m0":
        scale = _sc.pow2(enc.scale.to(torch.int32) - 127)
    elif sf == "e4m3":
        scale = enc.scale.view(torch.float8_e4m3fn).to(torch.float32) * enc.global_scale
    else:
        scale = enc.scale
    return scale.unsqueeze(-1) if scaling.mode == "block" else scale


def element_scale(enc: Encoded, like: torch.Tensor) -> torch.Tensor:
    """The scale of every element of ``like`` (shaped as the encoded tensor), as ``quantize_with_scale`` returns
    it for the same input: block scales expanded to the tensor's shape, other scales broadcastable."""
    view, undo = _sc.to_scaling_view(like, enc.spec.scaling)
    scale = _stored_scale(enc)
    return undo(scale.expand_as(view)) if enc.spec.scaling.mode == "block" else scale
