"""``QuantEmbedding``: an nn.Embedding whose table is quantized per ``policy.weight`` in the forward.

A row of the table is one embedding vector, so block/channel scaling runs along the embedding dimension; the
gradient passes straight through to the fp32 table (the lookup is not a GEMM: activation and grad specs are
not used).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowprec.nn.site import QuantModule, Site
from lowprec.policy import PrecisionPolicy
from lowprec.telemetry import Telemetry

__all__ = ["QuantEmbedding", "FakeQuantSTE"]


class FakeQuantSTE(torch.autograd.Function):
    """``FakeQuantSTE.apply(w, site, role, reduce_axis)``: quantize in the forward, identity gradient."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, site: Site, role: str, reduce_axis: int) -> torch.Tensor:
        return site.quant(w.float(), role, reduce_axis=reduce_axis, record=True).q.to(w.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g, None, None, None


class QuantEmbedding(QuantModule, nn.Embedding):
    """nn.Embedding whose table is quantized per ``policy.weight`` in the forward (straight-through backward)."""

    _kind = "embedding"

    def __init__(self, *args, policy: PrecisionPolicy | str = "fp32", name: str = "",
                 telemetry: Telemetry | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.configure(policy, name=name, telemetry=telemetry)

    def _make_site(self, policy: PrecisionPolicy, backend: str, name: str, telemetry: Telemetry | None,
                   rule: str | None) -> Site:
        return Site(policy, "emulated", name, telemetry, rule=rule)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, policy: PrecisionPolicy | str, *, backend: str = "auto",
                       name: str = "", telemetry: Telemetry | None = None,
                       rule: str | None = None) -> "QuantEmbedding":
        """A QuantEmbedding sharing ``emb``'s table Parameter (``backend`` is ignored: a lookup is no GEMM)."""
        with torch.device("meta"):
            new = cls(emb.num_embeddings, emb.embedding_dim, padding_idx=emb.padding_idx, max_norm=emb.max_norm,
                      norm_type=emb.norm_type, scale_grad_by_freq=emb.scale_grad_by_freq, sparse=emb.sparse)
        new.weight = emb.weight
        new.train(emb.training)
        new.configure(policy, name=name, telemetry=telemetry, rule=rule)
        return new

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        w = self.weight
        self._site.update_history = self.training
        if self._site.specs["weight"] is not None:
            w = FakeQuantSTE.apply(w, self._site, "weight", 1)
        return F.embedding(idx, w, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq,
                           self.sparse)
