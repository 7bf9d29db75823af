"""Batched parts of the wrapped optimizer's step (``lowprec.optim``, ``fused=True``): one call for a group of tensors
instead of one per tensor, split back, bit-identical to the per-tensor path (``wrap(..., fused=False)``, the
reference; ``tests/lowprec/test_optim_fused.py``, ``test_optim_segments.py``). A model's many small tensors spend
their time in per-tensor launches and Python, which this removes.

States (``encode_rows`` / ``decode_rows``): the wrapped optimizer stores one :class:`lowprec.Encoded` per state
tensor. For specs whose result for an element depends only on that element or on its own block of the last axis
(``batchable``), encoding the rows of several tensors stacked together gives, row for row, the codes and scales of
encoding each tensor alone. So the states of a step that share spec, dtype, device and last dimension are encoded
with one call (and decoded with one call) and split into per-tensor ``Encoded`` copies. Batchable: round-to-nearest
(no random bits, so no generator order to keep); unscaled, or blocks along the last axis with fp32 or E8M0 scales
(not tensor/channel scaling, not NVFP4's tensor-wide global scale); a format of more than 4 bits (codes one per
byte or wider, no nibble packing across tensors) that has a NaN code (formats without NaN keep the per-tensor path
and its non-finite guard).

Gradients and master weights (``quantize_segments``): see the section below.
"""
from __future__ import annotations

import dataclasses

import torch

from lowprec import codecs as _codecs
from lowprec import scaling as _sc
from lowprec.codecs import Encoded, decode, encode
from lowprec.fast import decode_table_rows, tensor_scaled_segments
from lowprec.formats import torch_dtype
from lowprec.quantize import QuantSpec, quantize_with_scale, scale_and_round

__all__ = ["batchable", "encode_rows", "decode_rows", "decode_batch", "decode_state", "e4m3_rows", "quantize_rows", "group_key", "BATCH_MAX_NUMEL",
           "segments_ok", "quantize_segments", "Segments"]

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


def _row_spec(spec: QuantSpec, n: int) -> QuantSpec:
    """The spec to encode rows of length ``n`` with: ``spec`` itself, or, for blocks longer than the row (one
    block per row, padded with zeros in the per-tensor path), blocks of exactly ``n``: the same block amax, scale,
    elements and codes (a block's scale depends on its amax only; nearest rounding is elementwise) without the
    padding pass."""
    sc = spec.scaling
    if sc is None or sc.mode != "block" or n >= sc.block_size:
        return spec
    key = (spec, n)
    out = _ROW_SPECS.get(key)
    if out is None:
        out = _ROW_SPECS[key] = dataclasses.replace(spec, scaling=dataclasses.replace(sc, block_size=n))
    return out


_ROW_SPECS: dict[tuple, QuantSpec] = {}


def _strides(shape: torch.Size) -> tuple[int, ...]:
    out, k = [], 1
    for d in reversed(shape):
        out.append(k)
        k *= d
    return tuple(reversed(out))


def _pieces(buf: torch.Tensor, shapes: list[torch.Size]) -> list[torch.Tensor]:
    """Views of contiguous ``buf`` as contiguous tensors of ``shapes``, one after the other (one view op each)."""
    out, off = [], 0
    for shape in shapes:
        out.append(buf.as_strided(shape, _strides(shape), buf.storage_offset() + off))
        k = 1
        for d in shape:
            k *= d
        off += k
    return out


