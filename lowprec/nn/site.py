"""The per-layer quantization state shared by a layer's forward and backward: a :class:`Site`.

A site holds, for one converted module: its policy's GEMM specs per role (weight, activation, grad; ``None`` = full
precision), the accumulator, the backend, the telemetry sink and site name, the delayed-scaling amax history of
each delayed role (``site.scalers[role]``, a :class:`lowprec.DelayedScaler`), and which per-module rule of the
policy chose its policy (``site.rule``; ``None`` = the base policy).

``quant`` quantizes an operand for a GEMM reducing over a given axis (block scaling runs along it, channel scaling
keeps one scale per index of the channel axis); delayed specs take their scale from the history of the calls
before and then record this call's amax (training mode only). ``requant`` gives the operand of a backward GEMM:
the forward's quantized tensor when the spec does not depend on the axis and is deterministic, else the saved
full-precision tensor re-quantized along the new axis (as microxcaling does; the forward's delayed scale reused).

Delayed-scaling state: ``delayed_state()`` / ``load_delayed_state()`` give and take every history as tensors
(``<role>.amax_history``, ``.scale``, ``.scale_inv``, ``.steps``), which ``lowprec.nn.state`` puts in the module's
``state_dict``. With ``amax_group`` set (``lowprec.nn.reduce_amax``), each amax recorded in training is first
all-reduced (max) over that ``torch.distributed`` group, so every rank keeps the same history and scales, as
Transformer Engine reduces amaxes over its ``fp8_group``.
"""
from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist

from lowprec.delayed import DelayedScaler
from lowprec.gemm import BACKENDS, Operand, matmul, native_reason
from lowprec.policy import PrecisionPolicy, is_identity
from lowprec.quantize import QuantSpec, Rounding, quantize_with_scale, quantize_with_scale_fn
from lowprec.scaling import finite_amax
from lowprec.telemetry import Telemetry

__all__ = ["Site", "GEMM_ROLES", "axis_spec", "axis_free", "is_delayed", "delayed_scale_of", "QuantizedRegion",
           "QUANTIZED", "quantized_region",
           "WORLD", "DELAYED_FIELDS"]

GEMM_ROLES = ("weight", "activation", "grad")
WORLD = "world"
"""``amax_group`` value for torch.distributed's default (world) group."""
DELAYED_FIELDS = ("amax_history", "scale", "scale_inv", "steps")
"""The tensors of one delayed-scaling history, as ``delayed_state`` names them (``<role>.<field>``)."""


_AXIS_SPECS: dict[tuple, QuantSpec] = {}


def axis_spec(spec: QuantSpec, reduce_axis: int, channel_axis: int | None = None) -> QuantSpec:
    """The spec for an operand whose GEMM reduces over ``reduce_axis`` (2-D: channel scaling keeps the other
    axis; N-d operands pass ``channel_axis``). Cached (every quantized GEMM operand asks for one), except while
    torch.compile traces (it then folds the computation into the graph)."""
    if torch.compiler.is_compiling():
        return _axis_spec(spec, reduce_axis, channel_axis)
    key = (spec, reduce_axis, channel_axis)
    out = _AXIS_SPECS.get(key)
    if out is None:
        out = _AXIS_SPECS[key] = _axis_spec(spec, reduce_axis, channel_axis)
    return out


def _axis_spec(spec: QuantSpec, reduce_axis: int, channel_axis: int | None) -> QuantSpec:
    sc = spec.scaling
    if sc is None or sc.mode in ("tensor", "delayed"):
        return spec
    if sc.mode == "block":
        return replace(spec, scaling=replace(sc, axis=reduce_axis))
    if sc.mode == "channel":  # one scale per index of the kept axis, amax over the reduction axis
        return replace(spec, scaling=replace(sc, axis=1 - reduce_axis if channel_axis is None else channel_axis))
    raise ValueError(f"unknown scaling mode {sc.mode!r}")


def delayed_scale_of(op: Operand | None) -> torch.Tensor | None:
    """The scale a re-quantization of the same operand takes (:meth:`Site.quant`'s ``delayed_scale``, which only
    delayed specs read): ``op.scale`` for a delayed operand, None otherwise (a lazy block scale stays uncomputed)."""
    return op.scale if op is not None and is_delayed(op.spec) else None


