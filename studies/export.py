"""Export a results folder to dashboards people already use: ``precision-sweep export DIR --tensorboard LOGDIR``.

One TensorBoard run per finished run (``LOGDIR/<phase>/<task>/<optimizer>/<precision>/lr=<lr>,seed=<seed>``),
holding the scalars of its metrics.csv at their step: ``loss``, ``val_loss``, ``lr``, ``grad_norm``,
``update_ratio`` and the telemetry columns (underflow/overflow fractions per role, ``state_zero_frac``,
``lost_update_frac``) under ``telemetry/``; empty cells are skipped. TensorBoard is an optional dependency
(``pip install 'lowprec-stosign[tensorboard]'``): without it the export stops with that instruction.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

from studies.records import check_results
from studies.schema import METRIC_COLUMNS, read_metrics

__all__ = ["TRAINING_SCALARS", "scalar_tag", "run_logdir", "export_tensorboard"]

TRAINING_SCALARS = ("loss", "val_loss", "lr", "grad_norm", "update_ratio")


def scalar_tag(column: str) -> str:
    """The TensorBoard tag of a metrics.csv column (training scalars as named, the rest under telemetry/)."""
    return column if column in TRAINING_SCALARS else f"telemetry/{column}"


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=,:+-]", "_", text)


def run_logdir(row) -> str:
    """The TensorBoard run name of a results row (relative to LOGDIR)."""
    return "/".join(_safe(str(v)) for v in (row.phase, row.task, row.optimizer, row.precision)) + \
        f"/lr={row.lr:g},seed={row.seed}"


def export_tensorboard(out_dir: str | Path, logdir: str | Path) -> int:
    """Write one TensorBoard event file per run of ``out_dir`` with metrics into ``logdir``; return the number of
    runs exported. ValueError when tensorboard is missing or the results folder is damaged (named)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError("export --tensorboard needs the tensorboard package: pip install "
                         "'lowprec-stosign[tensorboard]' (or pip install tensorboard)") from None
    out_dir, logdir = Path(out_dir), Path(logdir)
    rows = check_results(out_dir)
    if not rows:
        raise ValueError(f"no runs in {out_dir / 'results.csv'}")
    n = 0
    for row in rows:
        path = out_dir / "runs" / row.run_id / "metrics.csv"
        if row.status == "error" or not path.is_file():
            continue
        m = read_metrics(path)
        w = SummaryWriter(log_dir=str(logdir / run_logdir(row)))
        try:
            for rec in m.to_dict("records"):
                step = int(rec["step"])
                for c in METRIC_COLUMNS:
                    if c in ("step", "tokens"):
                        continue
                    v = rec[c]
                    if not math.isnan(v):
                        w.add_scalar(scalar_tag(c), v, global_step=step)
            w.add_text("run", f"run_id {row.run_id}; status {row.status}; {row.explanation}", global_step=0)
        finally:
            w.close()
        n += 1
    return n
