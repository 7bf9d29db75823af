"""One GEMM operand description and the choice of how to multiply two of them.

An :class:`Operand` is a quantized 2-D matrix: ``q`` (fp32 values on the format's grid times the scale), its
``scale`` (``None`` = 1; a 0-d tensor for tensor/delayed scaling, a column ``[M, 1]`` or row ``[1, N]`` for
channel scaling) and the ``spec`` it was quantized with (``None`` = full precision).

``matmul(a, b, backend, accumulator)`` computes ``a [M, K] @ b [K, N]`` in fp32 by one of three paths:

- native: ``torch._scaled_mm`` on float8 operands. The grid values are cast exactly to
  ``torch.float8_e4m3fn`` / ``float8_e5m2`` and the scales are handed over; possible when both specs are
  E4M3/E5M2 with no, tensor, delayed or channel (row-wise) scaling, no accumulator is emulated,
  ``lowprec.hardware`` says ``_scaled_mm`` runs on the device and (on CUDA) every dimension is a multiple of 16;
- accumulated: ``lowprec.accumulate.matmul`` with the policy's narrow accumulator;
- emulated: ``a.q @ b.q`` in fp32.

Native and emulated multiply the same values and both accumulate in fp32: they differ by summation order only.
``backend``: ``"auto"`` picks native where possible on a CUDA device (FP8 tensor cores) and never on the CPU,
``"native"`` insists (a RuntimeError names the reason; on the CPU too), ``"emulated"`` never uses it.

Why ``"auto"`` stays emulated on the CPU: torch's CPU ``_scaled_mm`` is a software path with no FP8 arithmetic
to gain from, never faster than the fp32 matmul of the same values and on some CPUs far slower: with tensor-wise
scales it took 480 ms for a 256 x 256 x 256 product (torch 2.13, one thread, an Intel Xeon, Sapphire Rapids) where
the fp32 matmul took 0.1 ms, and 31 s at 1024^3; with row-wise scales 1.2 ms (on an AMD EPYC a whole training step
through it was 1.73x the emulated one, README).
A converted 256 -> 256 ``fp8-all`` linear layer's forward on 512 rows took 2,632 ms through it, 0.95 ms emulated
(``python benchmarks/bench_gpu.py --device cpu --small --sections timing`` prints the GEMM rows).
"""
from __future__ import annotations

from typing import Callable

import torch

from lowprec import hardware
from lowprec.accumulate import Accumulator
from lowprec.accumulate import matmul as acc_matmul
from lowprec.formats import TORCH_DTYPES, torch_dtype
from lowprec.quantize import QuantSpec
from lowprec.scaling import nonzero

__all__ = ["Operand", "BACKENDS", "native_dtype", "native_reason", "use_native", "matmul", "scaled_mm"]

BACKENDS = ("auto", "native", "emulated")
_FLOAT8 = tuple(TORCH_DTYPES[n] for n in ("e4m3", "e5m2") if n in TORCH_DTYPES)  # what _scaled_mm multiplies


def native_dtype(spec: QuantSpec | None) -> torch.dtype | None:
    """The torch float8 dtype holding ``spec``'s element format exactly (E4M3 / E5M2, from the one map
    ``lowprec.formats.torch_dtype``), or None."""
    if spec is None:
        return None
    dt = torch_dtype(spec.format)
    return dt if dt in _FLOAT8 else None


def native_reason(spec: QuantSpec | None) -> str | None:
    """Why an operand quantized with ``spec`` cannot be a native ``_scaled_mm`` operand (None if it can)."""
    if spec is None:
        return "operand not quantized"
    if native_dtype(spec) is None:
        return f"format {spec.format.name} is not E4M3/E5M2"
    sc = spec.scaling
    if sc is not None and sc.mode not in ("tensor", "channel", "delayed"):
        return f"{sc.mode} scaling (native needs none, tensor, delayed or channel/row-wise)"
    return None


