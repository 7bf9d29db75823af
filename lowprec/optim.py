"""Low-precision gradients, packed optimizer states and master weights around any torch optimizer.

``wrap(optimizer, policy)`` returns a ``LowPrecisionOptimizer`` that shares the base optimizer's ``param_groups``
and ``state`` (so LR schedulers, ``zero_grad`` and ``add_param_group`` work as usual) and whose ``step()`` does:

1. **grads**: every ``p.grad`` is replaced by ``quantize(p.grad, policy.grad)``.
2. **states in**: packed states are decoded to fp32 tensors for the base optimizer.
3. **base step**: ``optimizer.step()`` (a closure, if given, is evaluated first, before the grads are quantized,
   so optimizers that evaluate their closure several times, such as LBFGS, are not supported).
4. **master**: every parameter with a gradient is rounded to ``policy.master`` (e.g. ``bf16:stochastic``). The
   parameters stay fp32 tensors holding values on the master grid (emulated storage); at ``wrap`` time they are
   rounded to the grid with round-to-nearest. Stochastic rounding uses this wrapper's own generator.
5. **states out**: each floating-point state tensor shaped like its parameter (``exp_avg``, ``exp_avg_sq``,
   ``momentum_buffer``, ...; never ``step``) whose spec (``policy.state_spec(name)``) is set is stored *packed*:
   ``state[p][name] = {"lowprec_packed": lowprec.encode(...).to_dict()}`` (uint8 codes, 4-bit formats two per
   byte, plus scales). Step counters and other non-float or differently shaped entries are left alone.

Steps 1, 2, 4 and 5 touch only parameters that have a gradient (torch optimizers skip the others; their states
stay packed, untouched).

Between steps the optimizer state really is the packed codes, so ``state_dict()`` holds them (loadable with
``torch.load(weights_only=True)``) together with ``"lowprec"``: the policy string and the stochastic-rounding
generator state, so that ``load_state_dict`` resumes exactly (the next step is identical).

Telemetry (``telemetry=Telemetry(...)``): sites ``optim:grad`` (role grad), ``optim:<state name>`` (role state,
including zero fractions of unquantized second moments), ``optim:master`` (role master, with
``lost_update_frac``: of the parameters whose unrounded update was nonzero, the fraction left unchanged by the
master rounding). ``step()`` calls ``telemetry.next_step()`` at its end.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

import torch

from lowprec.codecs import Encoded, element_scale, decode, encode
from lowprec.policy import PrecisionPolicy, is_identity
from lowprec.quantize import QuantSpec, quantize, quantize_with_scale
from lowprec.telemetry import Telemetry

__all__ = ["wrap", "LowPrecisionOptimizer", "state_bytes"]

_PACKED = "lowprec_packed"


def _is_packed(value: Any) -> bool:
    return isinstance(value, dict) and _PACKED in value


def _active(spec: QuantSpec | None) -> QuantSpec | None:
    """None for specs that are the identity (fp32, unscaled)."""
    return None if is_identity(spec) else spec


def _atleast_1d(t: torch.Tensor) -> torch.Tensor:
    """Scaling needs at least one dimension: a 0-dim tensor becomes shape (1,), others are untouched."""
    return t.reshape(1) if t.dim() == 0 else t


def state_bytes(state_dict: dict) -> int:
    """Bytes of all tensors in an optimizer ``state_dict()['state']`` (packed codes and scales included)."""
    def walk(v: Any) -> int:
        if isinstance(v, torch.Tensor):
            return v.numel() * v.element_size()
        if isinstance(v, dict):
            return sum(walk(x) for x in v.values())
        if isinstance(v, (list, tuple)):
            return sum(walk(x) for x in v)
        return 0
    return walk(state_dict["state"])


class LowPrecisionOptimizer(torch.optim.Optimizer):
    """See module docstring. Use ``wrap(optimizer, policy)`` to build one."""

    def __init__(self, optimizer: torch.optim.Optimizer, policy: PrecisionPolicy | str, *,
                 telemetry: Telemetry | None = None, seed: int = 0) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"wrap needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, LowPrecisionOptimizer):
            raise TypeError("this optimizer is already wrapped")
        self.optimizer = optimizer
        self.policy = PrecisionPolicy.parse(policy)
        self.telemetry = telemetry
        self.seed = int(seed)
        self._generators: dict[str, torch.Generator] = {}
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()
        self._grad_spec = _active(self.policy.grad)
        self._master_spec = _active(self.policy.master)
        self._round_to_master(self._params())

    # Shared, not copied: schedulers and users edit param_groups; the base optimizer reads them (and its
    # load_state_dict replaces both objects, so these are properties, not attributes).
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    # ------------------------------------------------------------------ helpers
    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _gen(self, device: torch.device) -> torch.Generator:
        key = str(device)
        g = self._generators.get(key)
        if g is None:
            g = self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return g

    def _round_to_master(self, params: list[torch.Tensor]) -> None:
        """Put new parameters on the master grid (round-to-nearest; no-op without a master spec)."""
        if self._master_spec is not None:
            with torch.no_grad():
                for p in params:
                    p.copy_(quantize(_atleast_1d(p), self._master_spec, rounding="nearest").reshape(p.shape))

    def __repr__(self) -> str:
        return f"LowPrecisionOptimizer({self.policy}, {self.optimizer!r})"

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)
        self._round_to_master(self.param_groups[-1]["params"])

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        tel = self.telemetry
        sampling = tel is not None and tel.sampling
        params = [p for p in self._params() if p.grad is not None]

        if self._grad_spec is not None:
            spec = self._grad_spec
            for p in params:
                if p.grad.is_sparse:
                    raise ValueError("lowprec.optim.wrap does not quantize sparse gradients")
                g = _atleast_1d(p.grad)
                q, scale = quantize_with_scale(g, spec, generator=self._gen(p.device))
                if tel is not None and tel.wants():
                    tel.record("optim:grad", "grad", g, q, scale=scale, fmt_max=spec.format.max, fmt=str(spec))
                p.grad.copy_(q.reshape(p.grad.shape))

        # only parameters with a gradient take part in the step (torch optimizers skip the others), so only
        # their states are decoded and re-encoded; the others stay packed untouched
        for p in params:
            st = self.state.get(p)
            if st:
                for name, value in list(st.items()):
                    if _is_packed(value):
                        st[name] = decode(Encoded.from_dict(value[_PACKED])).to(p.device).reshape(p.shape)

        olds = [p.detach().clone() for p in params] if (sampling and self._master_spec is not None) else None
        self.optimizer.step()

        if self._master_spec is not None:
            spec = self._master_spec
            for i, p in enumerate(params):
                unrounded = p.detach().clone() if sampling else None
                p.copy_(quantize(_atleast_1d(p), spec, generator=self._gen(p.device)).reshape(p.shape))
                if sampling:
                    tel.record_update("optim:master", olds[i], unrounded, p, fmt=str(spec))
                    tel.record("optim:master", "master", unrounded, p, fmt_max=spec.format.max, fmt=str(spec))

        for p in params:
            st = self.state.get(p)
            if not st:
                continue
            for name, value in list(st.items()):
                if name == "step" or not (isinstance(value, torch.Tensor) and value.is_floating_point()
                                          and value.shape == p.shape):
                    continue
                spec = _active(self.policy.state_spec(name))
                if spec is None:
                    if tel is not None and name in tel.zero_states:
                        tel.record_zeros(f"optim:{name}", "state", value, fmt="fp32")
                    continue
                enc = encode(_atleast_1d(value), spec, generator=self._gen(p.device))
                if tel is not None and (sampling or (tel.check_nonfinite and self._nonfinite(value, enc, spec))):
                    self._record_state(tel, name, value, enc, spec)
                st[name] = {_PACKED: enc.to_dict()}

        if tel is not None:
            tel.next_step()
        return loss

    @staticmethod
    def _nonfinite(value: torch.Tensor, enc: Encoded, spec: QuantSpec) -> bool:
        """Cheap check on unsampled steps: the state was nonfinite, or (only possible without saturation in a
        format with inf/NaN) its encoding overflowed to inf/NaN."""
        if not bool(torch.isfinite(value.sum())):
            return True
        if spec.saturate or not (spec.format.has_inf or spec.format.has_nan):
            return False
        return not bool(torch.isfinite(decode(enc).sum()))

    @staticmethod
    def _record_state(tel: Telemetry, name: str, value: torch.Tensor, enc: Encoded, spec: QuantSpec) -> None:
        q = decode(enc)
        value = value.reshape(q.shape)
        scale = None
        if spec.scaling is not None:   # the scale per element, for the saturation count: the encoding's own
            scale = element_scale(enc, q)  # (what quantize_with_scale(value, spec) computes again)
        tel.record(f"optim:{name}", "state", value, q, scale=scale, fmt_max=spec.format.max, fmt=str(spec))

    # ------------------------------------------------------------------ (de)serialisation
    def state_dict(self) -> dict[str, Any]:
        sd = self.optimizer.state_dict()
        sd["lowprec"] = {
            "policy": str(self.policy),
            "seed": self.seed,
            "generators": {k: g.get_state() for k, g in self._generators.items()},
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sd = dict(state_dict)
        extra = sd.pop("lowprec", None)
        # The base optimizer would cast packed uint8 codes to the parameter dtype (and choke on strings):
        # hand it the plain entries only and restore the packed ones here.
        packed: dict[Any, dict[str, Any]] = {}
        plain_state: dict[Any, dict[str, Any]] = {}
        for pid, st in sd["state"].items():
            plain_state[pid] = {k: v for k, v in st.items() if not _is_packed(v)}
            packed[pid] = {k: v for k, v in st.items() if _is_packed(v)}
        sd["state"] = plain_state
        self.optimizer.load_state_dict(sd)
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        id_to_param = dict(zip(saved_ids, self._params()))
        for pid, entries in packed.items():
            p = id_to_param[pid]
            for name, value in entries.items():
                inner = {k: (v.detach().clone().to(p.device) if isinstance(v, torch.Tensor) else v)
                         for k, v in value[_PACKED].items()}
                self.state[p][name] = {_PACKED: inner}
        if extra is not None:
            if extra.get("policy") != str(self.policy):
                raise ValueError(f"state_dict was saved under policy {extra.get('policy')!r}, "
                                 f"this optimizer uses {str(self.policy)!r}")
            self.seed = int(extra.get("seed", self.seed))
            self._generators = {}
            for key, gstate in extra.get("generators", {}).items():
                g = torch.Generator(device=key).manual_seed(self.seed)
                g.set_state(gstate)
                self._generators[key] = g


def wrap(optimizer: torch.optim.Optimizer, policy: PrecisionPolicy | str, *,
         telemetry: Telemetry | None = None, seed: int = 0) -> LowPrecisionOptimizer:
    """Wrap ``optimizer`` so its gradients, states and master weights follow ``policy`` (module docstring).
    ``seed`` seeds the stochastic-rounding generator (one per device), saved in ``state_dict``."""
    return LowPrecisionOptimizer(optimizer, policy, telemetry=telemetry, seed=seed)
