"""Integer codes for quantized tensors: ``encode`` -> :class:`Encoded` -> ``decode``.

Codes are the formats' bit patterns: for ``e4m3``/``e5m2`` exactly those of ``torch.float8_e4m3fn`` /
``torch.float8_e5m2``; for ``e2m1`` those of OCP FP4, packed two per byte like ``torch.float4_e2m1fn_x2``
(the first element in the low nibble, bits 3..0; the second in bits 7..4). Integers are two's complement.
Formats of up to 8 bits use uint8 codes (6-bit formats one per byte); bf16/fp16 use int16 and fp32 int32 codes.
Block/channel scales are stored in their own format: uint8 E8M0 codes (exponent + 127), uint8 E4M3 codes plus a
float32 ``global_scale``, or float32 values. ``encode`` takes its elements and scales from quantize's own path
(:func:`lowprec.quantize.scale_and_round`), so ``decode(encode(x, spec))`` equals ``quantize(x, spec)`` exactly
(for stochastic rounding: with identically seeded generators). A NaN or inf that the format cannot hold (NaN in
e2m1, FP6, integers, mxfp4, ...) raises :class:`NonFiniteError` instead of becoming a number.

COAT's dynamic range expansion (``encode(x, spec, expand=n)``; Xi et al. 2024, arXiv 2410.19313, as in NVlabs'
``fp8_adamw_expand`` kernel and torchao's ``subclass_fp8_with_dynamic_range_expansion.py``), for block specs with
fp32 scales (COAT: ``e4m3:block128``): per block, with ``M``/``m`` the largest/smallest magnitude (+1e-20) and
``c = sqrt(M m)``, the elements are stored as ``sign(x) |x / c|^k`` with ``k = floor(n log2(fmt.max^2 / 2) /
log2(M / m)) / n`` (a multiple of 1/n; 1 for a block of equal magnitudes), then block-quantized as usual; decoding
inverts it (``sign(v) |v|^(1/k) c``). ``k`` and ``c`` are stored per block (float32). ``decode(encode(...))`` then
differs from ``quantize(x, spec)``: the expansion belongs to the stored codes only.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from . import scaling as _sc
from .fast import encode_e4m3
from .formats import FLOAT_DTYPES, Format, torch_dtype
from .quantize import QuantSpec, scale_and_round, spec as _spec
from .rounding import e4m3_to_float32

__all__ = ["Encoded", "encode", "decode", "element_scale", "values_to_codes", "codes_to_values", "pack_nibbles",
           "unpack_nibbles", "NonFiniteError"]

_FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
_DTYPES = {str(d).replace("torch.", ""): d for d in FLOAT_DTYPES}


class NonFiniteError(ValueError):
    """A NaN or inf would be encoded in a format without a code for it (NaN in e2m1, FP6, integers, mxfp4, ...)."""


def _check_holds(v: torch.Tensor, fmt: Format) -> None:
    """Raise :class:`NonFiniteError` if ``v`` holds a NaN/inf that ``fmt`` has no code for (one reduction)."""
    if fmt.has_inf or fmt.kind == "scale":
        return
    bad = torch.isinf(v) if fmt.has_nan else ~torch.isfinite(v)
    if bool(bad.any()):
        what = "inf" if fmt.has_nan else "NaN or inf"
        raise NonFiniteError(f"cannot encode {what} in format {fmt.name}: it has no code for it "
                             f"({'NaN only' if fmt.has_nan else 'finite values only'})")


def values_to_codes(v: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Bit patterns of float32 values that already lie on ``fmt``'s grid (uint8; int16/int32 for 16/32-bit).
    Raises :class:`NonFiniteError` for NaN/inf where ``fmt`` has no code for them."""
    dt = torch_dtype(fmt)
    if dt in _FLOAT8:
        return v.to(dt).view(torch.uint8)  # e4m3: values from quantize are never inf
    if dt in _INT_VIEW:
        return v.to(dt).view(_INT_VIEW[dt]).clone()
    _check_holds(v, fmt)
    if fmt.kind != "float" or fmt.bits > 8:
        if fmt.kind == "int":
            c = v.to(torch.int32) & ((1 << fmt.bits) - 1)
            return c.to(torch.uint8) if fmt.bits <= 8 else c
        if fmt.kind == "scale":
            e = torch.round(torch.log2(v)).nan_to_num_(nan=128.0, posinf=128.0)
            return (e + 127).clamp_(0, 255).to(torch.uint8)
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
    dt = torch_dtype(fmt)
    if dt == torch.float8_e5m2:
        return c.view(dt).to(torch.float32)
    if dt == torch.float8_e4m3fn and (c.device.type != "cpu" or c.numel() >= _SMALL):
        return e4m3_to_float32(c.view(dt))  # (few codes on CPU: the table; e4m3_to_float32's fixed cost dominates)
    if dt in _INT_VIEW:
        return c.view(dt).to(torch.float32)
    if c.dtype == torch.uint8 and fmt.bits <= 8:
        return _lookup(c, _table(fmt, c.device))
    return _codes_to_values_arith(c, fmt)


