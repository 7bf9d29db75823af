"""The verdicts: the data compared with the paper's two FP8 claims, as sentences computed from the data.

Claim 1: AdamW fails (diverges) in FP8 while StoSignSGD is stable. Claim 2: StoSignSGD needs 1.44×–2.14× fewer
tokens than AdamW to reach the same loss (the speedup's bootstrap interval is compared with that band).
"""
from __future__ import annotations

import math

import pandas as pd

from studies.report.style import (BASELINE, MAIN_PHASES, OPTIMIZER_ORDER, PAPER_SPEEDUP, PRECISION_ORDER,
                                      PROPOSED, ordered)

__all__ = ["paper_comparison", "stability_verdict", "speedup_verdict"]


def stability_verdict(adamw_diverged: int, proposed_diverged: int) -> str:
    """Claim 1 for one cell from the numbers of diverged seeds of AdamW and StoSignSGD."""
    if adamw_diverged > 0 and proposed_diverged == 0:
        return "agrees with the paper (AdamW fails, StoSignSGD stable)"
    if adamw_diverged > 0:
        return "partly agrees (AdamW fails, but StoSignSGD diverges too)"
    if proposed_diverged == 0:
        return "does not agree with the paper (AdamW did not fail here)"
    return "does not agree with the paper (StoSignSGD diverged, AdamW did not)"


def speedup_verdict(lo: float, hi: float) -> str:
    """Claim 2 from a speedup interval [lo, hi] (lo = hi = the point estimate when there is no interval)."""
    lo_p, hi_p = PAPER_SPEEDUP
    if hi < lo_p:
        return "below the paper's 1.44×–2.14× (does not agree)"
    if lo > hi_p:
        return "above the paper's 1.44×–2.14× (larger than reported)"
    return "overlaps the paper's 1.44×–2.14× (agrees)"


def _speedup_sentence(r: pd.Series) -> str:
    st = r["status"]
    if st == "baseline never reached target":
        return " Speedup not defined: AdamW never reached the target at this precision."
    if st == "not reached by optimizer":
        return " StoSignSGD never reached the target: no speedup (does not agree with 1.44×–2.14×)."
    if st not in ("ok", "partial"):
        return ""
    ratio, rlo, rhi = r["speedup"], r["lo"], r["hi"]
    ci = f" [{rlo:.2f}, {rhi:.2f}]" if math.isfinite(rlo) else " (no interval: < 2 seeds)"
    lo_, hi_ = (rlo, rhi) if math.isfinite(rlo) else (ratio, ratio)
    part = " (conditional on the seeds that reached it)" if st == "partial" else ""
    return f" Tokens-to-target speedup {ratio:.2f}×{ci}{part}: {speedup_verdict(lo_, hi_)}."


def paper_comparison(results: pd.DataFrame, speed: pd.DataFrame, baselines: dict[str, str] | None = None) -> list[str]:
    """One sentence per FP8 cell of a language-model task with AdamW and StoSignSGD runs (main phase), computed
    from the data (never fixed text). `baselines`: task -> the AdamW label used as baseline (default "adamw")."""
    lines = []
    baselines = baselines or {}
    main = results[results["phase"].isin(MAIN_PHASES)]
    fp8 = [p for p in ordered(main["precision"], PRECISION_ORDER) if "fp8" in p.lower() or "e4m3" in p.lower()]
    if not fp8:
        return ["No FP8 precision in this study, so the paper's FP8 claims (AdamW fails; StoSignSGD needs "
                "1.44×–2.14× fewer tokens) cannot be checked here."]
    tasks = [t for t in ordered(main["task"], ()) if not t.startswith("convex")]  # the claims are about LMs
    cells = [(task, prec, pname) for task in tasks for prec in fp8
             for pname in ordered(main.loc[(main["task"] == task) & (main["precision"] == prec), "optimizer"],
                                  OPTIMIZER_ORDER) if pname.split("@")[0] == PROPOSED]
    for task, prec, pname in cells:
        g = main[(main["task"] == task) & (main["precision"] == prec)]
        bname = baselines.get(task, BASELINE)
        a, s = g[g["optimizer"] == bname], g[g["optimizer"] == pname]
        if a.empty or s.empty:
            continue
        ka, na = int(a["diverged"].sum()), len(a)
        ks, ns = int(s["diverged"].sum()), len(s)
        who = "" if (bname, pname) == (BASELINE, PROPOSED) else f" ({bname} vs {pname})"
        line = (f"{task}, {prec}{who}: AdamW diverged in {ka}/{na} seeds, StoSignSGD in {ks}/{ns} — "
                f"{stability_verdict(ka, ks)}.")
        row = speed[(speed["task"] == task) & (speed["precision"] == prec) & (speed["optimizer"] == pname)] \
            if not speed.empty else pd.DataFrame()
        if not row.empty:
            line += _speedup_sentence(row.iloc[0])
        lines.append(line)
    return lines or ["The FP8 cells lack AdamW or StoSignSGD runs, so the paper's claims cannot be checked here."]
