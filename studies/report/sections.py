"""The report's sections: each appends its headings, text, tables and figures to a :class:`Doc`.

A section whose data is absent is replaced by a one-line note (never silently dropped).
"""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd

from studies.report.analysis import ReportData, cell_table, optimal_losses, variant_labels
from studies.report.claims import paper_comparison
from studies.report.document import Doc
from studies.report.figures import Figures, heatmap, loss_curves, loss_unit, mechanism_fig, point_ci, telemetry_fig
from studies.report.style import (MAIN_PHASES, OPTIMIZER_ORDER, PAPER_SPEEDUP, PHASE_ORDER, PRECISION_ORDER, fmt,
                                      fmt_int, fmt_tokens, is_fp8, ordered, slug)
from studies.report.tables import cells_display, lr_rows, tune_table

__all__ = ["study_section", "problems_section", "stability_section", "main_metrics", "curves_section",
           "speedup_section", "telemetry_section", "telemetry_sites_section", "divergence_section",
           "variant_section", "mechanism_section"]


def _per_cell(runs: pd.DataFrame) -> str:
    """The number of runs per cell (phase, task, precision, optimizer) as "2", or "1–2" when cells differ."""
    n = runs.groupby(["phase", "task", "precision", "optimizer"]).size()
    if n.empty:
        return "0"
    return str(n.min()) if n.min() == n.max() else f"{n.min()}–{n.max()}"


def study_section(doc: Doc, data: ReportData) -> None:
    """What was run: tasks, optimizers, precisions, seeds, steps, LRs, targets, the LR grid, study.json; the
    caveats of how cells were kept apart; the tune-phase table."""
    study, results, targets = data.study, data.results, data.targets
    doc.h(1, "Study definition")
    phases = ordered(results["phase"], PHASE_ORDER)
    main = results[results["phase"].isin(MAIN_PHASES)]
    src = main if not main.empty else results
    seeds = sorted({int(s) for s in src["seed"].dropna()})
    items = [
        f"Runs: {len(results)} in phases {', '.join(phases) if phases else '—'}",
        f"Tasks: {', '.join(ordered(src['task'], ()))}",
        f"Optimizers: {', '.join(ordered(src['optimizer'], OPTIMIZER_ORDER))}",
        f"Precisions: {', '.join(ordered(src['precision'], PRECISION_ORDER))}",
        f"Seeds: {', '.join(map(str, seeds))} ({_per_cell(src)} per cell)",
    ]
    steps = sorted({int(s) for s in src["steps"].dropna()})
    if steps:
        items.append(f"Steps per run: {', '.join(map(str, steps))}")
    tok = src["tokens"].dropna()
    if len(tok):
        items.append(f"Tokens per run: {fmt_tokens(float(tok.max()))} (largest)")
    for key, label in (("thresholds", "Divergence thresholds"), ("date", "Date"), ("finished", "Finished"),
                       ("command", "Command"), ("status", "Study status"), ("size", "Size")):
        if key in study:
            v = study[key]
            items.append(f"{label}: {v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)}")
    if not main.empty:
        lr_by_opt = main.groupby("optimizer")["lr"].agg(lambda s: sorted(set(s.dropna())))
        items.append("LRs used in the main runs: " + "; ".join(
            f"{o}: {', '.join(fmt(v) for v in lr_by_opt[o])}" for o in ordered(lr_by_opt.index, OPTIMIZER_ORDER)))
    for task, (t, how) in targets.items():
        items.append(f"Target loss ({task}): {t:.4g} — {how}")
    if not targets and not main.empty:
        items.append("Target loss: none recorded in study.json, so no tokens-to-target.")
    doc.ul(items)
    for c in data.caveats:
        doc.note(c)
    lrs = lr_rows(study)
    if lrs is not None:
        doc.p("Learning-rate grid (the same tuning budget for every optimizer) and the chosen LR:")
        doc.table(lrs)
        if isinstance(study.get("lr_extension_rule"), str):
            doc.note(f"LRs tried = the grid plus its {study['lr_extension_rule']}.")
    if not study:
        doc.note("study.json is absent: the definition above is derived from results.csv.")
    else:
        if isinstance(study.get("protocol"), str):
            doc.p("Protocol:")
            doc.pre(study["protocol"])
        doc.details("study.json", json.dumps({k: v for k, v in study.items() if k != "protocol"}, indent=1,
                                             sort_keys=True, default=str)[:30000])
    tune = results[results["phase"] == "tune"]
    if not tune.empty:
        doc.h(2, "Learning-rate tuning")
        doc.table(tune_table(tune))