# Formats of up to 8 bits decode by a 256-entry table lookup (one gather instead of a dozen elementwise passes).
# The table is the format's own code -> value map, computed once by the bit arithmetic below, so the lookup
# gives the same bits (NaN payloads included). Keyed by the Format (frozen dataclass) and the device.
_TABLES: dict[tuple[Format, str], torch.Tensor] = {}
_SMALL = 1 << 16  # below this many e4m3 codes on CPU the table beats lowprec.rounding.e4m3_to_float32
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
    expand_k: torch.Tensor | None = None
    expand_center: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of codes plus scales."""
        n = self.codes.numel() * self.codes.element_size()
        for t in (self.scale, self.global_scale, self.expand_k, self.expand_center):
            if t is not None:
                n += t.numel() * t.element_size()
        return n

    def to_dict(self) -> dict[str, Any]:
        """Only tensors and plain Python values (safe for ``torch.load(weights_only=True)``)."""
        return {"codes": self.codes, "scale": self.scale, "global_scale": self.global_scale,
                "spec": _spec_text(self.spec), "shape": list(self.shape),
                "dtype": str(self.dtype).replace("torch.", ""), "packed": self.packed,
                "expand_k": self.expand_k, "expand_center": self.expand_center}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Encoded":
        return cls(codes=d["codes"], scale=d["scale"], spec=_spec(d["spec"]), shape=torch.Size(d["shape"]),
                   dtype=_DTYPES[d["dtype"]], global_scale=d.get("global_scale"), packed=bool(d["packed"]),
                   expand_k=d.get("expand_k"), expand_center=d.get("expand_center"))


def _check_expand(s: QuantSpec, expand: int) -> None:
    if not isinstance(expand, int) or isinstance(expand, bool) or expand < 0:
        raise ValueError(f"expand must be a non-negative int (0 = off; COAT: 16), got {expand!r}")
    if expand and (s.scaling is None or s.scaling.mode != "block" or s.scaling.scale_format != "fp32"
                   or s.scaling.block_rows != 1):
        raise ValueError(f"dynamic range expansion needs 1-D block scaling with fp32 scales (COAT: "
                         f"'e4m3:block128'), got {s}")


def _expand(x: torch.Tensor, s: QuantSpec, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """COAT's expansion of float32 ``x`` per block (module docstring): (expanded x, k, center)."""
    view, undo = _sc.to_scaling_view(x, s.scaling)
    real, _ = _sc.to_scaling_view(torch.ones_like(x), s.scaling)   # 0 on the padding of a ragged block
    a = view.abs()
    big = _sc.finite_amax(view, dim=-1, keepdim=True) + 1e-20
    small = torch.where(real > 0, a, torch.full_like(a, float("inf"))).amin(-1, keepdim=True) + 1e-20
    center = torch.sqrt(big * small)
    lr = torch.log2(big / small)
    k = torch.floor(torch.log2(torch.tensor(s.format.max ** 2 / 2)) / lr * n) / n
    k = torch.where((lr > 0) & torch.isfinite(k) & (k > 0), k, torch.ones_like(k))
    y = torch.sign(view) * (a / center) ** k
    return undo(y), k.squeeze(-1), center.squeeze(-1)


def _unexpand(v: torch.Tensor, enc: "Encoded") -> torch.Tensor:
    view, undo = _sc.to_scaling_view(v.float(), enc.spec.scaling)
    k, c = enc.expand_k.unsqueeze(-1), enc.expand_center.unsqueeze(-1)
    return undo(torch.sign(view) * view.abs() ** (1.0 / k) * c).to(enc.dtype)


def encode(x: torch.Tensor, fmt: "str | Format | QuantSpec", *, rounding: Any = None, scaling: Any = None,
           saturate: bool | None = None, generator: torch.Generator | None = None, pack: bool = True,
           expand: int = 0) -> Encoded:
    """Quantize ``x`` (quantize's scale -> round) and return its codes and scales (layout: module docstring).
    ``expand=n``: COAT's dynamic range expansion first (module docstring). Raises :class:`NonFiniteError`,
    naming the spec, for a NaN/inf the format cannot hold."""
    s = _spec(fmt, rounding=rounding, scaling=scaling, saturate=saturate)
    _check_expand(s, expand)
    if expand:
        y, k, c = _expand(x.detach().float(), s, expand)
        enc = encode(y, s, generator=generator, pack=pack)
        enc.shape, enc.dtype, enc.expand_k, enc.expand_center = x.shape, x.dtype, k, c
        return enc
    native = encode_e4m3(x, s)  # one native pass where it applies (the same codes and scales)
    if native is not None:
        return Encoded(native[0], native[1], s, x.shape, x.dtype, None, False)
    r = scale_and_round(x, s, generator, native=True)
    scale = glob = None
    if r.info is not None:
        scale, glob = r.info.codes, r.info.global_scale
        if s.scaling.mode == "block":
            scale = scale.squeeze(-1)
    if r.elements.dtype in _FLOAT8:  # one native cast gave the codes
        return Encoded(r.undo(r.elements.view(torch.uint8)), scale, s, x.shape, x.dtype, glob, False)
    try:
        codes = values_to_codes(r.undo(r.elements), s.format)
    except NonFiniteError as e:
        raise NonFiniteError(f"{e}; spec {s}") from None
    packed = bool(pack and s.format.bits == 4)
    if packed:
        codes = pack_nibbles(codes)
    return Encoded(codes, scale, s, x.shape, x.dtype, glob, packed)


def decode(enc: Encoded) -> torch.Tensor:
    """Values of an :class:`Encoded` (shape and dtype of the original tensor)."""
    if enc.expand_k is not None:
        plain = Encoded(enc.codes, enc.scale, enc.spec, enc.shape, torch.float32, enc.global_scale, enc.packed)
        return _unexpand(decode(plain), enc)
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
    if torch_dtype(fmt) == torch.float32:  # v is a view of the int32 codes
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
