"""PrecisionPolicy: one quantization spec per tensor role in training, and per-module rules.

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
``str(policy)`` is canonical and ``PrecisionPolicy.parse(str(p)) == p``. Presets are defined once, in
``PRESET_TABLE`` (name, policy text, description), and read by this same parser.

Options (integers, ``0`` = off; written after the roles):

- ``wgrad_rht=<n>``: a random Hadamard transform of size ``n`` (a power of two; NVFP4's recipe uses 16) applied to
  both operands of the grad-weight GEMM along its reduction (token) axis before they are quantized (as
  Transformer Engine's NVFP4 recipe; ``lowprec.nn.function``). The GEMM's exact result is unchanged
  (``H S (H S)^T = I``); only what quantization sees changes.
- ``state_min_numel=<n>``: optimizer states of tensors with fewer than ``n`` elements stay fp32 (torchao's
  low-bit optimizers and bitsandbytes keep tensors under 4,096 elements unquantized).
- ``state_expand=<n>``: COAT's dynamic range expansion of packed optimizer states (``lowprec.codecs.encode(...,
  expand=n)``: per block ``sign(x)|x/c|^k``, ``k`` a multiple of 1/n; COAT uses ``e4m3:block128`` and n = 16);
  needs a 1-D block state spec with fp32 scales.

Per-module rules: after the base policy, ``@``-separated ``pattern=policy`` entries ("at these modules, this
policy"), tried in order on module names (the first match wins; no match: the base policy), e.g.
``"fp8-all@lm_head|transformer.h.11.*=bf16@re:.*\\.attn\\..*=weight=e4m3:tensor"``. A pattern is ``|``-separated
shell globs (``fnmatch``; ``*`` matches dots too) or, after ``re:``, one regular expression (``re.fullmatch``); it
may contain neither ``=`` nor ``@`` (``@``, not ``;`` or ``,``: the CLI separates policies with those). A rule's
policy is any policy text without rules. Rules choose the GEMM policy (weight, activation, grad, accumulator)
of each module that ``lowprec.nn.convert`` converts; optimizer states and master weights follow the base policy.
In Python: ``PrecisionPolicy(..., rules=[("lm_head", "bf16")])`` or ``policy.with_rules("lm_head=bf16")``; in
TOML / JSON: a ``rules`` list of ``{pattern, policy}`` tables (``from_dict``, ``from_toml``).
"""
from __future__ import annotations

import fnmatch
import json
import re
import tomllib
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping, Sequence

from lowprec.accumulate import Accumulator
from lowprec.formats import Format
from lowprec.quantize import QuantSpec

__all__ = ["PrecisionPolicy", "Rule", "PRESETS", "PRESET_DOCS", "PRESET_TABLE", "ROLES", "TENSOR_ROLES",
           "OPTIONS", "is_identity"]

ROLES = ("weight", "activation", "grad", "state", "master", "accumulator")
TENSOR_ROLES = ROLES[:-1]  # the roles that hold a QuantSpec (the accumulator holds an Accumulator)
OPTIONS = ("wgrad_rht", "state_min_numel", "state_expand")  # integer options of a policy (module docstring), 0 = off

_WHERE = {
    "weight": "weight operand of forward and grad-input GEMMs",
    "activation": "input operand of forward and grad-weight GEMMs",
    "grad": "grad_output of both backward GEMMs; param grads before the optimizer",
    "state": "optimizer states, stored packed (codes + scales)",
    "master": "stored parameters; rounding of every update",
    "accumulator": "matmul partial sums",
}


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


