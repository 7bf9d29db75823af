"""The compact plain-text summary of a results folder printed on the terminal (no figures are drawn)."""
from __future__ import annotations

import math
from pathlib import Path

from studies.report.analysis import ReportData, prepare
from studies.report.claims import paper_comparison
from studies.report.style import BASELINE, OPTIMIZER_ORDER, PRECISION_ORDER, ordered
from studies.summary import verdict_lines

__all__ = ["summarize", "summary_text", "MAX_PROBLEMS"]

MAX_PROBLEMS = 10  # problems listed on the terminal (all of them are in the report)


def summarize(out_dir: Path, data: ReportData) -> str:
    """The terminal summary of prepared data: run counts, the diverged k/n grid per task, the speedups, the paper
    check, the rows left out, and the report's path when it exists."""
    results, targets, main, speed, failed = data.results, data.targets, data.main, data.speed, data.failed
    answer = verdict_lines(data.study.get("summary") or {})
    lines = (["verdicts (95% intervals; 'insufficient evidence' when n < 3 or the interval spans the null):"]
             + [f"  {v}" for v in answer]) if answer else []
    lines += [f"{len(results)} runs in {out_dir} ({int(results['diverged'].sum())} diverged"
             + (f", {len(failed)} failed" if len(failed) else "") + ")"]
    if main.empty:
        lines.append("no main-phase runs")
    for task in ordered(main["task"], ()):
        m = main[main["task"] == task]
        precs = ordered(m["precision"], PRECISION_ORDER)
        opts = ordered(m["optimizer"], OPTIMIZER_ORDER)
        tgt = targets.get(task)
        lines.append(f"[{task}] diverged seeds (k/n)" + (f"; target loss {tgt[0]:.4g}" if tgt else ""))
        w = max([len(p) for p in precs] + [9])
        cw = max([len(o) for o in opts] + [6]) + 2
        lines.append(" " * (w + 2) + "".join(f"{o:>{cw}}" for o in opts))
        for p in precs:
            cells = []
            for o in opts:
                g = m[(m["precision"] == p) & (m["optimizer"] == o)]
                cells.append(f"{int(g['diverged'].sum())}/{len(g)}" if len(g) else "-")
            lines.append(f"  {p:<{w}}" + "".join(f"{c:>{cw}}" for c in cells))
        s = speed[speed["task"] == task] if not speed.empty else speed
        if not s.empty:
            lines.append(f"  tokens-to-target speedup vs {data.baselines.get(task, BASELINE)} (95% bootstrap CI):")
        ow = max([len(o) for o in s["optimizer"]] + [10]) if not s.empty else 10
        for r in s.itertuples(index=False) if not s.empty else []:
            head = f"    {r.optimizer:<{ow}} {r.precision:<{w}} "
            if math.isfinite(r.speedup):
                ci = f" [{r.lo:.2f}, {r.hi:.2f}]" if math.isfinite(r.lo) else ""
                lines.append(head + f"{r.speedup:.2f}x{ci}" + ("" if r.status == "ok" else f" ({r.status})"))
            else:
                lines.append(head + r.status)
    if not main.empty:
        lines += ["paper check (tokens-to-target within one schedule; secondary to the verdicts above): " + x
                  for x in paper_comparison(main, speed, data.baselines)]
    if data.problems:
        lines.append(f"{len(data.problems)} problem(s) in the results folder (left out of every number):")
        lines += ["  " + p for p in data.problems[:MAX_PROBLEMS]]
        if len(data.problems) > MAX_PROBLEMS:
            lines.append(f"  ... and {len(data.problems) - MAX_PROBLEMS} more (see the report)")
    if (out_dir / "report.html").is_file():
        lines.append(f"report: {out_dir / 'report.html'}")
    return "\n".join(lines)


def summary_text(out_dir: Path | str) -> str:
    """A compact plain-text summary of a results folder for the terminal (no figures are drawn)."""
    out_dir = Path(out_dir)
    return summarize(out_dir, prepare(out_dir))