def axis_free(spec: QuantSpec | None) -> bool:
    """Quantizing with this spec gives the same result whatever the reduction axis (and is deterministic): no,
    tensor or delayed scaling, or square 2-D blocks (``block16x16``: the same tiles along either axis)."""
    if spec is None:
        return True
    deterministic = spec.rounding != Rounding.STOCHASTIC
    sc = spec.scaling
    square = sc is not None and sc.mode == "block" and sc.block_rows == sc.block_size
    return deterministic and (sc is None or sc.mode in ("tensor", "delayed") or square)


def is_delayed(spec: QuantSpec | None) -> bool:
    """True for a delayed-scaling spec."""
    return spec is not None and spec.scaling is not None and spec.scaling.mode == "delayed"


class QuantizedRegion:
    """``with QUANTIZED:`` marks lowprec's own quantized computation (``depth > 0`` inside), so that
    ``lowprec.nn.trace`` does not count its matmuls as full-precision ones. Code that ``torch.compile`` may
    trace enters :func:`quantized_region` instead (a no-op while compiling: tracing counts eager calls only)."""

    depth = 0

    def __enter__(self) -> None:
        QuantizedRegion.depth += 1

    def __exit__(self, *exc) -> None:
        QuantizedRegion.depth -= 1


QUANTIZED = QuantizedRegion()


def quantized_region() -> QuantizedRegion | contextlib.nullcontext:
    """``QUANTIZED`` in eager mode; a null context while ``torch.compile`` traces."""
    return contextlib.nullcontext() if torch.compiler.is_compiling() else QUANTIZED


