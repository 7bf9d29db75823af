"""The report's opening section: the study's answer from study.json's ``summary`` (``studies.summary``), before any
definition or per-run detail — claims, loss changes vs fp32, the horizon-ladder table with speedups read off
AdamW's scaling curve, the FP8 failure map with Wilson intervals and telemetry explanations, and the mechanism."""
from __future__ import annotations

import math
from typing import Any

import pandas as pd

from studies.report.document import Doc
from studies.schema import float_or_nan
from studies.summary import verdict_lines

__all__ = ["verdict_section", "ladder_table", "failure_table", "mechanism_table", "failure_statement"]


def _x(v: Any) -> str:
    v = float_or_nan(v)
    return "–" if math.isnan(v) else ("∞" if math.isinf(v) else f"{v:.2f}×")


def _ci(d: dict, fmt: str = ".4f") -> str:
    m, lo, hi = float_or_nan(d.get("mean")), float_or_nan(d.get("lo")), float_or_nan(d.get("hi"))
    if math.isnan(m):
        return "–"
    return f"{m:{fmt}}" + (f" [{lo:{fmt}}, {hi:{fmt}}]" if not math.isnan(lo) else "")


def ladder_table(summary: dict) -> pd.DataFrame:
    """One row per task, precision, optimizer and horizon: end-of-schedule loss, divergences, the speedup read off
    AdamW's curve with its interval and verdict, and tokens-to-target (secondary)."""
    rows = []
    for task, pp in summary.get("ladder", {}).items():
        for prec, po in pp.items():
            for opt, entries in po.items():
                for e in entries:
                    sp = e.get("speedup") or {}
                    rows.append({"task": task, "precision": prec, "optimizer": opt, "steps": e.get("steps"),
                                 "final loss [95% CI]": _ci(e.get("loss", {})),
                                 "diverged": f"{e.get('diverged', 0)}/{e.get('n', 0)}",
                                 "speedup vs AdamW curve [95% CI]": (f"{_x(sp.get('speedup'))} [{_x(sp.get('lo'))}, "
                                                                     f"{_x(sp.get('hi'))}]") if sp else "–",
                                 "status": sp.get("status", ""), "verdict": sp.get("verdict", ""),
                                 "tokens to target (secondary)": _ci(e.get("tokens_to_target", {}), ".0f")})
    return pd.DataFrame(rows)


def failure_table(summary: dict) -> pd.DataFrame:
    """One row per task, storage policy and optimizer: divergences pooled over seeds and horizons (Wilson 95%
    interval), per horizon, and the telemetry explanation of the first failure."""
    rows = []
    for task, pp in summary.get("failure_map", {}).items():
        for prec, po in pp.items():
            for opt, c in po.items():
                per_h = ", ".join(f"{h}: {v['k']}/{v['n']}" for h, v in c.get("per_horizon", {}).items())
                rows.append({"task": task, "storage": prec, "optimizer": opt, "diverged": f"{c['k']}/{c['n']}",
                             "Wilson 95%": f"[{float_or_nan(c.get('lo')):.2f}, {float_or_nan(c.get('hi')):.2f}]",
                             "per horizon (steps)": per_h,
                             "why (telemetry, first failure)": (c.get("explanations") or [""])[0]})
    return pd.DataFrame(rows)


def failure_statement(summary: dict, optimizer: str = "adamw") -> list[str]:
    """Plain sentences: under which storage policies ``optimizer`` diverged (in any seed) and under which not."""
    out = []
    for task, pp in summary.get("failure_map", {}).items():
        fails = [f"{p} ({c['k']}/{c['n']})" for p, po in pp.items() for o, c in po.items() if o == optimizer
                 and c["k"]]
        holds = [f"{p} (0/{c['n']})" for p, po in pp.items() for o, c in po.items() if o == optimizer and not c["k"]]
        if fails or holds:
            out.append(f"{task}: {optimizer} diverged with states/master stored as " + (", ".join(fails) or "none")
                       + "; it did not diverge with " + (", ".join(holds) or "none") + ".")
    return out


def _paired(d: dict) -> str:
    if not d:
        return "–"
    return f"{float_or_nan(d.get('delta')):+.4g} [{float_or_nan(d.get('lo')):+.3g}, {float_or_nan(d.get('hi')):+.3g}]: {d.get('verdict')}"


def mechanism_table(summary: dict) -> pd.DataFrame:
    """One row per convex task and optimizer: the stalled term, the reducible term, and StoSignSGD's paired
    difference in the stalled term against it."""
    rows = []
    for task, po in summary.get("mechanism", {}).items():
        for opt, v in po.items():
            d = v.get("stosignsgd_minus_this_stalled") or {}
            rows.append({"task": task, "optimizer": opt, "stalled term [95% CI]": _ci(v.get("stalled", {}), ".4g"),
                         "reducible term": _ci(v.get("reducible", {}), ".4g"),
                         "stosignsgd − this, stalled (paired)": _paired(d)})
    return pd.DataFrame(rows)


def verdict_section(doc: Doc, study: dict) -> None:
    """The verdict first: claims and per-cell verdicts, then the ladder, failure-map and mechanism tables."""
    summary = study.get("summary") or {}
    doc.h(1, "Verdict")
    if not summary:
        doc.note("study.json has no summary (a study from before the horizon ladder, or one still running).")
        return
    doc.p(summary.get("rule", ""))
    doc.ul(verdict_lines({k: summary.get(k, {}) for k in ("claims", "vs_fp32")}))
    doc.h(2, "Horizon ladder: end-of-schedule loss and speedup read off AdamW's scaling curve")
    lad = ladder_table(summary)
    doc.table(lad) if not lad.empty else doc.note("No main-phase runs.")
    fail = failure_table(summary)
    if not fail.empty:
        doc.h(2, "FP8 failure map: divergences per storage policy")
        doc.ul(failure_statement(summary))
        doc.table(fail)
    mech = mechanism_table(summary)
    if not mech.empty:
        doc.h(2, "Mechanism: stalled vs reducible term of the convex objective")
        doc.table(mech)
    if summary.get("lr_not_interior"):
        doc.note("Chosen LR at an edge of the tried grid (the optimum may lie outside): "
                 + "; ".join(summary["lr_not_interior"]))