def problems_section(doc: Doc, problems: list[str]) -> None:
    """The rows and files left out (named "FILE line N: why"); nothing when there are none."""
    if not problems:
        return
    doc.h(1, "Data problems (left out of every table, figure and statistic)")
    doc.ul(problems)


def stability_section(doc: Doc, figs: Figures, main: pd.DataFrame, precisions, optimizers) -> None:
    """One heatmap per task: fraction of seeds diverged per precision and optimizer."""
    doc.h(1, "Stability: fraction of seeds diverged")
    if main.empty:
        doc.note("No main-phase runs: stability heatmap omitted.")
        return
    cells = cell_table(main, ["task", "precision", "optimizer"])
    for task in ordered(main["task"], ()):
        c = cells[cells["task"] == task]
        p = heatmap(figs, c, "precision", "optimizer", [x for x in precisions if x in set(c["precision"])],
                     [x for x in optimizers if x in set(c["optimizer"])], f"{task}: diverged seeds (k/n)",
                     f"stability_{slug(task)}")
        doc.fig(p, f"{task}: fraction of seeds that diverged per precision and optimizer (annotated k/n).")


def main_metrics(metrics: pd.DataFrame) -> pd.DataFrame:
    """The metrics rows of the main-phase runs (``metrics`` itself when empty, as it then has no columns)."""
    return metrics[metrics["phase"].isin(MAIN_PHASES)] if not metrics.empty else metrics


def curves_section(doc: Doc, figs: Figures, metrics: pd.DataFrame, main: pd.DataFrame, precisions, optimizers,
                    targets) -> None:
    """One loss-curve figure per task (main runs)."""
    doc.h(1, "Loss curves")
    mm = main_metrics(metrics)
    if mm.empty:
        doc.note("No runs/*/metrics.csv for the main runs: loss curves omitted.")
        return
    for task in ordered(main["task"], ()):
        tgt = targets.get(task, (None, ""))[0]
        precs = [p for p in precisions if p in set(mm.loc[mm["task"] == task, "precision"])]
        opts = [o for o in optimizers if o in set(mm.loc[mm["task"] == task, "optimizer"])]
        p = loss_curves(figs, mm, task, precs, opts, tgt)
        if p is None:
            doc.note(f"{task}: no loss values in metrics.csv.")
        else:
            doc.fig(p, f"{task}: loss vs tokens, mean ± sd over seeds; red: a diverged run's training loss and ✕ "
                       f"where it stopped (clipped to the panel); dotted line = target loss.")


def speedup_section(doc: Doc, figs: Figures, main: pd.DataFrame, speed: pd.DataFrame, targets, precisions,
                     optimizers, baselines: dict[str, str] | None = None, notes: list[str] | None = None) -> None:
    """Tokens-to-target speedup over AdamW per task: figure, table and the comparison with the paper."""
    doc.h(1, "Tokens to target relative to AdamW")
    if main.empty or not targets:
        doc.note("No target loss (no fp32 AdamW baseline and none recorded): tokens-to-target omitted.")
        return
    if speed.empty:
        doc.note("No AdamW runs at the studied precisions: no speedup to compute.")
        return
    doc.p("Speedup = mean AdamW tokens-to-target / mean optimizer tokens-to-target at the same task and precision, "
          "over the seeds that reached the target; interval: 95% percentile bootstrap of that ratio of means "
          "(2000 resamples, seeds resampled independently per optimizer; none with fewer than 2 reached seeds). "
          "> 1 means fewer tokens than AdamW. 'not reached' cells are shown explicitly.")
    for n in notes or []:
        doc.note(n)
    for task in ordered(speed["task"], ()):
        tgt, how = targets.get(task, (math.nan, ""))
        s = speed[speed["task"] == task]
        missing, cell_notes = {}, {}
        for r in s.itertuples(index=False):
            if r.status == "partial":
                cell_notes[(r.precision, r.optimizer)] = (f"{round(r.opt_reached * r.n_opt)}/{r.n_opt} reached"
                                                     if r.opt_reached < 1 else
                                                     f"AdamW {round(r.base_reached * r.n_base)}/{r.n_base} reached")
            if r.status == "not reached by optimizer":
                missing[(r.precision, r.optimizer)] = "not reached"
            elif r.status == "baseline never reached target":
                missing[(r.precision, r.optimizer)] = "AdamW not reached"
        precs = [p for p in precisions if p in set(s["precision"])]
        opts = [o for o in optimizers if o in set(s["optimizer"])]
        p = point_ci(figs, s, "precision", "optimizer", precs, opts, "speedup", "lo", "hi",
                      "speedup vs AdamW (× fewer tokens)", f"{task}: tokens to loss {tgt:.4g} vs AdamW",
                      f"speedup_{slug(task)}", missing=missing, notes=cell_notes, ref_line=1.0, band=PAPER_SPEEDUP,
                      band_label="paper, FP8 (1.44×–2.14×)", hue_colors=figs.palette,
                      band_x={q for q in precs if is_fp8(q)})
        doc.fig(p, f"{task}: tokens-to-target speedup over AdamW (target loss {tgt:.4g}: {how}); bars = 95% "
                   f"bootstrap interval; a vertical note at the foot = no value (reason written); the paper's band "
                   f"only on FP8 precisions.")
        t = pd.DataFrame({
            "precision": s["precision"], "optimizer": s["optimizer"],
            "AdamW tokens": [fmt_tokens(v) for v in s["baseline_tokens"]],
            "optimizer tokens": [fmt_tokens(v) for v in s["optimizer_tokens"]],
            "speedup": [f"{v:.3f}" if math.isfinite(v) else "—" for v in s["speedup"]],
            "lo": [f"{v:.3f}" if math.isfinite(v) else "—" for v in s["lo"]],
            "hi": [f"{v:.3f}" if math.isfinite(v) else "—" for v in s["hi"]],
            "reached (opt)": [f"{round(f * n)}/{n}" for f, n in zip(s["opt_reached"], s["n_opt"])],
            "reached (AdamW)": [f"{round(f * n)}/{n}" for f, n in zip(s["base_reached"], s["n_base"])],
            "status": s["status"]})
        doc.table(t)
    doc.h(2, "Compared with the paper")
    doc.ul(paper_comparison(main, speed, baselines))


