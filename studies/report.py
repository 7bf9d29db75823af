"""The precision-sweep report: figures (seaborn), ``report.html`` (self-contained), ``report.md`` and a summary.

Reads a results folder written by the sweep (schema: INTERFACES.md, "results schema")::

    DIR/results.csv                 one row per completed run (required)
    DIR/study.json                  the study definition (optional)
    DIR/runs/<run_id>/metrics.csv   per-step metrics and telemetry columns (optional)
    DIR/runs/<run_id>/telemetry.csv the lowprec Telemetry frame (optional)

and writes ``DIR/figures/*.png``, ``DIR/tables/*.csv``, ``DIR/report.html`` (figures embedded as base64 data URIs,
no external CSS/JS, opens without network) and ``DIR/report.md`` (figures by relative path).

Every number in the report is computed here from those files (statistics in :mod:`studies.stats`); a section
whose data is absent is replaced by a one-line note. Entry points: :func:`render_report`, :func:`summary_text`.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import html
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from studies.stats import divergence_fraction, mean_ci, run_tokens_to_target, speedup_ci

__all__ = [
    "render_report",
    "summary_text",
    "render_with_summary",
    "load_results",
    "load_study",
    "load_metrics",
    "cell_table",
    "speedup_table",
    "paper_comparison",
    "PAPER_SPEEDUP",
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
PRECISION_ORDER = ("fp32", "bf16", "fp16", "fp8-hybrid", "fp8-states", "fp8-all", "fp8-all-unscaled", "mxfp8", "nvfp4", "mxfp4", "int4")
from lowprec.policy import TENSOR_ROLES as ROLES
_DASHES = ["", (4, 1.5), (1, 1), (3, 1.25, 1.5, 1.25), (5, 1, 1, 1), (2, 2), (6, 2)]

REQUIRED_COLUMNS = ("task", "optimizer", "precision", "seed", "diverged")
NUMERIC_COLUMNS = (
    "lr", "seed", "steps", "steps_done", "tokens", "final_loss", "final_val_loss", "best_val_loss", "diverged_step",
    "target_loss", "tokens_to_target", "wall_s", "state_bytes_per_param", "optimal_loss",
)
STRING_COLUMNS = ("run_id", "phase", "task", "optimizer", "precision", "divergence_reason", "divergence_site",
                  "explanation", "config_json")


# ============================================================================================ loading


def _to_bool(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("true", "1", "yes")
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return False
    return bool(v)


def load_results(out_dir: Path | str) -> pd.DataFrame:
    """Read ``DIR/results.csv`` with normalized types (numbers as float, ``diverged`` as bool, strings, phase).

    Raises FileNotFoundError when the file is missing and ValueError when a required column is absent.
    Missing optional columns are added (nan / ""); a missing ``phase`` column means every run is "main".
    """
    path = Path(out_dir) / "results.csv"
    if not path.is_file():
        raise FileNotFoundError(f"no results.csv in {Path(out_dir)} (expected {path}); run `precision-sweep run` first")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path} lacks required column(s) {', '.join(missing)}; "
                         f"the results schema needs at least: {', '.join(REQUIRED_COLUMNS)}")
    df = df.copy()
    if "phase" not in df.columns:
        df["phase"] = "main"
    for c in NUMERIC_COLUMNS:
        df[c] = pd.to_numeric(df[c], errors="coerce") if c in df.columns else np.nan
    for c in STRING_COLUMNS:
        df[c] = df[c].astype(str) if c in df.columns else ""
    df.loc[df["phase"] == "", "phase"] = "main"
    df["diverged"] = [_to_bool(v) for v in df["diverged"]]
    if (df["run_id"] == "").any():
        df.loc[df["run_id"] == "", "run_id"] = [f"row{i}" for i in df.index[df["run_id"] == ""]]
    df["final"] = df["final_val_loss"].where(df["final_val_loss"].notna(), df["final_loss"])
    df["status"] = df["status"].astype(str) if "status" in df.columns else ""
    return df.reset_index(drop=True)


def load_study(out_dir: Path | str) -> dict:
    """``DIR/study.json`` as a dict ({} when absent). Invalid JSON raises ValueError naming the file."""
    path = Path(out_dir) / "study.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def load_metrics(out_dir: Path | str, results: pd.DataFrame, name: str = "metrics.csv") -> pd.DataFrame:
    """Concatenate ``DIR/runs/<run_id>/<name>`` for the runs in `results`, tagged with the run's cell columns.

    Runs without the file are skipped; an empty frame comes back when no run has one.
    """
    frames = []
    runs_dir = Path(out_dir) / "runs"
    if not runs_dir.is_dir():
        return pd.DataFrame()
    keys = ["run_id", "phase", "task", "optimizer", "precision", "seed", "diverged", "diverged_step"]
    for row in results[keys].itertuples(index=False):
        p = runs_dir / str(row.run_id) / name
        if not p.is_file():
            continue
        try:
            m = pd.read_csv(p)
        except (pd.errors.EmptyDataError, pd.errors.ParserError):
            continue
        if m.empty:
            continue
        m = m.copy()
        for k, v in zip(keys, row):
            m[k] = v
        frames.append(m)
    if not frames:
        return pd.DataFrame()
    out = pd.concat(frames, ignore_index=True)
    for c in out.columns:
        if c not in keys and c not in ("site", "role") and not pd.api.types.is_numeric_dtype(out[c]):
            out[c] = pd.to_numeric(out[c], errors="coerce")
    return out


# ============================================================================================ ordering / style


def _ordered(values: Iterable[str], known: tuple[str, ...]) -> list[str]:
    seen = list(dict.fromkeys(str(v) for v in values))
    return [k for k in known if k in seen] + [v for v in seen if v not in known]


def _palette(optimizers: Iterable[str]) -> dict[str, Any]:
    """One colour per optimizer, the same in every figure (colour-blind palette, fixed order). Labels "name@lr"
    (one optimizer at several LRs) get shades of the optimizer's colour."""
    import seaborn as sns

    optimizers = list(optimizers)
    bases = _ordered(list(OPTIMIZER_ORDER) + [o.split("@")[0] for o in optimizers], OPTIMIZER_ORDER)
    colors = sns.color_palette("colorblind", 10) + sns.color_palette("dark", 10) + sns.color_palette("pastel", 10)
    pal: dict[str, Any] = {n: colors[i % len(colors)] for i, n in enumerate(bases)}
    shades = (0.0, -0.45, 0.45, -0.7, 0.7)
    for base in bases:
        variants = sorted((o for o in optimizers if o.split("@")[0] == base and "@" in o),
                          key=lambda o: float(o.split("@")[1]) if _is_float(o.split("@")[1]) else math.inf)
        for k, label in enumerate(variants):
            f = shades[k % len(shades)]
            c = np.array(pal[base])
            pal[label] = tuple(c * (1 + f) if f < 0 else c + (1 - c) * f)
    return pal


def _is_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _slug(text: str) -> str:
    """A file-name-safe name; a short hash is appended when characters were replaced (keeps names distinct)."""
    raw = str(text)
    s = re.sub(r"[^A-Za-z0-9]+", "-", raw).strip("-").lower() or "x"
    if s != raw.lower() or len(s) > 40:
        s = f"{s[:32]}-{hashlib.sha1(raw.encode()).hexdigest()[:6]}"
    return s


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if isinstance(v, (int, np.integer)):
        return f"{int(v)}"
    v = float(v)
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.{max(digits - 1, 1)}e}"
    return f"{v:.{digits}g}"


def _fmt_int(v: Any) -> str:
    try:
        return str(int(v)) if math.isfinite(float(v)) else "—"
    except (TypeError, ValueError):
        return str(v)


