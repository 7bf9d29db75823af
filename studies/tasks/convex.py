"""convex-l1: a non-smooth convex problem on which deterministic SignSGD provably stalls (optimum 0)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from studies.tasks.base import DATA_SEED, Task, TaskRun, check_step, sized_task

__all__ = ["L1Objective", "l1_problem", "ConvexRun", "build_convex", "convex_task", "CONVEX_SIZES", "CONVEX_LRS",
           "WEAK_EPS"]

WEAK_EPS = 0.02  # convex-l1-weak: below (1 - 0.9)/(1 + 0.9) = 0.053, where Signum's momentum keeps the stall


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
        check_step(step)
        return self.model()

    @torch.no_grad()
    def val_loss(self) -> float:
        return float(self.model())

    @torch.no_grad()
    def loss_parts(self) -> dict[str, float]:
        """``f(x)`` split by kink: ``reducible`` = ``Σ a_i |(u − v) − c_i| / n_blocks`` (the steep kink, which
        every sign method reduces) and ``stalled`` = ``Σ a_i ε |(u + v) − s_i| / n_blocks`` (the gentle kink,
        which deterministic SignSGD never moves); they sum to ``val_loss()``."""
        m = self.model
        r = (m.A @ m.x - m.b).abs()
        n = m.x.numel() // 2
        return {"reducible": float(r[0::2].sum()) / n, "stalled": float(r[1::2].sum()) / n}


def build_convex(*, seed: int, device: torch.device, dim: int, eps: float, init_std: float) -> ConvexRun:
    A, b, x_star = l1_problem(dim, eps)
    g = torch.Generator().manual_seed(seed)
    x0 = x_star + init_std * torch.randn(dim, generator=g)
    return ConvexRun(L1Objective(x0, A, b).to(device), x_star.to(device))



CONVEX_SIZES = {
    "quick": dict(dim=16, eps=0.25, init_std=1.0, steps=500, eval_every=25),
    "default": dict(dim=64, eps=0.25, init_std=1.0, steps=2000, eval_every=50),
    "paper": dict(dim=1024, eps=0.25, init_std=1.0, steps=20000, eval_every=200),
}
# fp32 starting points per optimizer (measured as described in studies.tasks; convex "quick" = default)
CONVEX_LRS = {
    "quick": {"adamw": 1e-2, "sgd": 1e-1, "signsgd": 1e-2, "signum": 1e-2, "lion": 1e-2, "stosignsgd": 1e-2},
    "default": {"adamw": 1e-2, "sgd": 1e-1, "signsgd": 1e-2, "signum": 1e-2, "lion": 1e-2, "stosignsgd": 1e-2},
    "paper": {"adamw": 3e-3, "sgd": 3e-2, "signsgd": 3e-3, "signum": 3e-3, "lion": 3e-3, "stosignsgd": 3e-3},
}


def convex_task(name: str, description: str, size: str, data: str | None) -> Task:
    """The convex-l1 recipe at ``size`` (embedded problem; ``data`` must be None, checked by the registry)."""
    c = CONVEX_SIZES[size]
    if name == "convex-l1-weak":  # kink strength below Signum's (1 - beta)/(1 + beta) ~ 0.053 threshold
        c = dict(c, eps=WEAK_EPS)
    return sized_task(name, description, size, c, CONVEX_LRS[size], c["dim"], build_convex)
