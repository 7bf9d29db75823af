"""StoSignSGD (Yu, Pan, Liu, Zhang 2026, arXiv 2604.15416, Algorithm 3) and SignSGD / Signum.

StoSignSGD, per coordinate, with decoupled weight decay::

    m_t     = β·m_{t−1} + (1−β)·g_t          (momentum=0: m_t = g_t, no buffer kept)
    G_t     = max(G_{t−1}, |m_t|)            (buffer="max", the paper's running maximum)
    n_t     ~ U(−1, 1)                        (16-bit grid, see stosign.sign)
    θ_{t+1} = θ_t − η·sign(m_t + G_t⊙n_t) − η·λ·θ_t

E[sign(m + G⊙n)] = m/G: each coordinate moves by exactly ±η (0 where G = 0) and the step is unbiased for the
preconditioned direction m/G. With fresh state G_1 = |m_1|, so the first step is exactly −η·sign(g_1) − η·λ·θ_1.

Ablations (all per param group): ``noise=False`` gives the deterministic sign(m) (Signum; with momentum=0 SignSGD);
``buffer`` = "max" (paper) | "decayed_max" (G = max(buffer_decay·G, |m|)) | "instant" (G = |m|: since |n| < 1 the
step is then sign(m) again, the control showing the buffer matters) | "tensor_max" (G = one running max of |m| per
tensor, a 0-dim state).

State per parameter: ``step`` (int), ``momentum_buffer`` (m, when momentum > 0) and ``bound`` (G, when noise is on
and buffer is not "instant"): two buffers for the paper variant. The random generator's state is saved in
``state_dict()["rng"]`` so a resumed run continues bit-identically. Scratch memory (one value of the parameter's
dtype and 2 bytes of random numbers per element, reused every step) is a workspace outside the state, freed with
``release_workspace()``.

``foreach``: True uses torch._foreach_* ops, False a per-tensor loop; None (default) picks foreach when every
parameter is on a GPU and the loop on CPU (there, torch's foreach ops are loops that allocate and are slower). Both
paths draw the same random numbers and compute bit-identical results.

For bf16/fp16 parameters the state and the arithmetic are in the parameter's dtype (the torch convention), which
coarsens the probability resolution to that dtype's precision.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from .sign import NOISE_SCALE, random_int16

__all__ = ["StoSignSGD", "SignSGD", "BUFFERS", "ABLATIONS"]

BUFFERS = ("max", "decayed_max", "instant", "tensor_max")

ABLATIONS: dict[str, dict[str, Any]] = {
    "paper": {},                                  # Algorithm 3: momentum 0.9, running max, noise
    "no-noise": {"noise": False},                 # deterministic sign(m) = Signum
    "no-momentum": {"momentum": 0.0},             # m = g
    "decayed-max": {"buffer": "decayed_max"},     # G = max(0.999·G, |m|)
    "instant": {"buffer": "instant"},             # G = |m| (then the step is sign(m) again)
    "tensor-max": {"buffer": "tensor_max"},       # one running max per tensor
}
"""Named StoSignSGD ablations: ``StoSignSGD(params, lr=..., **ABLATIONS[name])``. The converted base optimizers are
:class:`stosign.SignConverted` (e.g. ``SignConverted(torch.optim.AdamW(params, lr, weight_decay=0), weight_decay=λ)``)."""


def _check_hparams(lr: Any, momentum: Any, weight_decay: Any, buffer: Any = "max", buffer_decay: Any = 0.999) -> None:
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"lr must be a number or a 1-element tensor, got shape {tuple(lr.shape)}")
        lr = float(lr)
    if not isinstance(lr, (int, float)) or not lr >= 0.0:
        raise ValueError(f"lr must be a number >= 0, got {lr!r}")
    if not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    _check_sign_hparams(weight_decay, buffer, buffer_decay)


def _check_sign_hparams(weight_decay: Any, buffer: Any = "max", buffer_decay: Any = 0.999) -> None:
    """The checks of the sign step's own hyperparameters (shared with SignConverted)."""
    if not isinstance(weight_decay, (int, float)) or not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    if buffer not in BUFFERS:
        raise ValueError(f"buffer must be one of {BUFFERS}, got {buffer!r}")
    if not isinstance(buffer_decay, (int, float)) or not 0.0 < buffer_decay <= 1.0:
        raise ValueError(f"buffer_decay must be in (0, 1], got {buffer_decay!r}")


