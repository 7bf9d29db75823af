"""The sign step and the machinery shared by every sign optimizer of stosign (StoSignSGD, SignSGD, SignConverted,
Lion): hyperparameter checks, the single-tensor and foreach sign kernels, and :class:`SignOptimizer`, the base class
holding one random generator per device (saved in ``state_dict()["rng"]``) and a reusable scratch workspace.

StoSignSGD's float32 CPU parameters of >= 65,536 elements may instead take the compiled one-pass kernel of
:mod:`stosign.fused` (``fused`` argument), bit-identical to these.

The kernels update ``params`` in place: θ ← θ·(1 − lr·λ) − lr·s, with s = sign(d + G⊙n) when noise is given
(G the bound buffer updated per ``buffer``, n = noise·2**-15) and s = sign(d) otherwise.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor
from torch.optim import Optimizer

from .fused import fusable, fused_kernel
from .sign import NOISE_SCALE, random_int16

__all__ = ["BUFFERS", "check_hparams", "check_sign_hparams", "device_key", "carve", "sign_step_single",
           "sign_step_foreach", "SignOptimizer"]

BUFFERS = ("max", "decayed_max", "instant", "tensor_max")

def check_hparams(lr: Any, momentum: Any, weight_decay: Any, buffer: Any = "max", buffer_decay: Any = 0.999) -> None:
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"lr must be a number or a 1-element tensor, got shape {tuple(lr.shape)}")
        lr = float(lr)
    if not isinstance(lr, (int, float)) or not lr >= 0.0:
        raise ValueError(f"lr must be a number >= 0, got {lr!r}")
    if not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    check_sign_hparams(weight_decay, buffer, buffer_decay)


def check_sign_hparams(weight_decay: Any, buffer: Any = "max", buffer_decay: Any = 0.999) -> None:
    """The checks of the sign step's own hyperparameters (shared with SignConverted)."""
    if not isinstance(weight_decay, (int, float)) or not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    if buffer not in BUFFERS:
        raise ValueError(f"buffer must be one of {BUFFERS}, got {buffer!r}")
    if not isinstance(buffer_decay, (int, float)) or not 0.0 < buffer_decay <= 1.0:
        raise ValueError(f"buffer_decay must be in (0, 1], got {buffer_decay!r}")


def device_key(device: torch.device) -> str:
    device = torch.device(device)
    if device.type != "cpu" and device.index is None:
        device = torch.device(device.type, torch.cuda.current_device() if device.type == "cuda" else 0)
    return str(device)


def carve(params: list[Tensor], keys: list[Any], flat_for: Callable[[Any, int], Tensor]) -> list[Tensor]:
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
# The sign step, shared by StoSignSGD, SignSGD, SignConverted and Lion. `dirs` are the update directions (m, u or
# Lion's c), `bounds` the G buffers (None where unused), `noises` odd int16 tensors (None when noise is off),
# `scratch` one tensor like each parameter that the step may overwrite (without noise it may be `dirs` itself).
# ----------------------------------------------------------------------------------------------------------------