def _fmt_tokens(v: float) -> str:
    if v is None or not math.isfinite(v):
        return "—"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{unit}"
    return f"{v:.0f}"


def _fmt_ci(m: float, lo: float, hi: float, fmt=_fmt) -> str:
    if not math.isfinite(m):
        return "—"
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{fmt(m)}"
    return f"{fmt(m)} [{fmt(lo)}, {fmt(hi)}]"


# ============================================================================================ tables


def _targets(results: pd.DataFrame, study: dict, metrics: pd.DataFrame) -> dict[str, tuple[float, str]]:
    """task -> (target loss, how it was chosen). Sources: study.json, results.csv, else derived here."""
    out: dict[str, tuple[float, str]] = {}
    rule = study.get("target_rule") or study.get("target_source") or study.get("target_description")
    st = study.get("target_loss", study.get("target_losses", study.get("targets")))
    main = results[results["phase"].isin(MAIN_PHASES)]
    for task in _ordered(main["task"], ()):
        val = st.get(task) if isinstance(st, dict) else st
        task_rule = rule
        if isinstance(val, dict):
            task_rule = val.get("rule", rule)
            val = val.get("target_loss", val.get("value"))
        try:
            val = float(val) if val is not None else math.nan
        except (TypeError, ValueError):
            val = math.nan
        if math.isfinite(val):
            out[task] = (val, str(task_rule) if task_rule else
                         "as recorded in study.json (the fp32 AdamW baseline's loss)")
            continue
        col = main.loc[(main["task"] == task), "target_loss"].dropna()
        if len(col):
            out[task] = (float(col.mode().iloc[0]),
                         str(rule) if rule else "as recorded in results.csv (the fp32 AdamW baseline's loss)")
            continue
        base = main[(main["task"] == task) & (main["optimizer"].str.split("@").str[0] == BASELINE)
                    & (main["precision"] == "fp32")
                    & ~main["diverged"]]
        best = base["best_val_loss"].dropna()
        if len(best):
            out[task] = (float(best.max()), "not recorded by the sweep; chosen by the report as the worst best "
                         "validation loss over the fp32 AdamW seeds (a loss every baseline seed reached)")
    return out


def _apply_targets(results: pd.DataFrame, metrics: pd.DataFrame, targets: dict[str, tuple[float, str]]) -> pd.DataFrame:
    """Fill ``ttt`` (tokens to the task's target) per run: results.csv's value when it was computed for that
    target, else recomputed from the run's metrics.csv validation curve (nan when unavailable)."""
    res = results.copy()
    ttt = res["tokens_to_target"].to_numpy(dtype=float).copy()
    for i, row in enumerate(res.itertuples(index=False)):
        if row.task not in targets:
            continue
        target = targets[row.task][0]
        recorded_for = row.target_loss
        if math.isfinite(recorded_for) and math.isclose(recorded_for, target, rel_tol=1e-9, abs_tol=1e-12):
            continue
        if not math.isfinite(recorded_for) and math.isfinite(ttt[i]):
            continue
        ttt[i] = math.nan
        if not metrics.empty and "val_loss" in metrics.columns:
            m = metrics[metrics["run_id"] == row.run_id]
            if "tokens" in m:
                ttt[i] = run_tokens_to_target(m["tokens"].to_numpy(float), m["val_loss"].to_numpy(float), target)
    res["ttt"] = ttt
    return res


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
    cells = [(t, p) for t in _ordered(results["task"], ())
             for p in _ordered(results.loc[results["task"] == t, "precision"], PRECISION_ORDER)]
    for task, prec in cells:
        g = results[(results["task"] == task) & (results["precision"] == prec)]
        bname = baseline.get(task, BASELINE) if isinstance(baseline, dict) else baseline
        base = g[g["optimizer"] == bname]
        if base.empty:
            continue
        for opt in _ordered(g["optimizer"], OPTIMIZER_ORDER):
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


def paper_comparison(results: pd.DataFrame, speed: pd.DataFrame, baselines: dict[str, str] | None = None) -> list[str]:
    """Sentences comparing the data with the paper's two FP8 claims, computed from the data (never fixed text):
    (1) AdamW fails in FP8 while StoSignSGD is stable; (2) StoSignSGD needs 1.44×–2.14× fewer tokens.
    `baselines`: task -> the AdamW label used as baseline (default "adamw")."""
    lines = []
    baselines = baselines or {}
    main = results[results["phase"].isin(MAIN_PHASES)]
    fp8 = [p for p in _ordered(main["precision"], PRECISION_ORDER) if "fp8" in p.lower() or "e4m3" in p.lower()]
    if not fp8:
        return ["No FP8 precision in this study, so the paper's FP8 claims (AdamW fails; StoSignSGD needs "
                "1.44×–2.14× fewer tokens) cannot be checked here."]
    lo_p, hi_p = PAPER_SPEEDUP
    tasks = [t for t in _ordered(main["task"], ()) if not t.startswith("convex")]  # the claims are about LMs
    cells = [(task, prec, pname) for task in tasks for prec in fp8
             for pname in _ordered(main.loc[(main["task"] == task) & (main["precision"] == prec), "optimizer"],
                                   OPTIMIZER_ORDER) if pname.split("@")[0] == PROPOSED]
    for task, prec, pname in cells:
        g = main[(main["task"] == task) & (main["precision"] == prec)]
        bname = baselines.get(task, BASELINE)
        a, s = g[g["optimizer"] == bname], g[g["optimizer"] == pname]
        if a.empty or s.empty:
            continue
        ka, na = int(a["diverged"].sum()), len(a)
        ks, ns = int(s["diverged"].sum()), len(s)
        if ka > 0 and ks == 0:
            verdict = "agrees with the paper (AdamW fails, StoSignSGD stable)"
        elif ka > 0 and ks > 0:
            verdict = "partly agrees (AdamW fails, but StoSignSGD diverges too)"
        elif ka == 0 and ks == 0:
            verdict = "does not agree with the paper (AdamW did not fail here)"
        else:
            verdict = "does not agree with the paper (StoSignSGD diverged, AdamW did not)"
        who = "" if (bname, pname) == (BASELINE, PROPOSED) else f" ({bname} vs {pname})"
        line = (f"{task}, {prec}{who}: AdamW diverged in {ka}/{na} seeds, StoSignSGD in {ks}/{ns} — {verdict}.")
        row = speed[(speed["task"] == task) & (speed["precision"] == prec) & (speed["optimizer"] == pname)] \
            if not speed.empty else pd.DataFrame()
        if not row.empty:
            r = row.iloc[0]
            st = r["status"]
            if st == "baseline never reached target":
                line += " Speedup not defined: AdamW never reached the target at this precision."
            elif st == "not reached by optimizer":
                line += " StoSignSGD never reached the target: no speedup (does not agree with 1.44×–2.14×)."
            elif st in ("ok", "partial"):
                ratio, rlo, rhi = r["speedup"], r["lo"], r["hi"]
                ci = f" [{rlo:.2f}, {rhi:.2f}]" if math.isfinite(rlo) else " (no interval: < 2 seeds)"
                lo_, hi_ = (rlo, rhi) if math.isfinite(rlo) else (ratio, ratio)
                if hi_ < lo_p:
                    cmp = "below the paper's 1.44×–2.14× (does not agree)"
                elif lo_ > hi_p:
                    cmp = "above the paper's 1.44×–2.14× (larger than reported)"
                else:
                    cmp = "overlaps the paper's 1.44×–2.14× (agrees)"
                part = " (conditional on the seeds that reached it)" if st == "partial" else ""
                line += f" Tokens-to-target speedup {ratio:.2f}×{ci}{part}: {cmp}."
        lines.append(line)
    return lines or ["The FP8 cells lack AdamW or StoSignSGD runs, so the paper's claims cannot be checked here."]