def _device_key(device: torch.device) -> str:
    device = torch.device(device)
    if device.type != "cpu" and device.index is None:
        device = torch.device(device.type, torch.cuda.current_device() if device.type == "cuda" else 0)
    return str(device)


def _carve(params: list[Tensor], keys: list[Any], flat_for: Callable[[Any, int], Tensor]) -> list[Tensor]:
    """One view shaped like each parameter into a flat tensor per key: ``flat_for(key, total numel)`` is called
    once per distinct key (in order of first appearance) and the views follow parameter order within it."""
    totals: dict[Any, int] = {}
    for p, k in zip(params, keys):
        totals[k] = totals.get(k, 0) + p.numel()
    flats = {k: flat_for(k, n) for k, n in totals.items()}
    offsets = dict.fromkeys(totals, 0)
    out = []
    for p, k in zip(params, keys):
        o = offsets[k]
        out.append(flats[k][o:o + p.numel()].view(p.shape))
        offsets[k] = o + p.numel()
    return out


# ----------------------------------------------------------------------------------------------------------------
# The sign step, shared by StoSignSGD, SignSGD and SignConverted. `dirs` are the update directions (m or u),
# `bounds` the G buffers (None where unused), `noises` odd int16 tensors (None when noise is off), `scratch` one
# tensor like each parameter that the step may overwrite.
# ----------------------------------------------------------------------------------------------------------------

def _sign_step_single(params: list[Tensor], dirs: list[Tensor], bounds: list[Tensor | None],
                      noises: list[Tensor] | None, scratch: list[Tensor], *, lr: float, weight_decay: float,
                      buffer: str, buffer_decay: float) -> None:
    for i, p in enumerate(params):
        d, ws = dirs[i], scratch[i]
        if noises is not None:
            if buffer == "instant":
                bound = torch.abs(d, out=ws)
            else:
                bound = bounds[i]
                torch.abs(d, out=ws)
                if buffer == "tensor_max":
                    torch.maximum(bound, ws.amax(), out=bound)
                else:
                    if buffer == "decayed_max":
                        bound.mul_(buffer_decay)
                    torch.maximum(bound, ws, out=bound)
            torch.addcmul(d, bound, noises[i], value=NOISE_SCALE, out=ws)  # m + G·n
            ws.sign_()
        else:
            torch.sign(d, out=ws)
        if weight_decay != 0.0:
            p.mul_(1.0 - lr * weight_decay)
        p.add_(ws, alpha=-lr)


def _sign_step_foreach(params: list[Tensor], dirs: list[Tensor], bounds: list[Tensor | None],
                       noises: list[Tensor] | None, scratch: list[Tensor], *, lr: float, weight_decay: float,
                       buffer: str, buffer_decay: float) -> None:
    if not params:
        return
    ws = scratch
    if noises is not None:
        torch._foreach_copy_(ws, dirs)
        torch._foreach_abs_(ws)
        if buffer == "instant":
            torch._foreach_mul_(ws, noises)  # |m|·n, then ·2**-15 (exact) + m: the same rounding as addcmul
            torch._foreach_mul_(ws, NOISE_SCALE)
            torch._foreach_add_(ws, dirs)
        else:
            if buffer == "tensor_max":
                torch._foreach_maximum_(bounds, [a.amax() for a in ws])
            else:
                if buffer == "decayed_max":
                    torch._foreach_mul_(bounds, buffer_decay)
                torch._foreach_maximum_(bounds, ws)
            torch._foreach_copy_(ws, dirs)
            torch._foreach_addcmul_(ws, bounds, noises, value=NOISE_SCALE)  # m + G·n
        torch._foreach_sign_(ws)
    else:
        torch._foreach_copy_(ws, dirs)
        torch._foreach_sign_(ws)
    if weight_decay != 0.0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_add_(params, ws, alpha=-lr)