def telemetry_section(doc: Doc, figs: Figures, metrics: pd.DataFrame, main: pd.DataFrame, precisions,
                       optimizers) -> None:
    """One telemetry figure per task and precision (main runs); the quiet ones are named in a note."""
    doc.h(1, "Telemetry over training")
    mm = main_metrics(metrics)
    if mm.empty:
        doc.note("No runs/*/metrics.csv: telemetry omitted.")
        return
    any_fig, quiet = False, []
    for task in ordered(mm["task"], ()):
        for prec in [p for p in precisions if p in set(mm.loc[mm["task"] == task, "precision"])]:
            p = telemetry_fig(figs, mm, task, prec, optimizers)
            if p is None:
                quiet.append(f"{task} · {prec}")
            else:
                any_fig = True
                doc.fig(p, f"{task} · {prec}: underflow (flushed to zero) and overflow (saturated or non-finite) "
                           f"fractions per role, and the fraction of second-moment entries at zero, per step.")
    if quiet:
        doc.note("No telemetry signal (columns absent or all zero) for: " + ", ".join(quiet) + ".")
    if not any_fig and not quiet:
        doc.note("No telemetry columns in metrics.csv.")


def telemetry_sites_section(doc: Doc, tel: pd.DataFrame) -> None:
    """Per main cell, the site with the largest mean flushed / saturated fraction in the runs' telemetry.csv."""
    if tel.empty or "site" not in tel.columns:
        return
    cols = [c for c in ("flushed_frac", "saturated_frac") if c in tel.columns]
    if not cols:
        return
    doc.h(2, "Most affected sites (telemetry.csv)")
    g = tel.groupby(["task", "precision", "optimizer", "site"], sort=False)[cols].mean().reset_index()
    rows = []
    for (task, prec, opt), d in g.groupby(["task", "precision", "optimizer"], sort=False):
        for c in cols:
            top = d.sort_values(c, ascending=False).head(1)
            if len(top) and float(top[c].iloc[0]) > 0:
                rows.append({"task": task, "precision": prec, "optimizer": opt, "measure": c,
                             "site": top["site"].iloc[0], "mean fraction": float(top[c].iloc[0])})
    if rows:
        doc.table(pd.DataFrame(rows))
    else:
        doc.note("telemetry.csv shows no flushed or saturated entries.")


