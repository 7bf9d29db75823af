"""``convert(model, policy)``: swap every GEMM-like module for its quantized twin, in place; ``coverage(model)``.

Converted (parameters stay the same objects, ``state_dict`` keys unchanged):

- ``nn.Linear`` and subclasses that keep its forward (e.g. ``NonDynamicallyQuantizableLinear``) -> QuantLinear;
- Hugging Face ``Conv1D`` (GPT-2; recognised by structure, transformers is not imported) -> QuantHFConv1D;
- ``nn.Conv1d/2d/3d`` with numeric padding and zeros padding mode -> QuantConv1d/2d/3d (emulated);
- ``nn.Embedding`` -> QuantEmbedding (table quantized per the weight role, straight-through gradient);
- ``nn.MultiheadAttention`` -> QuantMultiheadAttention (in-projection; its ``out_proj`` becomes a QuantLinear);
- ``register(match, build)`` adds a converter for other module types (tried before the built-in ones).

Each module gets ``policy.for_module(name)``: the first per-module rule matching its name, else the base policy.
With ``attention=True`` every ``F.scaled_dot_product_attention`` call inside a MultiheadAttention or a module
whose class name ends in ``Attention`` (Hugging Face GPT2Attention, LlamaAttention, ...) has its two matmuls
quantized (``lowprec.nn.attention``). An ``nn.TransformerEncoderLayer`` holding quantizing modules gets a no-op
forward pre-hook, which turns off torch's fused eval fast path (it reads the weights directly). A module that
holds a weight matrix (a parameter with 2+ dims) but is left unconverted raises a ``UserWarning`` naming it and
why; ``coverage(model)`` lists every GEMM-like module.
"""
from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn
from torch.overrides import TorchFunctionMode

import torch.nn.functional as F

from lowprec.gemm import BACKENDS
from lowprec.nn.attention import AttentionSite, QuantMultiheadAttention
from lowprec.nn.conv import QUANT_CONV, unconvertible_reason
from lowprec.nn.embedding import QuantEmbedding
from lowprec.nn.linear import QuantHFConv1D, QuantLinear, is_hf_conv1d
from lowprec.nn.site import WORLD, QuantModule, install_state_hooks, module_sites
from lowprec.nn.trace import functional_gemms
from lowprec.policy import PrecisionPolicy
from lowprec.telemetry import Telemetry

__all__ = ["convert", "coverage", "register", "reduce_amax", "Coverage", "CoverageRow"]

Builder = Callable[..., nn.Module]
_REGISTRY: list[tuple[Callable[[nn.Module], bool], Builder]] = []
_SKIPPED: "weakref.WeakKeyDictionary[nn.Module, dict[str, str]]" = weakref.WeakKeyDictionary()


def register(match: Callable[[nn.Module], bool], build: Builder) -> Callable[[], None]:
    """Add a converter: ``build(module, policy, backend=, name=, telemetry=, rule=)`` returns the quantized
    module for every module with ``match(module)`` true (tried before the built-in converters, latest first).
    Returns a function that removes it again."""
    if not callable(match) or not callable(build):
        raise TypeError("register(match, build) needs two callables")
    entry = (match, build)
    _REGISTRY.insert(0, entry)

    def remove() -> None:
        if entry in _REGISTRY:
            _REGISTRY.remove(entry)
    return remove


def _keeps_forward(mod: nn.Module, base: type) -> bool:
    return isinstance(mod, base) and type(mod).forward is base.forward


