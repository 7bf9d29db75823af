"""The numbers of the report, computed from what the sweep wrote (statistics in :mod:`studies.stats`).

A *cell* is task × precision × optimizer (× phase); its runs are its seeds. Runs are never pooled across anything
else that defines them: an optimizer run at several learning rates is shown as "name@lr" (:func:`split_lrs`), and
a task whose runs differ in their setup (size, steps, data, ... — every field of ``config_json`` except the cell
and seed fields) is shown once per setup as "task [field=value, ...]" (:func:`split_setups`).

Targets come from study.json's ``targets`` ({task: {"target_loss", "rule"}}, written by studies.protocol); a run's
tokens-to-target is its results.csv ``tokens_to_target`` when the row's ``target_loss`` is that target (else it is
not counted, and the report says how many rows that left out).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from studies.report.load import load_metrics, load_results, load_study
from studies.summary import summarize_folder
from studies.report.style import BASELINE, LEVEL, MAIN_PHASES, OPTIMIZER_ORDER, PRECISION_ORDER, fmt, ordered
from studies.stats import divergence_fraction, mean_ci, speedup_ci

__all__ = [
    "CELL_FIELDS", "ReportData", "prepare", "targets_from_study", "apply_targets", "split_setups", "split_lrs",
    "baselines_for", "optimal_losses", "cell_table", "speedup_table", "variant_labels",
]

# config_json fields that are columns of the cell itself (or the seed); every other field defines the setup.
CELL_FIELDS = ("task", "optimizer", "precision", "lr", "seed", "phase")


def targets_from_study(study: dict, tasks: list[str]) -> tuple[dict[str, tuple[float, str]], list[str]]:
    """task -> (target loss, rule) from study.json ``targets``, for the `tasks` that have a finite one; and notes
    for the tasks whose recorded target is null (e.g. every baseline run diverged)."""
    recorded = study.get("targets") or {}
    out, notes = {}, []
    for task in tasks:
        t = recorded.get(task)
        if not isinstance(t, dict):
            continue
        v = t.get("target_loss")
        if isinstance(v, (int, float)) and math.isfinite(v):
            out[task] = (float(v), str(t.get("rule") or "as recorded in study.json"))
        else:
            notes.append(f"{task}: study.json records no finite target loss ({t.get('rule') or 'no rule'}), so no "
                         f"tokens-to-target.")
    return out, notes


def apply_targets(results: pd.DataFrame, targets: dict[str, tuple[float, str]]) -> tuple[pd.DataFrame, list[str]]:
    """Add ``target`` (the task's target, by the base task name ``task_name``) and ``ttt`` (tokens to it): the
    row's ``tokens_to_target`` when its ``target_loss`` equals the target, else NaN (counted in the note)."""
    res = results.copy()
    tgt = np.array([targets.get(t, (math.nan, ""))[0] for t in res["task_name"]], dtype=float)
    rec = res["target_loss"].to_numpy(float)
    match = np.isfinite(tgt) & np.isclose(rec, tgt, rtol=1e-9, atol=1e-12)
    res["target"] = tgt
    res["ttt"] = np.where(match, res["tokens_to_target"].to_numpy(float), math.nan)
    stale = int((np.isfinite(tgt) & ~match & np.isfinite(rec)).sum())
    notes = [f"{stale} run(s) recorded tokens-to-target for another target loss than study.json's; not counted."] \
        if stale else []
    return res, notes


def _setup(config_json: str, steps: float) -> str:
    d = {k: v for k, v in json.loads(config_json).items() if k not in CELL_FIELDS}
    d["steps"] = None if not math.isfinite(steps) else int(steps)  # the resolved count (None in config = default)
    return json.dumps(d, sort_keys=True)


def split_setups(results: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Add ``task_name`` (the task as written) and ``setup``; where one phase's runs of a task have several setups,
    ``task`` becomes "task [field=value, ...]" (the fields that differ), so no cell pools different setups."""
    res = results.copy()
    res["task_name"] = res["task"]
    res["setup"] = [_setup(c, s) for c, s in zip(res["config_json"], res["steps"])]
    notes = []
    for (phase, task), g in res.groupby(["phase", "task_name"], sort=False):
        setups = list(dict.fromkeys(g["setup"]))
        if len(setups) < 2:
            continue
        parsed = [json.loads(s) for s in setups]
        fields = dict.fromkeys(k for p in parsed for k in p)
        keys = [k for k in fields if len({json.dumps(p.get(k), sort_keys=True) for p in parsed}) > 1]
        label = {s: f"{task} [" + ", ".join(f"{k}={json.dumps(p.get(k), sort_keys=True)}" for k in keys) + "]"
                 for s, p in zip(setups, parsed)}
        res.loc[g.index, "task"] = [label[s] for s in g["setup"]]
        notes.append(f"{phase} phase: {task} has runs of {len(setups)} setups (differing in {', '.join(keys)}); each "
                     f"is shown as its own task, never pooled.")
    return res, notes


def split_lrs(results: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Main runs of one optimizer at several LRs (e.g. ``--lrs``) are kept apart as "name@lr" (never pooled)."""
    res, notes = results.copy(), []
    main = res[res["phase"].isin(MAIN_PHASES)]
    for (task, opt), g in main.groupby(["task", "optimizer"], sort=False):
        if g["lr"].nunique() > 1:
            res.loc[g.index, "optimizer"] = [f"{opt}@{fmt(lr)}" for lr in g["lr"]]
            notes.append(f"{task}: {opt} ran at {g['lr'].nunique()} learning rates; each is shown as {opt}@lr.")
    return res, notes


def baselines_for(main: pd.DataFrame) -> tuple[dict[str, str], list[str]]:
    """task -> the AdamW label to compare against. With several AdamW LRs, the one with the lowest mean final
    loss at fp32 (a diverged run counts as +inf), the protocol's own tuning rule; stated in the report."""
    out, notes = {}, []
    for task in ordered(main["task"], ()):
        m = main[main["task"] == task]
        labels = [o for o in ordered(m["optimizer"], OPTIMIZER_ORDER) if o.split("@")[0] == BASELINE]
        if len(labels) <= 1:
            if labels:
                out[task] = labels[0]
            continue
        ref = m[m["precision"] == "fp32"] if (m["precision"] == "fp32").any() else m

        def score(label: str) -> float:
            g = ref[ref["optimizer"] == label]
            vals = np.where(g["diverged"] | ~np.isfinite(g["final"]), np.inf, g["final"])
            return float(np.mean(vals)) if len(vals) else math.inf

        out[task] = min(labels, key=score)
        notes.append(f"{task}: speedups are relative to {out[task]}, the AdamW learning rate with the lowest mean "
                     f"final loss at {'fp32' if ref is not m else 'all precisions'}.")
    return out, notes


def optimal_losses(study: dict) -> dict[str, float]:
    """task -> its known optimum (convex tasks) from study.json ``optimal_loss``; tasks without one are absent."""
    st = study.get("optimal_loss") or {}
    return {t: float(v) for t, v in st.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def cell_table(results: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Per cell (group of `keys`): seeds, diverged k/n with Wilson interval, final loss mean and 95% t interval
    over the runs that did not diverge, best validation loss, tokens-to-target mean and interval over the runs
    that reached it (column ``ttt`` if present, else ``tokens_to_target``)."""
    rows = []
    tcol = "ttt" if "ttt" in results.columns else "tokens_to_target"
    for key, g in results.groupby(keys, sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        frac, dlo, dhi, k, n = divergence_fraction(g["diverged"])
        ok = g[~g["diverged"]]
        fm, flo, fhi = mean_ci(ok["final"])
        bm = float(ok["best_val_loss"].mean()) if ok["best_val_loss"].notna().any() else math.nan
        tm, tlo, thi = mean_ci(g[tcol])
        reached = int(np.isfinite(g[tcol].to_numpy(float)).sum())
        rows.append({**dict(zip(keys, key)), "n": n, "diverged_k": k, "diverged_frac": frac, "diverged_lo": dlo,
                     "diverged_hi": dhi, "final_mean": fm, "final_lo": flo, "final_hi": fhi, "best_val_mean": bm,
                     "ttt_mean": tm, "ttt_lo": tlo, "ttt_hi": thi, "reached": reached,
                     "lr": float(g["lr"].iloc[0]) if g["lr"].nunique() <= 1 else math.nan})
    return pd.DataFrame(rows)


def speedup_table(results: pd.DataFrame, baseline: str | dict[str, str] = BASELINE,
                  level: float = LEVEL) -> pd.DataFrame:
    """Tokens-to-target speedup of every optimizer vs `baseline` (a name, or task -> name) at the same task and
    precision.

    speedup = mean(baseline tokens) / mean(optimizer tokens) over seeds that reached the target, with the
    bootstrap interval and status of :func:`studies.stats.speedup_ci`. Uses column ``ttt`` if present.
    """
    tcol = "ttt" if "ttt" in results.columns else "tokens_to_target"
    rows = []
    cells = [(t, p) for t in ordered(results["task"], ())
             for p in ordered(results.loc[results["task"] == t, "precision"], PRECISION_ORDER)]
    for task, prec in cells:
        g = results[(results["task"] == task) & (results["precision"] == prec)]
        bname = baseline.get(task, BASELINE) if isinstance(baseline, dict) else baseline
        base = g[g["optimizer"] == bname]
        if base.empty:
            continue
        for opt in ordered(g["optimizer"], OPTIMIZER_ORDER):
            if opt == bname:
                continue
            o = g[g["optimizer"] == opt]
            r = speedup_ci(base[tcol].to_numpy(float), o[tcol].to_numpy(float), level=level)
            rows.append({"task": task, "precision": prec, "optimizer": opt,
                         "target_loss": float(g["target"].iloc[0]) if "target" in g else math.nan,
                         "baseline_tokens": float(np.nanmean(base[tcol])) if base[tcol].notna().any() else math.nan,
                         "optimizer_tokens": float(np.nanmean(o[tcol])) if o[tcol].notna().any() else math.nan,
                         **r.to_dict()})
    return pd.DataFrame(rows)


def variant_labels(precisions: list[str]) -> dict[str, str]:
    """Short labels for precision variants that differ in a few policy segments ("fp8-all,master=bf16:stochastic"):
    the segments not shared by all variants; a segment that differs only by ":stochastic" reads "<role> stochastic"
    or "<role> nearest". Falls back to the full names."""
    parts = {p: [x for x in re.split(r"[+,;]", p) if x] for p in precisions}
    if len(parts) < 2:
        return {p: p for p in precisions}
    common = set.intersection(*(set(v) for v in parts.values()))
    by_role: dict[str, set] = {}
    for segs in parts.values():
        for seg in segs:
            if seg not in common and "=" in seg:
                by_role.setdefault(seg.split("=")[0], set()).add(re.sub(r":stochastic", "", seg))
    out = {}
    for p, segs in parts.items():
        words = []
        for seg in segs:
            if seg in common:
                continue
            role = seg.split("=")[0]
            if "=" in seg and len(by_role[role]) == 1:
                words.append(f"{role} {'stochastic' if 'stochastic' in seg else 'nearest'}")
            else:
                words.append(seg)
        present = {seg.split("=")[0] for seg in segs if "=" in seg}
        words += [f"{r} as in preset" for r in by_role if r not in present]
        out[p] = ", ".join(sorted(words)) if words else p
    if len(set(out.values())) < len(out):  # ambiguous: keep the full names
        return {p: p for p in precisions}
    return out


@dataclass
class ReportData:
    """Everything the report shows, loaded and computed once."""

    results: pd.DataFrame  # runs that completed (diverged or not), labels split by setup and LR where needed
    failed: pd.DataFrame  # runs with status "error"
    study: dict
    metrics: pd.DataFrame  # every run's metrics.csv rows, tagged with its cell
    telemetry: pd.DataFrame  # the main runs' telemetry.csv rows, tagged with its cell
    targets: dict[str, tuple[float, str]]  # task label -> (target loss, rule)
    main: pd.DataFrame
    speed: pd.DataFrame
    baselines: dict[str, str]
    notes: list[str]  # shown with the speedups: LR labels, which AdamW run is the baseline
    caveats: list[str]  # shown with the study definition: setups kept apart, targets missing or not matching
    problems: list[str]  # damaged/duplicate rows and unreadable files, named "FILE line N: why"


def prepare(out_dir: Path | str) -> ReportData:
    """Load the folder and compute the report's tables; runs with status "error" are set aside in ``failed``."""
    out_dir = Path(out_dir)
    results, problems = load_results(out_dir)
    study = load_study(out_dir)
    study["summary"] = summarize_folder(out_dir, study, results.to_dict("records"))  # the rows shown, not older ones
    failed = results[results["status"] == "error"]
    results = results[results["status"] != "error"].reset_index(drop=True)
    results, notes = split_setups(results)
    results, lr_notes = split_lrs(results)
    metrics = load_metrics(out_dir, results, problems=problems)
    base_targets, tnotes = targets_from_study(study, ordered(results["task_name"], ()))
    results, stale = apply_targets(results, base_targets)
    main = results[results["phase"].isin(MAIN_PHASES)]
    targets = {label: base_targets[name] for label, name in zip(main["task"], main["task_name"])
               if name in base_targets}
    telemetry = load_metrics(out_dir, main, name="telemetry.csv", problems=problems)
    baselines, bnotes = baselines_for(main)
    speed = speedup_table(main, baselines) if targets else pd.DataFrame()
    return ReportData(results, failed, study, metrics, telemetry, targets, main, speed, baselines,
                      lr_notes + bnotes, notes + tnotes + stale, problems)
