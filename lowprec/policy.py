"""PrecisionPolicy: one quantization spec per tensor role in training.

Roles (``None`` = full precision, nothing done):

- ``weight``: the weight operand of every converted layer's GEMMs (forward and grad-input).
- ``activation``: the input operand of every converted layer's GEMMs (forward and grad-weight).
- ``grad``: the gradient operand of the backward GEMMs (grad_output, for grad-input and grad-weight), and the
  parameter gradients handed to the optimizer by ``lowprec.optim.wrap``.
- ``state``: optimizer states (tensors shaped like their parameter), stored packed; ``state_overrides`` maps a
  state name (``exp_avg_sq``) to its own spec (or ``None`` = keep that state in fp32).
- ``master``: the stored parameter precision; its rounding is applied to every update.
- ``accumulator``: the matmul accumulation format and chunk length (``lowprec.accumulate.Accumulator``).

Compact form: ``"weight=e4m3:tensor,activation=e4m3:tensor,grad=e5m2:stochastic,state=e4m3:block128,
state.exp_avg_sq=e5m2,master=bf16:stochastic,accumulator=fp16:chunk32"``; a leading preset name is a base that
the following entries modify (``"fp8-all,state.exp_avg_sq=none"``); ``none`` unsets a role. A spec written as
``e4m3`` (no scaling keyword) is a plain unscaled cast, exactly as ``lowprec.QuantSpec.parse`` reads it.
``str(policy)`` is canonical and ``PrecisionPolicy.parse(str(p)) == p``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from lowprec.accumulate import Accumulator
from lowprec.formats import Format
from lowprec.quantize import QuantSpec

__all__ = ["PrecisionPolicy", "PRESETS", "PRESET_DOCS", "ROLES", "TENSOR_ROLES"]

ROLES = ("weight", "activation", "grad", "state", "master", "accumulator")
TENSOR_ROLES = ROLES[:-1]  # the roles that hold a QuantSpec (the accumulator holds an Accumulator)


def _to_spec(value: Any, what: str) -> QuantSpec | None:
    if value is None or isinstance(value, QuantSpec):
        return value
    if isinstance(value, Format):
        return QuantSpec(value)
    if isinstance(value, str):
        if value.strip().lower() == "none":
            return None
        try:
            return QuantSpec.parse(value.strip())
        except ValueError as exc:
            raise ValueError(f"{what}: {exc}") from None
    raise TypeError(f"{what} must be a QuantSpec, a spec string, a lowprec.Format or None, "
                    f"got {type(value).__name__}")


def is_identity(spec: QuantSpec | None) -> bool:
    """True for no spec and for specs that change nothing (unscaled fp32 without flushing)."""
    if spec is None:
        return True
    f = spec.format
    return (f.kind == "float" and f.exp_bits == 8 and f.man_bits == 23 and spec.scaling is None
            and not spec.flush_subnormals)


def _spec_str(spec: QuantSpec | None) -> str:
    return "none" if spec is None else str(spec)


@dataclass(frozen=True)
class PrecisionPolicy:
    """Quantization spec per training role (see module docstring). Strings are parsed with QuantSpec.parse."""

    weight: QuantSpec | None = None
    activation: QuantSpec | None = None
    grad: QuantSpec | None = None
    state: QuantSpec | None = None
    master: QuantSpec | None = None
    accumulator: Accumulator | None = None
    state_overrides: Mapping[str, QuantSpec | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for role in TENSOR_ROLES:
            object.__setattr__(self, role, _to_spec(getattr(self, role), role))
        acc = self.accumulator
        if acc is not None and not isinstance(acc, Accumulator):
            if isinstance(acc, str) and acc.strip().lower() == "none":
                acc = None
            else:
                try:
                    acc = Accumulator.parse(acc)
                except ValueError as exc:
                    raise ValueError(f"accumulator: {exc}") from None
        object.__setattr__(self, "accumulator", acc)
        if not isinstance(self.state_overrides, Mapping):
            raise TypeError(f"state_overrides must be a mapping name -> spec, got {type(self.state_overrides).__name__}")
        overrides = {}
        for name, spec in sorted(self.state_overrides.items()):
            if not isinstance(name, str) or not name.isidentifier():
                raise ValueError(f"state override names must be identifiers such as 'exp_avg_sq', got {name!r}")
            overrides[name] = _to_spec(spec, f"state.{name}")
        object.__setattr__(self, "state_overrides", overrides)

    def __hash__(self) -> int:
        return hash(str(self))

    # ------------------------------------------------------------------ queries
    def state_spec(self, name: str) -> QuantSpec | None:
        """The spec of optimizer state ``name``: its override if any, else ``state``."""
        return self.state_overrides[name] if name in self.state_overrides else self.state

    @property
    def is_noop(self) -> bool:
        return str(self) == "fp32"

    # ------------------------------------------------------------------ construction
    @classmethod
    def preset(cls, name: str) -> "PrecisionPolicy":
        """A named preset. Unknown names raise ValueError listing the valid ones.

        - ``fp32``: no quantization anywhere, an exact no-op.
        - ``bf16``: bf16 mixed precision as under autocast: weights, activations and gradients rounded to bf16
          (nearest) at the GEMMs; fp32 master weights and optimizer states.
        - ``fp8-hybrid``: Transformer Engine's HYBRID: E4M3 weights/activations, E5M2 gradients, per-tensor
          current scaling (scale = amax / max); fp32 states and master.
        - ``fp8-states``: only optimizer states, E4M3 in blocks of 128 with fp32 scales amax/448 (torchao's
          layout; unlike torchao, tensors under 4096 elements are quantized too).
        - ``fp8-all``: the paper's FP8 setting: fp8-hybrid GEMMs (parameter gradients E5M2 too), E4M3 states
          (blocks of 128), bf16 master weights with stochastic rounding.
        - ``fp8-all-unscaled``: fp8-all with the optimizer states cast to E4M3 with no scaling at all, as a naive
          FP8 optimizer would store them: second moments (~g²) fall below E4M3's smallest subnormal (2⁻⁹) and flush
          to zero — the underflow mechanism by which AdamW is reported to fail in FP8.
        - ``mxfp8``: OCP MX E4M3, blocks of 32 along each GEMM's reduction axis, E8M0 scales, on weights,
          activations and gradients; fp32 states and master.
        - ``nvfp4``: E2M1 in blocks of 16 with E4M3 block scales and an fp32 tensor scale on weights, activations
          and gradients; stochastic rounding on gradients only (as TE); fp32 states and master. (TE's random
          Hadamard transform and 16x16 weight blocks are not modelled.)
        - ``int4``: weight-only INT4 fake quantization, symmetric absmax groups of 32 along the reduction axis,
          straight-through gradient; activations, gradients, states and master fp32.
        """
        if not isinstance(name, str) or name.strip().lower() not in PRESETS:
            raise ValueError(f"unknown precision preset {name!r}; valid presets: {', '.join(PRESETS)}")
        return PRESETS[name.strip().lower()]

    @classmethod
    def parse(cls, text: "str | PrecisionPolicy") -> "PrecisionPolicy":
        """Parse the compact form (module docstring); a bare preset name gives that preset."""
        if isinstance(text, PrecisionPolicy):
            return text
        if not isinstance(text, str):
            raise TypeError(f"a precision policy is a str, got {type(text).__name__}")
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise ValueError("empty precision policy string; use 'fp32' for full precision")
        base: dict[str, Any] = {}
        overrides: dict[str, Any] = {}
        for i, item in enumerate(items):
            if "=" not in item:
                if i != 0:
                    raise ValueError(f"{item!r}: only the first entry may be a preset name; "
                                     f"others are role=spec with roles {', '.join(ROLES)} or state.<name>")
                p = cls.preset(item)
                base = {r: getattr(p, r) for r in ROLES}
                overrides = dict(p.state_overrides)
                continue
            key, value = (s.strip() for s in item.split("=", 1))
            key = key.lower()
            if key.startswith("state."):
                overrides[key[len("state."):]] = value
            elif key in ROLES:
                base[key] = value
            else:
                raise ValueError(f"unknown role {key!r}; valid roles: {', '.join(ROLES)}, or state.<name> "
                                 "(e.g. state.exp_avg_sq)")
        return cls(**base, state_overrides=overrides)

    def __str__(self) -> str:
        parts = []
        for role in ("weight", "activation", "grad", "state"):
            spec = getattr(self, role)
            if spec is not None:
                parts.append(f"{role}={spec}")
        for name, spec in self.state_overrides.items():
            parts.append(f"state.{name}={_spec_str(spec)}")
        if self.master is not None:
            parts.append(f"master={self.master}")
        if self.accumulator is not None:
            parts.append(f"accumulator={self.accumulator}")
        return ",".join(parts) if parts else "fp32"

    def __repr__(self) -> str:
        return f"PrecisionPolicy.parse({str(self)!r})"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict: role -> spec string or None, and state_overrides."""
        d: dict[str, Any] = {r: (None if getattr(self, r) is None else str(getattr(self, r))) for r in ROLES}
        d["state_overrides"] = {k: (None if v is None else str(v)) for k, v in self.state_overrides.items()}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PrecisionPolicy":
        unknown = set(d) - set(ROLES) - {"state_overrides"}
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)}; valid: {', '.join(ROLES)}, state_overrides")
        return cls(**dict(d))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PrecisionPolicy":
        return cls.from_dict(json.loads(text))

    def explain(self) -> str:
        """A table: role, element format, rounding, scaling, saturation, and where it applies."""
        where = {
            "weight": "weight operand of forward and grad-input GEMMs",
            "activation": "input operand of forward and grad-weight GEMMs",
            "grad": "grad_output of both backward GEMMs; param grads before the optimizer",
            "state": "optimizer states, stored packed (codes + scales)",
            "master": "stored parameters; rounding of every update",
            "accumulator": "matmul partial sums",
        }
        rows = [("role", "format", "rounding", "scaling", "saturate", "applies to")]

        def spec_row(role: str, spec: QuantSpec | None, note: str) -> tuple:
            if spec is None:
                return (role, "fp32 (full)", "-", "-", "-", note)
            sc = spec.scaling
            if sc is None:
                scaling = "none"
            elif sc.mode == "tensor":
                scaling = f"tensor ({sc.scale_format})"
            elif sc.mode == "channel":
                scaling = f"channel ({sc.scale_format})"
            elif sc.mode == "delayed":
                scaling = (f"delayed {sc.history_len}" + (f", margin {sc.margin}" if sc.margin else "")
                           + ("" if sc.algo == "max" else f", {sc.algo}"))
            else:
                scaling = f"block {sc.block_size} ({sc.scale_format})"
            rnd = spec.rounding.value if hasattr(spec.rounding, "value") else str(spec.rounding)
            return (role, spec.format.name, rnd, scaling, "yes" if spec.saturate else "no", note)

        for role in TENSOR_ROLES:
            rows.append(spec_row(role, getattr(self, role), where[role]))
            if role == "state":
                for name, spec in self.state_overrides.items():
                    rows.append(spec_row(f"state.{name}", spec, f"optimizer state '{name}'"))
        acc = self.accumulator
        if acc is None:
            rows.append(("accumulator", "fp32 (full)", "-", "-", "-", where["accumulator"]))
        else:
            r = spec_row("accumulator", acc.spec, where["accumulator"])
            promote = f", promote {acc.promote}" if acc.promote else ""
            rows.append(r[:3] + (f"chunk {acc.chunk}{promote}",) + r[4:])
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        title = f"precision policy: {self}"
        for name, p in PRESETS.items():
            if p == self:
                title += f"  (preset {name}: {PRESET_DOCS[name]})"
                break
        return title + "\n" + "\n".join(lines)