class Site:
    """Per-layer quantization state (module docstring). ``native_gemms`` lists the (left role, right role) pairs
    of the layer's GEMMs, checked once here when ``backend="native"``."""

    def __init__(self, policy: PrecisionPolicy | str, backend: str = "auto", name: str = "",
                 telemetry: Telemetry | None = None, *, rule: str | None = None,
                 native_gemms: tuple[tuple[str, str], ...] = (("weight", "activation"), ("grad", "weight"),
                                                               ("grad", "activation"))) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; valid: {BACKENDS}")
        policy = PrecisionPolicy.parse(policy)
        self.policy = policy
        self.backend = backend
        self.name = name
        self.telemetry = telemetry
        self.rule = rule
        self.specs: dict[str, QuantSpec | None] = {
            r: (None if is_identity(getattr(policy, r)) else getattr(policy, r)) for r in GEMM_ROLES}
        self.accumulator = policy.accumulator
        self.wgrad_rht = policy.wgrad_rht   # Hadamard size on the grad-weight GEMM's operands (0: none)
        self.noop = all(s is None for s in self.specs.values()) and self.accumulator is None
        # delayed scaling: one amax history per role of this layer; recorded in training mode
        self.scalers = {r: DelayedScaler.from_spec(s) for r, s in self.specs.items() if is_delayed(s)}
        self.update_history = True
        self.amax_group: Any = None   # None: no reduction; WORLD or a ProcessGroup: all-reduce (max) of amaxes
        if backend == "native":
            problems = [p for a, b in native_gemms for p in self.native_problems(a, b)]
            if problems:
                raise ValueError(f"backend='native' impossible for policy {policy}: {'; '.join(sorted(set(problems)))}"
                                 f"; use backend='auto' or 'emulated'")

    def native_problems(self, role_a: str, role_b: str) -> list[str]:
        """Why the GEMM of these two roles cannot run natively (empty if it can, hardware permitting)."""
        out = []
        for role in (role_a, role_b):
            why = native_reason(self.specs[role])
            if why:
                out.append(f"{role}: {why}")
        if self.accumulator is not None:
            out.append("an accumulator is emulated only")
        return out

    def quant(self, t: torch.Tensor, role: str, reduce_axis: int, record: bool,
              channel_axis: int | None = None, delayed_scale: torch.Tensor | None = None,
              contiguous: bool = True) -> Operand:
        """Quantize ``t`` for a GEMM reducing over ``reduce_axis``; ``record`` sends it to telemetry.
        ``contiguous=False``: the operand's values may be a strided view (no transposing copy for blocks along a
        leading axis; ``lowprec.quantize.quantize_with_scale_fn``).

        Delayed specs: the scale comes from the role's amax history (calls before this one), then ``amax(t)`` is
        appended (when ``update_history``); ``delayed_scale`` re-quantizes the same operand with the scale already
        used this step (nothing recorded)."""
        spec = self.specs[role]
        if spec is None:
            return Operand(t, None, None)
        spec = axis_spec(spec, reduce_axis, channel_axis)
        if is_delayed(spec):
            if delayed_scale is None:
                scaler = self.scalers[role]
                amax = finite_amax(t.detach())
                if self.update_history and self.amax_group is not None:
                    amax = self._reduce(amax)
                delayed_scale = scaler.scales_for(amax)[1]
                if self.update_history:
                    scaler.update(amax)
            q, scale = quantize_with_scale(t, spec, scale=delayed_scale)
            scale_fn = None
        else:
            # the scale only when read: telemetry's rows (sampled steps) and native GEMMs read it, the emulated
            # GEMM does not (a block spec's scale is a full-size tensor)
            q, scale_fn = quantize_with_scale_fn(t, spec, contiguous=contiguous)
            scale = None
        op = Operand(q, scale, spec, scale_fn=scale_fn)
        tel = self.telemetry
        if record and tel is not None and not torch.compiler.is_compiling() and tel.wants():
            name = f"{self.name}:{role}"
            if not tel.skip(name, q):   # (an unsampled step: the NaN/inf check, and nothing else to record)
                tel.record(name, role, t, q, scale=lambda: op.scale, fmt_max=spec.format.max, fmt=str(spec),
                           checked=True)
        return op

    def _reduce(self, amax: torch.Tensor) -> torch.Tensor:
        """``amax`` all-reduced (max) over ``amax_group`` (every rank must run the same quantized calls)."""
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"site {self.name!r}: amax reduction needs an initialized torch.distributed "
                               "process group (torch.distributed.init_process_group)")
        amax = amax.to(torch.float32).reshape(()).clone()
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=None if self.amax_group == WORLD else self.amax_group)
        return amax

    def delayed_state(self) -> dict[str, torch.Tensor]:
        """Every delayed history of this site as tensors ``<role>.<field>`` (``DELAYED_FIELDS``; copies)."""
        out: dict[str, torch.Tensor] = {}
        for role, sc in self.scalers.items():
            out[f"{role}.amax_history"] = sc.amax_history.detach().clone()
            out[f"{role}.scale"] = sc.scale.detach().clone()
            out[f"{role}.scale_inv"] = sc.scale_inv.detach().clone()
            out[f"{role}.steps"] = torch.tensor(sc.steps, dtype=torch.int64)
        return out

    def load_delayed_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore histories from ``delayed_state()`` output; a role missing from ``state`` keeps its history.
        Raises ValueError for a role this site has no delayed spec for or a history of another length."""
        roles = {k.split(".", 1)[0] for k in state}
        extra = roles - set(self.scalers)
        if extra:
            raise ValueError(f"site {self.name!r}: delayed-scaling state for role(s) {sorted(extra)}, but this "
                             f"site's delayed roles are {sorted(self.scalers) or 'none'}")
        for role in sorted(roles):
            sc = self.scalers[role]
            missing = [f for f in DELAYED_FIELDS if f"{role}.{f}" not in state]
            if missing:
                raise ValueError(f"site {self.name!r}: delayed-scaling state of {role!r} lacks {missing}")
            hist = state[f"{role}.amax_history"]
            if hist.numel() != sc.history_len:
                raise ValueError(f"site {self.name!r}: {role} amax history of length {hist.numel()}, but the "
                                 f"spec {self.specs[role]} keeps {sc.history_len}")
            dev = sc.amax_history.device
            sc.load_state_dict({"amax_history": hist.to(dev), "scale": state[f"{role}.scale"].to(dev),
                                "scale_inv": state[f"{role}.scale_inv"].to(dev),
                                "steps": int(state[f"{role}.steps"])})

    def requant(self, t: torch.Tensor, role: str, saved_q: torch.Tensor, saved_scale: torch.Tensor | None,
                reduce_axis: int, channel_axis: int | None = None, contiguous: bool = True) -> Operand:
        """The operand of a backward GEMM reducing over ``reduce_axis`` (module docstring)."""
        if axis_free(self.specs[role]):
            return Operand(saved_q, saved_scale, self.specs[role])
        return self.quant(t, role, reduce_axis=reduce_axis, record=False, channel_axis=channel_axis,
                          delayed_scale=saved_scale, contiguous=contiguous)

    def gemm(self, a: Operand, b: Operand) -> torch.Tensor:
        """``a [M, K] @ b [K, N]`` in fp32 on this site's backend and accumulator (``lowprec.gemm.matmul``)."""
        return matmul(a, b, self.backend, self.accumulator)