class _SignBase(Optimizer):
    """Shared machinery: one random generator per device (saved in state_dict) and a reusable workspace."""

    def __init__(self, params: Any, defaults: dict, generator: torch.Generator | None) -> None:
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self._user_generator = generator
        self._generators: dict[str, torch.Generator] = {}
        self._workspace: dict[tuple, Tensor] = {}
        super().__init__(params, defaults)

    # --- random numbers ----------------------------------------------------------------------------------------
    def _generator_for(self, device: torch.device) -> torch.Generator:
        key = _device_key(device)
        gen = self._generators.get(key)
        if gen is None:
            if self._user_generator is not None:
                if _device_key(self._user_generator.device) != key:
                    raise ValueError(f"generator is on {self._user_generator.device} but a parameter is on {key}; "
                                     "pass generator=None (one generator per device is then created) or put all "
                                     "parameters on the generator's device")
                gen = self._user_generator
            else:
                gen = torch.Generator(device=key)
                gen.manual_seed(torch.initial_seed())  # reproducible under torch.manual_seed
            self._generators[key] = gen
        return gen

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            self._generator_for(p.device)  # create eagerly so state_dict always carries the rng state

    def _buffer(self, name: str, device: torch.device, dtype: torch.dtype, numel: int) -> Tensor:
        key = (name, _device_key(device), dtype)
        buf = self._workspace.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._workspace[key] = buf
        return buf[:numel]

    def _views(self, name: str, params: list[Tensor]) -> list[Tensor]:
        """One workspace tensor shaped like each parameter (flat buffers per (device, dtype), reused)."""
        keys = [(_device_key(p.device), p.dtype) for p in params]
        return _carve(params, keys, lambda k, n: self._buffer(name, torch.device(k[0]), k[1], n))

    def _noise(self, params: list[Tensor]) -> list[Tensor]:
        """Odd uniform int16 noise shaped like each parameter: one generator call per device, in parameter order."""
        def draw(k: str, n: int) -> Tensor:
            words = self._buffer("noise", torch.device(k), torch.int64, (n + 3) // 4)
            return random_int16(n, k, self._generator_for(torch.device(k)), out=words).bitwise_or_(1)
        return _carve(params, [_device_key(p.device) for p in params], draw)

    def release_workspace(self) -> None:
        """Free the scratch buffers (they are reallocated at the next step)."""
        self._workspace.clear()

    # --- state_dict with the generator state ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["rng"] = {k: g.get_state() for k, g in self._generators.items()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        rng = state_dict.pop("rng", None)
        super().load_state_dict(state_dict)
        if rng is not None:
            for k, st in rng.items():
                self._generator_for(torch.device(k)).set_state(st.to("cpu", torch.uint8))

    @staticmethod
    def _use_foreach(foreach: bool | None, params: list[Tensor]) -> bool:
        if foreach is None:
            return bool(params) and all(p.device.type != "cpu" for p in params)
        return bool(foreach)

    def _momentum_dirs(self, group: dict, params: list[Tensor], grads: list[Tensor], foreach: bool) -> list[Tensor]:
        """m ← β·m + (1−β)·g (as torch.lerp); returns the directions (the buffers, or the grads when β = 0)."""
        beta = group["momentum"]
        if group["maximize"]:
            grads = torch._foreach_neg(grads) if foreach else [torch.neg(g) for g in grads]
        if beta == 0.0:
            return grads
        bufs = []
        for p in params:
            st = self.state[p]
            if "momentum_buffer" not in st:
                st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            bufs.append(st["momentum_buffer"])
        if foreach:
            torch._foreach_lerp_(bufs, grads, 1.0 - beta)
        else:
            for b, g in zip(bufs, grads):
                b.lerp_(g, 1.0 - beta)
        return bufs

    def _bounds(self, buffer: str, params: list[Tensor]) -> list[Tensor | None]:
        """The G buffer of each parameter for this ``buffer`` kind (created, or re-created when the kind changed
        between per-tensor and "tensor_max"); None each for "instant"."""
        if buffer == "instant":
            return [None] * len(params)
        out: list[Tensor | None] = []
        for p in params:
            st = self.state[p]
            want_scalar = buffer == "tensor_max"
            b = st.get("bound")
            if b is None or (b.dim() == 0) != want_scalar:
                b = (torch.zeros((), dtype=p.dtype, device=p.device) if want_scalar
                     else torch.zeros_like(p, memory_format=torch.preserve_format))
                st["bound"] = b
            out.append(b)
        return out

    @staticmethod
    def _collect(group: dict) -> tuple[list[Tensor], list[Tensor]]:
        params, grads = [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("sign optimizers do not support sparse gradients")
            params.append(p)
            grads.append(p.grad)
        return params, grads

    def _count_step(self, params: list[Tensor]) -> None:
        for p in params:
            st = self.state[p]
            st["step"] = st.get("step", 0) + 1

    def _sign_options(self, group: dict) -> tuple[bool, str, float]:
        """(noise, buffer, buffer_decay) of a param group, for :meth:`step`."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One optimizer step; ``closure`` (optional) re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            noisy, buffer, buffer_decay = self._sign_options(group)
            _check_hparams(group["lr"], group["momentum"], group["weight_decay"], buffer, buffer_decay)
            params, grads = self._collect(group)
            if not params:
                continue
            self._count_step(params)
            foreach = self._use_foreach(group["foreach"], params)
            dirs = self._momentum_dirs(group, params, grads, foreach)
            bounds = self._bounds(buffer, params) if noisy else [None] * len(params)
            noises = self._noise(params) if noisy else None
            scratch = self._views("scratch", params)
            kernel = _sign_step_foreach if foreach else _sign_step_single
            kernel(params, dirs, bounds, noises, scratch, lr=float(group["lr"]),
                   weight_decay=float(group["weight_decay"]), buffer=buffer, buffer_decay=float(buffer_decay))
        return loss


class StoSignSGD(_SignBase):
    """StoSignSGD: θ ← θ − lr·sign(m + G⊙n) − lr·weight_decay·θ, G the running max of |m| (see module doc).

    Args:
        params: parameters or param groups (every hyperparameter below may be set per group).
        lr: step size η (each coordinate moves by exactly ±lr, or 0 where G = 0).
        momentum: β of the EMA m = β·m + (1−β)·g; 0 uses g directly.
        weight_decay: decoupled decay λ, applied as −lr·λ·θ outside the sign.
        generator: torch.Generator for the noise; None creates one per device seeded with torch.initial_seed().
        foreach: see module doc.
        maximize: ascend instead of descend.
        noise: False gives the deterministic sign(m) (Signum).
        buffer: "max" (paper) | "decayed_max" | "instant" | "tensor_max".
        buffer_decay: factor for "decayed_max": G = max(buffer_decay·G, |m|).
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], lr: float = 1e-3, momentum: float = 0.9,
                 weight_decay: float = 0.0, *, generator: torch.Generator | None = None,
                 foreach: bool | None = None, maximize: bool = False, noise: bool = True, buffer: str = "max",
                 buffer_decay: float = 0.999) -> None:
        _check_hparams(lr, momentum, weight_decay, buffer, buffer_decay)
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=foreach, maximize=bool(maximize),
                        noise=bool(noise), buffer=buffer, buffer_decay=buffer_decay)
        super().__init__(params, defaults, generator)

    def _sign_options(self, group: dict) -> tuple[bool, str, float]:
        return group["noise"], group["buffer"], group["buffer_decay"]


class SignSGD(_SignBase):
    """SignSGD: θ ← θ − lr·sign(g) − lr·weight_decay·θ; with momentum > 0 it is Signum: θ ← θ − lr·sign(m),
    m = β·m + (1−β)·g. Deterministic; state: ``step`` and, for Signum, ``momentum_buffer``."""

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], lr: float = 1e-3, momentum: float = 0.0,
                 weight_decay: float = 0.0, *, foreach: bool | None = None, maximize: bool = False) -> None:
        _check_hparams(lr, momentum, weight_decay)
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=foreach, maximize=bool(maximize))
        super().__init__(params, defaults, None)

    def add_param_group(self, param_group: dict) -> None:
        Optimizer.add_param_group(self, param_group)  # no random numbers: no generator

    def _sign_options(self, group: dict) -> tuple[bool, str, float]:
        return False, "max", 1.0  # deterministic sign: no bound, no noise
