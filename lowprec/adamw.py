"""``NativeAdamW``: ``torch.optim.AdamW(foreach=True)`` whose step runs as two native passes where it can, bit for bit.

torch's foreach AdamW on the CPU is about ten passes over the parameters and states, each a separate ATen call per
tensor (lerp_, mul_, addcmul_, sqrt, div_, add_, addcdiv_, ...). :func:`lowprec.fast.adam_step` does the same float
operations in the same order in two C loops around torch's own ``_foreach_sqrt`` (MKL's square root is not the
correctly rounded one, so it stays torch's call), over all tensors of a group in one call each.

Where it runs: every group with ``foreach`` on (not ``fused``), no ``amsgrad``, ``maximize``, ``capturable`` or
``differentiable``, float ``lr``/betas; every parameter with a gradient, the gradient and both states contiguous
dense float32 on the CPU; one torch thread; not while torch.compile traces; the native helpers built; and the
check below passed. Anywhere else, and for the whole step if one group does not qualify, it is
``torch.optim.AdamW.step`` itself.

The check: the first time a process would use the native step, it runs both on a fixed small problem (tensor
sizes that exercise the vector bodies and tails, both branches of lerp, with and without weight decay, 4 steps)
and compares every bit of parameters and states. Whether ATen contracts a product into an fma is a property of
the torch build and CPU; a build where the bits differ keeps torch's step for the whole process
(``native_adamw_status()`` says which and why). ``tests/lowprec/test_native_adamw.py`` compares the two over many
steps, shapes, hyperparameters and edge values.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from lowprec import fast
from lowprec.optim import closure_loss

__all__ = ["NativeAdamW", "native_adamw_status"]

_CHECK: dict[str, Any] = {}   # "ok": bool, "why": str, once per process


def _check_sizes() -> list[int]:
    return [1, 7, 15, 16, 17, 31, 32, 33, 64, 100, 1000, 4099]


def _self_check() -> tuple[bool, str]:
    """Both steps on the same small problem; (bits equal, why not)."""
    gen = torch.Generator().manual_seed(1234)
    sizes = _check_sizes()
    for beta1, wd in ((0.9, 0.0), (0.9, 0.1), (0.3, 0.05)):
        ref = [torch.randn(n, generator=gen) for n in sizes]
        mine = [p.clone() for p in ref]
        a = torch.optim.AdamW(ref, lr=3e-3, betas=(beta1, 0.95), eps=1e-8, weight_decay=wd, foreach=True)
        b = NativeAdamW(mine, lr=3e-3, betas=(beta1, 0.95), eps=1e-8, weight_decay=wd, _checked=True)
        for step in range(4):
            for i, n in enumerate(sizes):
                g = torch.randn(n, generator=gen) * 10.0 ** (step - 3 - (i % 5))
                if i == 3:
                    g[:2] = 0.0
                ref[i].grad, mine[i].grad = g, g.clone()
            a.param_groups[0]["lr"] = b.param_groups[0]["lr"] = 3e-3 * (1 + step) / 4   # an LR schedule
            a.step()
            if not b._native_step(any_threads=True):
                return False, "the native helpers are unavailable"
        for p, q in zip(ref, mine):
            sa, sb = a.state[p], b.state[q]
            for x, y in ((p, q), (sa["exp_avg"], sb["exp_avg"]), (sa["exp_avg_sq"], sb["exp_avg_sq"]),
                         (sa["step"], sb["step"])):
                if not torch.equal(x.view(torch.int32) if x.dim() else x, y.view(torch.int32) if y.dim() else y):
                    return False, (f"differs from torch.optim.AdamW(foreach=True) on this build and CPU "
                                   f"(beta1={beta1}, weight_decay={wd}, {p.numel()} values)")
    return True, ""


def native_adamw_status() -> tuple[bool, str]:
    """(whether ``NativeAdamW`` may take the native step in this process, why not); runs the check if not yet."""
    if "ok" not in _CHECK:
        if not fast.native_available():
            _CHECK["ok"], _CHECK["why"] = False, "the native helpers are unavailable"
        else:
            _CHECK["ok"], _CHECK["why"] = _self_check()
    return _CHECK["ok"], _CHECK["why"]


class NativeAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` with ``foreach=True`` (the default here); its step is the native one where it applies
    (module docstring), else torch's. State, ``state_dict`` and hooks are torch's own."""

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, foreach: bool | None = True, _checked: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach, **kwargs)
        self._checked = _checked   # (the self-check's own instance: no check of the check)
        self._packed: tuple[dict[torch.Tensor, fast.PackedMoments], Callable[[], None]] | None = None

    def defer_moment_decode(self, packed: dict[torch.Tensor, fast.PackedMoments] | None,
                            decode: Callable[[], None] | None = None) -> None:
        """For the next :meth:`step` only (``lowprec.optim``'s wrapper calls this just before it): the parameters
        in ``packed`` have ``exp_avg`` / ``exp_avg_sq`` tensors of the right shape whose values are still only
        the codes in their :class:`lowprec.fast.PackedMoments`. The native step decodes them as it updates them
        and writes the new encodings (``done``); a step that cannot be native calls ``decode()`` first (which
        must put the decoded values in the states) and then runs torch's. ``None`` withdraws the request."""
        self._packed = None if packed is None else (packed, decode)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = closure_loss(closure)
        packed, self._packed = getattr(self, "_packed", None), None   # (an instance unpickled from before it)
        if (not (self._checked or native_adamw_status()[0])
                or not self._native_step(packed=None if packed is None else packed[0])):
            if packed is not None:
                packed[1]()
            super().step()
        return loss

    def _native_step(self, any_threads: bool = False,
                     packed: dict[torch.Tensor, fast.PackedMoments] | None = None) -> bool:
        """The native step of every group, or False (nothing changed) where one group or tensor does not qualify
        (or a parameter in ``packed`` would not be stepped: it has no gradient here)."""
        if ((torch.get_num_threads() != 1 and not any_threads) or torch.compiler.is_compiling()
                or not fast.native_available()):
            return False
        work = []
        for group in self.param_groups:
            if not _group_ok(group):
                return False
            params = [p for p in group["params"] if p.grad is not None]
            state = self.state
            for p in params:
                g = p.grad
                if not (_dense_f32(p) and _dense_f32(g)) or g.shape != p.shape:
                    return False
                st = state.get(p)
                if st:
                    step, m, v = st.get("step"), st.get("exp_avg"), st.get("exp_avg_sq")
                    if not (isinstance(step, torch.Tensor) and step.is_cpu and _dense_f32(m) and _dense_f32(v)
                            and m.shape == p.shape and v.shape == p.shape):
                        return False
            work.append((group, params))
        if packed and sum(p in packed for _, params in work for p in params) != len(packed):
            return False
        for group, params in work:
            steps, ms, vs = [], [], []
            for p in params:
                st = self.state[p]
                if len(st) == 0:   # as torch's _init_group (not capturable, not fused)
                    st["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                steps.append(st["step"])
                ms.append(st["exp_avg"])
                vs.append(st["exp_avg_sq"])
            if not params:
                continue
            torch._foreach_add_(steps, torch.tensor(1.0, device="cpu"), alpha=1.0)
            beta1, beta2 = group["betas"]
            fast.adam_step(params, [p.grad for p in params], ms, vs, [s.item() for s in steps], lr=group["lr"],
                           beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                           packed=[packed.get(p) for p in params] if packed else None)
        return True


def _scalar_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _group_ok(group: dict) -> bool:
    beta1, beta2 = group["betas"]
    return (group.get("foreach") is True and not group.get("fused") and not group.get("amsgrad")
            and not group.get("maximize") and not group.get("capturable") and not group.get("differentiable")
            and group.get("decoupled_weight_decay", True)
            and all(isinstance(x, (float, int)) and not isinstance(x, bool)
                    for x in (group["lr"], beta1, beta2, group["eps"], group["weight_decay"])))


def _dense_f32(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and fast.dense_cpu_f32(t)