STATE_PREFIX = "lowprec_delayed"


def module_sites(module: torch.nn.Module) -> dict[str, Site]:
    """The sites a module owns itself (not its children's): ``""`` for a QuantModule's own site, ``"qk"`` /
    ``"pv"`` for an attached attention site (``module.attention`` of a converted MultiheadAttention, or the
    ``lowprec_attention`` router of another attention module)."""
    out: dict[str, Site] = {}
    att = None
    if isinstance(module, QuantModule):
        out[""] = module._site
        att = getattr(module, "attention", None)
    if att is None:
        att = getattr(getattr(module, "lowprec_attention", None), "site", None)
    for key in ("qk", "pv"):
        site = getattr(att, key, None)
        if isinstance(site, Site):
            out[key] = site
    return out


def _key(prefix: str, site_key: str, name: str) -> str:
    return f"{prefix}{STATE_PREFIX}.{site_key + '.' if site_key else ''}{name}"


def _save_delayed(module: torch.nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for site_key, site in module_sites(module).items():
        for name, t in site.delayed_state().items():
            state_dict[_key(prefix, site_key, name)] = t


def _load_delayed(module: torch.nn.Module, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                  missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    """Takes this module's ``lowprec_delayed.*`` entries out of ``state_dict`` (so strict loading does not call
    them unexpected) and loads them; entries for a site or role without a delayed spec stay, and are unexpected."""
    for site_key, site in module_sites(module).items():
        head = _key(prefix, site_key, "")
        mine = {k[len(head):]: k for k in state_dict if k.startswith(head)
                and k[len(head):].split(".", 1)[0] in site.scalers}
        if not mine:
            continue
        try:
            site.load_delayed_state({name: state_dict[k] for name, k in mine.items()})
        except ValueError as exc:
            error_msgs.append(str(exc))
        for k in mine.values():
            del state_dict[k]


def install_state_hooks(module: torch.nn.Module) -> None:
    """Make ``module.state_dict()`` hold the delayed-scaling histories of its sites (``module_sites``) under
    ``<prefix>lowprec_delayed.[qk.|pv.]<role>.<field>`` and ``load_state_dict`` restore them (idempotent)."""
    if getattr(module, "_lowprec_state_hooks", None) is None:
        module._lowprec_state_hooks = (module.register_state_dict_post_hook(_save_delayed),
                                       module.register_load_state_dict_pre_hook(_load_delayed))


__all__ += ["STATE_PREFIX", "module_sites", "install_state_hooks"]


class QuantModule:
    """Mixin of every converted module: its :class:`Site` (``module.site``), ``configure`` and ``policy``.

    Subclasses set ``_kind`` (the coverage report's label) and may override ``_make_site`` to restrict backends.
    ``state_dict`` holds the site's delayed-scaling histories, if any (``install_state_hooks``); ``configure``
    keeps the site's ``amax_group``.
    """

    _kind = "module"

    def _make_site(self, policy: PrecisionPolicy, backend: str, name: str, telemetry: Telemetry | None,
                   rule: str | None) -> Site:
        return Site(policy, backend, name, telemetry, rule=rule)

    def configure(self, policy: PrecisionPolicy | str, *, backend: str = "auto", name: str = "",
                  telemetry: Telemetry | None = None, rule: str | None = None) -> None:
        """(Re)set the policy, backend, telemetry site name and sink; delayed-scaling histories restart."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; valid: {BACKENDS}")
        old = getattr(self, "_site", None)
        self._site = self._make_site(PrecisionPolicy.parse(policy), backend, name or self._kind, telemetry, rule)
        if isinstance(old, Site):
            self._site.amax_group = old.amax_group
        install_state_hooks(self)

    @property
    def site(self) -> Site:
        return self._site

    @property
    def policy(self) -> PrecisionPolicy:
        return self._site.policy

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, policy={self._site.policy}"


__all__ += ["QuantModule"]