PRESET_DOCS: dict[str, str] = {
    "fp32": "no quantization anywhere: an exact no-op",
    "bf16": "bf16 mixed precision as under autocast: GEMM operands (weights, activations, grads) rounded to bf16 "
            "(nearest), fp32 master weights and optimizer states",
    "fp8-hybrid": "Transformer Engine HYBRID: E4M3 weights and activations, E5M2 gradients, per-tensor current "
                  "scaling (amax / max), fp32 states and master",
    "fp8-states": "only optimizer states in E4M3, blocks of 128 with fp32 scales amax/448 (torchao-style; "
                  "small tensors are quantized too); everything else fp32",
    "fp8-all": "the paper's FP8 setting: fp8-hybrid GEMMs (param gradients E5M2 too), E4M3 optimizer states "
               "(blocks of 128), bf16 master weights with stochastic rounding",
    "fp8-all-unscaled": "fp8-all with optimizer states cast to E4M3 without any scaling (a naive FP8 optimizer): "
                        "second moments below 2^-9 flush to zero",
    "mxfp8": "OCP MX: E4M3 elements in blocks of 32 along each GEMM's reduction axis with E8M0 scales, on "
             "weights, activations and gradients; fp32 states and master",
    "nvfp4": "NVFP4: E2M1 elements in blocks of 16 with E4M3 scales and an fp32 tensor scale on weights, "
             "activations and gradients, stochastic rounding on gradients only (as TE); fp32 states and master",
    "int4": "weight-only INT4 fake quantization, symmetric absmax groups of 32 along the reduction axis "
            "(straight-through gradient); activations, gradients, states and master fp32",
}

_PRESET_TEXT: dict[str, str] = {
    "fp32": "",
    "bf16": "weight=bf16,activation=bf16,grad=bf16",
    "fp8-hybrid": "weight=e4m3:tensor,activation=e4m3:tensor,grad=e5m2:tensor",
    "fp8-states": "state=e4m3:block128",
    "fp8-all": "weight=e4m3:tensor,activation=e4m3:tensor,grad=e5m2:tensor,state=e4m3:block128,"
               "master=bf16:stochastic",
    "fp8-all-unscaled": "weight=e4m3:tensor,activation=e4m3:tensor,grad=e5m2:tensor,state=e4m3,"
                        "master=bf16:stochastic",
    "mxfp8": "weight=mxfp8,activation=mxfp8,grad=mxfp8",
    "nvfp4": "weight=nvfp4,activation=nvfp4,grad=nvfp4:stochastic",
    "int4": "weight=int4:block32",
}


def _build_presets() -> dict[str, PrecisionPolicy]:
    out = {}
    for name, text in _PRESET_TEXT.items():
        kwargs = dict(item.split("=", 1) for item in text.split(",") if item)
        out[name] = PrecisionPolicy(**kwargs)
    return out


PRESETS: dict[str, PrecisionPolicy] = _build_presets()
