"""The precision edge of the studies: text or ``PrecisionPolicy`` in, one ``PrecisionPolicy`` and one label out.

``lowprec.PrecisionPolicy.parse`` is the only precision language; the old studies dialect
``"preset+role=spec"`` (results folders written before it) is translated once, here, with a deprecation warning.
``rounding_variants`` builds the rounding phase's variants as policies (``dataclasses.replace``).
"""
from __future__ import annotations

import dataclasses
import warnings

from lowprec.policy import PRESETS, PrecisionPolicy

__all__ = ["parse_precision", "precision_label", "rounding_variants"]


def _translate_legacy(text: str) -> str:
    """The old studies dialect "preset+role=spec+role=spec" -> parse's "preset,role=spec,role=spec" (with a
    deprecation warning); any other text unchanged."""
    if "+" not in text:
        return text
    new = ",".join(part.strip() for part in text.split("+"))
    warnings.warn(f"precision {text!r} uses the old '+' form; read as {new!r} (write it that way)",
                  DeprecationWarning, stacklevel=3)
    return new


def parse_precision(text: "str | PrecisionPolicy") -> PrecisionPolicy:
    """A preset name or a ``PrecisionPolicy.parse`` string (old "preset+role=spec" strings are translated once,
    with a deprecation warning) -> ``PrecisionPolicy``. Raises ValueError naming what is valid."""
    if isinstance(text, PrecisionPolicy):
        return text
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"precision must be a preset name ({', '.join(PRESETS)}) or a policy string like "
                         f"weight=e4m3,grad=e5m2, got {text!r}")
    return PrecisionPolicy.parse(_translate_legacy(text.strip()))


def precision_label(precision: "str | PrecisionPolicy") -> str:
    """The text that names a precision in run ids, results and reports: the text as written (old '+' strings
    translated), or for a policy object its preset name when it equals one, else ``str(policy)``."""
    if isinstance(precision, PrecisionPolicy):
        return next((name for name, p in PRESETS.items() if p == precision), str(precision))
    if not isinstance(precision, str):
        parse_precision(precision)  # raises ValueError naming what is valid
    text = _translate_legacy(precision.strip())  # translated (and warned about) once
    parse_precision(text)  # a bad name fails here, with the valid choices
    return text


def rounding_variants(precision: "str | PrecisionPolicy") -> dict[str, str]:
    """Nearest vs stochastic rounding of master weights and optimizer states, derived from ``precision``.

    Returns label ("master:nearest,state:stochastic") -> precision text in the policy language
    ("fp8-all,master=bf16,state=e4m3:block128"), one per combination of the roles the policy quantizes (a role
    kept in full precision has no rounding to vary). Each variant is built as a policy (``dataclasses.replace``)
    and its text parses back to exactly that policy.
    """
    base = precision_label(precision)
    policy = parse_precision(precision)
    roles = [r for r in ("master", "state") if getattr(policy, r) is not None]
    out: dict[str, str] = {}
    for combo in range(2 ** len(roles)):
        changes, labels = {}, []
        for i, role in enumerate(roles):
            old = getattr(policy, role)
            mode = type(old.rounding)("stochastic" if (combo >> i) & 1 else "nearest")  # the Rounding enum
            changes[role] = dataclasses.replace(old, rounding=mode)
            labels.append(f"{role}:{mode.value}")
        variant = dataclasses.replace(policy, **changes)
        text = ",".join([base, *(f"{role}={spec}" for role, spec in changes.items())])
        if parse_precision(text) != variant:  # a policy whose text does not say what it is would mislabel runs
            raise ValueError(f"rounding variant {text!r} does not parse back to its policy {variant}")
        out[",".join(labels)] = text
    return out
