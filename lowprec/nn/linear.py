"""Quantized linear layers: ``QuantLinear`` (``nn.Linear`` and its subclasses) and ``QuantHFConv1D`` (the
Hugging Face GPT-2 ``Conv1D``: a linear layer whose weight is stored transposed, ``[in, out]``).

Both run the three GEMMs of :mod:`lowprec.nn.function` with the ``LINEAR`` table (x ``[M, K]``, W ``[N, K]``):
forward reduces over K, grad-input over N, grad-weight over the M token rows. Under a policy that quantizes
nothing they call the original module's arithmetic (``F.linear`` / ``torch.addmm``): bit-for-bit unchanged.
Parameters are the same objects as the module they replace, and ``state_dict`` keys are unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowprec.nn.function import LINEAR, QuantGemm
from lowprec.nn.site import QuantModule, Site
from lowprec.policy import PrecisionPolicy
from lowprec.telemetry import Telemetry

__all__ = ["QuantLinear", "QuantHFConv1D", "linear", "is_hf_conv1d"]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, site: Site,
           training: bool = True) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` (weight ``[out, in]``) with its three GEMMs quantized per ``site``.
    ``training`` says whether delayed-scaling histories record this call."""
    if site.noop:
        return F.linear(x, weight, bias)
    site.update_history = training
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    x2 = x.reshape(-1, x.shape[-1]).float()
    y = QuantGemm.apply(x2, weight.float(), None if bias is None else bias.float(), site, LINEAR, ())
    return y.reshape(*x.shape[:-1], weight.shape[0]).to(out_dtype)


class QuantLinear(QuantModule, nn.Linear):
    """nn.Linear whose three GEMMs are quantized per ``policy`` (see lowprec.nn)."""

    _kind = "linear"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 policy: PrecisionPolicy | str = "fp32", backend: str = "auto", name: str = "",
                 telemetry: Telemetry | None = None, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.configure(policy, backend=backend, name=name, telemetry=telemetry)

    @classmethod
    def from_linear(cls, lin: nn.Linear, policy: PrecisionPolicy | str, *, backend: str = "auto", name: str = "",
                    telemetry: Telemetry | None = None, rule: str | None = None) -> "QuantLinear":
        """A QuantLinear sharing ``lin``'s Parameter objects (works for subclasses of nn.Linear too)."""
        with torch.device("meta"):
            new = cls(lin.in_features, lin.out_features, lin.bias is not None)
        new.weight = lin.weight          # the same Parameter objects
        new.bias = lin.bias
        new.train(lin.training)
        new.configure(policy, backend=backend, name=name, telemetry=telemetry, rule=rule)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self._site, self.training)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self._site.backend}"


def is_hf_conv1d(mod: nn.Module) -> bool:
    """True for a Hugging Face ``Conv1D`` (GPT-2's linear layer), recognised by structure, not by import:
    class name ``Conv1D``, ints ``nx``/``nf``, a weight ``[nx, nf]`` and a bias ``[nf]``."""
    w = getattr(mod, "weight", None)
    b = getattr(mod, "bias", None)
    nx, nf = getattr(mod, "nx", None), getattr(mod, "nf", None)
    return (type(mod).__name__ == "Conv1D" and isinstance(nx, int) and isinstance(nf, int)
            and isinstance(w, torch.Tensor) and tuple(w.shape) == (nx, nf)
            and isinstance(b, torch.Tensor) and tuple(b.shape) == (nf,))


class QuantHFConv1D(QuantModule, nn.Module):
    """A Hugging Face ``Conv1D`` (weight ``[nx, nf]``, ``y = x @ W + b``) quantized exactly as a QuantLinear with
    weight ``W^T``: the weight operand's blocks run along ``nx`` (the forward's reduction axis)."""

    _kind = "conv1d_hf"

    def __init__(self, nf: int, nx: int, *, policy: PrecisionPolicy | str = "fp32", backend: str = "auto",
                 name: str = "", telemetry: Telemetry | None = None, device=None, dtype=None) -> None:
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.empty(nx, nf, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(nf, device=device, dtype=dtype))
        nn.init.normal_(self.weight, std=0.02)
        self.configure(policy, backend=backend, name=name, telemetry=telemetry)

    @classmethod
    def from_hf(cls, mod: nn.Module, policy: PrecisionPolicy | str, *, backend: str = "auto", name: str = "",
                telemetry: Telemetry | None = None, rule: str | None = None) -> "QuantHFConv1D":
        """A QuantHFConv1D sharing the Parameter objects of a module for which ``is_hf_conv1d`` holds."""
        if not is_hf_conv1d(mod):
            raise TypeError(f"{type(mod).__name__} is not a Hugging Face Conv1D (weight [nx, nf], bias [nf])")
        with torch.device("meta"):
            new = cls(mod.nf, mod.nx)
        new.weight, new.bias = mod.weight, mod.bias
        new.train(mod.training)
        new.configure(policy, backend=backend, name=name, telemetry=telemetry, rule=rule)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._site.noop:   # the original Conv1D arithmetic, bit for bit
            size_out = x.size()[:-1] + (self.nf,)
            return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)
        return linear(x, self.weight.t(), self.bias, self._site, self.training)

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}, policy={self._site.policy}, backend={self._site.backend}"
