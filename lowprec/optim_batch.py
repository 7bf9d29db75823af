"""Batched state codecs for ``lowprec.optim``: one ``encode``/``decode`` per group of like states, split back.

The wrapped optimizer stores one :class:`lowprec.Encoded` per state tensor. For specs whose result for an element
depends only on that element or on its own block of the last axis (``batchable``), encoding the rows of several
tensors stacked together gives, row for row, the codes and scales of encoding each tensor alone. So the states of a
step that share spec, dtype, device and last dimension are encoded with one call (and decoded with one call) and
split into per-tensor ``Encoded`` copies: bit-identical to the per-tensor path (``wrap(..., fused=False)``, the
reference; ``tests/lowprec/test_optim_fused.py`` checks it), with one set of kernel launches per group instead of
per tensor, which is where a model's many small tensors spend their time.

Batchable: round-to-nearest (no random bits, so no generator order to keep); unscaled, or blocks along the last
axis with fp32 or E8M0 scales (not tensor/channel scaling, not NVFP4's tensor-wide global scale); a format of more
than 4 bits (codes one per byte or wider, no nibble packing across tensors) that has a NaN code (formats without
NaN keep the per-tensor path and its non-finite guard).
"""
from __future__ import annotations

import torch

from lowprec.codecs import Encoded, decode, encode
from lowprec.quantize import QuantSpec, quantize_with_scale

__all__ = ["batchable", "encode_rows", "decode_rows", "quantize_rows", "group_key", "BATCH_MAX_NUMEL"]

# Only tensors up to this size are batched: for larger ones the launches are a small part of the time and the
# concatenation would add a pass over the data.
BATCH_MAX_NUMEL = 1 << 16


def batchable(spec: QuantSpec) -> bool:
    """True when rows of different tensors never interact in ``encode(x, spec)`` (module docstring)."""
    f, sc = spec.format, spec.scaling
    if getattr(spec.rounding, "value", spec.rounding) != "nearest" or f.bits <= 4 or not f.has_nan:
        return False
    return sc is None or (sc.mode == "block" and sc.axis == -1 and sc.block_rows == 1
                          and sc.scale_format in ("fp32", "e8m0"))


def group_key(t: torch.Tensor, spec: QuantSpec) -> tuple:
    """Tensors with equal keys (of at least one dimension) may be encoded together."""
    return (spec, t.dtype, t.device, t.shape[-1])


def encode_rows(xs: list[torch.Tensor], spec: QuantSpec) -> list[Encoded] | None:
    """``[encode(x, spec) for x in xs]`` in one call (``xs``: at least 1-dim, one ``group_key``; ``spec``
    batchable). None when the encoding does not have the expected row layout (the caller then encodes per
    tensor)."""
    n = xs[0].shape[-1]
    rows = [x.reshape(-1, n) for x in xs]
    big = torch.cat(rows) if len(rows) > 1 else rows[0]
    enc = encode(big, spec)
    scale = enc.scale
    if (enc.packed or enc.global_scale is not None or enc.codes.shape != big.shape
            or (scale is not None and (scale.dim() != 2 or scale.shape[0] != big.shape[0]))):
        return None
    out, r = [], 0
    for x, rw in zip(xs, rows):
        # copies, not views: a state kept between steps must not pin the whole batch's buffer (a parameter that
        # stops getting gradients would keep every other tensor's codes of that step alive)
        k = rw.shape[0]
        sc = None if scale is None else scale[r:r + k].reshape(*x.shape[:-1], scale.shape[1]).clone()
        codes = enc.codes[r:r + k].reshape(x.shape).clone()
        out.append(Encoded(codes, sc, enc.spec, x.shape, x.dtype, None, False))
        r += k
    return out


def quantize_rows(xs: list[torch.Tensor], spec: QuantSpec) -> list[tuple[torch.Tensor, torch.Tensor | None]] | None:
    """``[quantize_with_scale(x, spec) for x in xs]`` in one call (same conditions as ``encode_rows``); the
    values and per-element scales are views of the batch. None when the result has an unexpected layout."""
    n = xs[0].shape[-1]
    rows = [x.reshape(-1, n) for x in xs]
    big = torch.cat(rows)
    q, scale = quantize_with_scale(big, spec)
    if q.shape != big.shape or (scale is not None and scale.shape != big.shape):
        return None
    out, r = [], 0
    for x, rw in zip(xs, rows):
        k = rw.shape[0]
        out.append((q[r:r + k].reshape(x.shape), None if scale is None else scale[r:r + k].reshape(x.shape)))
        r += k
    return out


def decode_rows(encs: list[Encoded]) -> list[torch.Tensor]:
    """``[decode(e) for e in encs]`` in one call (``encs`` from ``encode_rows`` or the per-tensor path with one
    batchable spec, dtype, device and last dimension, unpacked, without a global scale)."""
    e0 = encs[0]
    n = e0.shape[-1]
    codes = torch.cat([e.codes.reshape(-1, n) for e in encs]) if len(encs) > 1 else e0.codes.reshape(-1, n)
    scale = None
    if e0.scale is not None:
        nb = e0.scale.shape[-1]
        scale = torch.cat([e.scale.reshape(-1, nb) for e in encs]) if len(encs) > 1 else e0.scale.reshape(-1, nb)
    values = decode(Encoded(codes, scale, e0.spec, codes.shape, e0.dtype, None, False))
    out, r = [], 0
    for e in encs:
        k = e.codes.numel() // n
        out.append(values[r:r + k].reshape(e.shape))
        r += k
    return out
