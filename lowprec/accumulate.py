"""Matmul with an emulated low-precision accumulator.

Model: the reduction dimension K is cut into chunks of ``chunk`` elements. Each chunk's dot products are
computed in fp32 (the products of two FP8/bf16 values are exact in fp32 and a short chunk adds little error), then
added to a running accumulator that is rounded to the accumulator format after every chunk:

    acc = round(acc + A[:, k:k+chunk] @ B[k:k+chunk, :])

``chunk=1`` rounds after every single product (a fully sequential narrow accumulator). With ``promote=P`` the
narrow accumulator is added to an fp32 total and restarted every P elements of K — the "promotion" of Hopper FP8
tensor cores / DeepSeek-V3 (narrow chains of 32 to 128, then fp32).

Profiles: ``"fp16"``, ``"bf16"``, and ``FP8_TENSOR_CORE`` (``e8m13``: ~13 fraction bits, the reported precision of
Hopper FP8 tensor-core accumulation, chunk 4, promoted to fp32 every 32). An fp32 accumulator reproduces
``torch.matmul`` up to summation order.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from lowprec.quantize import QuantSpec, quantize

__all__ = ["Accumulator", "matmul", "FP8_TENSOR_CORE"]


@dataclass(frozen=True)
class Accumulator:
    """An accumulator: element ``spec`` (unscaled; rounding and saturation from the spec), the chunk length
    after which partial sums are rounded, and an optional promotion interval into fp32 (None = never).

    String form: ``"fp16"``, ``"fp16:chunk32"``, ``"e8m13:chunk4:promote32"``; chunk defaults to 32.
    """

    spec: QuantSpec
    chunk: int = 32
    promote: int | None = None

    def __post_init__(self) -> None:
        spec = self.spec
        if isinstance(spec, str):
            spec = QuantSpec.parse(spec)
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"Accumulator.spec must be a QuantSpec or str, got {type(spec).__name__}")
        if spec.scaling is not None:
            raise ValueError(f"an accumulator is unscaled; got scaling {spec.scaling} in {spec}")
        if spec.format.kind != "float":
            raise ValueError(f"an accumulator must be a float format, got {spec.format.name}")
        object.__setattr__(self, "spec", spec)
        if not isinstance(self.chunk, int) or self.chunk < 1:
            raise ValueError(f"chunk must be a positive int, got {self.chunk!r}")
        if self.promote is not None and (not isinstance(self.promote, int) or self.promote < self.chunk
                                         or self.promote % self.chunk):
            raise ValueError(f"promote must be None or a multiple of chunk={self.chunk}, got {self.promote!r}")

    @classmethod
    def parse(cls, text: "str | Accumulator | QuantSpec") -> "Accumulator":
        if isinstance(text, Accumulator):
            return text
        if isinstance(text, QuantSpec):
            return cls(text)
        if not isinstance(text, str):
            raise TypeError(f"an accumulator is a str, QuantSpec or Accumulator, got {type(text).__name__}")
        chunk, promote, rest = 32, None, []
        for tok in text.strip().split(":"):
            m = re.fullmatch(r"(chunk|promote)(\d+)", tok.strip().lower())
            if m and m.group(1) == "chunk":
                chunk = int(m.group(2))
            elif m:
                promote = int(m.group(2))
            else:
                rest.append(tok)
        if not rest:
            raise ValueError(f"accumulator {text!r} names no format (e.g. 'fp16:chunk32')")
        return cls(QuantSpec.parse(":".join(rest)), chunk, promote)

    def __str__(self) -> str:
        out = f"{self.spec}"
        if self.chunk != 32:
            out += f":chunk{self.chunk}"
        if self.promote is not None:
            out += f":promote{self.promote}"
        return out


FP8_TENSOR_CORE = Accumulator(QuantSpec.parse("e8m13"), chunk=4, promote=32)


def matmul(a: torch.Tensor, b: torch.Tensor, accumulator: "Accumulator | QuantSpec | str" = "fp32",
           chunk: int | None = None, *, promote: int | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """``a @ b`` (torch.matmul broadcasting, a[..., M, K] @ b[..., K, N]) with partial sums over chunks of K
    rounded to ``accumulator`` (see module docstring). ``chunk`` / ``promote``, when given, override the
    accumulator's. Computes in fp32, returns fp32. Not differentiable (used inside lowprec.nn's backward)."""
    acc_spec = Accumulator.parse(accumulator)
    if chunk is not None or promote is not None:
        acc_spec = Accumulator(acc_spec.spec, acc_spec.chunk if chunk is None else chunk,
                               acc_spec.promote if promote is None else promote)
    if a.dim() < 1 or b.dim() < 1:
        raise ValueError("matmul needs tensors with at least one dimension")
    vec_a, vec_b = a.dim() == 1, b.dim() == 1
    a2 = a.unsqueeze(0) if vec_a else a
    b2 = b.unsqueeze(-1) if vec_b else b
    K = a2.shape[-1]
    if b2.shape[-2] != K:
        raise ValueError(f"inner dimensions differ: a has K={K}, b has K={b2.shape[-2]}")
    a2, b2 = a2.float(), b2.float()
    spec, step = acc_spec.spec, acc_spec.chunk
    group = acc_spec.promote or K
    total = None
    with torch.no_grad():
        for g0 in range(0, K, group):
            acc = None
            for k0 in range(g0, min(g0 + group, K), step):
                k1 = min(k0 + step, g0 + group, K)
                part = torch.matmul(a2[..., k0:k1], b2[..., k0:k1, :])
                acc = quantize(part if acc is None else acc + part, spec, generator=generator)
            total = acc if total is None else total + acc
    if total is None:  # K == 0
        total = torch.matmul(a2, b2)
    if vec_a:
        total = total.squeeze(-2)
    if vec_b:
        total = total.squeeze(-1)
    return total