def _builtin(mod: nn.Module) -> tuple[Builder | None, str | None]:
    """The builder for ``mod`` or (None, why it stays in full precision); (None, None) for non-GEMM modules."""
    if isinstance(mod, nn.MultiheadAttention):
        why = QuantMultiheadAttention.unsupported_reason(mod)
        return (None, why) if why else (QuantMultiheadAttention.from_mha, None)
    if isinstance(mod, nn.Linear):
        if _keeps_forward(mod, nn.Linear):
            return QuantLinear.from_linear, None
        return None, f"{type(mod).__name__} subclasses nn.Linear with its own forward"
    if is_hf_conv1d(mod):
        return QuantHFConv1D.from_hf, None
    for plain, quant in QUANT_CONV.items():
        if isinstance(mod, plain):
            if not _keeps_forward(mod, plain):
                return None, f"{type(mod).__name__} subclasses {plain.__name__} with its own forward"
            why = unconvertible_reason(mod)
            return (None, why) if why else (quant.from_conv, None)
    if isinstance(mod, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return None, "transposed convolutions are not supported"
    if isinstance(mod, nn.Embedding):
        if _keeps_forward(mod, nn.Embedding):
            return QuantEmbedding.from_embedding, None
        return None, f"{type(mod).__name__} subclasses nn.Embedding with its own forward"
    return None, None


def _holds_matrix(mod: nn.Module) -> bool:
    return any(p.dim() >= 2 for p in mod.parameters(recurse=False))


class _SdpaRouter(TorchFunctionMode):
    """Sends F.scaled_dot_product_attention calls to an AttentionSite while the module it is attached to runs
    (its bound ``enter`` / ``leave`` are the module's forward hooks, so a deep copy gets its own router)."""

    def __init__(self, site: AttentionSite) -> None:
        super().__init__()
        self.site = site
        self.hooks: tuple = ()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            return self.site.sdpa(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))

    def enter(self, module: nn.Module, args: tuple) -> None:
        self.__enter__()

    def leave(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.__exit__(None, None, None)


def _attach_attention(mod: nn.Module, site: AttentionSite) -> None:
    """Quantize the SDPA calls of ``mod``'s forward through ``site`` (replacing an earlier attachment)."""
    old = getattr(mod, "lowprec_attention", None)
    if isinstance(old, _SdpaRouter):
        for h in old.hooks:
            h.remove()
    router = _SdpaRouter(site)
    router.hooks = (mod.register_forward_pre_hook(router.enter),
                    mod.register_forward_hook(router.leave, always_call=True))
    mod.lowprec_attention = router
    install_state_hooks(mod)   # its delayed histories go in state_dict, as a QuantModule's do


def convert(model: nn.Module, policy: PrecisionPolicy | str, *,
            filter: Callable[[str, nn.Module], bool] | None = None, backend: str = "auto",
            telemetry: Telemetry | None = None, attention: bool = False) -> nn.Module:
    """Swap the GEMM-like modules of ``model`` (in place) for quantized ones (module docstring).

    ``filter(name, module) -> bool`` selects which modules to convert (default: all). ``policy``: a
    PrecisionPolicy, a preset name or a policy text, optionally with per-module rules. Already-converted modules
    get the new policy. Returns ``model`` (a bare layer passed as ``model`` is returned converted). With
    ``backend="native"`` convolutions run emulated (there is no native FP8 convolution). Telemetry sites are
    ``"<module name>:<role>"``.
    """
    policy = PrecisionPolicy.parse(policy)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: {BACKENDS}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert needs an nn.Module, got {type(model).__name__}")
    skipped: dict[str, str] = {}

    def swap(name: str, mod: nn.Module) -> nn.Module:
        if filter is not None and not filter(name, mod):
            if _holds_matrix(mod) or _builtin(mod) != (None, None):
                skipped[name] = "excluded by filter"
            return mod
        pol, rule = policy.for_module(name), policy.rule_for(name)
        rule_text = None if rule is None else rule.pattern
        kw: dict[str, Any] = dict(name=name, telemetry=telemetry, rule=rule_text)
        if isinstance(mod, QuantModule):   # re-configure (convolutions have no native path)
            conv = isinstance(mod, tuple(QUANT_CONV.values()))
            mod.configure(pol, backend="auto" if conv and backend == "native" else backend,
                          name=name or type(mod).__name__, telemetry=telemetry, rule=rule_text)
            return mod
        build = next((b for m, b in _REGISTRY if m(mod)), None)
        if build is None:
            build, why = _builtin(mod)
            if build is None:
                if why is not None or _holds_matrix(mod):
                    skipped[name] = why or f"no converter for {type(mod).__name__}"
                return mod
        return build(mod, pol, backend=backend, **kw)

    def walk(name: str, mod: nn.Module) -> nn.Module:
        new = swap(name, mod)
        if isinstance(new, nn.MultiheadAttention) and not isinstance(new, QuantMultiheadAttention):
            # its forward reads out_proj.weight directly: converting out_proj alone would change nothing
            skipped[f"{name}.out_proj" if name else "out_proj"] = (
                "excluded by filter" if skipped.get(name) == "excluded by filter"
                else "inside an unconverted MultiheadAttention")
            return new
        for child_name, child in list(new.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            c = walk(full, child)
            if c is not child:
                setattr(new, child_name, c)
        return new

    root = walk("", model)
    _guard_fast_paths(root)
    if attention:
        _convert_attention(root, policy, filter, telemetry)
    _SKIPPED[root] = skipped
    unsupported = {n: why for n, why in skipped.items() if why != "excluded by filter"}
    if unsupported:
        listing = "; ".join(f"{n or '<root>'}: {why}" for n, why in unsupported.items())
        warnings.warn(f"lowprec.nn.convert left {len(unsupported)} module(s) holding weights in full precision: "
                      f"{listing}", UserWarning, stacklevel=2)
    return root


def reduce_amax(model: nn.Module, group: Any = WORLD) -> int:
    """Opt-in for data-parallel training (DDP): from now on every amax that a delayed-scaling site of ``model``
    records in training is all-reduced (max) over the ``torch.distributed`` process ``group`` first (``WORLD``,
    the default: the default group; ``None`` turns the reduction off again), so all ranks keep identical
    histories and scales, as Transformer Engine reduces amaxes over its ``fp8_group``. Call it after the last
    ``convert`` (a re-``configure`` keeps it; a new attention site does not). Each reduced amax is one blocking
    all-reduce of one fp32 scalar, on the amax's device (CPU tensors need a gloo group). Returns the number of
    delayed histories affected."""
    n = 0
    for mod in model.modules():
        for site in module_sites(mod).values():
            site.amax_group = group
            n += len(site.scalers)
    return n


def _no_fast_path(module: nn.Module, args: tuple) -> None:
    """A no-op forward pre-hook: its presence turns off ``nn.TransformerEncoderLayer``'s fused eval fast path,
    which reads the weights directly and would skip the quantized GEMMs."""
    return None


def _guard_fast_paths(root: nn.Module) -> None:
    for layer in root.modules():
        if not isinstance(layer, nn.TransformerEncoderLayer):
            continue
        quantizing = any(isinstance(m, QuantModule) and not m.site.noop for m in layer.modules())
        guard = getattr(layer, "_lowprec_fast_path_guard", None)
        if quantizing and guard is None:
            layer._lowprec_fast_path_guard = layer.register_forward_pre_hook(_no_fast_path)
        elif not quantizing and guard is not None:
            guard.remove()
            layer._lowprec_fast_path_guard = None


def _convert_attention(root: nn.Module, policy: PrecisionPolicy, filter, telemetry: Telemetry | None) -> None:
    for name, mod in root.named_modules():
        if filter is not None and not filter(name, mod):
            continue
        rule = policy.rule_for(name)
        site = AttentionSite(policy.for_module(name), name or "attention", telemetry,
                             None if rule is None else rule.pattern)
        if isinstance(mod, QuantMultiheadAttention):
            mod.attention = site
        elif type(mod).__name__.endswith("Attention"):
            _attach_attention(mod, site)


@dataclass(frozen=True)
class CoverageRow:
    """One GEMM-like module: its name and type, whether it is quantized, the specs of its GEMM roles, the rule
    that chose its policy (``"base"`` if none) and, when in full precision, why."""

    name: str
    type: str
    quantized: bool
    weight: str
    activation: str
    grad: str
    rule: str
    reason: str = ""


class Coverage:
    """The coverage report: ``rows`` (CoverageRow), ``unconverted()``, ``to_dicts()``; ``str()`` is a table."""

    def __init__(self, rows: list[CoverageRow]) -> None:
        self.rows = rows

    def unconverted(self) -> list[CoverageRow]:
        return [r for r in self.rows if not r.quantized]

    def to_dicts(self) -> list[dict[str, Any]]:
        return [dict(r.__dict__) for r in self.rows]

    def __str__(self) -> str:
        head = ("module", "type", "status", "weight", "activation", "grad", "rule")
        rows = [head] + [(r.name or "<root>", r.type, "quantized" if r.quantized else f"fp32: {r.reason}",
                          r.weight, r.activation, r.grad, r.rule) for r in self.rows]
        widths = [max(len(str(x[i])) for x in rows) for i in range(len(head))]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(x, widths)).rstrip() for x in rows]
        lines.insert(1, "-" * len(lines[0]))
        n_q = sum(r.quantized for r in self.rows)
        return f"lowprec coverage: {n_q} of {len(self.rows)} GEMM-like modules quantized\n" + "\n".join(lines)


