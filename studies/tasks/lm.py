"""gpt, moe, text: a tiny nanoGPT-style transformer (optionally with routed experts) on a character corpus."""
from __future__ import annotations

import copy
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from studies.tasks.base import Task, TaskRun, check_step, sized_task, step_seed
from studies.tasks.corpus import Corpus, check_corpus, load_corpus, pydoc_corpus

__all__ = ["CausalSelfAttention", "FeedForward", "MoE", "Block", "GPT", "LMRun", "build_lm", "lm_task",
           "LM_SIZES", "MOE_SIZES", "LM_LRS"]

# ------------------------------------------------------------------------------------- the tiny GPT / MoE

class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention; q/k/v and output projections are nn.Linear, the two attention matmuls
    are plain ``@`` (they stay in full precision under ``lowprec.nn.convert``)."""

    def __init__(self, d_model: int, n_heads: int, ctx: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.register_buffer("mask", torch.ones(ctx, ctx, dtype=torch.bool).tril(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(C // self.n_heads))
        att = att.masked_fill(~self.mask[:T, :T], float("-inf")).softmax(dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(B, T, C))


class FeedForward(nn.Module):
    """Linear → GELU → Linear."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, hidden)
        self.proj = nn.Linear(hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class MoE(nn.Module):
    """Top-k routed experts: ``y = Σ_{e ∈ topk(p)} w_e · expert_e(x)`` with ``p = softmax(router(x))`` and the
    top-k probabilities renormalised to sum to 1 (top-1: ``w = p_top``, Switch style).

    Tokens are really dispatched (each expert sees only its tokens), so a quantized expert's scales come from the
    tokens it processes. ``aux_loss`` (set by ``forward``) is the Switch Transformer load-balancing loss
    ``E · Σ_e f_e · P_e`` (``f_e``: fraction of token-slots routed to ``e``, ``P_e``: mean router probability);
    it is 1 for perfectly balanced routing.
    """

    def __init__(self, d_model: int, hidden: int, n_experts: int, top_k: int) -> None:
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k must be in 1..n_experts={n_experts}, got {top_k}")
        self.top_k = top_k
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(d_model, hidden) for _ in range(n_experts))
        self.aux_loss = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        probs = self.router(flat).softmax(dim=-1)                      # (N, E)
        top_p, top_i = probs.topk(self.top_k, dim=-1)                  # (N, k)
        weights = top_p if self.top_k == 1 else top_p / top_p.sum(-1, keepdim=True)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            tok, slot = (top_i == e).nonzero(as_tuple=True)
            if tok.numel():
                out.index_add_(0, tok, expert(flat[tok]) * weights[tok, slot].unsqueeze(-1))
        n_exp = probs.shape[-1]
        frac = torch.bincount(top_i.flatten(), minlength=n_exp).to(probs.dtype) / top_i.numel()
        self.aux_loss = n_exp * (frac * probs.mean(0)).sum()
        return out.view(shape)


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))`` (mlp dense or MoE)."""

    def __init__(self, d_model: int, n_heads: int, ctx: int, mlp: nn.Module) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, ctx)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """nanoGPT-style decoder: token + learned position embeddings, ``n_layers`` pre-LN blocks, final LayerNorm,
    untied linear head (untied so that quantizing the head never touches the embedding table).

    ``n_experts = 0`` gives dense GELU MLPs (hidden ``4·d_model``); ``n_experts > 0`` gives :class:`MoE` layers
    (hidden ``expert_hidden`` each). Init as in GPT-2/nanoGPT: weights N(0, 0.02), residual output projections
    N(0, 0.02/√(2·n_layers)), biases 0 — so the initial logits are small and the initial loss ≈ ln(vocab).
    """

    def __init__(self, vocab: int, ctx: int, d_model: int, n_layers: int, n_heads: int,
                 n_experts: int = 0, top_k: int = 2, expert_hidden: int | None = None) -> None:
        super().__init__()
        self.ctx = ctx
        self.tok_emb = nn.Embedding(vocab, d_model)
        self.pos_emb = nn.Embedding(ctx, d_model)

        def mlp() -> nn.Module:
            if n_experts:
                return MoE(d_model, expert_hidden or 2 * d_model, n_experts, top_k)
            return FeedForward(d_model, 4 * d_model)

        self.blocks = nn.ModuleList(Block(d_model, n_heads, ctx, mlp()) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2:
                residual = name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight") or \
                    (".experts." in name and name.endswith("proj.weight"))
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layers) if residual else 0.02)

    @property
    def aux_loss(self) -> torch.Tensor:
        """Sum of the MoE layers' load-balancing losses from the last forward (0 for a dense model)."""
        aux = [b.mlp.aux_loss for b in self.blocks if isinstance(b.mlp, MoE)]
        return sum(aux) if aux else torch.zeros(())

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        if T > self.ctx:
            raise ValueError(f"sequence length {T} exceeds the context {self.ctx}")
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(T, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))





