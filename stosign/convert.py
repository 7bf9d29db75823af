"""Sign conversion: turn any optimizer's update direction into its (unbiased, stochastic) sign counterpart.

For a base optimizer whose step is θ ← θ − η·u_t (u_t = SGD-momentum's m, AdamW's m̂/(√v̂+ε), Lion's sign, ...),
the converted optimizer steps

    G_t = max(G_{t−1}, |u_t|)          θ ← θ − η·sign(u_t + G_t⊙n_t) − η·λ·θ,     n_t ~ U(−1, 1)

(``noise=False``: θ ← θ − η·sign(u_t), the plain-sign counterpart; ``buffer`` as in StoSignSGD).

How u_t is obtained, for ANY torch.optim.Optimizer: the parameters are copied, the base optimizer steps, the
direction is read off as u = (θ_before − θ_after)/lr with the group's lr, the parameters are restored, and the sign
step is applied with the same lr. Consequences, by design:

- Weight decay of the base (AdamW's decoupled decay, SGD/Adam's coupled L2) is part of what the base did to θ, so it
  is inside u and is signed with it. For Algorithm 3's decoupled decay *outside* the sign, give the base
  weight_decay=0 and pass ``weight_decay`` here (applied as −lr·λ·θ).
- u is the change the base actually made in the parameter's dtype: a base update smaller than half an ulp of θ is
  lost to rounding and reads as u = 0 (no move there), and in general u equals the base's internal direction only
  up to that rounding (exactly when the arithmetic is exact, e.g. dyadic values and lr a power of two; the tests use
  that to show StoSignSGD is the conversion of EMA-momentum SGD bit for bit).
- Groups with lr == 0 are left unchanged. Parameters without a gradient are restored and not moved, even if the base
  moved them.
- Bases that evaluate the closure several times (LBFGS) work: their direction is the net change of one step.

Memory: the state adds G per parameter (none for noise=False or buffer="instant"); two parameter-sized scratch
buffers (snapshot and direction) are reused across steps.

The wrapper shares the base's ``param_groups`` (so LR schedulers may be attached to either) and its
``state_dict()`` is ``{"base": base.state_dict(), "state": ..., "param_groups": ..., "rng": ...}``.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.optim import Optimizer

from .step import SignOptimizer, check_sign_hparams, sign_step_foreach, sign_step_single

__all__ = ["SignConverted"]


class SignConverted(SignOptimizer):
    """Wrap ``optimizer`` so that its update direction u becomes the step −lr·sign(u + G⊙n) (see module doc).

    Args:
        optimizer: any torch.optim.Optimizer (already constructed on the parameters).
        noise: True: stochastic sign with the running bound G (unbiased for u/G); False: sign(u).
        buffer: "max" | "decayed_max" | "instant" | "tensor_max" (as in StoSignSGD).
        buffer_decay: for "decayed_max".
        weight_decay: decoupled decay −lr·λ·θ applied outside the sign (default 0).
        generator: torch.Generator for the noise (None: one per device seeded with torch.initial_seed()).
        foreach: as in StoSignSGD (None: foreach on GPU, loop on CPU).
    """

    def __init__(self, optimizer: Optimizer, *, noise: bool = True, buffer: str = "max", buffer_decay: float = 0.999,
                 weight_decay: float = 0.0, generator: torch.Generator | None = None,
                 foreach: bool | None = None) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"SignConverted wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        check_sign_hparams(weight_decay, buffer, buffer_decay)
        self.base = optimizer
        self.noise = bool(noise)
        self.buffer = buffer
        self.buffer_decay = float(buffer_decay)
        self.weight_decay = float(weight_decay)
        self.foreach = foreach
        groups = [{"params": list(g["params"])} for g in optimizer.param_groups]
        super().__init__(groups, {}, generator)
        self.param_groups = optimizer.param_groups  # shared: schedulers on either object act on both

    def add_param_group(self, param_group: dict) -> None:
        if not hasattr(self, "base") or self.param_groups is not self.base.param_groups:
            super().add_param_group(param_group)  # during __init__
            return
        self.base.add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            self._generator_for(p.device)

    def __repr__(self) -> str:
        return (f"SignConverted({self.base!r}, noise={self.noise}, buffer={self.buffer!r}, "
                f"weight_decay={self.weight_decay})")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Run the base step, read its direction, restore θ and apply the sign step. Returns the closure's loss."""
        everything = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        snapshot = self._views("snapshot", everything)
        if everything:
            torch._foreach_copy_(snapshot, everything)
        saved = dict(zip(map(id, everything), snapshot))
        loss = self.base.step(closure)
        for group in self.param_groups:
            lr = float(group["lr"])
            params = [p for p in group["params"] if p.requires_grad]
            movers = [p for p in params if p.grad is not None]
            if lr == 0.0 or not movers:
                for p in params:
                    p.copy_(saved[id(p)])
                continue
            dirs = self._views("direction", movers)
            for p, u in zip(movers, dirs):
                torch.sub(saved[id(p)], p, out=u).div_(lr)  # u = (θ_before − θ_after)/lr
            for p in params:
                p.copy_(saved[id(p)])  # restore
            self._count_step(movers)
            scratch = [saved[id(p)] for p in movers]  # the snapshot is free again
            if self.noise:
                bounds = self._bounds(self.buffer, movers)
                noises = self._noise(movers)
            else:
                bounds, noises = [None] * len(movers), None
            kernel = sign_step_foreach if self._use_foreach(self.foreach, movers) else sign_step_single
            kernel(movers, dirs, bounds, noises, scratch, lr=lr, weight_decay=self.weight_decay, buffer=self.buffer,
                   buffer_decay=self.buffer_decay)
        return loss

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["base"] = self.base.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        base_sd = state_dict.pop("base")
        super().load_state_dict(state_dict)  # replaces self.param_groups with new dicts ...
        self.base.load_state_dict(base_sd)
        self.param_groups = self.base.param_groups  # ... so share the base's again
