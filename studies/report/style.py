"""Display conventions of the report: name orders, number formats, file-name slugs and the optimizer palette.

Nothing here reads or computes results; every other report module formats through these functions so that a
number reads the same in the HTML, the Markdown, the CSV tables and the terminal summary.
"""
from __future__ import annotations

import hashlib
import math
import re
from typing import Any, Callable, Iterable

import numpy as np

__all__ = [
    "BASELINE", "PROPOSED", "PAPER_SPEEDUP", "MAIN_PHASES", "DPI", "LEVEL", "OPTIMIZER_ORDER", "PRECISION_ORDER",
    "PHASE_ORDER", "ordered", "palette", "is_float", "slug", "fmt", "fmt_int", "fmt_tokens", "fmt_ci", "is_fp8",
]

BASELINE = "adamw"
PROPOSED = "stosignsgd"
PAPER_SPEEDUP = (1.44, 2.14)  # StoSignSGD vs AdamW, FP8 GPT-2 (arXiv 2604.15416): 30-53% fewer tokens
MAIN_PHASES = ("main", "custom")
DPI = 90
LEVEL = 0.95

# Display order (not results): known names first in this order, unknown names after, in order of appearance.
OPTIMIZER_ORDER = (
    "adamw", "sgd", "signsgd", "signum", "stosignsgd", "stosign-nonoise", "stosign-instant", "stosign-decaymax",
    "stosign-tensormax", "stosign-nomomentum", "stosign-adamw",
)
PRECISION_ORDER = ("fp32", "bf16", "fp16", "fp8-hybrid", "fp8-states", "fp8-all", "fp8-all-unscaled", "mxfp8",
                   "nvfp4", "mxfp4", "int4")
PHASE_ORDER = ("tune", "main", "custom", "ablation", "rounding", "mechanism")


def ordered(values: Iterable[Any], known: tuple[str, ...]) -> list[str]:
    """The distinct `values` as text: those in `known` first (in its order), the others in order of appearance."""
    seen = list(dict.fromkeys(str(v) for v in values))
    return [k for k in known if k in seen] + [v for v in seen if v not in known]


def is_float(text: str) -> bool:
    """Whether `text` parses as a float."""
    try:
        float(text)
        return True
    except ValueError:
        return False


def palette(optimizers: Iterable[str]) -> dict[str, Any]:
    """One colour per optimizer, the same in every figure (colour-blind palette, fixed order). Labels "name@lr"
    (one optimizer at several LRs) get shades of the optimizer's colour."""
    import seaborn as sns

    optimizers = list(optimizers)
    bases = ordered(list(OPTIMIZER_ORDER) + [o.split("@")[0] for o in optimizers], OPTIMIZER_ORDER)
    colors = sns.color_palette("colorblind", 10) + sns.color_palette("dark", 10) + sns.color_palette("pastel", 10)
    pal: dict[str, Any] = {n: colors[i % len(colors)] for i, n in enumerate(bases)}
    shades = (0.0, -0.45, 0.45, -0.7, 0.7)
    for base in bases:
        variants = sorted((o for o in optimizers if o.split("@")[0] == base and "@" in o),
                          key=lambda o: float(o.split("@")[1]) if is_float(o.split("@")[1]) else math.inf)
        for k, label in enumerate(variants):
            f = shades[k % len(shades)]
            c = np.array(pal[base])
            pal[label] = tuple(c * (1 + f) if f < 0 else c + (1 - c) * f)
    return pal


def slug(text: str) -> str:
    """A file-name-safe name; a short hash is appended when characters were replaced (keeps names distinct)."""
    raw = str(text)
    s = re.sub(r"[^A-Za-z0-9]+", "-", raw).strip("-").lower() or "x"
    if s != raw.lower() or len(s) > 40:
        s = f"{s[:32]}-{hashlib.sha1(raw.encode()).hexdigest()[:6]}"
    return s


def fmt(v: Any, digits: int = 4) -> str:
    """A number with `digits` significant digits ("—" for None/NaN/inf; scientific below 1e-3 or from 1e5)."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if isinstance(v, (int, np.integer)):
        return f"{int(v)}"
    v = float(v)
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.{max(digits - 1, 1)}e}"
    return f"{v:.{digits}g}"


def fmt_int(v: Any) -> str:
    """An integer-valued number as an integer ("—" when not finite)."""
    try:
        return str(int(v)) if math.isfinite(float(v)) else "—"
    except (TypeError, ValueError):
        return str(v)


def fmt_tokens(v: float) -> str:
    """A token count as 5k / 1.2M / 3G ("—" when not finite)."""
    if v is None or not math.isfinite(v):
        return "—"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{unit}"
    return f"{v:.0f}"


def fmt_ci(m: float, lo: float, hi: float, fmt_one: Callable[[Any], str] = fmt) -> str:
    """"mean [lo, hi]", or only the mean when the interval is undefined, or "—" without a mean."""
    if not math.isfinite(m):
        return "—"
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{fmt_one(m)}"
    return f"{fmt_one(m)} [{fmt_one(lo)}, {fmt_one(hi)}]"


def is_fp8(precision: str) -> bool:
    """Whether a precision label involves an FP8 format (a preset named fp8-* or mxfp8, or e4m3 / e5m2 in it)."""
    p = str(precision).lower()
    return "fp8" in p or "e4m3" in p or "e5m2" in p
