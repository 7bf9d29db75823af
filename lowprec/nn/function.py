"""One autograd function for every weight layer: three labelled GEMMs described by a :class:`GemmTable`.

A layer with input ``x``, weight ``W`` and output ``y`` runs (the microxcaling ``mx/linear.py`` pattern):

    forward      y  = Q_act(x)  (*) Q_w(W)     the table's ``x_fwd`` / ``w_fwd`` axes
    grad-input   dx = Q_grad(dy) (*) Q_w(W)     ``g_dgrad`` / ``w_dgrad``
    grad-weight  dW = Q_grad(dy) (*) Q_act(x)   ``g_wgrad`` / ``x_wgrad``

where ``(*)`` is the layer's product (a matmul for Linear, a convolution for Conv) and each operand is quantized
along that GEMM's own reduction axis (:class:`Axes`). The table's ``forward`` / ``grad_input`` / ``grad_weight``
compute the products from quantized :class:`lowprec.gemm.Operand` s; the bias is added in fp32 inside the forward
and its gradient is the fp32 sum of the unquantized ``dy`` over ``bias_dims`` (as Transformer Engine does).

Inputs arrive in fp32 in the layer's own layout (layers reshape / cast outside, so autograd casts gradients back).
A second backward GEMM re-quantizes ``dy`` only when its spec depends on the axis or is stochastic; the grad
telemetry is recorded once per backward.

Random Hadamard transform (``policy.wgrad_rht = n``, tables with ``rht=True``: the linear layers): before the
grad-weight GEMM ``dW = dy^T x`` is quantized, both operands are multiplied, in blocks of ``n`` rows along the
token axis it reduces over, by ``H S`` (``H`` the n x n Sylvester Hadamard matrix over sqrt(n), ``S`` a diagonal
of random signs drawn from torch's global RNG once per backward and shared by the two operands). Since
``(H S)(H S)^T = I`` the product is unchanged before quantization; outliers are spread over the block. This is
Transformer Engine's NVFP4 recipe ("Random Hadamard Transform": 16 x 16, "only for wgrad GEMM"; TE docs
``features/low_precision_training/nvfp4``; arXiv 2509.25149). A ragged last block is padded with zero rows.
Delayed specs quantize the transformed operands with the step's scale already taken from the history.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lowprec.gemm import Operand
from lowprec.nn.site import quantized_region, Site, axis_free, delayed_scale_of, is_delayed

__all__ = ["Axes", "GemmTable", "QuantGemm", "hadamard", "random_hadamard_rows"]


def hadamard(n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The n x n Sylvester Hadamard matrix divided by sqrt(n) (orthogonal; n a power of two), float32."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard size is a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float32, device=device)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n ** 0.5


def random_hadamard_rows(t: torch.Tensor, hs: torch.Tensor) -> torch.Tensor:
    """``t [M, C]`` with every block of ``n`` consecutive rows ``u`` replaced by ``(H S)^T u`` (``hs = H S``,
    ``n x n``); rows are zero-padded to a multiple of ``n`` (the result has ``ceil(M / n) * n`` rows)."""
    n = hs.shape[0]
    pad = (-t.shape[0]) % n
    if pad:
        t = torch.nn.functional.pad(t, (0, 0, 0, pad))
    return (hs.t() @ t.reshape(-1, n, t.shape[1])).reshape(-1, t.shape[1])


@dataclass(frozen=True)
class Axes:
    """Where an operand's GEMM reduces (block scaling runs along ``reduce``) and which axis keeps one scale per
    index under channel scaling (``None``: the other axis of a 2-D operand)."""

    reduce: int
    channel: int | None = None


@dataclass(frozen=True)
class GemmTable:
    """A layer's three GEMMs: operand axes per GEMM and the products (module docstring).

    ``forward(site, qx, qw, bias, args)``, ``grad_input(site, qg, qw, x, args)`` and
    ``grad_weight(site, qg, qx, w, args)`` return fp32 tensors; ``x`` / ``w`` give the shapes."""

    x_fwd: Axes
    w_fwd: Axes
    g_dgrad: Axes
    w_dgrad: Axes
    g_wgrad: Axes
    x_wgrad: Axes
    forward: Callable[..., torch.Tensor]
    grad_input: Callable[..., torch.Tensor]
    grad_weight: Callable[..., torch.Tensor]
    bias_dims: tuple[int, ...]
    rht: bool = False
    """Whether ``policy.wgrad_rht`` applies: 2-D operands whose grad-weight GEMM reduces over axis 0."""
    strided: bool = False
    """Whether the products take strided operands (``Site.quant(contiguous=False)``: blocks along a leading axis
    without a transposing copy); a plain matmul does, and gives the same bits (tests/lowprec/test_lazy_scale.py)."""


class QuantGemm(torch.autograd.Function):
    """``QuantGemm.apply(x, weight, bias, site, table, args)``: fp32 in, fp32 out (module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, site: Site,
                table: GemmTable, args: tuple) -> torch.Tensor:
        with quantized_region():
            qx = site.quant(x, "activation", table.x_fwd.reduce, record=True, channel_axis=table.x_fwd.channel)
            qw = site.quant(weight, "weight", table.w_fwd.reduce, record=True, channel_axis=table.w_fwd.channel)
            y = table.forward(site, qx, qw, bias, args)
        ctx.site, ctx.table, ctx.args = site, table, args
        ctx.update_history = site.update_history   # the backward records grad amaxes iff this forward did
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, qx.q, qw.q, _kept_scale(qx), _kept_scale(qw))
        return y

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        site: Site = ctx.site
        table: GemmTable = ctx.table
        site.update_history = ctx.update_history
        x, w, qxq, qwq, qxs, qws = ctx.saved_tensors
        g = gy.float()
        grad_x = grad_w = grad_b = None
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        c = not table.strided   # operands along a leading axis as strided views where the products take them
        qg = None
        if need_x:
            a = table.g_dgrad
            qg = site.quant(g, "grad", a.reduce, record=True, channel_axis=a.channel, contiguous=c)
            b = table.w_dgrad
            qw = site.requant(w, "weight", qwq, qws, b.reduce, channel_axis=b.channel, contiguous=c)
            grad_x = table.grad_input(site, qg, qw, x, ctx.args)
        if need_w and table.rht and site.wgrad_rht:
            hs = hadamard(site.wgrad_rht, g.device)
            hs = hs * (torch.randint(0, 2, (hs.shape[0],), device=g.device) * 2 - 1).to(hs.dtype)
            gt, xt = random_hadamard_rows(g, hs), random_hadamard_rows(x, hs)
            qgw = site.quant(gt, "grad", 0, record=qg is None, delayed_scale=delayed_scale_of(qg), contiguous=c)
            qx = site.quant(xt, "activation", 0, record=False, delayed_scale=qxs, contiguous=c)
            grad_w = table.grad_weight(site, qgw, qx, w, ctx.args)
        elif need_w:
            a = table.g_wgrad
            if qg is not None and axis_free(site.specs["grad"]):
                qgw = qg
            else:
                qgw = site.quant(g, "grad", a.reduce, record=qg is None, channel_axis=a.channel,
                                 delayed_scale=delayed_scale_of(qg), contiguous=c)
            b = table.x_wgrad
            qx = site.requant(x, "activation", qxq, qxs, b.reduce, channel_axis=b.channel, contiguous=c)
            grad_w = table.grad_weight(site, qgw, qx, w, ctx.args)
        if ctx.has_bias and need_b:
            grad_b = g.sum(table.bias_dims)
        return grad_x, grad_w, grad_b, None, None, None