def divergence_section(doc: Doc, results: pd.DataFrame) -> None:
    """Every diverged run with its step, reason, first site and explanation; the closest site of the others."""
    doc.h(1, "Why runs diverged")
    div = results[results["diverged"]]
    if div.empty:
        doc.note("No run diverged.")
    else:
        lines = []
        for r in div.itertuples(index=False):
            step = f"at step {int(r.diverged_step)}" if math.isfinite(r.diverged_step) else "(step unknown)"
            reason = f" ({r.divergence_reason})" if r.divergence_reason else ""
            site = f"; first site: {r.divergence_site}" if r.divergence_site else ""
            expl = f"; {r.explanation}" if r.explanation else "; no telemetry explanation recorded"
            lines.append(f"[{r.phase}] {r.task}: {r.optimizer} {r.precision}, seed {fmt_int(r.seed)}, diverged {step}"
                         f"{reason}{site}{expl}")
        doc.ul(lines)
    ok = results[~results["diverged"] & ((results["divergence_site"] != "") | (results["explanation"] != ""))]
    if not ok.empty:
        doc.h(2, "Runs that did not diverge: closest site")
        lines = []
        for r in ok.itertuples(index=False):
            parts = [x for x in (r.divergence_site and f"closest site: {r.divergence_site}", r.explanation) if x]
            lines.append(f"[{r.phase}] {r.task}: {r.optimizer} {r.precision}, seed {fmt_int(r.seed)} — "
                         + "; ".join(parts))
        doc.ul(lines)


def variant_section(doc: Doc, figs: Figures, results: pd.DataFrame, phase: str, title: str, intro: str,
                     name: str, x: str, hue: str) -> None:
    """An ablation or rounding phase: heatmap (ablation), final loss with 95% t intervals, and the cell table."""
    doc.h(1, title)
    sub = results[results["phase"] == phase]
    if sub.empty:
        doc.note(f"No {phase}-phase runs in this study: section omitted.")
        return
    doc.p(intro)
    cells = cell_table(sub, ["task", "precision", "optimizer"])
    labels = variant_labels(ordered(sub["precision"], PRECISION_ORDER))
    cells.insert(1, "variant", [labels[p] for p in cells["precision"]])
    for task in ordered(sub["task"], ()):
        c = cells[cells["task"] == task]
        if phase == "ablation":
            p = heatmap(figs, c, "precision", "optimizer", ordered(c["precision"], PRECISION_ORDER),
                         ordered(c["optimizer"], OPTIMIZER_ORDER), f"{task}: ablation, diverged seeds (k/n)",
                         f"{name}_stability_{slug(task)}")
            doc.fig(p, f"{task}: fraction of seeds diverged per StoSignSGD variant.")
        x_order = ordered(c[x], OPTIMIZER_ORDER if x == "optimizer" else tuple(labels.values()))
        hue_order = ordered(c[hue], OPTIMIZER_ORDER if hue == "optimizer" else tuple(labels.values()))
        missing = {(getattr(r, x), getattr(r, hue)): f"{r.diverged_k}/{r.n} diverged"
                   for r in c.itertuples(index=False) if not math.isfinite(r.final_mean)}
        notes = {(getattr(r, x), getattr(r, hue)): f"{r.diverged_k}/{r.n} diverged"
                 for r in c.itertuples(index=False) if math.isfinite(r.final_mean) and r.diverged_k > 0}
        p = point_ci(figs, c, x, hue, x_order, hue_order, "final_mean", "final_lo", "final_hi",
                      f"final loss{loss_unit(task)}", f"{task}: {title.lower()} — final loss, 95% t interval",
                      f"{name}_{slug(task)}", missing=missing, notes=notes,
                      hue_colors=figs.palette if hue == "optimizer" else None)
        doc.fig(p, f"{task}: final loss per {x} and {hue} (mean over seeds that did not diverge, 95% t interval).")
    doc.table(cells_display(cells))


def mechanism_section(doc: Doc, figs: Figures, results: pd.DataFrame, metrics: pd.DataFrame, study: dict) -> None:
    """The mechanism phase: distance to the known optimum per step, and the cell table."""
    doc.h(1, "Mechanism: SignSGD vs StoSignSGD on non-smooth convex problems")
    sub = results[results["phase"] == "mechanism"]
    if sub.empty:
        doc.note("No mechanism-phase runs in this study: section omitted.")
        return
    mm = metrics[metrics["phase"] == "mechanism"] if not metrics.empty else metrics
    if mm.empty:
        doc.note("Mechanism runs have no metrics.csv: only the table is shown.")
    else:
        p, note = mechanism_fig(figs, mm, optimal_losses(study))
        if p is not None:
            doc.fig(p, "Loss minus the known optimum (log scale) per step, mean ± sd over seeds.")
        if note:
            doc.note(note)
    doc.table(cells_display(cell_table(sub.assign(ttt=np.nan), ["task", "precision", "optimizer"]))
              .drop(columns=["tokens to target [95% CI]", "reached"]))