def sign_step_single(params: list[Tensor], dirs: list[Tensor], bounds: list[Tensor | None],
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


def sign_step_foreach(params: list[Tensor], dirs: list[Tensor], bounds: list[Tensor | None],
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
        if dirs is not ws:
            torch._foreach_copy_(ws, dirs)
        torch._foreach_sign_(ws)
    if weight_decay != 0.0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_add_(params, ws, alpha=-lr)


class SignOptimizer(Optimizer):
    """Shared machinery: one random generator per device (saved in state_dict) and a reusable workspace."""

    def __init__(self, params: Any, defaults: dict, generator: torch.Generator | None) -> None:
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self._user_generator = generator
        self._generators: dict[str, torch.Generator] = {}
        self._workspace: dict[tuple, Tensor] = {}
        self._fused: bool | None = False  # StoSignSGD sets its ``fused`` argument (see stosign.fused)
        super().__init__(params, defaults)

    # --- random numbers ----------------------------------------------------------------------------------------
    def _generator_for(self, device: torch.device) -> torch.Generator:
        key = device_key(device)
        gen = self._generators.get(key)
        if gen is None:
            if self._user_generator is not None:
                if device_key(self._user_generator.device) != key:
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
        key = (name, device_key(device), dtype)
        buf = self._workspace.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._workspace[key] = buf
        return buf[:numel]

    def _views(self, name: str, params: list[Tensor]) -> list[Tensor]:
        """One workspace tensor shaped like each parameter (flat buffers per (device, dtype), reused)."""
        keys = [(device_key(p.device), p.dtype) for p in params]
        return carve(params, keys, lambda k, n: self._buffer(name, torch.device(k[0]), k[1], n))

    def _noise(self, params: list[Tensor]) -> list[Tensor]:
        """Odd uniform int16 noise shaped like each parameter: one generator call per device, in parameter order."""
        def draw(k: str, n: int) -> Tensor:
            words = self._buffer("noise", torch.device(k), torch.int64, (n + 3) // 4)
            return random_int16(n, k, self._generator_for(torch.device(k)), out=words).bitwise_or_(1)
        return carve(params, [device_key(p.device) for p in params], draw)

    def release_workspace(self) -> None:
        """Free the scratch buffers (they are reallocated at the next step)."""
        self._workspace.clear()

    # --- pickling / deepcopy: torch's Optimizer keeps only defaults/state/param_groups ----------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(_user_generator=self._user_generator, _generators=self._generators, _fused=self._fused)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = {"_user_generator": None, "_generators": {}, "_fused": False} | dict(state)
        state["_workspace"] = {}  # scratch only: reallocated at the next step
        super().__setstate__(state)

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
        bufs = self._state_zeros("momentum_buffer", params)
        if foreach:
            torch._foreach_lerp_(bufs, grads, 1.0 - beta)
        else:
            for b, g in zip(bufs, grads):
                b.lerp_(g, 1.0 - beta)
        return bufs

    def _state_zeros(self, key: str, params: list[Tensor]) -> list[Tensor]:
        """``self.state[p][key]`` of each parameter, created as zeros shaped like ``p`` the first time."""
        out = []
        for p in params:
            st = self.state[p]
            if key not in st:
                st[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
            out.append(st[key])
        return out

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
            params, grads = self._collect(group)
            if not params:
                continue
            self._count_step(params)
            foreach = self._use_foreach(group["foreach"], params)
            noises = self._noise(params) if noisy else None  # one draw per group, the same on every path
            scratch = self._views("scratch", params)
            if noisy and buffer in ("max", "decayed_max") and self._fused is not False:
                params, grads, noises, scratch = self._fused_step(group, params, grads, noises, scratch)
                if not params:
                    continue
            dirs = self._momentum_dirs(group, params, grads, foreach)
            bounds = self._bounds(buffer, params) if noisy else [None] * len(params)
            kernel = sign_step_foreach if foreach else sign_step_single
            kernel(params, dirs, bounds, noises, scratch, lr=float(group["lr"]),
                   weight_decay=float(group["weight_decay"]), buffer=buffer, buffer_decay=float(buffer_decay))
        return loss

    def _fused_step(self, group: dict, params: list[Tensor], grads: list[Tensor], noises: list[Tensor],
                    scratch: list[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """Step the parameters :func:`stosign.fused.fusable` accepts with the compiled kernel (bit-identical to the
        eager step); returns the other parameters' (params, grads, noises, scratch) for the eager path."""
        take = [i for i, (p, g) in enumerate(zip(params, grads)) if fusable(p, g)]
        if not take:
            return params, grads, noises, scratch
        beta = group["momentum"]
        kernel = fused_kernel(beta != 0.0, group["maximize"], required=self._fused is True)
        if kernel is None:
            return params, grads, noises, scratch
        lr, wd = float(group["lr"]), float(group["weight_decay"])
        decay = float(group["buffer_decay"]) if group["buffer"] == "decayed_max" else 1.0
        scalars = [torch.tensor(v, dtype=torch.float32) for v in (1.0 - beta, decay, 1.0 - lr * wd, -lr)]
        ps = [params[i] for i in take]
        if beta != 0.0:  # the eager path's state order: momentum_buffer, then bound
            self._state_zeros("momentum_buffer", ps)
        done = []
        for i, G in zip(take, self._bounds(group["buffer"], ps)):
            p, g = params[i], grads[i]
            m = self.state[p]["momentum_buffer"] if beta != 0.0 else g
            if not (m.is_contiguous() and G.is_contiguous() and m.dtype == G.dtype == torch.float32):
                continue  # e.g. a state loaded with other strides: the eager path
            n = scratch[i].view(-1).copy_(noises[i].view(-1))  # odd int16 -> float32, exact
            if kernel(p.view(-1), g.view(-1), m.view(-1), G.view(-1), n, *scalars):
                done.append(i)  # else dynamo would have recompiled: nothing ran, the eager step does it
        rest = sorted(set(range(len(params))) - set(done))
        return ([params[i] for i in rest], [grads[i] for i in rest], [noises[i] for i in rest],
                [scratch[i] for i in rest])
