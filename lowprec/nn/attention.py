"""Attention: ``QuantMultiheadAttention`` (nn.MultiheadAttention's projections quantized) and the opt-in
attention site (the two matmuls inside attention quantized).

``QuantMultiheadAttention`` runs ``nn.MultiheadAttention.forward`` unchanged under a torch function mode that
routes the ``F.linear`` calls of ``F.multi_head_attention_forward`` to quantized GEMMs: the in-projection
(``in_proj_weight`` or its q/k/v slices, or ``q/k/v_proj_weight``; telemetry site ``<name>.in_proj``) with the
module's own site, the out-projection with the ``out_proj`` child (a ``QuantLinear`` after ``convert``). Torch's
fused fast paths read the weights directly and would bypass the quantization: the no-op pre-hook of every
quantizing module (``lowprec.nn.site``) turns off ``nn.TransformerEncoderLayer``'s, the function mode
``MultiheadAttention``'s own.

The attention site (``AttentionSite``, opt-in: ``convert(..., attention=True)``) quantizes, for every
``F.scaled_dot_product_attention`` call inside the module it is attached to (and inside a converted
MultiheadAttention), the two matmuls of ``softmax(Q K^T * scale + mask) V``:

    scores  S = Q K^T     Q: activation role, K: activation role   (blocks along the head dimension)
    output  O = P V       P: activation role, V: activation role   (blocks along the key positions)
    backward              dO and dS: grad role; dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q, each operand
                          re-quantized along that GEMM's reduction axis; the softmax and its backward stay fp32.

Dropout inside attention (``dropout_p > 0``) and ``enable_gqa`` are passed to the unquantized SDPA (not modelled).
Telemetry sites: ``<name>.qk:activation`` / ``<name>.qk:grad`` and ``<name>.pv:...``. Only SDPA calls are seen:
attention written with ``torch.matmul`` (e.g. Hugging Face ``attn_implementation="eager"``) stays fp32.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from lowprec.gemm import Operand
from lowprec.nn.linear import QuantLinear, linear
from lowprec.nn.site import QuantModule, Site, axis_free
from lowprec.policy import PrecisionPolicy
from lowprec.telemetry import Telemetry

__all__ = ["QuantMultiheadAttention", "AttentionSite", "QuantMatmul", "quantized_matmul"]


class QuantMatmul(torch.autograd.Function):
    """``QuantMatmul.apply(a, b, site, name)``: ``a [..., M, K] @ b [..., K, N]`` with both operands quantized per
    the activation role and, in the backward, the incoming gradient per the grad role (module docstring)."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, site: Site, name: str) -> torch.Tensor:
        qa = site.quant(a, "activation", -1, record=True, channel_axis=-2)
        qb = site.quant(b, "activation", -2, record=True, channel_axis=-1)
        ctx.site = site
        ctx.save_for_backward(a, b, qa.q, qb.q)
        return qa.q @ qb.q

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        site: Site = ctx.site
        a, b, qaq, qbq = ctx.saved_tensors
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:   # dA [M, K] = dC [M, N] @ B^T [N, K]: reduction over N
            qg = site.quant(g, "grad", -1, record=True, channel_axis=-2).q
            qb = qbq if axis_free(site.specs["activation"]) else site.quant(b, "activation", -1, False, -2).q
            grad_a = qg @ qb.transpose(-1, -2)
        if ctx.needs_input_grad[1]:   # dB [K, N] = A^T [K, M] @ dC [M, N]: reduction over M
            qg = site.quant(g, "grad", -2, record=not ctx.needs_input_grad[0], channel_axis=-1).q
            qa = qaq if axis_free(site.specs["activation"]) else site.quant(a, "activation", -2, False, -1).q
            grad_b = qa.transpose(-1, -2) @ qg
        return grad_a, grad_b, None, None


def quantized_matmul(a: torch.Tensor, b: torch.Tensor, site: Site) -> torch.Tensor:
    """``a @ b`` (batched) through :class:`QuantMatmul` in fp32, returned in ``a``'s dtype."""
    out_dtype = torch.result_type(a, b)
    return QuantMatmul.apply(a.float(), b.float(), site, site.name).to(out_dtype)


