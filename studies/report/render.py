"""The report's entry points: :func:`render_report`, :func:`render_with_summary`.

Writes ``DIR/figures/*.png``, ``DIR/tables/*.csv`` (speedup, cells, runs), ``DIR/report.html`` (figures embedded,
opens without network) and ``DIR/report.md`` (figures by relative path).
"""
from __future__ import annotations

import datetime as _dt
from pathlib import Path

import pandas as pd

from studies.report.analysis import ReportData, cell_table, prepare
from studies.report.document import Doc, render_html, render_md
from studies.report.figures import Figures
from studies.report.sections import (curves_section, divergence_section, mechanism_section, problems_section,
                                         speedup_section, stability_section, study_section, telemetry_section,
                                         telemetry_sites_section, variant_section)
from studies.report.style import OPTIMIZER_ORDER, PRECISION_ORDER, fmt_int, ordered, palette
from studies.report.summary import summarize
from studies.report.verdicts import verdict_section
from studies.report.tables import cells_display, run_table

__all__ = ["render_report", "render_with_summary", "write_report"]


def render_report(out_dir: Path | str) -> dict[str, Path]:
    """Render the report of the results folder `out_dir`; return the paths written.

    Keys: "html", "md", "table:<name>" for CSV tables under DIR/tables/, "figure:<name>" for PNGs under
    DIR/figures/. Raises FileNotFoundError when DIR/results.csv is missing.
    """
    out_dir = Path(out_dir)
    return write_report(out_dir, prepare(out_dir))


def render_with_summary(out_dir: Path | str) -> tuple[dict[str, Path], str]:
    """:func:`render_report` then :func:`studies.report.summary.summary_text`, loading the folder once."""
    out_dir = Path(out_dir)
    data = prepare(out_dir)
    return write_report(out_dir, data), summarize(out_dir, data)


def write_report(out_dir: Path, data: ReportData) -> dict[str, Path]:
    """Draw the figures and write the tables, report.html and report.md of prepared data; the paths written."""
    results, study, metrics, targets, main, speed, failed = (data.results, data.study, data.metrics, data.targets,
                                                             data.main, data.speed, data.failed)
    optimizers = ordered(results["optimizer"], OPTIMIZER_ORDER)
    figs = Figures(out_dir, palette(optimizers))
    doc = Doc()

    title = "Precision sweep report"
    gen = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    doc.p(f"Results folder: {out_dir.resolve()} · rendered {gen} · {len(results)} runs, "
          f"{int(results['diverged'].sum())} diverged.")
    verdict_section(doc, study)
    problems_section(doc, data.problems)
    main_precs = ordered(main["precision"], PRECISION_ORDER)
    main_opts = ordered(main["optimizer"], OPTIMIZER_ORDER)
    stability_section(doc, figs, main, main_precs, main_opts)
    curves_section(doc, figs, metrics, main, main_precs, main_opts, targets)
    speedup_section(doc, figs, main, speed, targets, main_precs, main_opts, data.baselines, data.notes)
    telemetry_section(doc, figs, metrics, main, main_precs, main_opts)
    telemetry_sites_section(doc, data.telemetry)
    divergence_section(doc, results)
    if len(failed):
        doc.h(2, "Failed runs (errors, not divergences; left out of every statistic)")
        doc.ul([f"[{r.phase}] {r.task}: {r.optimizer} {r.precision}, seed {fmt_int(r.seed)} — "
                f"{r.explanation or 'no message'}" for r in failed.itertuples(index=False)])
    variant_section(doc, figs, results, "ablation", "Ablation of StoSignSGD",
                     "Which component carries stability: StoSignSGD against variants without noise (= Signum), "
                     "without the max buffer, with a decayed max, without momentum, and the sign conversion of AdamW.",
                     "ablation", "optimizer", "variant")
    variant_section(doc, figs, results, "rounding", "Nearest vs stochastic rounding",
                     "The same optimizers with round-to-nearest and stochastic rounding of master weights and "
                     "optimizer states; 'variant' names the rounding per role (the table gives the full precision).",
                     "rounding", "variant", "optimizer")
    mechanism_section(doc, figs, results, metrics, study)

    doc.h(1, "Final loss per cell (main runs)")
    cells = cell_table(main, ["task", "precision", "optimizer"]) if not main.empty else pd.DataFrame()
    if cells.empty:
        doc.note("No main-phase runs.")
    else:
        doc.p("Final loss: mean over the seeds that did not diverge with a 95% t interval; tokens to target: mean "
              "over the seeds that reached it with a 95% t interval.")
        doc.table(cells_display(cells))
    doc.h(1, "Appendix: all runs")
    runs = run_table(results)
    doc.table(runs)
    study_section(doc, data)  # the study definition and study.json dump: appendix

    tables_dir = out_dir / "tables"
    tables_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for name, df in (("speedup", speed), ("cells", cells), ("runs", runs)):
        if not df.empty:
            p = tables_dir / f"{name}.csv"
            df.to_csv(p, index=False)
            written[f"table:{name}"] = p
    html_path, md_path = out_dir / "report.html", out_dir / "report.md"
    html_path.write_text(render_html(doc, title), encoding="utf-8")
    md_path.write_text(render_md(doc, title, out_dir), encoding="utf-8")
    written["html"], written["md"] = html_path, md_path
    for name, p in figs.written.items():
        written[f"figure:{name}"] = p
    return written