def encode_rows(xs: list[torch.Tensor], spec: QuantSpec, *, big: torch.Tensor | None = None,
                keep: dict | None = None) -> list[Encoded] | None:
    """``[encode(x, spec) for x in xs]`` in one call (``xs``: at least 1-dim, one ``group_key``; ``spec``
    batchable). None when the encoding does not have the expected row layout (the caller then encodes per
    tensor). ``big``: the rows of ``xs`` already concatenated (a ``decode_rows`` buffer the states still live in);
    ``keep``: receives the batch's ``codes`` and ``scale`` (for ``decode_rows`` of the next step)."""
    n = xs[0].shape[-1]
    if big is None:
        rows = [x.reshape(-1, n) for x in xs]
        big = torch.cat(rows) if len(rows) > 1 else rows[0]
    enc = encode(big, _row_spec(spec, n))
    scale = enc.scale
    if (enc.packed or enc.global_scale is not None or enc.codes.shape != big.shape
            or (scale is not None and (scale.dim() != 2 or scale.shape[0] != big.shape[0]))):
        return None
    if keep is not None:
        keep["codes"], keep["scale"] = enc.codes, scale
    # copies, not views: a state kept between steps must not pin the whole batch's buffer (a parameter that
    # stops getting gradients would keep every other tensor's codes of that step alive)
    ks = [x.numel() // n for x in xs]
    codes = [c.clone() for c in enc.codes.split(ks)]            # (rows, n) pieces: a 2-D tensor's own shape
    codes = [c if c.shape == x.shape else c.view(x.shape) for c, x in zip(codes, xs)]
    if scale is None:
        scales = [None] * len(xs)
    else:
        nb = scale.shape[1]
        scales = [c.clone() for c in scale.split(ks)]
        scales = [c if x.dim() == 2 else c.view(*x.shape[:-1], nb) for c, x in zip(scales, xs)]
    return [Encoded(c, sc, spec, x.shape, x.dtype, None, False) for x, c, sc in zip(xs, codes, scales)]


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


def e4m3_rows(enc: Encoded) -> bool:
    """Whether ``enc`` is unpacked uint8 e4m3 codes (no expansion) of a float32 tensor in 2-D rows on the CPU, with
    one scale per block along them (or none): the layout the native row decode takes."""
    sc = enc.spec.scaling
    return (not enc.packed and enc.expand_k is None and enc.codes.dtype == torch.uint8
            and torch_dtype(enc.spec.format) == torch.float8_e4m3fn and enc.dtype == torch.float32
            and enc.codes.dim() == 2 and enc.codes.device.type == "cpu"
            and (sc is None or (sc.mode == "block" and sc.block_rows == 1 and sc.axis in (-1, 1))))


def _decode_e4m3_native(enc: Encoded, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """``lowprec.codecs.decode(enc)`` of codes laid out as :func:`e4m3_rows` says, in one native pass: the codes'
    table (bit for bit the values of ``lowprec.rounding.e4m3_to_float32``, NaNs included, which decode() takes for
    large tensors) times the block's scale as decode() stores it in float32; None where that does not apply."""
    if not e4m3_rows(enc):
        return None
    sc = enc.spec.scaling
    table = _codecs._table(enc.spec.format, enc.codes.device)
    scale = None if sc is None else _codecs._stored_scale(enc).reshape(enc.codes.shape[0], -1)
    return decode_table_rows(enc.codes, table, scale, 1 if sc is None else sc.block_size, out)


def decode_state(enc: Encoded, out: torch.Tensor | None = None) -> torch.Tensor:
    """``lowprec.codecs.decode(enc)`` of one state: by the native e4m3 row decode where it applies (the same
    bits; into ``out``, a float32 tensor of the codes' shape, if given), else ``decode`` (a new tensor)."""
    values = _decode_e4m3_native(enc, out)
    return decode(enc) if values is None else values


def _decode_e4m3_table(enc: Encoded) -> torch.Tensor:
    """``lowprec.codecs.decode(enc)`` with the element values from the codes' table by torch's gather and multiply
    (unpacked uint8 e4m3 codes, no global scale or expansion; float32 or the state's dtype)."""
    table = _codecs._table(enc.spec.format, enc.codes.device)
    v = _codecs._lookup(enc.codes, table)
    if enc.spec.scaling is None:
        return v.to(enc.dtype)
    view, undo = _sc.to_scaling_view(v, enc.spec.scaling)
    return undo(view.mul_(_codecs._stored_scale(enc))).to(enc.dtype)


def decode_batch(codes: torch.Tensor, scale: torch.Tensor | None, spec: QuantSpec, dtype: torch.dtype, small: bool,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """The values of a batch of rows (``codes`` ``[rows, n]``, one ``scale`` per block along them, ``spec`` a row
    spec of ``_row_spec``): ``decode_rows``'s buffer; ``small``: every tensor of the batch has fewer than
    ``_codecs._SMALL`` codes (what ``decode()`` of each alone would branch on); ``out``: a float32 ``[rows, n]``
    buffer to write them into (returned)."""
    batch = Encoded(codes, scale, spec, codes.shape, dtype, None, False)
    values = _decode_e4m3_native(batch, out)   # any size: the table's bits are the arithmetic's
    if values is None:
        if (torch_dtype(spec.format) == torch.float8_e4m3fn and codes.device.type == "cpu"
                and codes.dtype == torch.uint8 and small):
            # decode() of each tensor alone reads e4m3 codes of fewer than _SMALL elements from its 256-entry
            # table (larger ones by lowprec.rounding.e4m3_to_float32): the batch uses that table too (the same
            # bits; also much faster than the arithmetic at the batch's size)
            values = _decode_e4m3_table(batch)
        else:
            values = decode(batch)
        if out is not None:
            values = out.copy_(values)
    return values


def decode_rows(encs: list[Encoded], *, codes: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                keep: dict | None = None) -> list[torch.Tensor]:
    """``[decode(e) for e in encs]`` in one call (``encs`` from ``encode_rows`` or the per-tensor path with one
    batchable spec, dtype, device and last dimension, unpacked, without a global scale), as views of one buffer.
    ``codes``/``scale``: the batch those codes were split from (``encode_rows``'s ``keep``; not concatenated
    again); ``keep`` receives the values buffer as ``values``."""
    e0 = encs[0]
    n = e0.shape[-1]
    if codes is None:
        codes = torch.cat([e.codes.reshape(-1, n) for e in encs]) if len(encs) > 1 else e0.codes.reshape(-1, n)
        if e0.scale is not None:
            nb = e0.scale.shape[-1]
            scale = torch.cat([e.scale.reshape(-1, nb) for e in encs]) if len(encs) > 1 else e0.scale.reshape(-1, nb)
    small = max(e.codes.numel() for e in encs) < _codecs._SMALL
    values = decode_batch(codes, scale, _row_spec(e0.spec, n), e0.dtype, small)
    if keep is not None:
        keep["values"] = values
    pieces = values.split([e.codes.numel() // n for e in encs])    # (rows, n): a 2-D tensor's own shape
    return [v if v.shape == e.shape else v.view(e.shape) for v, e in zip(pieces, encs)]


class BatchReadback:
    """Per-tensor ``decode(enc)`` and ``element_scale(enc, ...)`` of the ``Encoded`` of one ``encode_rows`` call,
    computed once for the whole batch on first use (telemetry of a sampled step, or a non-saturating state's
    overflow check): views of one buffer, the same values."""

    def __init__(self, encs: list[Encoded], codes: torch.Tensor, scale: torch.Tensor | None) -> None:
        self.encs, self.codes, self.scale = encs, codes, scale
        self._values: list[torch.Tensor] | None = None
        self._buf: torch.Tensor | None = None
        self._scales: list[torch.Tensor] | None = None

    def value(self, j: int) -> torch.Tensor:
        if self._values is None:
            out: dict[str, torch.Tensor] = {}
            self._values = decode_rows(self.encs, codes=self.codes, scale=self.scale, keep=out)
            self._buf = out["values"]
        return self._values[j]

    def element_scale(self, j: int) -> torch.Tensor:
        if self._scales is None:
            self.value(0)
            e0 = self.encs[0]
            n = e0.shape[-1]
            batch = Encoded(self.codes, self.scale, _row_spec(e0.spec, n), self.codes.shape, e0.dtype, None, False)
            self._scales = _pieces(_codecs.element_scale(batch, self._buf), [e.shape for e in self.encs])
        return self._scales[j]


# ---------------------------------------------------------------------------------------------------------------
# Segmented quantization: ``[quantize_with_scale(x, spec, generator) for x in xs]`` (in that order) in one pass.
#
# Used by ``lowprec.optim`` for the gradients and the master weights of a step. Unlike ``quantize_rows`` it also
# takes tensor/delayed scaling (one scale per tensor: a segment amax), E4M3 block scales with their per-tensor
# global scale (NVFP4) and stochastic rounding. Why it is bit-identical to the per-tensor calls:
#
# * every step of the reference is elementwise once the scales are known (division by the scale, rounding,
#   zero-scale mask, product, final cast), and the scales are elementwise functions of amaxes; a maximum is exact
#   in any order, so a tensor's (or block's) amax taken over the batch equals the one taken alone;
# * stochastic rounding draws ``ceil(n / 2)`` int64 words per call (``lowprec.rounding.random_bits`` /
#   ``_stochastic_float``: one ``random_`` of a CPU generator, which fills its tensor serially, one word per
#   element) and uses the first ``n`` int32 halves. A tensor of odd size is given one padding element in the batch,
#   so that each tensor's draws start at the word where its own call would start: the batch consumes the same words
#   in the same order. (CUDA generators advance by launch geometry, not per word: stochastic batches are CPU only.)
# ---------------------------------------------------------------------------------------------------------------

_STOCHASTIC = "stochastic"


def segments_ok(spec: QuantSpec) -> bool:
    """True when :func:`quantize_segments` handles ``spec``: unscaled, tensor or delayed scaling (no history:
    the current amax), or 1-D blocks along any axis (any scale format); any element format and rounding."""
    sc = spec.scaling
    return sc is None or sc.mode in ("tensor", "delayed") or (sc.mode == "block" and sc.block_rows == 1)


def _scales_from_amax(amax: torch.Tensor, t_amax: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """``lowprec.scaling.compute_scale(...).scale`` from the groups' (float32, finite, >= 0) amaxes ``amax`` and,
    for E4M3 scales, each group's tensor amax ``t_amax`` (same shape): the same elementwise operations."""
    sc, fmt = spec.scaling, spec.format
    if sc.scale_format == "e8m0":
        return _sc.pow2(_sc.e8m0_exponent(amax, fmt, sc.scale_rounding))
    if sc.scale_format == "e4m3":
        g = t_amax / (448.0 * fmt.max)
        g = torch.where((g > 0) & torch.isfinite(g), g, torch.ones_like(g)).to(torch.float32)
        s_blk = ((amax / fmt.max) / g).clamp_(max=448.0).to(torch.float8_e4m3fn)
        return s_blk.to(torch.float32) * g
    s = amax / fmt.max
    if sc.mode == "delayed":
        s = s * 2.0 ** sc.margin
    if fmt.emax >= 127:
        s = s.clamp_(min=2.0**-126)
        s = torch.where(amax / s > fmt.max, torch.nextafter(s, torch.full_like(s, float("inf"))), s)
    return torch.where((s > 0) & torch.isfinite(s), s, torch.ones_like(s))


_SEG_CACHE: dict[tuple, torch.Tensor] = {}


def _segment_ids(lengths: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """int64 segment index of every element of a batch of segments of ``lengths`` (cached per layout)."""
    key = (lengths, str(device))
    ids = _SEG_CACHE.get(key)
    if ids is None:
        if len(_SEG_CACHE) > 256:
            _SEG_CACHE.clear()
        ids = _SEG_CACHE[key] = torch.repeat_interleave(
            torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    return ids


class Segments:
    """The result of :func:`quantize_segments`: ``q[i]`` (shape and dtype of ``xs[i]``) and ``scale(i)``, the
    float32 scale broadcastable to ``xs[i]`` as ``quantize_with_scale`` returns it (None when unscaled; block
    scales expanded to the tensor's shape; computed on demand, only telemetry reads it)."""

    def __init__(self, q: list[torch.Tensor], scale_fn) -> None:
        self.q = q
        self._scale_fn = scale_fn

    def scale(self, i: int) -> torch.Tensor | None:
        return None if self._scale_fn is None else self._scale_fn(i)


def quantize_segments(xs: list[torch.Tensor], spec: QuantSpec,
                      generator: torch.Generator | None = None) -> Segments | None:
    """``[quantize_with_scale(x, spec, generator) for x in xs]``, called in this order, in one pass (bit for bit,
    the generator left in the same state; see above). ``xs``: at least 1-dim, non-empty, one dtype and device;
    ``spec``: :func:`segments_ok`. None (and no random bits drawn) when the batch cannot reproduce the per-tensor
    draws (stochastic rounding off the CPU, or blocks of odd length)."""
    sto = getattr(spec.rounding, "value", spec.rounding) == _STOCHASTIC
    dev = xs[0].device
    if sto and dev.type != "cpu":
        return None
    sc = spec.scaling
    if sc is None:
        return _unscaled(xs, spec, generator, sto)
    if sc.mode != "block":
        return _per_tensor_scaled(xs, spec, generator, sto)
    return _blocks(xs, spec, generator, sto)


def _flat(xs: list[torch.Tensor], pad_odd: bool, dtype: torch.dtype | None = None):
    """One flat buffer of ``xs`` (a zero after each odd-sized tensor but the last when ``pad_odd``): (buffer,
    offsets, slot lengths)."""
    parts, offs, lens, o = [], [], [], 0
    last = len(xs) - 1
    for i, x in enumerate(xs):
        n = x.numel()
        x = x.reshape(-1)
        parts.append(x if dtype is None or x.dtype == dtype else x.to(dtype))
        offs.append(o)
        k = n + 1 if (pad_odd and n % 2 and i < last) else n
        if k != n:
            parts.append(parts[-1].new_zeros(1))
        lens.append(k)
        o += k
    return (torch.cat(parts) if len(parts) > 1 else parts[0]), offs, lens


def _unscaled(xs, spec, generator, sto) -> Segments:
    # in the tensors' own dtype: quantize_with_scale then applies the same dtype saturation limit and final cast
    buf, offs, _ = _flat(xs, sto)
    q, _ = quantize_with_scale(buf, spec, generator)
    return Segments(_at(q, xs, offs), None)


def _at(buf: torch.Tensor, xs: list[torch.Tensor], offs: list[int]) -> list[torch.Tensor]:
    """Views of contiguous 1-D ``buf`` shaped like ``xs`` at element offsets ``offs`` (one view op each)."""
    base = buf.storage_offset()
    return [buf.as_strided(x.shape, _strides(x.shape), base + o) for x, o in zip(xs, offs)]


def _round_elements(y: torch.Tensor, spec: QuantSpec, generator) -> torch.Tensor:
    """The rounding of ``lowprec.quantize.scale_and_round`` for already scaled float32 ``y`` (float32 result)."""
    el = scale_and_round(y, _unscaled_spec(spec), generator).elements
    return el


def _unscaled_spec(spec: QuantSpec) -> QuantSpec:
    return dataclasses.replace(spec, scaling=None)


def _per_tensor_scaled(xs, spec, generator, sto) -> Segments:
    buf, offs, lens = _flat(xs, sto, torch.float32)
    native = None if sto else tensor_scaled_segments(buf, lens, spec)
    if native is not None:   # one native pass per tensor (fp32 scales, nearest / toward_zero; the same bits)
        q, scale = native
        out = [v if v.dtype == x.dtype else v.to(x.dtype) for v, x in zip(_at(q, xs, offs), xs)]
        return Segments(out, lambda i: scale[i:i + 1].reshape([1] * xs[i].dim()))
    ids = _segment_ids(tuple(lens), buf.device)
    a = buf.abs().nan_to_num_(nan=0.0, posinf=0.0)
    amax = torch.zeros(len(xs), dtype=torch.float32, device=buf.device).scatter_reduce_(0, ids, a, "amax")
    scale = _scales_from_amax(amax, amax, spec)          # tensor mode: the tensor amax is the group amax
    # (the zero guard and mask taken per tensor, then spread: the same values per element)
    el = _round_elements(buf / _sc.nonzero(scale).index_select(0, ids), spec, generator)
    if spec.scaling.scale_format == "e4m3":
        el = el.mul_((scale != 0).index_select(0, ids))
    q = el.mul_(scale.index_select(0, ids))
    out = [v if v.dtype == x.dtype else v.to(x.dtype) for v, x in zip(_at(q, xs, offs), xs)]
    return Segments(out, lambda i: scale[i:i + 1].reshape([1] * xs[i].dim()))


def _blocks(xs, spec, generator, sto) -> Segments | None:
    sc = spec.scaling
    bs = sc.block_size
    if all(x.shape[-1] % bs == 0 and sc.axis in (-1, x.dim() - 1) for x in xs):
        if sto and any(x.numel() % 2 for x in xs[:-1]):
            return None   # an odd-sized scaling view before the last tensor: its draws cannot be aligned
        # blocks along the last axis that tile each row: the scaling view is the tensor's own memory in rows of
        # one block (no padding, no transposition), so the tensors are concatenated flat and split as they are
        buf, offs, _ = _flat(xs, False, torch.float32)
        big = buf.view(-1, bs)
        row_counts = [x.numel() // bs for x in xs]
        views = None
    else:
        views = [_sc.to_scaling_view(x.detach().float(), sc) for x in xs]
        if sto and any(v.numel() % 2 for v, _ in views[:-1]):
            return None
        bs = views[0][0].shape[-1]
        rows = [v.reshape(-1, bs) for v, _ in views]
        big = torch.cat(rows) if len(rows) > 1 else rows[0]
        row_counts = [r.shape[0] for r in rows]
    amax = _sc.finite_amax(big, dim=-1, keepdim=True).to(torch.float32)
    t_amax = None
    if sc.scale_format == "e4m3":
        ids = _segment_ids(tuple(row_counts), big.device)
        tmax = torch.zeros(len(xs), dtype=torch.float32, device=big.device).scatter_reduce_(
            0, ids, amax.view(-1), "amax")
        t_amax = tmax.index_select(0, ids).view(-1, 1)
    scale = _scales_from_amax(amax, t_amax, spec)         # (rows, 1)
    el = _round_elements(big / _sc.nonzero(scale), spec, generator)
    if sc.scale_format == "e4m3":
        el = el.mul_(scale != 0)
    q = el.mul_(scale)
    starts, r = [], 0
    for k in row_counts:
        starts.append(r)
        r += k
    if views is None:
        out = [v if v.dtype == x.dtype else v.to(x.dtype) for v, x in zip(_at(q.view(-1), xs, offs), xs)]

        def scale_of(i: int) -> torch.Tensor:
            s0, k = starts[i], row_counts[i]
            return scale[s0:s0 + k].expand(k, bs).reshape(xs[i].shape)
        return Segments(out, scale_of)
    out = []
    for x, (v, undo), s0, k in zip(xs, views, starts, row_counts):
        out.append(undo(q[s0:s0 + k].view(v.shape)).to(x.dtype).view(x.shape))

    def scale_of(i: int) -> torch.Tensor:
        v, undo = views[i]
        s0, k = starts[i], row_counts[i]
        return undo(scale[s0:s0 + k].view(*v.shape[:-1], 1).expand(v.shape))
    return Segments(out, scale_of)