class LMRun(TaskRun):
    """Next-token cross-entropy on random windows of the training split; validation on fixed windows.

    Batch ``step``: ``batch`` window offsets drawn uniformly from the training split with a generator seeded
    by ``(seed, step)``. Validation: ``val_windows`` windows evenly spaced over the validation split (the same
    for every seed), evaluated in chunks of ``max(batch, 4096 // ctx)`` windows (built once, on the device, at the
    first evaluation); ``val_loss`` is the mean over all their tokens.
    For the MoE, ``train_loss`` adds ``aux_weight ·`` the load-balancing loss; ``val_loss`` is cross-entropy only.
    """

    def __init__(self, model: GPT, corpus: Corpus, ctx: int, batch: int, seed: int, val_windows: int,
                 aux_weight: float, device: torch.device) -> None:
        check_corpus(corpus, ctx)
        self.model, self.corpus = model, corpus
        self.ctx, self.batch, self.seed = ctx, batch, seed
        self.aux_weight, self.device = aux_weight, device
        self.tokens_per_step = batch * ctx
        self.optimal_loss = None
        n_val = len(corpus.val) - ctx
        self.val_offsets = np.unique(np.linspace(0, n_val - 1, num=min(val_windows, n_val)).round().astype(np.int64))
        self._val_chunks: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def batch_offsets(self, step: int) -> np.ndarray:
        """Start offsets (into the training split) of the windows of batch ``step``."""
        rng = np.random.Generator(np.random.PCG64(step_seed(self.seed, check_step(step))))
        return rng.integers(0, len(self.corpus.train) - self.ctx, size=self.batch)

    def _windows(self, tokens: np.ndarray, offsets: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.from_numpy(tokens[offsets[:, None] + np.arange(self.ctx + 1)].astype(np.int64)).to(self.device)
        return w[:, :-1], w[:, 1:]

    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets (each ``batch × ctx``) of training batch ``step``."""
        return self._windows(self.corpus.train, self.batch_offsets(step))

    def batch_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of the model on inputs ``x`` and targets ``y`` (plus the MoE term)."""
        loss = F.cross_entropy(self.model(x).flatten(0, 1), y.flatten())
        if self.aux_weight:
            loss = loss + self.aux_weight * self.model.aux_loss
        return loss

    def chunk_loss_sum(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy of one validation chunk (no MoE term)."""
        return F.cross_entropy(self.model(x).flatten(0, 1), y.flatten(), reduction="sum")

    def train_loss(self, step: int) -> torch.Tensor:
        return self.batch_loss(*self.batch_at(step))

    def compiled(self) -> "LMRun | None":
        """The twin whose ``batch_loss`` and ``chunk_loss_sum`` are ``torch.compile``'d (static shapes), sharing
        this run's model, corpus and validation chunks (``TaskRun.compiled``). None for a mixture of experts
        (its token dispatch has data-dependent shapes)."""
        if any(isinstance(m, MoE) for m in self.model.modules()):
            return None
        self.val_chunks()  # build the shared validation chunks once, before the copy
        twin = copy.copy(self)
        twin.batch_loss = torch.compile(self.batch_loss, dynamic=False)
        twin.chunk_loss_sum = torch.compile(self.chunk_loss_sum, dynamic=False)
        return twin

    def val_chunks(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The validation set as (inputs, targets) chunks of ``max(batch, 4096 // ctx)`` windows (fewer, larger
        forward passes), built on the first call and kept."""
        if self._val_chunks is None:
            chunk = max(self.batch, 4096 // self.ctx)
            self._val_chunks = [self._windows(self.corpus.val, self.val_offsets[i:i + chunk])
                                for i in range(0, len(self.val_offsets), chunk)]
        return self._val_chunks

    @torch.no_grad()
    def val_loss(self) -> float:
        was = self.model.training
        self.model.eval()
        try:
            total, count = 0.0, 0
            for x, y in self.val_chunks():
                total += float(self.chunk_loss_sum(x, y))
                count += y.numel()
            return total / count
        finally:
            self.model.train(was)


def build_lm(*, seed: int, device: torch.device, data: str | None, ctx: int, batch: int, d_model: int,
              n_layers: int, n_heads: int, val_windows: int, n_experts: int = 0, top_k: int = 2,
              expert_hidden: int | None = None, aux_weight: float = 0.0) -> LMRun:
    corpus = pydoc_corpus() if data is None else load_corpus(data)
    model = GPT(corpus.vocab, ctx, d_model, n_layers, n_heads, n_experts, top_k, expert_hidden).to(device)
    return LMRun(model, corpus, ctx, batch, seed, val_windows, aux_weight, device)


LM_SIZES = {
    "quick": dict(d_model=32, n_layers=1, n_heads=2, ctx=32, batch=8, val_windows=64, steps=60, eval_every=20),
    "default": dict(d_model=64, n_layers=2, n_heads=4, ctx=32, batch=16, val_windows=256, steps=250,
                    eval_every=25),
    "paper": dict(d_model=256, n_layers=6, n_heads=8, ctx=256, batch=32, val_windows=512, steps=5000,
                  eval_every=250),
}
MOE_SIZES = {"quick": dict(n_experts=4, top_k=2), "default": dict(n_experts=4, top_k=2),
             "paper": dict(n_experts=8, top_k=2)}
LM_LRS = {
    "quick": {"adamw": 1e-2, "sgd": 3e-1, "signsgd": 1e-2, "signum": 3e-3, "lion": 3e-3, "stosignsgd": 1e-2},
    "default": {"adamw": 3e-3, "sgd": 1e-1, "signsgd": 3e-3, "signum": 1e-3, "lion": 1e-3, "stosignsgd": 3e-3},
    "paper": {"adamw": 1e-3, "sgd": 3e-2, "signsgd": 1e-3, "signum": 3e-4, "lion": 3e-4, "stosignsgd": 1e-3},
}


def lm_task(name: str, description: str, size: str, data: str | None) -> Task:
    """The gpt / moe / text recipe at ``size``; ``data=PATH`` replaces the embedded corpus (checked here)."""
    c = dict(LM_SIZES[size])
    if data is not None:
        data = os.path.abspath(os.fspath(data))
        check_corpus(load_corpus(data), c["ctx"])   # missing/empty/too small -> ValueError here, not later
    c["data"] = data
    if name == "moe":
        c.update(MOE_SIZES[size], expert_hidden=2 * c["d_model"], aux_weight=0.01)
    if data is not None:
        model = "tiny mixture-of-experts transformer" if name == "moe" else "tiny nanoGPT-style transformer"
        description = f"{model} on {load_corpus(data).source}"
    return sized_task(name, description, size, c, LM_LRS[size], c["batch"] * c["ctx"], build_lm)