# ============================================================================================ document model


@dataclass
class _Doc:
    """A report as a list of blocks rendered to both HTML and Markdown."""

    blocks: list[tuple] = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def note(self, text: str) -> None:
        self.blocks.append(("note", text))

    def ul(self, items: list[str]) -> None:
        if items:
            self.blocks.append(("ul", list(items)))

    def table(self, df: pd.DataFrame) -> None:
        self.blocks.append(("table", df))

    def fig(self, path: Path, caption: str) -> None:
        self.blocks.append(("fig", path, caption))

    def pre(self, text: str) -> None:
        self.blocks.append(("pre", text))

    def details(self, summary: str, text: str) -> None:
        self.blocks.append(("details", summary, text))


def _md_cell(v: Any) -> str:
    s = v if isinstance(v, str) else _fmt(v) if isinstance(v, (float, np.floating)) else str(v)
    return s.replace("|", "\\|").replace("\n", " ")


def _md_table(df: pd.DataFrame) -> str:
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(_md_cell(c) for c in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(_md_cell(v) for v in row) + " |")
    return "\n".join(lines)


def _html_table(df: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = []
    for row in df.itertuples(index=False):
        cells = []
        for v in row:
            s = v if isinstance(v, str) else _fmt(v) if isinstance(v, (float, np.floating)) else str(v)
            cells.append(f"<td>{html.escape(s)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{border-bottom:2px solid #444}h2{border-bottom:1px solid #bbb;margin-top:2em}
table{border-collapse:collapse;font-size:0.85em;margin:0.8em 0;display:block;overflow-x:auto}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:left;white-space:nowrap}th{background:#f0f0f0}
tr:nth-child(even){background:#fafafa}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:0.9em;color:#555}
.note{color:#666;font-style:italic}pre{background:#f6f6f6;padding:0.6em;overflow-x:auto;font-size:0.85em}
"""


def _render_html(doc: _Doc, title: str, out_dir: Path) -> str:
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    for b in doc.blocks:
        kind = b[0]
        if kind == "h":
            lvl = min(6, b[1] + 1)
            anchor = _slug(b[2])
            parts.append(f"<h{lvl} id='{anchor}'>{html.escape(b[2])}</h{lvl}>")
        elif kind == "p":
            parts.append(f"<p>{html.escape(b[1])}</p>")
        elif kind == "note":
            parts.append(f"<p class='note'>{html.escape(b[1])}</p>")
        elif kind == "ul":
            parts.append("<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in b[1]) + "</ul>")
        elif kind == "table":
            parts.append(_html_table(b[1]))
        elif kind == "pre":
            parts.append(f"<pre>{html.escape(b[1])}</pre>")
        elif kind == "details":
            parts.append(f"<details><summary>{html.escape(b[1])}</summary><pre>{html.escape(b[2])}</pre></details>")
        elif kind == "fig":
            data = base64.b64encode(Path(b[1]).read_bytes()).decode("ascii")
            parts.append(f"<figure><img alt='{html.escape(b[2])}' src='data:image/png;base64,{data}'>"
                         f"<figcaption>{html.escape(b[2])}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _render_md(doc: _Doc, title: str, out_dir: Path) -> str:
    parts = [f"# {title}", ""]
    for b in doc.blocks:
        kind = b[0]
        if kind == "h":
            parts += [f"{'#' * min(6, b[1] + 1)} {b[2]}", ""]
        elif kind == "p":
            parts += [b[1], ""]
        elif kind == "note":
            parts += [f"_{b[1]}_", ""]
        elif kind == "ul":
            parts += [f"- {x}" for x in b[1]] + [""]
        elif kind == "table":
            parts += [_md_table(b[1]), ""]
        elif kind == "pre":
            parts += ["```", b[1], "```", ""]
        elif kind == "details":
            parts += [f"<details><summary>{html.escape(b[1])}</summary>", "", "```json", b[2], "```", "",
                      "</details>", ""]
        elif kind == "fig":
            rel = Path(b[1]).relative_to(out_dir).as_posix()
            parts += [f"![{b[2]}]({rel})", "", f"*{b[2]}*", ""]
    return "\n".join(parts)


# ============================================================================================ figures


class _Figures:
    """Creates figures with matplotlib's object API (no pyplot, no global backend change) and saves PNGs."""

    def __init__(self, out_dir: Path, palette: dict[str, Any]):
        self.dir = out_dir / "figures"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.palette = palette
        self.written: dict[str, Path] = {}

    def new(self, nrows: int = 1, ncols: int = 1, w: float = 4.2, h: float = 3.2, **kw):
        from matplotlib.figure import Figure

        fig = Figure(figsize=(w * ncols, h * nrows), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
        return fig, axes

    def save(self, fig, name: str) -> Path:
        path = self.dir / f"{name}.png"
        fig.savefig(path, dpi=DPI, metadata={"Software": None})  # no URL in the PNG either
        self.written[name] = path
        return path


def _style():
    import seaborn as sns

    return sns.axes_style("whitegrid")


def _heatmap(figs: _Figures, cells: pd.DataFrame, row: str, col: str, row_order, col_order, title: str, name: str):
    import seaborn as sns

    frac = cells.pivot(index=row, columns=col, values="diverged_frac").reindex(index=row_order, columns=col_order)
    cells = cells.assign(label=[f"{k}/{n}" for k, n in zip(cells["diverged_k"], cells["n"])])
    labels = cells.pivot(index=row, columns=col, values="label").reindex(index=row_order, columns=col_order)
    with _style():
        fig, axes = figs.new(w=max(3.6, 1.1 * len(col_order) + 1.8), h=max(2.6, 0.55 * len(row_order) + 1.3))
        ax = axes[0, 0]
        sns.heatmap(frac.astype(float), ax=ax, vmin=0, vmax=1, cmap="Reds", annot=labels.fillna("").to_numpy(),
                    fmt="", linewidths=0.5, linecolor="white", cbar_kws={"label": "fraction diverged"})
        ax.set_title(title)
        ax.set_xlabel(col)
        ax.set_ylabel(row)
        long = max((len(str(c)) for c in col_order), default=0) > 10
        ax.tick_params(axis="x", rotation=30 if long else 0)
        ax.tick_params(axis="y", rotation=0)
        return figs.save(fig, name)


def _mean_band(ax, d: pd.DataFrame, x: str, y: str, color, label: str | None, log: bool = False) -> None:
    """Mean over runs at each x with a ±1 sd band (where ≥ 2 runs have a value); non-finite values skipped.
    With `log`, the band is clipped to positive values."""
    g = d[[x, y]].replace([np.inf, -np.inf], np.nan).dropna().groupby(x)[y].agg(["mean", "std", "count"])
    if g.empty:
        return
    xs, m, sd = g.index.to_numpy(float), g["mean"].to_numpy(float), g["std"].to_numpy(float)
    ax.plot(xs, m, color=color, linewidth=1.6, label=label)
    band = (g["count"].to_numpy() >= 2) & np.isfinite(sd)
    if band.any():
        lo = m - np.where(band, sd, 0.0)
        if log:
            lo = np.maximum(lo, m * 1e-3)
        ax.fill_between(xs, lo, m + np.where(band, sd, 0.0), where=band, color=color, alpha=0.2, linewidth=0)


def _loss_unit(task: str) -> str:
    """Axis unit: cross-entropy in nats for the learning tasks; the convex problems' objective has no unit."""
    return " (objective)" if task.startswith("convex") else " (cross-entropy, nats)"


def _tokens_axis(ax) -> None:
    """Token counts as 5k / 1.2M with at most 5 ticks (long integers overlap otherwise)."""
    from matplotlib.ticker import EngFormatter, MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))


def _curve_column(m: pd.DataFrame) -> tuple[pd.DataFrame, str, str]:
    """Validation-loss rows when the run logged them, else the training loss: (frame, column, label)."""
    if "val_loss" in m.columns and m["val_loss"].notna().sum() >= 2:
        return m[m["val_loss"].notna()], "val_loss", "validation loss"
    return m[m["loss"].notna()] if "loss" in m.columns else m.iloc[0:0], "loss", "training loss"


def _loss_curves(figs: _Figures, metrics: pd.DataFrame, task: str, precisions: list[str], optimizers: list[str],
                 target: float | None) -> Path | None:
    mt = metrics[metrics["task"] == task]
    if mt.empty or "tokens" not in mt.columns:
        return None
    data, ycol, ylabel = _curve_column(mt)
    if data.empty:
        return None
    data = data.assign(y=data[ycol].where(np.isfinite(data[ycol])))
    start = data.sort_values("tokens").groupby("run_id")["y"].first()
    finite = data["y"].dropna()
    top = float(np.nanmax(start)) * 1.15 if start.notna().any() else float(finite.quantile(0.99))
    bottom = float(finite.min()) if len(finite) else 0.0
    bottom -= 0.05 * (top - bottom)
    with _style():
        fig, axes = figs.new(len(precisions), len(optimizers), w=3.4, h=2.5, sharex=True, sharey=True)
        marked = False
        for i, prec in enumerate(precisions):
            for j, opt in enumerate(optimizers):
                ax = axes[i, j]
                d = data[(data["precision"] == prec) & (data["optimizer"] == opt)]
                if d.empty:
                    ax.text(0.5, 0.5, "no runs", ha="center", va="center", transform=ax.transAxes, color="grey")
                else:
                    _mean_band(ax, d, "tokens", "y", figs.palette[opt], "mean ± sd over seeds")
                    for rid in d.loc[d["diverged"], "run_id"].unique():
                        r = mt[mt["run_id"] == rid].sort_values("tokens")
                        fin = r[np.isfinite(r["loss"])] if "loss" in r else r.iloc[0:0]
                        x = float(r["tokens"].max())
                        cap = top - 0.03 * (top - bottom)
                        if len(fin):
                            ax.plot(fin["tokens"].to_numpy(float), np.minimum(fin["loss"].to_numpy(float), cap),
                                    color="crimson", linewidth=0.8, alpha=0.6,
                                    label="diverged run: training loss")
                        y = min(float(fin["loss"].iloc[-1]), cap) if len(fin) else cap
                        ax.plot([x], [y], marker="X", color="crimson", markersize=9, linestyle="none",
                                clip_on=False, label="diverged run: where it stopped")
                        marked = True
                if target is not None and math.isfinite(target):
                    ax.axhline(target, color="black", linestyle=":", linewidth=1, label=f"target {target:.4g}")
                ax.set_ylim(bottom, top)
                _tokens_axis(ax)
                ax.set_title(f"{opt} · {prec}", fontsize=9)
                ax.set_xlabel("tokens (training)" if i == len(precisions) - 1 else "")
                ax.set_ylabel("")
        handles, labels = [], []
        for ax in axes.flat:
            for hnd, lab in zip(*ax.get_legend_handles_labels()):
                if lab not in labels:
                    handles.append(hnd)
                    labels.append(lab)
        if handles:
            fig.legend(handles, labels, loc="outside lower center", ncols=min(4, len(labels)), fontsize=8)
        fig.supylabel(f"{ylabel}{_loss_unit(task)}", fontsize=10)
        fig.suptitle(f"{task}: {ylabel} vs tokens per precision (rows) and optimizer (columns)"
                     + (" — diverged runs marked ✕" if marked else ""), fontsize=10)
        return figs.save(fig, f"loss_curves_{_slug(task)}")


def _xticks(ax, labels: list[str]) -> None:
    import textwrap

    ax.set_xticks(range(len(labels)))
    long = max((len(v) for v in labels), default=0) > 12
    shown = [textwrap.fill(v.replace(",", ", "), 18) if long else v for v in labels]
    ax.set_xticklabels(shown, fontsize=8 if long else 9)


def _point_ci(figs: _Figures, table: pd.DataFrame, x: str, hue: str, x_order, hue_order, y: str, lo: str, hi: str,
              ylabel: str, title: str, name: str, missing: dict | None = None, notes: dict | None = None,
              ref_line: float | None = None, band: tuple[float, float] | None = None, band_label: str = "",
              hue_colors: dict | None = None) -> Path:
    """Points with interval bars: one group per x, one colour per hue.

    `missing[(x, hue)]`: text shown with a ▼ at the bottom where the value is nan (e.g. "not reached");
    `notes[(x, hue)]`: small text next to a plotted point (e.g. "1/2 diverged").
    """
    import seaborn as sns
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    missing, notes = missing or {}, notes or {}
    with _style():
        fig, axes = figs.new(w=max(4.6, 0.75 * len(x_order) * max(1, len(hue_order)) ** 0.5 + 2.4), h=3.5)
        ax = axes[0, 0]
        colors = hue_colors or dict(zip(hue_order, sns.color_palette("colorblind", len(hue_order))))
        width = 0.7
        vals = table[[y, lo, hi]].to_numpy(float)
        vals = vals[np.isfinite(vals)]
        lo_v = float(vals.min()) if vals.size else (ref_line if ref_line is not None else 1.0)
        hi_v = float(vals.max()) if vals.size else lo_v + 1.0
        if ref_line is not None:
            lo_v, hi_v = min(lo_v, ref_line), max(hi_v, ref_line)
        span = max(hi_v - lo_v, 1e-9)
        base_y = lo_v - 0.12 * span
        handles = []
        if ref_line is not None:
            ax.axhline(ref_line, color="black", linewidth=1, linestyle="--")
            handles.append(Line2D([], [], color="black", linestyle="--", label=f"{ref_line:g} = baseline"))
        if band is not None:
            ax.axhspan(band[0], band[1], color="gold", alpha=0.25)
            handles.append(Patch(color="gold", alpha=0.4, label=band_label))
        any_missing = False
        for k, hv in enumerate(hue_order):
            off = (k - (len(hue_order) - 1) / 2) * width / max(1, len(hue_order))
            for i, xv in enumerate(x_order):
                r = table[(table[x] == xv) & (table[hue] == hv)]
                if r.empty:
                    continue
                xpos = i + off
                m, l_, h_ = float(r[y].iloc[0]), float(r[lo].iloc[0]), float(r[hi].iloc[0])
                if math.isfinite(m):
                    yerr = [[m - l_], [h_ - m]] if (math.isfinite(l_) and math.isfinite(h_)) else None
                    ax.errorbar([xpos], [m], yerr=yerr, fmt="o", color=colors[hv], capsize=4, markersize=6)
                    if (xv, hv) in notes:
                        ax.annotate(notes[(xv, hv)], (xpos, m), textcoords="offset points", xytext=(5, 3),
                                    fontsize=7, color=colors[hv])
                else:
                    any_missing = True
                    ax.plot([xpos], [base_y], marker="v", color=colors[hv], markersize=7, linestyle="none")
                    ax.annotate(missing.get((xv, hv), "no value"), (xpos, base_y), textcoords="offset points",
                                xytext=(0, 7), ha="center", va="bottom", fontsize=7, rotation=90, color=colors[hv])
            handles.append(Line2D([], [], marker="o", color=colors[hv], linestyle="none", label=str(hv)))
        if any_missing:
            handles.append(Line2D([], [], marker="v", color="grey", linestyle="none", label="no value (see label)"))
            ax.set_ylim(bottom=base_y - 0.06 * span)
        _xticks(ax, [str(v) for v in x_order])
        ax.set_xlim(-0.6, len(x_order) - 0.4)
        ax.set_xlabel(x)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        fig.legend(handles=handles, loc="outside right upper", fontsize=8, title=hue, title_fontsize=8)
        return figs.save(fig, name)


def _telemetry_fig(figs: _Figures, metrics: pd.DataFrame, task: str, prec: str, optimizers: list[str]) -> Path | None:
    m = metrics[(metrics["task"] == task) & (metrics["precision"] == prec)]
    if m.empty or "step" not in m.columns:
        return None
    panels: list[tuple[str, list[tuple[str, str]]]] = []
    for kind in ("underflow", "overflow"):
        cols = [(f"{r}_{kind}", r) for r in ROLES if f"{r}_{kind}" in m.columns]
        cols += [(c, c[: -len(kind) - 1]) for c in m.columns
                 if c.endswith(f"_{kind}") and c[: -len(kind) - 1] not in ROLES]
        if cols:
            panels.append((f"{kind} fraction", cols))
    for c, lab in (("state_zero_frac", "second moment at zero"), ("lost_update_frac", "lost updates")):
        if c in m.columns:
            panels.append((f"{lab} (fraction)", [(c, "state" if c == "state_zero_frac" else "master")]))
    if not panels:
        return None
    long = []
    for title, cols in panels:
        for c, role in cols:
            v = pd.to_numeric(m[c], errors="coerce")
            long.append(pd.DataFrame({"step": m["step"], "optimizer": m["optimizer"], "run_id": m["run_id"],
                                      "panel": title, "role": role, "value": v}))
    d = pd.concat(long, ignore_index=True).dropna(subset=["value"])
    if d.empty or not (d["value"].abs() > 0).any():
        return None
    opts = [o for o in optimizers if o in set(d["optimizer"])]
    roles = _ordered(d["role"], ROLES)
    with _style():
        fig, axes = figs.new(1, len(panels), w=3.6, h=3.0)
        for ax, (title, _) in zip(axes[0], panels):
            dd = d[d["panel"] == title]
            if dd.empty:
                ax.set_visible(False)
                continue
            for (opt, role, _rid), r in dd.groupby(["optimizer", "role", "run_id"], sort=False):
                r = r.sort_values("step")
                if len(r) > 400:  # plenty for a 3-4 inch panel
                    r = r.iloc[:: int(math.ceil(len(r) / 400))]
                dash = _DASHES[roles.index(role) % len(_DASHES)]
                ax.plot(r["step"].to_numpy(float), r["value"].to_numpy(float), color=figs.palette[opt],
                        linestyle=(0, dash) if dash else "-", linewidth=1.2)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("step")
            ax.set_ylabel("fraction of entries")
            ax.set_ylim(bottom=0)
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color=figs.palette[o], label=o) for o in opts]
        for i, r in enumerate(roles):
            dash = _DASHES[i % len(_DASHES)]
            handles.append(Line2D([], [], color="grey", linestyle=(0, dash) if dash else "-", label=f"role: {r}"))
        fig.legend(handles=handles, loc="outside right upper", fontsize=8)
        fig.suptitle(f"{task} · {prec}: telemetry per role over training (one line per run)", fontsize=10)
        return figs.save(fig, f"telemetry_{_slug(task)}_{_slug(prec)}")


def _optimal_losses(results: pd.DataFrame, study: dict) -> dict[str, float]:
    out: dict[str, float] = {}
    st = study.get("optimal_loss", study.get("optimal_losses", {}))
    for task in _ordered(results["task"], ()):
        v = math.nan
        if isinstance(st, dict) and task in st:
            try:
                v = float(st[task])
            except (TypeError, ValueError):
                v = math.nan
        if not math.isfinite(v):
            col = results.loc[results["task"] == task, "optimal_loss"].dropna()
            if len(col):
                v = float(col.iloc[0])
        if not math.isfinite(v):
            for cj in results.loc[results["task"] == task, "config_json"]:
                try:
                    v = float(json.loads(cj).get("optimal_loss"))
                    break
                except (ValueError, TypeError, AttributeError):
                    continue
        if not math.isfinite(v):
            v = _optimal_from_task(task, results.loc[results["task"] == task, "config_json"])
        if math.isfinite(v):
            out[task] = v
    return out


def _optimal_from_task(task: str, configs: pd.Series) -> float:
    """The task's known optimum from studies.tasks (convex problems), built as the run's config says; nan if the
    task is unknown, has no known optimum, or cannot be built here."""
    try:
        cfg = json.loads(configs.iloc[0]) if len(configs) and configs.iloc[0] else {}
        from studies.tasks import get_task

        t = get_task(task, size=cfg.get("size", "default"), data=cfg.get("data"))
        opt = t.build(int(cfg.get("seed", 0))).optimal_loss
        return float(opt) if opt is not None else math.nan
    except Exception:  # the report never fails over an optional annotation
        return math.nan


def _mechanism_fig(figs: _Figures, metrics: pd.DataFrame, optimal: dict[str, float]) -> tuple[Path | None, str]:
    tasks = _ordered(metrics["task"], ())
    if not tasks:
        return None, ""
    notes = []
    with _style():
        fig, axes = figs.new(1, len(tasks), w=max(5.6, 9.0 / len(tasks)), h=3.6)
        for ax, task in zip(axes[0], tasks):
            m = metrics[metrics["task"] == task]
            d, ycol, ylabel = _curve_column(m)
            xcol = "step" if "step" in d.columns else "tokens"
            opt = optimal.get(task)
            if opt is not None:
                y = (d[ycol] - opt).clip(lower=1e-12)
                label = f"{ylabel} − optimum (log scale)"
            else:
                y = d[ycol]
                label = f"{ylabel} (log scale; optimum unknown)"
                notes.append(task)
            d = d.assign(gap=y.where(np.isfinite(y)))
            for o in _ordered(d["optimizer"], OPTIMIZER_ORDER):
                _mean_band(ax, d[d["optimizer"] == o], xcol, "gap", figs.palette[o], o, log=True)
            ax.legend(title="optimizer", fontsize=8)
            ax.set_yscale("log")
            ax.set_xlabel(xcol)
            ax.set_ylabel(label)
            ax.set_title(f"{task}: mean ± sd over seeds", fontsize=10)
        fig.suptitle("Mechanism on non-smooth convex problems: distance to the optimum", fontsize=10)
        note = (f"Optimal loss unknown for {', '.join(notes)}: the raw loss is plotted." if notes else "")
        return figs.save(fig, "mechanism"), note


# ============================================================================================ sections


def _study_section(doc: _Doc, study: dict, results: pd.DataFrame, targets: dict, out_dir: Path) -> None:
    doc.h(1, "Study definition")
    phases = _ordered(results["phase"], ("tune", "main", "custom", "ablation", "rounding", "mechanism"))
    main = results[results["phase"].isin(MAIN_PHASES)]
    src = main if not main.empty else results
    seeds = sorted({int(s) for s in src["seed"].dropna()})
    items = [
        f"Runs: {len(results)} in phases {', '.join(phases) if phases else '—'}",
        f"Tasks: {', '.join(_ordered(src['task'], ()))}",
        f"Optimizers: {', '.join(_ordered(src['optimizer'], OPTIMIZER_ORDER))}",
        f"Precisions: {', '.join(_ordered(src['precision'], PRECISION_ORDER))}",
        f"Seeds: {', '.join(map(str, seeds))} ({len(seeds)} per cell)",
    ]
    steps = sorted({int(s) for s in src["steps"].dropna()})
    if steps:
        items.append(f"Steps per run: {', '.join(map(str, steps))}")
    tok = src["tokens"].dropna()
    if len(tok):
        items.append(f"Tokens per run: {_fmt_tokens(float(tok.max()))} (largest)")
    for key, label in (("thresholds", "Divergence thresholds"), ("date", "Date"), ("finished", "Finished"),
                       ("command", "Command"), ("status", "Study status"), ("size", "Size")):
        if key in study:
            v = study[key]
            items.append(f"{label}: {v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)}")
    if not main.empty:
        lr_by_opt = main.groupby("optimizer")["lr"].agg(lambda s: sorted(set(s.dropna())))
        items.append("LRs used in the main runs: " + "; ".join(
            f"{o}: {', '.join(_fmt(v) for v in lr_by_opt[o])}" for o in _ordered(lr_by_opt.index, OPTIMIZER_ORDER)))
    for task, (t, how) in targets.items():
        items.append(f"Target loss ({task}): {t:.4g} — {how}")
    if not targets and not main.empty:
        items.append("Target loss: none recorded or derivable (no fp32 AdamW baseline), so no tokens-to-target.")
    doc.ul(items)
    lr_rows = _lr_rows(study)
    if lr_rows is not None:
        doc.p("Learning-rate grid (the same tuning budget for every optimizer) and the chosen LR:")
        doc.table(lr_rows)
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
        t = tune.groupby(["task", "precision", "optimizer", "lr"], sort=False).agg(
            runs=("run_id", "size"), diverged=("diverged", "sum"), final_loss=("final", "mean")).reset_index()
        t = t.assign(diverged=[f"{int(k)}/{n}" for k, n in zip(t["diverged"], t["runs"])]).drop(columns="runs")
        doc.table(t)


def _lr_rows(study: dict) -> pd.DataFrame | None:
    """Table task/optimizer/grid/chosen from study.json's lr_grid ({task: {opt: [lrs]}} or {opt: [lrs]}) and
    chosen_lrs ({task: {precision: {opt: lr}}}, {task: {opt: lr}} or {opt: lr}), with the LRs tried and an
    "at edge of grid" flag from lr_tried / lr_at_edge ({task: {precision: {opt: ...}}}) when present; None when
    absent."""
    grid, chosen = study.get("lr_grid"), study.get("chosen_lrs")
    if not isinstance(grid, dict) and not isinstance(chosen, dict):
        return None

    def by_task(d: Any) -> dict:
        if not isinstance(d, dict) or not d:
            return {}
        first = next(iter(d.values()))
        return d if isinstance(first, dict) else {"": d}

    g, c = by_task(grid), by_task(chosen)
    tried_all, edge_all = study.get("lr_tried") or {}, study.get("lr_at_edge") or {}   # {task: {prec: {opt: .}}}
    rows = []
    for task in list(dict.fromkeys([*g, *c])):
        cg = c.get(task, {})
        per_prec = {p: v for p, v in cg.items() if isinstance(v, dict)}
        if not per_prec and cg:
            per_prec = {"": cg}
        opts = list(dict.fromkeys([*g.get(task, {}), *(o for v in per_prec.values() for o in v)]))
        for opt in _ordered(opts, OPTIMIZER_ORDER):
            grid_v = g.get(task, {}).get(opt)
            row = {"task": task, "optimizer": opt,
                   "grid": ", ".join(_fmt(float(x)) for x in grid_v) if isinstance(grid_v, list) else "—"}
            for prec, v in per_prec.items():
                tried = tried_all.get(task, {}).get(prec, {}).get(opt)
                if isinstance(tried, list):
                    row[f"LRs tried{' @ ' + prec if prec else ''}"] = ", ".join(_fmt(float(x)) for x in tried)
                edge = edge_all.get(task, {}).get(prec, {}).get(opt) is True
                row[f"chosen LR{' @ ' + prec if prec else ''}"] = (
                    _fmt(float(v[opt])) + (" (at edge of grid)" if edge else "")) if opt in v else "—"
            rows.append(row)
    return pd.DataFrame(rows).fillna("—") if rows else None


def _stability_section(doc: _Doc, figs: _Figures, main: pd.DataFrame, precisions, optimizers) -> None:
    doc.h(1, "Stability: fraction of seeds diverged")
    if main.empty:
        doc.note("No main-phase runs: stability heatmap omitted.")
        return
    cells = cell_table(main, ["task", "precision", "optimizer"])
    for task in _ordered(main["task"], ()):
        c = cells[cells["task"] == task]
        p = _heatmap(figs, c, "precision", "optimizer", [x for x in precisions if x in set(c["precision"])],
                     [x for x in optimizers if x in set(c["optimizer"])], f"{task}: diverged seeds (k/n)",
                     f"stability_{_slug(task)}")
        doc.fig(p, f"{task}: fraction of seeds that diverged per precision and optimizer (annotated k/n).")


def _main_metrics(metrics: pd.DataFrame) -> pd.DataFrame:
    """The metrics rows of the main-phase runs (``metrics`` itself when empty, as it then has no columns)."""
    return metrics[metrics["phase"].isin(MAIN_PHASES)] if not metrics.empty else metrics


def _curves_section(doc: _Doc, figs: _Figures, metrics: pd.DataFrame, main: pd.DataFrame, precisions, optimizers,
                    targets) -> None:
    doc.h(1, "Loss curves")
    mm = _main_metrics(metrics)
    if mm.empty:
        doc.note("No runs/*/metrics.csv for the main runs: loss curves omitted.")
        return
    for task in _ordered(main["task"], ()):
        tgt = targets.get(task, (None, ""))[0]
        precs = [p for p in precisions if p in set(mm.loc[mm["task"] == task, "precision"])]
        opts = [o for o in optimizers if o in set(mm.loc[mm["task"] == task, "optimizer"])]
        p = _loss_curves(figs, mm, task, precs, opts, tgt)
        if p is None:
            doc.note(f"{task}: no loss values in metrics.csv.")
        else:
            doc.fig(p, f"{task}: loss vs tokens, mean ± sd over seeds; red: a diverged run's training loss and ✕ "
                       f"where it stopped (clipped to the panel); dotted line = target loss.")


def _speedup_section(doc: _Doc, figs: _Figures, main: pd.DataFrame, speed: pd.DataFrame, targets, precisions,
                     optimizers, baselines: dict[str, str] | None = None, notes: list[str] | None = None) -> None:
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
    for task in _ordered(speed["task"], ()):
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
        p = _point_ci(figs, s, "precision", "optimizer", precs, opts, "speedup", "lo", "hi",
                      "speedup vs AdamW (× fewer tokens)", f"{task}: tokens to loss {tgt:.4g} vs AdamW",
                      f"speedup_{_slug(task)}", missing=missing, notes=cell_notes, ref_line=1.0, band=PAPER_SPEEDUP,
                      band_label="paper, FP8 (1.44×–2.14×)", hue_colors=figs.palette)
        doc.fig(p, f"{task}: tokens-to-target speedup over AdamW (target loss {tgt:.4g}: {how}); bars = 95% "
                   f"bootstrap interval; ▼ = no value (reason annotated).")
        t = pd.DataFrame({
            "precision": s["precision"], "optimizer": s["optimizer"],
            "AdamW tokens": [_fmt_tokens(v) for v in s["baseline_tokens"]],
            "optimizer tokens": [_fmt_tokens(v) for v in s["optimizer_tokens"]],
            "speedup": [f"{v:.3f}" if math.isfinite(v) else "—" for v in s["speedup"]],
            "lo": [f"{v:.3f}" if math.isfinite(v) else "—" for v in s["lo"]],
            "hi": [f"{v:.3f}" if math.isfinite(v) else "—" for v in s["hi"]],
            "reached (opt)": [f"{round(f * n)}/{n}" for f, n in zip(s["opt_reached"], s["n_opt"])],
            "reached (AdamW)": [f"{round(f * n)}/{n}" for f, n in zip(s["base_reached"], s["n_base"])],
            "status": s["status"]})
        doc.table(t)
    doc.h(2, "Compared with the paper")
    doc.ul(paper_comparison(main, speed, baselines))


def _telemetry_section(doc: _Doc, figs: _Figures, metrics: pd.DataFrame, main: pd.DataFrame, precisions,
                       optimizers) -> None:
    doc.h(1, "Telemetry over training")
    mm = _main_metrics(metrics)
    if mm.empty:
        doc.note("No runs/*/metrics.csv: telemetry omitted.")
        return
    any_fig, quiet = False, []
    for task in _ordered(mm["task"], ()):
        for prec in [p for p in precisions if p in set(mm.loc[mm["task"] == task, "precision"])]:
            p = _telemetry_fig(figs, mm, task, prec, optimizers)
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


def _telemetry_sites_section(doc: _Doc, out_dir: Path, main: pd.DataFrame) -> None:
    tel = load_metrics(out_dir, main, name="telemetry.csv")
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


def _divergence_section(doc: _Doc, results: pd.DataFrame) -> None:
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
            lines.append(f"[{r.phase}] {r.task}: {r.optimizer} {r.precision}, seed {_fmt_int(r.seed)}, diverged {step}"
                         f"{reason}{site}{expl}")
        doc.ul(lines)
    ok = results[~results["diverged"] & ((results["divergence_site"] != "") | (results["explanation"] != ""))]
    if not ok.empty:
        doc.h(2, "Runs that did not diverge: closest site")
        lines = []
        for r in ok.itertuples(index=False):
            parts = [x for x in (r.divergence_site and f"closest site: {r.divergence_site}", r.explanation) if x]
            lines.append(f"[{r.phase}] {r.task}: {r.optimizer} {r.precision}, seed {_fmt_int(r.seed)} — "
                         + "; ".join(parts))
        doc.ul(lines)


def _variant_section(doc: _Doc, figs: _Figures, results: pd.DataFrame, phase: str, title: str, intro: str,
                     name: str, x: str, hue: str) -> None:
    doc.h(1, title)
    sub = results[results["phase"] == phase]
    if sub.empty:
        doc.note(f"No {phase}-phase runs in this study: section omitted.")
        return
    doc.p(intro)
    cells = cell_table(sub, ["task", "precision", "optimizer"])
    labels = _variant_labels(_ordered(sub["precision"], PRECISION_ORDER))
    cells.insert(1, "variant", [labels[p] for p in cells["precision"]])
    for task in _ordered(sub["task"], ()):
        c = cells[cells["task"] == task]
        if phase == "ablation":
            p = _heatmap(figs, c, "precision", "optimizer", _ordered(c["precision"], PRECISION_ORDER),
                         _ordered(c["optimizer"], OPTIMIZER_ORDER), f"{task}: ablation, diverged seeds (k/n)",
                         f"{name}_stability_{_slug(task)}")
            doc.fig(p, f"{task}: fraction of seeds diverged per StoSignSGD variant.")
        x_order = _ordered(c[x], OPTIMIZER_ORDER if x == "optimizer" else tuple(labels.values()))
        hue_order = _ordered(c[hue], OPTIMIZER_ORDER if hue == "optimizer" else tuple(labels.values()))
        missing = {(getattr(r, x), getattr(r, hue)): f"{r.diverged_k}/{r.n} diverged"
                   for r in c.itertuples(index=False) if not math.isfinite(r.final_mean)}
        notes = {(getattr(r, x), getattr(r, hue)): f"{r.diverged_k}/{r.n} diverged"
                 for r in c.itertuples(index=False) if math.isfinite(r.final_mean) and r.diverged_k > 0}
        p = _point_ci(figs, c, x, hue, x_order, hue_order, "final_mean", "final_lo", "final_hi",
                      f"final loss{_loss_unit(task)}", f"{task}: {title.lower()} — final loss, 95% t interval",
                      f"{name}_{_slug(task)}", missing=missing, notes=notes,
                      hue_colors=figs.palette if hue == "optimizer" else None)
        doc.fig(p, f"{task}: final loss per {x} and {hue} (mean over seeds that did not diverge, 95% t interval).")
    doc.table(_cells_display(cells))


def _variant_labels(precisions: list[str]) -> dict[str, str]:
    """Short labels for precision variants that differ in a few policy segments ("fp8-all+master=bf16:stochastic"):
    the segments not shared by all variants; a segment that differs only by ":stochastic" reads "<role> stochastic"
    or "<role> nearest". Falls back to the full name."""
    parts = {p: [x for x in re.split(r"[+,;]", p) if x] for p in precisions}
    if len(parts) < 2:
        return {p: p for p in precisions}
    common = set.intersection(*(set(v) for v in parts.values()))
    strip = lambda seg: re.sub(r":stochastic", "", seg)  # noqa: E731
    by_role: dict[str, set] = {}
    for segs in parts.values():
        for seg in segs:
            if seg not in common and "=" in seg:
                by_role.setdefault(seg.split("=")[0], set()).add(strip(seg))
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


def _cells_display(cells: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame({c: cells[c] for c in ("task", "variant", "precision", "optimizer") if c in cells.columns})
    out["lr"] = [_fmt(v) for v in cells["lr"]]
    out["seeds"] = cells["n"].astype(int)
    out["diverged"] = [f"{k}/{n}" for k, n in zip(cells["diverged_k"], cells["n"])]
    out["final loss, mean [95% CI]"] = [_fmt_ci(m, lo, hi) for m, lo, hi in
                                        zip(cells["final_mean"], cells["final_lo"], cells["final_hi"])]
    out["best val loss"] = [_fmt(v) for v in cells["best_val_mean"]]
    out["tokens to target [95% CI]"] = [_fmt_ci(m, lo, hi, _fmt_tokens) if r else "not reached" for m, lo, hi, r in
                                        zip(cells["ttt_mean"], cells["ttt_lo"], cells["ttt_hi"], cells["reached"])]
    out["reached"] = [f"{r}/{n}" for r, n in zip(cells["reached"], cells["n"])]
    return out


def _mechanism_section(doc: _Doc, figs: _Figures, results: pd.DataFrame, metrics: pd.DataFrame, study: dict) -> None:
    doc.h(1, "Mechanism: SignSGD vs StoSignSGD on non-smooth convex problems")
    sub = results[results["phase"] == "mechanism"]
    if sub.empty:
        doc.note("No mechanism-phase runs in this study: section omitted.")
        return
    mm = metrics[metrics["phase"] == "mechanism"] if not metrics.empty else metrics
    if mm.empty:
        doc.note("Mechanism runs have no metrics.csv: only the table is shown.")
    else:
        p, note = _mechanism_fig(figs, mm, _optimal_losses(results, study))
        if p is not None:
            doc.fig(p, "Loss minus the known optimum (log scale) per step, mean ± sd over seeds.")
        if note:
            doc.note(note)
    doc.table(_cells_display(cell_table(sub.assign(ttt=np.nan), ["task", "precision", "optimizer"]))
              .drop(columns=["tokens to target [95% CI]", "reached"]))


def _run_table(results: pd.DataFrame) -> pd.DataFrame:
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
        t["tokens"] = [_fmt_tokens(v) for v in t["tokens"]]
    if "tokens_to_target" in t:
        t["tokens_to_target"] = [_fmt_tokens(v) for v in t["tokens_to_target"]]
    t["diverged"] = ["yes" if v else "no" for v in t["diverged"]]
    return t


# ============================================================================================ entry points


def _split_lrs(results: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Main runs of one optimizer at several LRs (e.g. ``--lrs``) are kept apart as "name@lr" (never pooled)."""
    res, notes = results.copy(), []
    main = res[res["phase"].isin(MAIN_PHASES)]
    for (task, opt), g in main.groupby(["task", "optimizer"], sort=False):
        if g["lr"].nunique() > 1:
            res.loc[g.index, "optimizer"] = [f"{opt}@{_fmt(lr)}" for lr in g["lr"]]
            notes.append(f"{task}: {opt} ran at {g['lr'].nunique()} learning rates; each is shown as {opt}@lr.")
    return res, notes


def _baselines(main: pd.DataFrame) -> tuple[dict[str, str], list[str]]:
    """task -> the AdamW label to compare against. With several AdamW LRs, the one with the lowest mean final
    loss at fp32 (a diverged run counts as +inf), the protocol's own tuning rule; stated in the report."""
    out, notes = {}, []
    for task in _ordered(main["task"], ()):
        m = main[main["task"] == task]
        labels = [o for o in _ordered(m["optimizer"], OPTIMIZER_ORDER) if o.split("@")[0] == BASELINE]
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


@dataclass
class _Data:
    results: pd.DataFrame  # runs that completed (diverged or not), optimizer labels split by LR where needed
    failed: pd.DataFrame  # runs with status "error"
    study: dict
    metrics: pd.DataFrame
    targets: dict[str, tuple[float, str]]
    main: pd.DataFrame
    speed: pd.DataFrame
    baselines: dict[str, str]
    notes: list[str]


def _prepare(out_dir: Path) -> _Data:
    """Load everything; runs with status "error" (the run itself failed) are set aside in ``failed``."""
    results = load_results(out_dir)
    failed = results[results["status"] == "error"]
    results = results[results["status"] != "error"].reset_index(drop=True)
    results, notes = _split_lrs(results)
    study = load_study(out_dir)
    metrics = load_metrics(out_dir, results)
    targets = _targets(results, study, metrics)
    results = _apply_targets(results, metrics, targets)
    results["target"] = [targets.get(t, (math.nan, ""))[0] for t in results["task"]]
    main = results[results["phase"].isin(MAIN_PHASES)]
    baselines, bnotes = _baselines(main)
    speed = speedup_table(main, baselines) if targets else pd.DataFrame()
    return _Data(results, failed, study, metrics, targets, main, speed, baselines, notes + bnotes)


def render_report(out_dir: Path | str) -> dict[str, Path]:
    """Render the report of the results folder `out_dir`; return the paths written.

    Keys: "html", "md", "table:<name>" for CSV tables under DIR/tables/, "figure:<name>" for PNGs under
    DIR/figures/. Raises FileNotFoundError when DIR/results.csv is missing.
    """
    out_dir = Path(out_dir)
    return _render_report(out_dir, _prepare(out_dir))


def summary_text(out_dir: Path | str) -> str:
    """A compact plain-text summary of a results folder for the terminal (no figures are drawn)."""
    out_dir = Path(out_dir)
    return _summary_text(out_dir, _prepare(out_dir))


def render_with_summary(out_dir: Path | str) -> tuple[dict[str, Path], str]:
    """:func:`render_report` then :func:`summary_text`, loading the results folder (every metrics.csv) once."""
    out_dir = Path(out_dir)
    data = _prepare(out_dir)
    return _render_report(out_dir, data), _summary_text(out_dir, data)


def _render_report(out_dir: Path, data: _Data) -> dict[str, Path]:
    results, study, metrics, targets, main, speed, failed = (data.results, data.study, data.metrics, data.targets,
                                                             data.main, data.speed, data.failed)
    optimizers = _ordered(results["optimizer"], OPTIMIZER_ORDER)
    figs = _Figures(out_dir, _palette(optimizers))
    doc = _Doc()

    title = "Precision sweep report"
    gen = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    doc.p(f"Results folder: {out_dir.resolve()} · rendered {gen} · {len(results)} runs, "
          f"{int(results['diverged'].sum())} diverged.")
    _study_section(doc, study, results, targets, out_dir)
    main_precs = _ordered(main["precision"], PRECISION_ORDER)
    main_opts = _ordered(main["optimizer"], OPTIMIZER_ORDER)
    _stability_section(doc, figs, main, main_precs, main_opts)
    _curves_section(doc, figs, metrics, main, main_precs, main_opts, targets)
    _speedup_section(doc, figs, main, speed, targets, main_precs, main_opts, data.baselines, data.notes)
    _telemetry_section(doc, figs, metrics, main, main_precs, main_opts)
    _telemetry_sites_section(doc, out_dir, main)
    _divergence_section(doc, results)
    if len(failed):
        doc.h(2, "Failed runs (errors, not divergences; left out of every statistic)")
        doc.ul([f"[{r.phase}] {r.task}: {r.optimizer} {r.precision}, seed {_fmt_int(r.seed)} — "
                f"{r.explanation or 'no message'}" for r in failed.itertuples(index=False)])
    _variant_section(doc, figs, results, "ablation", "Ablation of StoSignSGD",
                     "Which component carries stability: StoSignSGD against variants without noise (= Signum), "
                     "without the max buffer, with a decayed max, without momentum, and the sign conversion of AdamW.",
                     "ablation", "optimizer", "variant")
    _variant_section(doc, figs, results, "rounding", "Nearest vs stochastic rounding",
                     "The same optimizers with round-to-nearest and stochastic rounding of master weights and "
                     "optimizer states; 'variant' names the rounding per role (the table gives the full precision).",
                     "rounding", "variant", "optimizer")
    _mechanism_section(doc, figs, results, metrics, study)

    doc.h(1, "Final loss per cell (main runs)")
    cells = cell_table(main, ["task", "precision", "optimizer"]) if not main.empty else pd.DataFrame()
    if cells.empty:
        doc.note("No main-phase runs.")
    else:
        doc.p("Final loss: mean over the seeds that did not diverge with a 95% t interval; tokens to target: mean "
              "over the seeds that reached it with a 95% t interval.")
        doc.table(_cells_display(cells))
    doc.h(1, "All runs")
    runs = _run_table(results)
    doc.table(runs)

    tables_dir = out_dir / "tables"
    tables_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for name, df in (("speedup", speed), ("cells", cells), ("runs", runs)):
        if not df.empty:
            p = tables_dir / f"{name}.csv"
            df.to_csv(p, index=False)
            written[f"table:{name}"] = p
    html_path, md_path = out_dir / "report.html", out_dir / "report.md"
    html_path.write_text(_render_html(doc, title, out_dir), encoding="utf-8")
    md_path.write_text(_render_md(doc, title, out_dir), encoding="utf-8")
    written["html"], written["md"] = html_path, md_path
    for name, p in figs.written.items():
        written[f"figure:{name}"] = p
    return written


def _summary_text(out_dir: Path, data: _Data) -> str:
    results, targets, main, speed, failed = data.results, data.targets, data.main, data.speed, data.failed
    lines = [f"{len(results)} runs in {out_dir} ({int(results['diverged'].sum())} diverged"
             + (f", {len(failed)} failed" if len(failed) else "") + ")"]
    if main.empty:
        lines.append("no main-phase runs")
    for task in _ordered(main["task"], ()):
        m = main[main["task"] == task]
        precs = _ordered(m["precision"], PRECISION_ORDER)
        opts = _ordered(m["optimizer"], OPTIMIZER_ORDER)
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
        lines += ["paper check: " + x for x in paper_comparison(main, speed, data.baselines)]
    if (out_dir / "report.html").is_file():
        lines.append(f"report: {out_dir / 'report.html'}")
    return "\n".join(lines)
