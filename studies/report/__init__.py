"""The precision-sweep report: figures (seaborn), ``report.html`` (self-contained), ``report.md`` and a summary.

Reads a results folder as :mod:`studies.schema` defines it (the writer's own definition; nothing else)::

    DIR/results.csv                 one row per finished run (required)
    DIR/study.json                  the study definition (targets, LR grid, known optima, ...)
    DIR/runs/<run_id>/metrics.csv   per-step metrics and telemetry columns
    DIR/runs/<run_id>/telemetry.csv the lowprec Telemetry frame

Every number in the report is computed from those files (statistics in :mod:`studies.stats`); a section whose
data is absent is replaced by a one-line note; damaged or duplicate rows and unreadable files are named (file,
line) and left out. Modules, in import order: ``style`` (orders, formats), ``load`` (reading), ``analysis``
(cells, targets, speedups), ``claims`` (verdicts against the paper), ``document`` (HTML/Markdown), ``figures``,
``tables``, ``sections``, ``summary`` (terminal), ``render`` (entry points).
"""
from __future__ import annotations

from studies.report.analysis import ReportData, cell_table, prepare, speedup_table, variant_labels
from studies.report.claims import paper_comparison
from studies.report.load import load_metrics, load_results, load_study, read_result_rows
from studies.report.render import render_report, render_with_summary
from studies.report.style import PAPER_SPEEDUP
from studies.report.summary import summary_text
from studies.report.tables import lr_rows

__all__ = [
    "render_report", "summary_text", "render_with_summary", "load_results", "load_study", "load_metrics",
    "read_result_rows", "cell_table", "speedup_table", "paper_comparison", "PAPER_SPEEDUP", "ReportData", "prepare",
    "variant_labels", "lr_rows",
]
