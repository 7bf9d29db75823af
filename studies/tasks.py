"""Built-in tasks of the precision sweep: small models on embedded data, deterministic on CPU given a seed.

A :class:`Task` is a recipe (name, sizes, step count, learning rates); ``Task.build(seed)`` makes a
:class:`TaskRun` — a fresh model plus its data — whose ``train_loss(step)`` is the differentiable loss on training
batch ``step`` and ``val_loss()`` the loss on a fixed validation set.

Tasks (``get_task(name, size=..., data=...)``):

- ``convex-l1``: a non-smooth convex problem, ``f(x) = ‖Ax − b‖₁ / n_blocks`` with ``A`` block diagonal, built so
  that deterministic SignSGD provably stalls while StoSignSGD converges (see :class:`L1Objective`). Optimum 0.
- ``mlp``: a ReLU MLP classifying synthetic inputs labelled by a fixed random teacher network.
- ``gpt``: a tiny nanoGPT-style character-level transformer on the CPython documentation text shipped with
  Python (``pydoc_data.topics``): the default language-model task.
- ``moe``: the same transformer with each MLP replaced by top-k routed experts (softmax router, Switch-style
  load-balancing auxiliary loss) — the non-smooth routing the StoSignSGD paper names.
- ``text``: the GPT on the user's data (``data=PATH``): a text file (byte-level, vocabulary 256), a
  nanoGPT-style uint16 ``.bin`` token file, or a directory holding nanoGPT's ``train.bin`` and ``val.bin``.
  ``gpt`` and ``moe`` accept ``data=PATH`` too.

Every matrix multiply with learned weights is an ``nn.Linear`` (the precision layer ``lowprec.nn.convert`` swaps
those for quantized layers); ``nn.Embedding`` and ``nn.LayerNorm`` stay in full precision, and so do the attention
score and attention-times-value matmuls (plain ``@`` on activations, no fused ``scaled_dot_product_attention``).

Determinism: the problem data (teacher, convex instance, text split, validation windows) is fixed per task and
identical for every seed, so runs are compared on the same validation set; the seed fixes the model
initialisation and the order of training batches (batch ``step`` is drawn from a generator seeded by
``(seed, step)``, so it does not depend on what was computed before).
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["TASKS", "SIZES", "Task", "TaskRun", "get_task", "load_corpus", "pydoc_corpus", "GPT", "MoE", "MLP",
           "L1Objective"]

SIZES = ("quick", "default", "paper")
DATA_SEED = 1234          # fixes every task's problem data (teacher, convex instance, validation windows)
TRAIN_FRACTION = 0.9      # contiguous split: first 90% of the tokens train, last 10% validate


# --------------------------------------------------------------------------------------------------- helpers

def _step_seed(seed: int, step: int) -> int:
    """A well-mixed 64-bit seed for (run seed, step) — batch ``step`` is independent of earlier batches."""
    return int(np.random.SeedSequence([int(seed), 0x5EED, int(step)]).generate_state(1, np.uint64)[0])


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _check_step(step: int) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    return int(step)


def _grid(center: float) -> list[float]:
    """The tuning grid around a default learning rate: center/3, center, 3*center (rounded to 2 digits)."""
    return [float(f"{v:.2g}") for v in (center / 3, center, center * 3)]


# ------------------------------------------------------------------------------------------- Task / TaskRun

class TaskRun:
    """One instantiated task: a model and its data, for one seed.

    Attributes: ``model`` (the ``nn.Module`` to optimize), ``tokens_per_step`` (tokens — or examples — consumed
    by one ``train_loss`` call), ``optimal_loss`` (the known minimum of the objective, else ``None``).
    """

    model: nn.Module
    tokens_per_step: int
    optimal_loss: float | None = None

    def train_loss(self, step: int) -> torch.Tensor:
        """Differentiable scalar loss of the model on training batch ``step``."""
        raise NotImplementedError

    def val_loss(self) -> float:
        """Loss on the fixed validation set (no gradient; the model's train/eval mode is restored)."""
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class Task:
    """A task recipe. ``build(seed)`` returns a :class:`TaskRun`, deterministic given ``seed``.

    ``default_lrs`` and ``lr_grid`` are keyed by optimizer name (adamw, sgd, signsgd, signum, stosignsgd);
    ``config`` holds every knob that defines the task (JSON-serialisable, for run ids).
    """

    name: str
    description: str
    size: str
    default_steps: int
    eval_every: int
    default_lrs: dict[str, float]
    lr_grid: dict[str, list[float]]
    tokens_per_step: int
    config: dict
    builder: Callable[..., TaskRun] = field(repr=False)

    def build(self, seed: int, device: str | torch.device = "cpu") -> TaskRun:
        """Fresh model and data for ``seed`` (init and batch order depend on it; the problem data does not)."""
        seed = _check_seed(seed)
        with torch.random.fork_rng(devices=[]):   # leave the caller's global RNG untouched
            torch.manual_seed(seed)
            return self.builder(seed=seed, device=torch.device(device), **self.config)


# ------------------------------------------------------------------------------------- convex: ‖Ax − b‖₁

class L1Objective(nn.Module):
    """``f(x) = ‖Ax − b‖₁ / n_blocks`` with ``A`` block diagonal, blocks ``a_i·[[1, −1], [ε, ε]]``, ``b = A x*``.

    Per block ``i`` (coordinates ``u = x_{2i}``, ``v = x_{2i+1}``) the objective is
    ``a_i·(|(u − v) − c_i| + ε·|(u + v) − s_i|)``, minimum 0 at ``x = x*`` (``A`` is invertible).

    Why deterministic SignSGD stalls: the subgradient of a block is
    ``a_i·(σ₁·(1, −1) + ε·σ₂·(1, 1))`` with ``σ₁, σ₂ ∈ {±1}``. Because ``ε < 1`` its sign is ``σ₁·(1, −1)``
    whatever ``σ₂`` is, so every SignSGD step changes ``u − v`` by ``∓2η`` and leaves ``u + v`` exactly as it was.
    Hence ``f(x_t) ≥ Σ_i a_i ε |(u₀ + v₀) − s_i| / n_blocks`` for every step size schedule: the sign of the
    subgradient never points along the second (gently sloped) kink. At a kink (``r = 0``) the subgradient used
    is ``sign(0) = +1``, so the argument holds at every point (see ``forward``).

    Why StoSignSGD converges: it follows ``m/G`` in expectation. While ``u − v`` oscillates around its kink the
    momentum ``m`` averages the alternating ``σ₁·(1, −1)`` part away and keeps ``≈ a_i ε σ₂ (1, 1)``, while
    ``G`` remembers ``≈ a_i (1 + ε)`` from the approach; so ``u + v`` drifts towards ``s_i`` at an expected
    ``≈ 2ηε/(1 + ε)`` per step, to a neighbourhood of size ``O(η)`` for a constant step. (Signum, the
    deterministic sign of the momentum, also escapes when ``ε`` exceeds the residual oscillation of ``m``,
    ``≈ (1 − β)/(1 + β)`` — here ``ε = 0.25 > 0.053`` — so the stall is SignSGD's, not every sign method's.)
    """

    def __init__(self, x0: torch.Tensor, A: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.x = nn.Parameter(x0.clone())
        self.register_buffer("A", A)
        self.register_buffer("b", b)

    def forward(self) -> torch.Tensor:
        r = self.A @ self.x - self.b
        # |r| whose autograd subgradient is sign(r) with sign(0) := +1 (valid: +1 ∈ ∂|0| = [−1, 1]). With
        # torch's abs (d|r|/dr = 0 at 0), float32 rounding makes r₁ exactly 0 surprisingly often once u − v sits
        # in its kink, and the zero then hands SignSGD the (1, 1) direction; this convention keeps the sign
        # analysis exact at every point.
        return torch.where(r >= 0, r, -r).sum() / (self.x.numel() // 2)


def l1_problem(dim: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fixed convex instance ``(A, b, x_star)`` (from ``DATA_SEED``; float32). ``dim`` even, ``0 < eps < 1``."""
    if dim < 2 or dim % 2:
        raise ValueError(f"dim must be an even integer >= 2, got {dim}")
    if not 0 < eps < 1:
        raise ValueError(f"eps must be in (0, 1) (the SignSGD stall needs eps < 1), got {eps}")
    g = torch.Generator().manual_seed(DATA_SEED)
    n = dim // 2
    scales = torch.exp(torch.empty(n).uniform_(math.log(0.5), math.log(2.0), generator=g))
    A = torch.zeros(dim, dim)
    for i in range(n):
        a = scales[i].item()
        A[2 * i:2 * i + 2, 2 * i:2 * i + 2] = torch.tensor([[a, -a], [eps * a, eps * a]])
    x_star = torch.randn(dim, generator=g)
    return A, A @ x_star, x_star


class ConvexRun(TaskRun):
    """Full-batch deterministic objective: ``train_loss(step)`` is ``f(x)`` for every step."""

    def __init__(self, model: L1Objective, x_star: torch.Tensor) -> None:
        self.model = model
        self.x_star = x_star
        self.tokens_per_step = model.A.shape[0]      # rows of A ("examples") touched per step
        self.optimal_loss = 0.0

    def train_loss(self, step: int) -> torch.Tensor:
        _check_step(step)
        return self.model()

    @torch.no_grad()
    def val_loss(self) -> float:
        return float(self.model())


def _build_convex(*, seed: int, device: torch.device, dim: int, eps: float, init_std: float) -> ConvexRun:
    A, b, x_star = l1_problem(dim, eps)
    g = torch.Generator().manual_seed(seed)
    x0 = x_star + init_std * torch.randn(dim, generator=g)
    return ConvexRun(L1Objective(x0, A, b).to(device), x_star.to(device))


# ------------------------------------------------------------------------------------------ MLP (teacher)

def teacher_data(n: int, in_dim: int, classes: int, teacher_hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` Gaussian inputs labelled by the argmax of a fixed random ReLU teacher MLP (from ``DATA_SEED``)."""
    g = torch.Generator().manual_seed(DATA_SEED)
    W1 = torch.randn(in_dim, teacher_hidden, generator=g) / math.sqrt(in_dim)
    W2 = torch.randn(teacher_hidden, classes, generator=g) / math.sqrt(teacher_hidden)
    x = torch.randn(n, in_dim, generator=g)
    y = (torch.relu(x @ W1) @ W2).argmax(1)
    return x, y


class MLP(nn.Module):
    """ReLU MLP: Linear → ReLU → … → Linear (logits)."""

    def __init__(self, in_dim: int, hidden: int, depth: int, classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = in_dim
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.ReLU()]
            d = hidden
        layers.append(nn.Linear(d, classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ClassifierRun(TaskRun):
    """Minibatch cross-entropy; batch ``step`` is a sample without replacement drawn from ``(seed, step)``."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, n_train: int, batch: int, seed: int):
        self.model = model
        self.x_train, self.y_train = x[:n_train], y[:n_train]
        self.x_val, self.y_val = x[n_train:], y[n_train:]
        self.batch, self.seed = batch, seed
        self.tokens_per_step = batch
        self.optimal_loss = None

    def batch_indices(self, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(_step_seed(self.seed, _check_step(step)))
        return torch.randperm(len(self.x_train), generator=g)[:self.batch]

    def train_loss(self, step: int) -> torch.Tensor:
        idx = self.batch_indices(step).to(self.x_train.device)
        return F.cross_entropy(self.model(self.x_train[idx]), self.y_train[idx])

    @torch.no_grad()
    def val_loss(self) -> float:
        was = self.model.training
        self.model.eval()
        try:
            return float(F.cross_entropy(self.model(self.x_val), self.y_val))
        finally:
            self.model.train(was)


def _build_mlp(*, seed: int, device: torch.device, in_dim: int, classes: int, teacher_hidden: int, hidden: int,
               depth: int, n_train: int, n_val: int, batch: int) -> ClassifierRun:
    x, y = teacher_data(n_train + n_val, in_dim, classes, teacher_hidden)
    model = MLP(in_dim, hidden, depth, classes).to(device)     # torch's default init under manual_seed(seed)
    return ClassifierRun(model, x.to(device), y.to(device), n_train, batch, seed)


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


# ---------------------------------------------------------------------------------------------- LM data

@dataclass(frozen=True)
class Corpus:
    """Token arrays of a split corpus (numpy, possibly memory-mapped) and its vocabulary size."""

    train: np.ndarray
    val: np.ndarray
    vocab: int
    source: str
    chars: str | None = None   # the character vocabulary (id -> char) for the embedded corpus


@functools.lru_cache(maxsize=None)
def pydoc_text() -> str:
    """The CPython documentation topics shipped with Python, values joined in sorted key order."""
    from pydoc_data.topics import topics
    return "".join(topics[k] for k in sorted(topics))


@functools.lru_cache(maxsize=None)
def pydoc_corpus() -> Corpus:
    """Character-level corpus of :func:`pydoc_text` (vocabulary: its sorted distinct characters)."""
    text = pydoc_text()
    chars = "".join(sorted(set(text)))
    lut = {c: i for i, c in enumerate(chars)}
    tokens = np.array([lut[c] for c in text], dtype=np.uint8 if len(chars) <= 256 else np.int64)
    n = int(len(tokens) * TRAIN_FRACTION)
    return Corpus(tokens[:n], tokens[n:], len(chars), "pydoc_data.topics (characters)", chars)


def _bin_tokens(path: str) -> np.ndarray:
    size = os.path.getsize(path)
    if size == 0:
        raise ValueError(f"data file is empty: {path}")
    if size % 2:
        raise ValueError(f"{path}: a .bin token file must hold uint16 tokens (even byte count), got {size} bytes")
    return np.memmap(path, dtype=np.uint16, mode="r")


def _max_token(*arrays: np.ndarray, chunk: int = 1 << 24) -> int:
    return max(int(a[i:i + chunk].max()) for a in arrays for i in range(0, len(a), chunk))


@functools.lru_cache(maxsize=None)
def load_corpus(path: str) -> Corpus:
    """Load user data for the language-model tasks.

    - a directory holding nanoGPT's ``train.bin`` and ``val.bin`` (uint16 tokens): used as the split;
    - a file ending in ``.bin``: uint16 tokens (memory-mapped), first 90% train, last 10% validation;
    - any other file: raw bytes (byte-level, vocabulary 256), first 90% train, last 10% validation.
    For token files the vocabulary is ``max token + 1`` (one pass over the data; nanoGPT's ``meta.pkl`` is not
    read — unpickling a file is not safe). Cached per path within a process.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"data must be a path (str), got {type(path).__name__}")
    path = os.fspath(path)
    if os.path.isdir(path):
        tr, va = os.path.join(path, "train.bin"), os.path.join(path, "val.bin")
        if not (os.path.isfile(tr) and os.path.isfile(va)):
            raise ValueError(f"data directory {path} must contain train.bin and val.bin (nanoGPT layout); "
                             "or pass a text file or a single uint16 .bin token file")
        train, val = _bin_tokens(tr), _bin_tokens(va)
        return Corpus(train, val, _max_token(train, val) + 1, f"{path} (train.bin/val.bin uint16 tokens)")
    if not os.path.isfile(path):
        raise ValueError(f"data file not found: {path} (expected a text file, a uint16 .bin token file, "
                         "or a directory with train.bin and val.bin)")
    if path.endswith(".bin"):
        tokens = _bin_tokens(path)
        n = int(len(tokens) * TRAIN_FRACTION)
        return Corpus(tokens[:n], tokens[n:], _max_token(tokens) + 1, f"{path} (uint16 tokens)")
    with open(path, "rb") as f:
        raw = f.read()
    if not raw:
        raise ValueError(f"data file is empty: {path}")
    tokens = np.frombuffer(raw, dtype=np.uint8)
    n = int(len(tokens) * TRAIN_FRACTION)
    return Corpus(tokens[:n], tokens[n:], 256, f"{path} (bytes)")


def _check_corpus(corpus: Corpus, ctx: int) -> None:
    for split, arr in (("training", corpus.train), ("validation", corpus.val)):
        if len(arr) < ctx + 2:
            raise ValueError(f"{corpus.source}: the {split} split has {len(arr)} tokens, fewer than context + 2 = "
                             f"{ctx + 2}; this size needs at least {ctx + 2} tokens per split, i.e. at least "
                             f"{math.ceil((ctx + 2) / (1 - TRAIN_FRACTION))} tokens in a single file split 90/10")


class LMRun(TaskRun):
    """Next-token cross-entropy on random windows of the training split; validation on fixed windows.

    Batch ``step``: ``batch`` window offsets drawn uniformly from the training split with a generator seeded
    by ``(seed, step)``. Validation: ``val_windows`` windows evenly spaced over the validation split (the same
    for every seed), evaluated in chunks of ``max(batch, 4096 // ctx)`` windows; ``val_loss`` is the mean over all
    their tokens.
    For the MoE, ``train_loss`` adds ``aux_weight ·`` the load-balancing loss; ``val_loss`` is cross-entropy only.
    """

    def __init__(self, model: GPT, corpus: Corpus, ctx: int, batch: int, seed: int, val_windows: int,
                 aux_weight: float, device: torch.device) -> None:
        _check_corpus(corpus, ctx)
        self.model, self.corpus = model, corpus
        self.ctx, self.batch, self.seed = ctx, batch, seed
        self.aux_weight, self.device = aux_weight, device
        self.tokens_per_step = batch * ctx
        self.optimal_loss = None
        n_val = len(corpus.val) - ctx
        self.val_offsets = np.unique(np.linspace(0, n_val - 1, num=min(val_windows, n_val)).round().astype(np.int64))

    def batch_offsets(self, step: int) -> np.ndarray:
        """Start offsets (into the training split) of the windows of batch ``step``."""
        rng = np.random.Generator(np.random.PCG64(_step_seed(self.seed, _check_step(step))))
        return rng.integers(0, len(self.corpus.train) - self.ctx, size=self.batch)

    def _windows(self, tokens: np.ndarray, offsets: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.from_numpy(tokens[offsets[:, None] + np.arange(self.ctx + 1)].astype(np.int64)).to(self.device)
        return w[:, :-1], w[:, 1:]

    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets (each ``batch × ctx``) of training batch ``step``."""
        return self._windows(self.corpus.train, self.batch_offsets(step))

    def train_loss(self, step: int) -> torch.Tensor:
        x, y = self.batch_at(step)
        loss = F.cross_entropy(self.model(x).flatten(0, 1), y.flatten())
        if self.aux_weight:
            loss = loss + self.aux_weight * self.model.aux_loss
        return loss

    @torch.no_grad()
    def val_loss(self) -> float:
        was = self.model.training
        self.model.eval()
        try:
            total, count = 0.0, 0
            chunk = max(self.batch, 4096 // self.ctx)          # fewer, larger forward passes
            for i in range(0, len(self.val_offsets), chunk):
                x, y = self._windows(self.corpus.val, self.val_offsets[i:i + chunk])
                total += float(F.cross_entropy(self.model(x).flatten(0, 1), y.flatten(), reduction="sum"))
                count += y.numel()
            return total / count
        finally:
            self.model.train(was)


def _build_lm(*, seed: int, device: torch.device, data: str | None, ctx: int, batch: int, d_model: int,
              n_layers: int, n_heads: int, val_windows: int, n_experts: int = 0, top_k: int = 2,
              expert_hidden: int | None = None, aux_weight: float = 0.0) -> LMRun:
    corpus = pydoc_corpus() if data is None else load_corpus(data)
    model = GPT(corpus.vocab, ctx, d_model, n_layers, n_heads, n_experts, top_k, expert_hidden).to(device)
    return LMRun(model, corpus, ctx, batch, seed, val_windows, aux_weight, device)


# -------------------------------------------------------------------------------------------- registry

_CONVEX = {
    "quick": dict(dim=16, eps=0.25, init_std=1.0, steps=500, eval_every=25),
    "default": dict(dim=64, eps=0.25, init_std=1.0, steps=2000, eval_every=50),
    "paper": dict(dim=1024, eps=0.25, init_std=1.0, steps=20000, eval_every=200),
}
_MLP = {
    "quick": dict(hidden=64, depth=2, batch=64, n_train=4096, steps=100, eval_every=20),
    "default": dict(hidden=128, depth=2, batch=128, n_train=8192, steps=500, eval_every=25),
    "paper": dict(hidden=512, depth=4, batch=256, n_train=65536, steps=5000, eval_every=250),
}
_LM = {
    "quick": dict(d_model=32, n_layers=1, n_heads=2, ctx=32, batch=8, val_windows=64, steps=60, eval_every=20),
    "default": dict(d_model=64, n_layers=2, n_heads=4, ctx=32, batch=16, val_windows=256, steps=250,
                    eval_every=25),
    "paper": dict(d_model=256, n_layers=6, n_heads=8, ctx=256, batch=32, val_windows=512, steps=5000,
                  eval_every=250),
}
_MOE = {"quick": dict(n_experts=4, top_k=2), "default": dict(n_experts=4, top_k=2),
        "paper": dict(n_experts=8, top_k=2)}

# fp32 starting points per optimizer (studies.optimizers defaults: momentum 0.9, AdamW betas (0.9, 0.95); the
# runner's cosine schedule with 5% warm-up). Measured on CPU, seed 0, default steps, each over the 3-point grid
# around it: the best final validation loss. Not measured: convex "quick" (= default), and every "paper" size
# (a third of "default": larger nanoGPT-like models want smaller steps). Short "quick" runs prefer larger steps.
_LRS = {
    ("convex", "quick"): {"adamw": 1e-2, "sgd": 1e-1, "signsgd": 1e-2, "signum": 1e-2, "stosignsgd": 1e-2},
    ("convex", "default"): {"adamw": 1e-2, "sgd": 1e-1, "signsgd": 1e-2, "signum": 1e-2, "stosignsgd": 1e-2},
    ("convex", "paper"): {"adamw": 3e-3, "sgd": 3e-2, "signsgd": 3e-3, "signum": 3e-3, "stosignsgd": 3e-3},
    ("mlp", "quick"): {"adamw": 1e-2, "sgd": 3e-1, "signsgd": 1e-2, "signum": 1e-2, "stosignsgd": 1e-2},
    ("mlp", "default"): {"adamw": 3e-3, "sgd": 1e-1, "signsgd": 3e-3, "signum": 3e-3, "stosignsgd": 3e-3},
    ("mlp", "paper"): {"adamw": 1e-3, "sgd": 3e-2, "signsgd": 1e-3, "signum": 1e-3, "stosignsgd": 1e-3},
    ("lm", "quick"): {"adamw": 1e-2, "sgd": 3e-1, "signsgd": 1e-2, "signum": 3e-3, "stosignsgd": 1e-2},
    ("lm", "default"): {"adamw": 3e-3, "sgd": 1e-1, "signsgd": 3e-3, "signum": 1e-3, "stosignsgd": 3e-3},
    ("lm", "paper"): {"adamw": 1e-3, "sgd": 3e-2, "signsgd": 1e-3, "signum": 3e-4, "stosignsgd": 1e-3},
}

TASKS: dict[str, str] = {
    "convex-l1": "non-smooth convex ‖Ax−b‖₁ (block kinks): deterministic SignSGD provably stalls, optimum 0",
    "mlp": "ReLU MLP on Gaussian inputs labelled by a fixed random teacher network (10 classes)",
    "gpt": "tiny nanoGPT-style char-level transformer on Python's pydoc_data.topics (default LM task)",
    "moe": "tiny mixture-of-experts transformer (softmax router, top-k experts, balancing loss) on the same text",
    "text": "the tiny GPT on your data=PATH (text file as bytes, uint16 .bin tokens, or a train.bin/val.bin dir)",
}
DATA_TASKS = ("gpt", "moe", "text")


def get_task(name: str, *, size: str = "default", data: str | None = None) -> Task:
    """The task ``name`` at ``size`` ("quick" | "default" | "paper"); ``data=PATH`` for gpt, moe and text.

    Unknown names, sizes or unusable data raise ``ValueError`` naming the valid choices.
    """
    if not isinstance(name, str) or name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; valid sizes: {', '.join(SIZES)}")
    if data is not None and name not in DATA_TASKS:
        raise ValueError(f"task {name!r} uses embedded data; data=PATH applies only to {', '.join(DATA_TASKS)}")
    if name == "text" and data is None:
        raise ValueError("task 'text' needs data=PATH (a text file, a uint16 .bin token file, "
                         "or a directory with train.bin and val.bin)")

    if name == "convex-l1":
        c = dict(_CONVEX[size])
        steps, every = c.pop("steps"), c.pop("eval_every")
        lrs = _LRS["convex", size]
        return Task(name, TASKS[name], size, steps, every, dict(lrs), {k: _grid(v) for k, v in lrs.items()},
                    c["dim"], c, _build_convex)
    if name == "mlp":
        c = dict(_MLP[size])
        steps, every = c.pop("steps"), c.pop("eval_every")
        c.update(in_dim=32, classes=10, teacher_hidden=64, n_val=2048)
        lrs = _LRS["mlp", size]
        return Task(name, TASKS[name], size, steps, every, dict(lrs), {k: _grid(v) for k, v in lrs.items()},
                    c["batch"], c, _build_mlp)

    c = dict(_LM[size])
    steps, every = c.pop("steps"), c.pop("eval_every")
    if data is not None:
        data = os.path.abspath(os.fspath(data))
        _check_corpus(load_corpus(data), c["ctx"])   # missing/empty/too small -> ValueError here, not later
    c["data"] = data
    if name == "moe":
        c.update(_MOE[size], expert_hidden=2 * c["d_model"], aux_weight=0.01)
    lrs = _LRS["lm", size]
    if data is not None:
        model = "tiny mixture-of-experts transformer" if name == "moe" else "tiny nanoGPT-style transformer"
        description = f"{model} on {load_corpus(data).source}"
    else:
        description = TASKS[name]
    return Task(name, description, size, steps, every, dict(lrs), {k: _grid(v) for k, v in lrs.items()},
                c["batch"] * c["ctx"], c, _build_lm)