class AttentionSite:
    """The two quantized matmuls of attention (module docstring): ``qk`` and ``pv`` sites of one policy."""

    def __init__(self, policy: PrecisionPolicy | str, name: str = "attention", telemetry: Telemetry | None = None,
                 rule: str | None = None) -> None:
        policy = PrecisionPolicy.parse(policy)
        if policy.accumulator is not None:
            raise ValueError("the attention site does not emulate an accumulator")
        self.name = name
        self.qk = Site(policy, "emulated", f"{name}.qk", telemetry, rule=rule)
        self.pv = Site(policy, "emulated", f"{name}.pv", telemetry, rule=rule)

    @property
    def noop(self) -> bool:
        return self.qk.noop

    def sdpa(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
             dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
             enable_gqa: bool = False) -> torch.Tensor:
        """``F.scaled_dot_product_attention`` with its two matmuls quantized (the math of torch's reference)."""
        if self.noop or dropout_p > 0.0 or enable_gqa:
            return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                                  is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        L, S = query.shape[-2], key.shape[-2]
        s = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
        scores = quantized_matmul(query, key.transpose(-1, -2), self.qk) * s
        if is_causal:
            causal = torch.ones(L, S, dtype=torch.bool, device=query.device).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            else:
                scores = scores + attn_mask
        p = torch.softmax(scores.float(), dim=-1).to(query.dtype)
        return quantized_matmul(p, value, self.pv)


class _Router(TorchFunctionMode):
    """Routes a QuantMultiheadAttention's F.linear calls and (when it has one) SDPA calls to quantized ones."""

    def __init__(self, mha: "QuantMultiheadAttention") -> None:
        super().__init__()
        self.mha = mha

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        mha = self.mha
        if func is F.linear:
            x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            if mha.is_in_proj(w):
                return linear(x, w, b, mha.site, mha.training)
            out = mha.out_proj
            if w is out.weight and isinstance(out, QuantModule):
                return linear(x, w, b, out.site, out.training)
        if func is F.scaled_dot_product_attention and mha.attention is not None:
            return mha.attention.sdpa(*args, **kwargs)
        return func(*args, **kwargs)


class QuantMultiheadAttention(QuantModule, nn.MultiheadAttention):
    """nn.MultiheadAttention whose in-projection GEMMs are quantized per ``policy`` (the out-projection is the
    ``out_proj`` child's, a QuantLinear once converted); ``attention`` is an optional :class:`AttentionSite`."""

    _kind = "multihead_attention"

    def __init__(self, *args, policy: PrecisionPolicy | str = "fp32", backend: str = "auto", name: str = "",
                 telemetry: Telemetry | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.attention: AttentionSite | None = None
        self.configure(policy, backend=backend, name=name, telemetry=telemetry)

    def _make_site(self, policy: PrecisionPolicy, backend: str, name: str, telemetry: Telemetry | None,
                   rule: str | None) -> Site:
        return Site(policy, backend, f"{name}.in_proj", telemetry, rule=rule)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention, policy: PrecisionPolicy | str, *, backend: str = "auto",
                 name: str = "", telemetry: Telemetry | None = None,
                 rule: str | None = None) -> "QuantMultiheadAttention":
        """A QuantMultiheadAttention sharing ``mha``'s Parameter objects and its ``out_proj`` module."""
        with torch.device("meta"):
            new = cls(mha.embed_dim, mha.num_heads, dropout=mha.dropout, bias=mha.in_proj_bias is not None,
                      add_bias_kv=mha.bias_k is not None, add_zero_attn=mha.add_zero_attn, kdim=mha.kdim,
                      vdim=mha.vdim, batch_first=mha.batch_first)
        for pname, p in mha.named_parameters(recurse=False):
            setattr(new, pname, p)
        new.out_proj = mha.out_proj
        new.train(mha.training)
        new.configure(policy, backend=backend, name=name, telemetry=telemetry, rule=rule)
        return new

    def is_in_proj(self, w: torch.Tensor) -> bool:
        """Whether ``w`` is one of this module's in-projection weights (or a slice of the packed one)."""
        own = [t for t in (self.in_proj_weight, self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
               if t is not None]
        return any(w is t or w._base is t for t in own)

    def forward(self, *args, **kwargs):
        out = self.out_proj
        quiet = self._site.noop and (not isinstance(out, QuantModule) or out.site.noop) and self.attention is None
        if quiet:
            return super().forward(*args, **kwargs)
        with _Router(self):
            return super().forward(*args, **kwargs)
