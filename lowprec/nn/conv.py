"""Quantized convolutions ``QuantConv1d`` / ``QuantConv2d`` / ``QuantConv3d`` (emulated only).

A convolution is three GEMMs of the implicit im2col, each operand quantized along its own reduction axis
(the :mod:`lowprec.nn.function` table built by ``conv_table(n)``; n spatial dims, x ``[B, C, *S]``,
W ``[O, C/groups, *k]``, dy ``[B, O, *S']``):

    forward   y  = sum_{c,k} x W       block along c (x axis 1, W axis 1); channel: per sample of x, per o of W
    grad-in   dx = sum_{o,k} dy W      block along o (dy axis 1, W axis 0); channel: per sample of dy, per c of W
    grad-w    dW = sum_{b,S} dy x      block along the last spatial axis of both; channel: per o of dy, per c of x

Only numeric padding with ``padding_mode="zeros"`` is converted (``convertible``); there is no native FP8
convolution and no accumulator emulation for convolutions (both refused in ``configure``).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from lowprec.gemm import Operand
from lowprec.nn.function import Axes, GemmTable, QuantGemm
from lowprec.nn.site import QuantModule, Site
from lowprec.policy import PrecisionPolicy
from lowprec.telemetry import Telemetry

__all__ = ["QuantConv1d", "QuantConv2d", "QuantConv3d", "conv_table", "QUANT_CONV", "unconvertible_reason"]

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _bwd(gq: torch.Tensor, x: torch.Tensor, w: torch.Tensor, args: tuple, mask: list[bool]):
    stride, padding, dilation, groups = args
    return torch.ops.aten.convolution_backward(gq, x, w, None, list(stride), list(padding), list(dilation),
                                               False, [0] * len(stride), groups, mask)


def _forward(n: int, site: Site, qx: Operand, qw: Operand, bias: torch.Tensor | None, args: tuple):
    stride, padding, dilation, groups = args
    return _CONV_FN[n](qx.q, qw.q, bias, stride, padding, dilation, groups)


def _grad_input(site: Site, qg: Operand, qw: Operand, x: torch.Tensor, args: tuple) -> torch.Tensor:
    return _bwd(qg.q, x, qw.q, args, [True, False, False])[0]


def _grad_weight(site: Site, qg: Operand, qx: Operand, w: torch.Tensor, args: tuple) -> torch.Tensor:
    return _bwd(qg.q, qx.q, w, args, [False, True, False])[1]


@functools.lru_cache(maxsize=None)
def conv_table(n: int) -> GemmTable:
    """The GEMM table of an n-d convolution (module docstring)."""
    last = n + 1
    return GemmTable(x_fwd=Axes(1, 0), w_fwd=Axes(1, 0), g_dgrad=Axes(1, 0), w_dgrad=Axes(0, 1),
                     g_wgrad=Axes(last, 1), x_wgrad=Axes(last, 1), forward=functools.partial(_forward, n),
                     grad_input=_grad_input, grad_weight=_grad_weight, bias_dims=(0, *range(2, n + 2)))


def unconvertible_reason(conv: nn.Module) -> str | None:
    """Why a convolution stays in full precision (None if it can be converted)."""
    if isinstance(conv, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return "transposed convolutions are not supported"
    if isinstance(conv.padding, str):
        return f"string padding {conv.padding!r} is not supported (use numbers)"
    if conv.padding_mode != "zeros":
        return f"padding_mode {conv.padding_mode!r} is not supported (only 'zeros')"
    return None


class _QuantConvNd(QuantModule):
    """The shared body of QuantConv1d/2d/3d (``_n`` spatial dims)."""

    _n = 2
    _kind = "conv"

    def __init__(self, *args, policy: PrecisionPolicy | str = "fp32", backend: str = "auto", name: str = "",
                 telemetry: Telemetry | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        reason = unconvertible_reason(self)
        if reason:
            raise ValueError(f"{type(self).__name__}: {reason}")
        self.configure(policy, backend=backend, name=name, telemetry=telemetry)

    def _make_site(self, policy: PrecisionPolicy, backend: str, name: str, telemetry: Telemetry | None,
                   rule: str | None) -> Site:
        if backend == "native":
            raise ValueError(f"backend='native' is not available for {type(self).__name__[5:]}; "
                             "use 'auto' or 'emulated'")
        site = Site(policy, "emulated", name, telemetry, rule=rule)
        if site.accumulator is not None:
            raise ValueError("accumulator emulation is implemented for Linear layers only, not convolutions")
        return site

    @classmethod
    def convertible(cls, conv: nn.Module) -> bool:
        return unconvertible_reason(conv) is None

    @classmethod
    def from_conv(cls, conv: nn.Module, policy: PrecisionPolicy | str, *, backend: str = "auto", name: str = "",
                  telemetry: Telemetry | None = None, rule: str | None = None):
        """A quantized convolution sharing ``conv``'s Parameter objects (``backend="native"`` runs emulated)."""
        reason = unconvertible_reason(conv)
        if reason:
            raise ValueError(f"{cls.__name__} cannot convert this convolution: {reason}")
        with torch.device("meta"):
            new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode)
        new.weight = conv.weight
        new.bias = conv.bias
        new.train(conv.training)
        new.configure(policy, backend="auto" if backend == "native" else backend, name=name, telemetry=telemetry,
                      rule=rule)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        site = self._site
        if site.noop:
            return super().forward(x)
        site.update_history = self.training
        out_dtype = torch.result_type(x, self.weight)
        args = (self.stride, self.padding, self.dilation, self.groups)
        y = QuantGemm.apply(x.float(), self.weight.float(), None if self.bias is None else self.bias.float(),
                            site, conv_table(self._n), args)
        return y.to(out_dtype)


class QuantConv1d(_QuantConvNd, nn.Conv1d):
    """nn.Conv1d whose three GEMMs are quantized per ``policy`` (module docstring)."""

    _n = 1


class QuantConv2d(_QuantConvNd, nn.Conv2d):
    """nn.Conv2d whose three GEMMs are quantized per ``policy`` (module docstring)."""

    _n = 2


class QuantConv3d(_QuantConvNd, nn.Conv3d):
    """nn.Conv3d whose three GEMMs are quantized per ``policy`` (module docstring)."""

    _n = 3


QUANT_CONV: dict[type, type] = {nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d, nn.Conv3d: QuantConv3d}
"""The plain convolution class -> its quantized class."""
