"""The report's tables as display frames (text cells): the LR grid, the per-cell summary and the list of runs.

The per-cell and per-run tables are also written as ``DIR/tables/cells.csv`` / ``runs.csv``.
"""
from __future__ import annotations

import math
import pandas as pd

from studies.report.style import OPTIMIZER_ORDER, fmt, fmt_ci, fmt_tokens, ordered

__all__ = ["lr_rows", "cells_display", "run_table", "tune_table"]


def lr_rows(study: dict) -> pd.DataFrame | None:
    """Table task/optimizer/grid/LRs tried/chosen LR from study.json as studies.protocol writes it: ``lr_grid``
    {task: {opt: [lrs]}}, ``chosen_lrs`` {task: {precision: {opt: lr}}}, ``lr_tried`` {task: {precision: {opt:
    [lrs]}}} and ``lr_at_edge`` {task: {precision: {opt: bool}}} (flagged "at edge of grid"); one "LRs tried" and
    one "chosen LR" column per tuned precision. None when the study has neither a grid nor chosen LRs."""
    grid, chosen = study.get("lr_grid") or {}, study.get("chosen_lrs") or {}
    if not grid and not chosen:
        return None
    tried_all, edge_all = study.get("lr_tried") or {}, study.get("lr_at_edge") or {}
    rows = []
    for task in dict.fromkeys([*grid, *chosen]):
        per_prec = chosen.get(task, {})
        opts = list(dict.fromkeys([*grid.get(task, {}), *(o for v in per_prec.values() for o in v)]))
        for opt in ordered(opts, OPTIMIZER_ORDER):
            grid_v = grid.get(task, {}).get(opt)
            row = {"task": task, "optimizer": opt,
                   "grid": ", ".join(fmt(float(x)) for x in grid_v) if isinstance(grid_v, list) else "—"}
            for prec, v in per_prec.items():
                tried = tried_all.get(task, {}).get(prec, {}).get(opt)
                if isinstance(tried, list):
                    row[f"LRs tried @ {prec}"] = ", ".join(fmt(float(x)) for x in tried)
                edge = edge_all.get(task, {}).get(prec, {}).get(opt) is True
                row[f"chosen LR @ {prec}"] = (fmt(float(v[opt])) + (" (at edge of grid)" if edge else "")
                                              if opt in v else "—")
            rows.append(row)
    return pd.DataFrame(rows).fillna("—") if rows else None


def cells_display(cells: pd.DataFrame) -> pd.DataFrame:
    """A cell_table as text: seeds, diverged k/n, final loss and tokens to target with their 95% intervals."""
    out = pd.DataFrame({c: cells[c] for c in ("task", "variant", "precision", "optimizer") if c in cells.columns})
    out["lr"] = [fmt(v) for v in cells["lr"]]
    out["seeds"] = cells["n"].astype(int)
    out["diverged"] = [f"{k}/{n}" for k, n in zip(cells["diverged_k"], cells["n"])]
    out["final loss, mean [95% CI]"] = [fmt_ci(m, lo, hi) for m, lo, hi in
                                        zip(cells["final_mean"], cells["final_lo"], cells["final_hi"])]
    out["best val loss"] = [fmt(v) for v in cells["best_val_mean"]]
    out["tokens to target [95% CI]"] = [fmt_ci(m, lo, hi, fmt_tokens) if r else "not reached" for m, lo, hi, r in
                                        zip(cells["ttt_mean"], cells["ttt_lo"], cells["ttt_hi"], cells["reached"])]
    out["reached"] = [f"{r}/{n}" for r, n in zip(cells["reached"], cells["n"])]
    return out


def run_table(results: pd.DataFrame) -> pd.DataFrame:
    """One row per run (run id shortened to 12 characters), counts as integers, tokens as 5k / 1.2M."""
    cols = ["run_id", "phase", "task", "optimizer", "precision", "lr", "seed", "steps_done", "tokens", "final",
            "best_val_loss", "diverged", "diverged_step", "divergence_reason", "ttt", "wall_s",
            "state_bytes_per_param"]
    t = results[[c for c in cols if c in results.columns]].copy()
    t = t.rename(columns={"final": "final_loss", "ttt": "tokens_to_target"})
    t["run_id"] = t["run_id"].str.slice(0, 12)
    for c in ("seed", "steps_done", "diverged_step"):
        if c in t:
            t[c] = [str(int(v)) if math.isfinite(v) else "—" for v in t[c]]
    if "tokens" in t:
        t["tokens"] = [fmt_tokens(v) for v in t["tokens"]]
    if "tokens_to_target" in t:
        t["tokens_to_target"] = [fmt_tokens(v) for v in t["tokens_to_target"]]
    t["diverged"] = ["yes" if v else "no" for v in t["diverged"]]
    return t


def tune_table(tune: pd.DataFrame) -> pd.DataFrame:
    """The tune-phase runs per task, precision, optimizer and LR: diverged k/n and the mean final loss."""
    t = tune.groupby(["task", "precision", "optimizer", "lr"], sort=False).agg(
        runs=("run_id", "size"), diverged=("diverged", "sum"), final_loss=("final", "mean")).reset_index()
    return t.assign(diverged=[f"{int(k)}/{n}" for k, n in zip(t["diverged"], t["runs"])]).drop(columns="runs")