class Operand:
    """A quantized 2-D GEMM operand: values ``q``, its ``scale`` (None = 1) and ``spec`` (None = unquantized).

    ``scale_fn`` (instead of ``scale``): a function computing the scale when ``scale`` is first read (block scales
    expanded to ``q``'s shape cost a full-size tensor that an emulated GEMM never reads)."""

    __slots__ = ("q", "_scale", "_scale_fn", "spec")

    def __init__(self, q: torch.Tensor, scale: torch.Tensor | None, spec: QuantSpec | None,
                 scale_fn: Callable[[], torch.Tensor | None] | None = None):
        self.q, self._scale, self._scale_fn, self.spec = q, scale, scale_fn, spec

    @property
    def scale(self) -> torch.Tensor | None:
        if self._scale_fn is not None:
            self._scale, self._scale_fn = self._scale_fn(), None
        return self._scale

    def t(self) -> "Operand":
        """The transposed operand (a channel scale column becomes a row)."""
        def transposed(s: torch.Tensor | None) -> torch.Tensor | None:
            return s.t() if s is not None and s.dim() == 2 else s
        if self._scale_fn is not None:
            fn = self._scale_fn
            return Operand(self.q.t(), None, self.spec, scale_fn=lambda: transposed(fn()))
        return Operand(self.q.t(), transposed(self._scale), self.spec)


def use_native(a: Operand, b: Operand, backend: str, accumulator: Accumulator | None) -> bool:
    """Whether ``matmul(a, b, backend, accumulator)`` takes the native path (raises for an impossible
    ``backend="native"`` on this device or shape)."""
    if backend == "emulated" or accumulator is not None:
        return False
    if native_reason(a.spec) or native_reason(b.spec):
        return False
    if a.q.numel() == 0 or b.q.numel() == 0:   # an empty product is exact zeros on every path
        return False
    device = a.q.device
    if backend == "auto" and device.type != "cuda":   # the CPU's _scaled_mm is software, and far slower (above)
        return False
    rowwise = any(o.spec.scaling is not None and o.spec.scaling.mode == "channel" for o in (a, b))
    ok = hardware.scaled_mm_ok(device, rowwise=rowwise)
    if ok and device.type == "cuda":
        ok = all(d % 16 == 0 for d in (*a.q.shape, b.q.shape[1]))
    if not ok and backend == "native":
        raise RuntimeError(f"backend='native': torch._scaled_mm unavailable for shapes {tuple(a.q.shape)} x "
                           f"{tuple(b.q.shape)} on {device}: {hardware.probe()}")
    return ok


def matmul(a: Operand, b: Operand, backend: str = "auto", accumulator: Accumulator | None = None) -> torch.Tensor:
    """``a [M, K] @ b [K, N]`` in fp32 by the native, accumulated or emulated path (module docstring), as a new
    tensor of its own (callers may write into it)."""
    if use_native(a, b, backend, accumulator):
        return scaled_mm(a, b)
    if accumulator is not None:
        return acc_matmul(a.q, b.q, accumulator)
    return a.q @ b.q


def _to_fp8(op: Operand) -> tuple[torch.Tensor, torch.Tensor | None]:
    if op.scale is None:
        q = op.q
    else:  # grid values, so the cast below is exact; a zero scale (all-zero tensor) must not give 0/0
        q = op.q / nonzero(op.scale)
    return q.to(native_dtype(op.spec)), op.scale


def scaled_mm(a: Operand, b: Operand) -> torch.Tensor:
    """``torch._scaled_mm`` of two native-capable operands (their grid values cast to float8), fp32 out."""
    a8, sa = _to_fp8(a)
    b8, sb = _to_fp8(b)
    M, N = a8.shape[0], b8.shape[1]
    rowwise = (sa is not None and sa.numel() > 1) or (sb is not None and sb.numel() > 1)
    dev = a8.device
    if rowwise:  # per row of a, per column of b
        sa = torch.ones(M, device=dev) if sa is None else sa.float().expand(M, a8.shape[1])[:, 0].clone()
        sb = torch.ones(N, device=dev) if sb is None else sb.float().expand(b8.shape[0], N)[0, :].clone()
        sa, sb = sa.reshape(M, 1), sb.reshape(1, N)   # fresh storage: _scaled_mm wants unit strides
    else:
        sa = torch.ones((), device=dev) if sa is None else sa.float().reshape(())
        sb = torch.ones((), device=dev) if sb is None else sb.float().reshape(())
    return torch._scaled_mm(a8.contiguous(), b8.t().contiguous().t(), scale_a=sa, scale_b=sb,
                            out_dtype=torch.float32)