def _kept_scale(op: Operand) -> torch.Tensor | None:
    """The scale the backward reads again (``Site.requant``): an axis-free operand's (it is reused as it is) or a
    delayed one's (the step's scale); None otherwise, so a block scale is never expanded just to be saved."""
    return op.scale if axis_free(op.spec) or is_delayed(op.spec) else None


def _linear_forward(site: Site, qx: Operand, qw: Operand, bias: torch.Tensor | None, args: tuple) -> torch.Tensor:
    y = site.gemm(qx, qw.t())                      # y [M, N] = x [M, K] @ W^T [K, N]
    return y if bias is None else y.add_(bias)     # (the GEMM's own new tensor: the same sums, no second buffer)


def _linear_grad_input(site: Site, qg: Operand, qw: Operand, x: torch.Tensor, args: tuple) -> torch.Tensor:
    return site.gemm(qg, qw)                       # dx [M, K] = dy [M, N] @ W [N, K]


def _linear_grad_weight(site: Site, qg: Operand, qx: Operand, w: torch.Tensor, args: tuple) -> torch.Tensor:
    return site.gemm(qg.t(), qx)                   # dW [N, K] = dy^T [N, M] @ x [M, K]


LINEAR = GemmTable(x_fwd=Axes(1), w_fwd=Axes(1), g_dgrad=Axes(1), w_dgrad=Axes(0), g_wgrad=Axes(0),
                   x_wgrad=Axes(0), forward=_linear_forward, grad_input=_linear_grad_input,
                   grad_weight=_linear_grad_weight, bias_dims=(0,), rht=True, strided=True)
"""x [M, K], W [N, K], dy [M, N] (2-D: layers flatten the leading dims)."""

__all__ += ["LINEAR"]