def _parse_items(text: str, preset: Callable[[str], "PrecisionPolicy"]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Role and state-override entries of one comma-separated policy text (no rules); a first entry without
    ``=`` names a base preset, looked up with ``preset(name)``."""
    base: dict[str, Any] = {}
    overrides: dict[str, Any] = {}
    for i, item in enumerate(t.strip() for t in text.split(",") if t.strip()):
        if "=" not in item:
            if i != 0:
                raise ValueError(f"{item!r}: only the first entry may be a preset name; "
                                 f"others are role=spec with roles {', '.join(ROLES)} or state.<name>")
            p = preset(item)
            base = {r: getattr(p, r) for r in (*ROLES, *OPTIONS)}
            overrides = dict(p.state_overrides)
            continue
        key, value = (s.strip() for s in item.split("=", 1))
        key = key.lower()
        if key.startswith("state."):
            overrides[key[len("state."):]] = value
        elif key in ROLES:
            base[key] = value
        elif key in OPTIONS:
            try:
                base[key] = int(value)
            except ValueError:
                raise ValueError(f"{key}= needs an integer, got {value!r}") from None
        else:
            raise ValueError(f"unknown role {key!r}; valid roles: {', '.join(ROLES)}, or state.<name> "
                             f"(e.g. state.exp_avg_sq), or an option: {', '.join(OPTIONS)}")
    return base, overrides


@dataclass(frozen=True)
class Rule:
    """``pattern -> policy`` on module names (module docstring): ``|``-separated globs, or ``re:<regex>``."""

    pattern: str
    policy: "PrecisionPolicy"

    def __post_init__(self) -> None:
        pat = self.pattern.strip() if isinstance(self.pattern, str) else self.pattern
        if not isinstance(pat, str) or not pat or "=" in pat or "@" in pat:
            raise ValueError(f"a rule pattern is a non-empty string without '=' or '@', got {self.pattern!r}")
        if pat.startswith("re:"):
            try:
                re.compile(pat[3:])
            except re.error as exc:
                raise ValueError(f"rule pattern {pat!r}: bad regular expression: {exc}") from None
        pol = PrecisionPolicy.parse(self.policy)
        if pol.rules:
            raise ValueError(f"rule {pat!r}: a rule's policy cannot carry rules of its own")
        object.__setattr__(self, "pattern", pat)
        object.__setattr__(self, "policy", pol)

    def matches(self, name: str) -> bool:
        """Whether module ``name`` (e.g. ``transformer.h.11.attn.c_attn``) matches the pattern."""
        if self.pattern.startswith("re:"):
            return re.fullmatch(self.pattern[3:], name) is not None
        return any(fnmatch.fnmatchcase(name, alt.strip()) for alt in self.pattern.split("|"))

    def __str__(self) -> str:
        return f"{self.pattern}={self.policy}"


def _to_rule(value: Any) -> Rule:
    if isinstance(value, Rule):
        return value
    if isinstance(value, Mapping):
        if set(value) != {"pattern", "policy"}:
            raise ValueError(f"a rule table has exactly the keys 'pattern' and 'policy', got {sorted(value)}")
        return Rule(value["pattern"], value["policy"])
    if isinstance(value, str):
        if "=" not in value:
            raise ValueError(f"a rule is 'pattern=policy', got {value!r}")
        pattern, pol = value.split("=", 1)
        return Rule(pattern, pol.strip())
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return Rule(value[0], value[1])
    raise TypeError(f"a rule is a Rule, 'pattern=policy', (pattern, policy) or {{pattern, policy}}, got {value!r}")


def _scaling_text(spec: QuantSpec) -> str:
    sc = spec.scaling
    if sc is None:
        return "none"
    if sc.mode in ("tensor", "channel"):
        return f"{sc.mode} ({sc.scale_format})"
    if sc.mode == "delayed":
        return (f"delayed {sc.history_len}" + (f", margin {sc.margin}" if sc.margin else "")
                + ("" if sc.algo == "max" else f", {sc.algo}"))
    size = sc.block_size if sc.block_rows == 1 else f"{sc.block_rows}x{sc.block_size}"
    rnd = "" if sc.scale_rounding == "floor" else f", scale_round={sc.scale_rounding}"
    return f"block {size} ({sc.scale_format}{rnd})"


def _spec_row(role: str, spec: QuantSpec | None, note: str) -> tuple:
    if spec is None:
        return (role, "fp32 (full)", "-", "-", "-", note)
    rnd = spec.rounding.value if hasattr(spec.rounding, "value") else str(spec.rounding)
    return (role, spec.format.name, rnd, _scaling_text(spec), "yes" if spec.saturate else "no", note)


def _table(rows: list[tuple]) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return lines


@dataclass(frozen=True)
class PrecisionPolicy:
    """Quantization spec per training role, plus ordered per-module ``rules`` (see module docstring).
    Strings are parsed with QuantSpec.parse; rules may be given as Rule, ``"pattern=policy"`` or pairs."""

    weight: QuantSpec | None = None
    activation: QuantSpec | None = None
    grad: QuantSpec | None = None
    state: QuantSpec | None = None
    master: QuantSpec | None = None
    accumulator: Accumulator | None = None
    state_overrides: Mapping[str, QuantSpec | None] = field(default_factory=dict)
    rules: Sequence[Rule] = ()
    wgrad_rht: int = 0
    state_min_numel: int = 0
    state_expand: int = 0

    def __post_init__(self) -> None:
        for opt in OPTIONS:
            v = getattr(self, opt)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{opt} must be a non-negative int (0 = off), got {v!r}")
        if self.wgrad_rht and (self.wgrad_rht < 2 or self.wgrad_rht & (self.wgrad_rht - 1)):
            raise ValueError(f"wgrad_rht must be 0 (off) or a power of two >= 2 (NVFP4's recipe: 16), "
                             f"got {self.wgrad_rht}")
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
            raise TypeError("state_overrides must be a mapping name -> spec, got "
                            f"{type(self.state_overrides).__name__}")
        overrides = {}
        for name, spec in sorted(self.state_overrides.items()):
            if not isinstance(name, str) or not name.isidentifier():
                raise ValueError(f"state override names must be identifiers such as 'exp_avg_sq', got {name!r}")
            overrides[name] = _to_spec(spec, f"state.{name}")
        object.__setattr__(self, "state_overrides", overrides)
        if isinstance(self.rules, (str, Mapping)) or not isinstance(self.rules, Iterable):
            raise TypeError(f"rules must be a sequence of rules such as [('lm_head', 'bf16')], got {self.rules!r}")
        object.__setattr__(self, "rules", tuple(_to_rule(r) for r in self.rules))
        if self.state_expand:
            for name in ("state", *self.state_overrides):
                sp = self.state if name == "state" else self.state_overrides[name]
                sc = None if sp is None else sp.scaling
                if sp is not None and (sc is None or sc.mode != "block" or sc.scale_format != "fp32"
                                       or sc.block_rows != 1):
                    raise ValueError(f"state_expand (COAT dynamic range expansion) needs 1-D block state specs "
                                     f"with fp32 scales (COAT: 'state=e4m3:block128'), got {name}={sp}")

    def __hash__(self) -> int:
        return hash(str(self))

    # ------------------------------------------------------------------ queries
    def state_spec(self, name: str, numel: int | None = None) -> QuantSpec | None:
        """The spec of optimizer state ``name``: its override if any, else ``state``; ``None`` (fp32) for a
        tensor of ``numel`` elements below ``state_min_numel``."""
        if numel is not None and numel < self.state_min_numel:
            return None
        return self.state_overrides[name] if name in self.state_overrides else self.state

    @property
    def is_noop(self) -> bool:
        return str(self) == "fp32"

    @property
    def base(self) -> "PrecisionPolicy":
        """This policy without its rules."""
        return replace(self, rules=()) if self.rules else self

    def rule_for(self, name: str) -> Rule | None:
        """The first rule matching module ``name``, or None."""
        return next((r for r in self.rules if r.matches(name)), None)

    def for_module(self, name: str) -> "PrecisionPolicy":
        """The policy of module ``name``: the first matching rule's, else the base policy (without rules)."""
        rule = self.rule_for(name)
        return self.base if rule is None else rule.policy

    def with_rules(self, *rules: Any) -> "PrecisionPolicy":
        """This policy with ``rules`` appended (each a Rule, ``"pattern=policy"`` or ``(pattern, policy)``)."""
        return replace(self, rules=(*self.rules, *rules))

    # ------------------------------------------------------------------ construction
    @classmethod
    def preset(cls, name: str) -> "PrecisionPolicy":
        """A named preset (``PRESET_TABLE``: name, policy text, description). Unknown names raise ValueError
        listing the valid ones."""
        if not isinstance(name, str) or name.strip().lower() not in PRESETS:
            raise ValueError(f"unknown precision preset {name!r}; valid presets: {', '.join(PRESETS)}")
        return PRESETS[name.strip().lower()]

    @classmethod
    def parse(cls, text: "str | PrecisionPolicy") -> "PrecisionPolicy":
        """Parse the compact form with optional ``@pattern=policy`` rules (module docstring); a bare preset name
        gives that preset. The one precision language of lowprec."""
        if isinstance(text, PrecisionPolicy):
            return text
        if not isinstance(text, str):
            raise TypeError(f"a precision policy is a str, got {type(text).__name__}")
        head, *rule_texts = text.split("@")
        if not head.strip():
            raise ValueError("empty precision policy string; use 'fp32' for full precision")
        base, overrides = _parse_items(head, cls.preset)
        return cls(**base, state_overrides=overrides, rules=[r for r in rule_texts if r.strip()])

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
        parts += [f"{opt}={getattr(self, opt)}" for opt in OPTIONS if getattr(self, opt)]
        return "@".join([",".join(parts) if parts else "fp32", *(str(r) for r in self.rules)])

    def __repr__(self) -> str:
        return f"PrecisionPolicy.parse({str(self)!r})"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict: role -> spec string or None, state_overrides, and ``rules`` when there are any."""
        d: dict[str, Any] = {r: (None if getattr(self, r) is None else str(getattr(self, r))) for r in ROLES}
        d["state_overrides"] = {k: (None if v is None else str(v)) for k, v in self.state_overrides.items()}
        d.update({opt: getattr(self, opt) for opt in OPTIONS if getattr(self, opt)})
        if self.rules:
            d["rules"] = [{"pattern": r.pattern, "policy": str(r.policy)} for r in self.rules]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PrecisionPolicy":
        """The inverse of ``to_dict``; also reads ``base`` (a policy text that the other keys modify)."""
        unknown = set(d) - set(ROLES) - set(OPTIONS) - {"state_overrides", "rules", "base"}
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)}; valid: {', '.join(ROLES + OPTIONS)}, "
                             "state_overrides, rules, base")
        kwargs = dict(d)
        if "base" in kwargs:
            b = cls.parse(kwargs.pop("base"))
            merged: dict[str, Any] = {r: kwargs.pop(r, getattr(b, r)) for r in (*ROLES, *OPTIONS)}
            merged["state_overrides"] = {**b.state_overrides, **kwargs.pop("state_overrides", {})}
            merged["rules"] = (*b.rules, *kwargs.pop("rules", ()))
            kwargs = merged
        return cls(**kwargs)

    @classmethod
    def from_toml(cls, text: str) -> "PrecisionPolicy":
        """A policy from TOML with ``from_dict``'s keys, e.g. ``base = "fp8-all"`` and ``[[rules]]`` tables
        holding ``pattern`` and ``policy``."""
        return cls.from_dict(tomllib.loads(text))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PrecisionPolicy":
        return cls.from_dict(json.loads(text))

    def explain(self, modules: Iterable[str] | None = None) -> str:
        """A table: role, element format, rounding, scaling, saturation, and where it applies; then the rules,
        and, given module names, which rule (or the base policy) each module gets."""
        rows = [("role", "format", "rounding", "scaling", "saturate", "applies to")]
        for role in TENSOR_ROLES:
            rows.append(_spec_row(role, getattr(self, role), _WHERE[role]))
            if role == "state":
                for name, spec in self.state_overrides.items():
                    rows.append(_spec_row(f"state.{name}", spec, f"optimizer state '{name}'"))
        acc = self.accumulator
        if acc is None:
            rows.append(("accumulator", "fp32 (full)", "-", "-", "-", _WHERE["accumulator"]))
        else:
            r = _spec_row("accumulator", acc.spec, _WHERE["accumulator"])
            promote = f", promote {acc.promote}" if acc.promote else ""
            rows.append(r[:3] + (f"chunk {acc.chunk}{promote}",) + r[4:])
        if self.wgrad_rht:
            rows.append(("wgrad_rht", "-", "-", f"Hadamard {self.wgrad_rht}, random signs", "-",
                         "both grad-weight GEMM operands, along the tokens, before quantization"))
        if self.state_expand:
            rows.append(("state_expand", "-", "-", f"x -> sign(x)|x/c|^k per block, k in 1/{self.state_expand}",
                         "-", "packed optimizer states (COAT dynamic range expansion)"))
        if self.state_min_numel:
            rows.append(("state_min_numel", "fp32 (full)", "-", "-", "-",
                         f"states of tensors under {self.state_min_numel} elements"))
        base = self.base
        title = f"precision policy: {base}"
        for name, p in PRESETS.items():
            if p == base:
                title += f"  (preset {name}: {PRESET_DOCS[name]})"
                break
        out = [title, *_table(rows)]
        if self.rules:
            out.append("rules (first match wins; modules matching none get the policy above):")
            out += [f"  {i}. {r.pattern} -> {r.policy}" for i, r in enumerate(self.rules, 1)]
        if modules is not None:
            rows = [("module", "rule", "policy")]
            for name in modules:
                rule = self.rule_for(name)
                rows.append((name, "base" if rule is None else rule.pattern, str(self.for_module(name))))
            out += _table(rows)
        return "\n".join(out)


PRESET_TABLE: tuple[tuple[str, str, str], ...] = (
    # (name, policy text, description): the one definition of every preset
    ("fp32", "fp32",
     'no quantization anywhere: an exact no-op'),
    ("bf16", "weight=bf16,activation=bf16,grad=bf16",
     'bf16 mixed precision as under autocast: GEMM operands (weights, activations, grads) rounded to bf16 '
     '(nearest), fp32 master weights and optimizer states'),
    ("fp8-hybrid", "weight=e4m3:tensor,activation=e4m3:tensor,grad=e5m2:tensor",
     'Transformer Engine HYBRID: E4M3 weights and activations, E5M2 gradients, per-tensor current scaling '
     '(amax / max), fp32 states and master'),
    ("fp8-states", "state=e4m3:block128",
     'only optimizer states in E4M3, blocks of 128 along the last axis with fp32 scales amax/448, every state'
     ' tensor quantized (not torchao\'s rule: see fp8-states-torchao); everything else fp32'),
    ("fp8-states-torchao", "state=e4m3:block256,state_min_numel=4096",
     "torchao's FP8 optimizer states (torchao.optim.AdamWFp8): E4M3 moments in blocks of 256 with fp32 scales "
     'amax/448, states of tensors under 4,096 elements kept fp32 (torchao/optim/adam.py, after bitsandbytes); '
     'blocks run along the last axis (torchao blocks the flattened tensor and keeps fp32 a tensor whose size is '
     'no multiple of 256: the same blocks when the last dimension is a multiple of 256); everything else fp32'),
    ("fp8-states-e4m3-e5m2", "state=e4m3:tensor,state.exp_avg_sq=e5m2:tensor",
     'both Adam moments in FP8 with per-tensor scaling: first moment E4M3, second moment E5M2 for its range '
     '(Fishman et al. 2024, "Scaling FP8 training to trillion-token LLMs", arXiv 2409.12517); everything else '
     'fp32'),
    ("coat-states", "state=e4m3:block128,state_expand=16",
     "COAT's optimizer states (Xi et al. 2024, arXiv 2410.19313): both Adam moments E4M3 in groups of 128 with "
     'fp32 scales after dynamic range expansion sign(x)|x/c|^k (c the geometric mean of the group\'s largest '
     'and smallest magnitude, k a multiple of 1/16 fitting the group\'s range to E4M3\'s); everything else fp32'),
    ("fp8-lm-o2", "weight=e4m3:tensor,activation=e4m3:tensor,grad=e5m2:tensor,state=e4m3:tensor,"
                  "state.exp_avg_sq=fp16,master=fp16:tensor",
     'FP8-LM / MS-AMP O2 (arXiv 2310.18313; MS-AMP docs "Optimization Level"): FP8 GEMMs as fp8-hybrid, '
     'first Adam moment FP8 E4M3 with a per-tensor scale, second moment FP16, FP16 master weights with a '
     'per-tensor scale (MS-AMP LBAdamW: exp_avg_dtype=uint8, exp_avg_sq_dtype=float16)'),
    ("fp8-all", "weight=e4m3:tensor,activation=e4m3:tensor,grad=e5m2:tensor,state=e4m3:block128,"
                "master=bf16:stochastic",
     "everything in FP8 (this project's all-FP8 policy, not a setting sourced from the paper): fp8-hybrid "
     "GEMMs (param gradients E5M2 too), E4M3 optimizer states (blocks of 128), bf16 master weights with "
     "stochastic rounding"),
    ("fp8-all-unscaled", "weight=e4m3:tensor,activation=e4m3:tensor,grad=e5m2:tensor,state=e4m3,"
                         "master=bf16:stochastic",
     'fp8-all with optimizer states cast to E4M3 without any scaling (a naive FP8 optimizer): second '
     'moments below 2^-9 flush to zero'),
    ("mxfp8", "weight=mxfp8,activation=mxfp8,grad=mxfp8",
     "OCP MX: E4M3 elements in blocks of 32 along each GEMM's reduction axis with E8M0 scales, on weights,"
     ' activations and gradients; fp32 states and master'),
    ("nvfp4", "weight=nvfp4,activation=nvfp4,grad=nvfp4:stochastic",
     'NVFP4: E2M1 elements in blocks of 16 with E4M3 scales and an fp32 tensor scale on weights, '
     'activations and gradients, stochastic rounding on gradients only (as TE); fp32 states and master'),
    ("nvfp4-recipe", "weight=nvfp4:block16x16,activation=nvfp4,grad=nvfp4:stochastic,wgrad_rht=16",
     "NVFP4 as deployed (Transformer Engine's NVFP4BlockScaling; arXiv 2509.25149): E2M1 with E4M3 block scales "
     'and an fp32 tensor scale; weights in 16x16 2-D blocks (the same tiles forward and backward), activations '
     'and gradients in 1x16 blocks, stochastic rounding on gradients only, a 16x16 random Hadamard transform on '
     'both grad-weight GEMM operands; fp32 states and master (TE also keeps some layers in bf16: add rules)'),
    ("fp8-blockwise", "weight=e4m3:block128x128,activation=e4m3:block128,grad=e4m3:block128",
     'DeepSeek-V3 fine-grained FP8 (arXiv 2412.19437, sec. 3.3; TE Float8BlockScaling): E4M3 everywhere, '
     'fp32 scales amax/448, weights in 128x128 blocks, activations and gradients in 1x128 tiles along each '
     "GEMM's reduction axis; fp32 states and master"),
    ("int4", "weight=int4:block32",
     'weight-only INT4 fake quantization, symmetric absmax groups of 32 along the reduction axis '
     '(straight-through gradient); activations, gradients, states and master fp32'),
)


def _build_presets() -> dict[str, PrecisionPolicy]:
    out: dict[str, PrecisionPolicy] = {}
    for name, text, _ in PRESET_TABLE:
        if text == "fp32":
            out[name] = PrecisionPolicy()
        else:   # the same parser as every other policy text (preset texts name no presets)
            base, overrides = _parse_items(text, PrecisionPolicy.preset)
            out[name] = PrecisionPolicy(**base, state_overrides=overrides)
    return out


PRESETS: dict[str, PrecisionPolicy] = _build_presets()
PRESET_DOCS: dict[str, str] = {name: doc for name, _, doc in PRESET_TABLE}
