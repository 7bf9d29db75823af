"""Attention: ``QuantMultiheadAttention`` (nn.MultiheadAttention's projections quantized) and the opt-in
attention site (the two matmuls inside attention quantized).

``QuantMultiheadAttention`` computes ``nn.MultiheadAttention``'s math (torch's reference path: in-projection,
scaled dot-product attention, out-projection; masks, ``batch_first``, unbatched inputs, ``need_weights``) with the
in-projection GEMMs (packed ``in_proj_weight`` for self-attention as torch does, or its q/k/v slices, or
``q/k/v_proj_weight``; telemetry site ``<name>.in_proj``) on the module's own site and the out-projection on the
``out_proj`` child's (a ``QuantLinear`` after ``convert``). Under a policy quantizing nothing it calls
``nn.MultiheadAttention.forward`` itself (bit for bit). Torch's fused fast paths read the weights directly and
would bypass the quantization: ``convert`` gives an ``nn.TransformerEncoderLayer`` holding quantizing modules a
no-op forward pre-hook, which turns its fast path off.

The attention site (``AttentionSite``, opt-in: ``convert(..., attention=True)``) quantizes, for every
``F.scaled_dot_product_attention`` call inside the module it is attached to (and inside a converted
MultiheadAttention), the two matmuls of ``softmax(Q K^T * scale + mask) V``:

    scores  S = Q K^T     Q: activation role, K: activation role   (blocks along the head dimension)
    output  O = P V       P: activation role, V: activation role   (blocks along the key positions)
    backward              dO and dS: grad role; dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q, each operand
                          re-quantized along that GEMM's reduction axis; the softmax and its backward stay fp32.

Calls with dropout inside attention (``dropout_p > 0``) go to the unquantized SDPA (not modelled).
Telemetry sites: ``<name>.qk:activation`` / ``<name>.qk:grad`` and ``<name>.pv:...``. Only SDPA calls are seen:
attention written with ``torch.matmul`` (e.g. Hugging Face ``attn_implementation="eager"``) stays fp32.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lowprec.nn.linear import linear
from lowprec.nn.site import quantized_region, QuantModule, Site, axis_free, delayed_scale_of
from lowprec.policy import PrecisionPolicy
from lowprec.telemetry import Telemetry

__all__ = ["QuantMultiheadAttention", "AttentionSite", "QuantMatmul", "quantized_matmul"]


class QuantMatmul(torch.autograd.Function):
    """``QuantMatmul.apply(a, b, site, name)``: ``a [..., M, K] @ b [..., K, N]`` with both operands quantized per
    the activation role and, in the backward, the incoming gradient per the grad role (module docstring)."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, site: Site, name: str) -> torch.Tensor:
        with quantized_region():
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
        first = None   # the first quantized dC: a delayed spec's second quantization reuses its scale
        if ctx.needs_input_grad[0]:   # dA [M, K] = dC [M, N] @ B^T [N, K]: reduction over N
            first = site.quant(g, "grad", -1, record=True, channel_axis=-2)
            qb = qbq if axis_free(site.specs["activation"]) else site.quant(b, "activation", -1, False, -2).q
            grad_a = first.q @ qb.transpose(-1, -2)
        if ctx.needs_input_grad[1]:   # dB [K, N] = A^T [K, M] @ dC [M, N]: reduction over M
            qg = site.quant(g, "grad", -2, record=first is None, channel_axis=-1,
                            delayed_scale=delayed_scale_of(first)).q
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
        if self.noop or dropout_p > 0.0:
            return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                                  is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        if enable_gqa and key.shape[-3] != query.shape[-3]:   # grouped-query attention: repeat the kv heads
            rep = query.shape[-3] // key.shape[-3]
            key, value = key.repeat_interleave(rep, dim=-3), value.repeat_interleave(rep, dim=-3)
        with quantized_region():
            return self._sdpa(query, key, value, attn_mask, is_causal, scale)

    def _sdpa(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None,
              is_causal: bool, scale: float | None) -> torch.Tensor:
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


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """nn.MultiheadAttention's mask convention (bool True = may not attend; float = added) as a float mask."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))


class QuantMultiheadAttention(QuantModule, nn.MultiheadAttention):
    """nn.MultiheadAttention whose in-projection GEMMs are quantized per ``policy`` (the out-projection is the
    ``out_proj`` child's, a QuantLinear once converted); ``attention`` is an optional :class:`AttentionSite`.
    ``add_bias_kv`` / ``add_zero_attn`` modules are not converted (``unsupported_reason``)."""

    _kind = "multihead_attention"

    def __init__(self, *args, policy: PrecisionPolicy | str = "fp32", backend: str = "auto", name: str = "",
                 telemetry: Telemetry | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        why = self.unsupported_reason(self)
        if why:
            raise ValueError(f"QuantMultiheadAttention: {why}")
        self.attention: AttentionSite | None = None
        self.configure(policy, backend=backend, name=name, telemetry=telemetry)

    @staticmethod
    def unsupported_reason(mha: nn.MultiheadAttention) -> str | None:
        """Why ``mha`` stays in full precision (None if it can be converted)."""
        if mha.bias_k is not None or mha.add_zero_attn:
            return "add_bias_kv / add_zero_attn are not supported"
        return None

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

    def _in_proj(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, same_qkv: bool,
                 same_kv: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        E, site, b = self.embed_dim, self._site, self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
        if self._qkv_same_embed_dim:
            w = self.in_proj_weight
            if same_qkv:                           # packed, as torch does: one GEMM
                return linear(query, w, b, site, self.training).chunk(3, dim=-1)
            wq, wk, wv = w.chunk(3)
            if same_kv:
                kv = linear(key, w[E:], None if b is None else b[E:], site, self.training).chunk(2, dim=-1)
                return linear(query, wq, bq, site, self.training), kv[0], kv[1]
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return (linear(query, wq, bq, site, self.training), linear(key, wk, bk, site, self.training),
                linear(value, wv, bv, site, self.training))

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False):
        out = self.out_proj
        out_site = out.site if isinstance(out, QuantModule) else None
        if self._site.noop and (out_site is None or out_site.noop) and self.attention is None:
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        if is_causal and attn_mask is None:    # as torch: is_causal is only a hint about attn_mask
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention)")
        same_qkv, same_kv = query is key and key is value, key is value   # torch's packed in-projections
        batched = query.dim() == 3
        if not batched:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        L, N, E = query.shape
        h, hd = self.num_heads, self.head_dim
        q, k, v = self._in_proj(query, key, value, same_qkv, same_kv)
        q, k, v = (t.reshape(t.shape[0], N * h, hd).transpose(0, 1).reshape(N, h, t.shape[0], hd)
                   for t in (q, k, v))
        S = k.shape[-2]
        mask = _additive(attn_mask, q.dtype)
        if mask is not None:
            mask = mask.reshape(1, 1, L, S) if mask.dim() == 2 else mask.reshape(N, h, L, S)
        kpm = _additive(key_padding_mask, q.dtype)
        if kpm is not None:
            kpm = kpm.reshape(N, 1, 1, S)
            mask = kpm if mask is None else mask + kpm
        dropout = self.dropout if self.training else 0.0
        att = self.attention
        weights = None
        if need_weights:
            mm = (lambda a, b, st: quantized_matmul(a, b, st)) if att is not None else (lambda a, b, st: a @ b)
            scores = mm(q, k.transpose(-1, -2), None if att is None else att.qk) / math.sqrt(hd)
            if mask is not None:
                scores = scores + mask
            p = torch.softmax(scores, dim=-1)
            p = F.dropout(p, dropout) if dropout > 0 else p       # torch returns the weights after dropout
            weights = p.mean(1) if average_attn_weights else p
            a = mm(p, v, None if att is None else att.pv)
        elif att is not None:
            a = att.sdpa(q, k, v, attn_mask=mask, dropout_p=dropout)
        else:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        a = a.permute(2, 0, 1, 3).reshape(L * N, E)            # (L, N, h, hd) -> (L*N, E)
        if out_site is not None:
            o = linear(a, out.weight, out.bias, out_site, out.training)
        else:
            o = F.linear(a, out.weight, out.bias)
        o = o.reshape(L, N, E)
        if not batched:
            o = o.squeeze(1)
            weights = None if weights is None else weights.squeeze(0)
        elif self.batch_first:
            o = o.transpose(0, 1)
        return o, weights