def _spec(site, role: str) -> str:
    s = site.specs[role]
    return "fp32" if s is None else str(s)


def coverage(model: nn.Module, *example_args: Any, **example_kwargs: Any) -> Coverage:
    """Every GEMM-like module of ``model`` (and attention sites): quantized with which specs, or why not. Given
    example inputs, one forward pass (``lowprec.nn.trace.functional_gemms``) adds a row per module that runs
    functional matmuls in full precision (``torch.matmul``, ``@``, ``F.linear``, SDPA, ...)."""
    rows = _module_rows(model)
    if example_args or example_kwargs:
        for (name, func), n in functional_gemms(model, *example_args, **example_kwargs).items():
            hint = ("; convert(..., attention=True) quantizes it" if func == "scaled_dot_product_attention"
                    else "")
            rows.append(CoverageRow(f"{name}:{func}" if name else func, f"{func} (x{n})", False, "fp32", "fp32",
                                    "fp32", "-", f"functional call in full precision{hint}"))
    return Coverage(rows)


def _module_rows(model: nn.Module) -> list[CoverageRow]:
    skipped = _SKIPPED.get(model, {})
    rows: list[CoverageRow] = []
    for name, mod in model.named_modules():
        if isinstance(mod, QuantModule):
            site = mod.site
            reason = "" if not site.noop else "its policy quantizes nothing"
            if isinstance(mod, QuantEmbedding):
                reason = "" if site.specs["weight"] is not None else "its policy leaves the weight unquantized"
            lookup = isinstance(mod, QuantEmbedding)   # a lookup, not a GEMM: only the weight role applies
            rows.append(CoverageRow(name, type(mod).__name__, not reason, _spec(site, "weight"),
                                    "-" if lookup else _spec(site, "activation"),
                                    "-" if lookup else _spec(site, "grad"), site.rule or "base", reason))
        elif name in skipped or _holds_matrix(mod) or _builtin(mod) != (None, None):
            why = skipped.get(name) or _builtin(mod)[1] or "not converted (convert() not run on it)"
            rows.append(CoverageRow(name, type(mod).__name__, False, "fp32", "fp32", "fp32", "-", why))
        att = getattr(mod, "attention", None) if isinstance(mod, QuantMultiheadAttention) else \
            getattr(getattr(mod, "lowprec_attention", None), "site", None)
        if isinstance(att, AttentionSite):
            site = att.qk
            rows.append(CoverageRow(f"{name}.sdpa" if name else "sdpa", "scaled_dot_product_attention",
                                    not site.noop, "-", _spec(site, "activation"), _spec(site, "grad"),
                                    site.rule or "base", "" if not site.noop else "its policy quantizes nothing"))
    return rows
