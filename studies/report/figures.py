"""The report's figures: matplotlib's object API (no pyplot, no global backend change), seaborn styles, PNGs.

Each function draws one figure from the report's frames and returns the PNG path under ``DIR/figures/`` (None when
it has nothing to draw). Colours come from one palette per report (:func:`studies.report.style.palette`), so an
optimizer has the same colour in every figure.
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from studies.report.style import DPI, OPTIMIZER_ORDER, ordered, slug
from studies.schema import METRIC_ROLES as ROLES

__all__ = ["Figures", "style", "heatmap", "mean_band", "loss_unit", "tokens_axis", "curve_column", "loss_curves",
           "xticks", "point_ci", "telemetry_fig", "mechanism_fig"]

_DASHES = ["", (4, 1.5), (1, 1), (3, 1.25, 1.5, 1.25), (5, 1, 1, 1), (2, 2), (6, 2)]


class Figures:
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


def style():
    """The seaborn style every figure is drawn in (a context manager)."""
    import seaborn as sns

    return sns.axes_style("whitegrid")


def heatmap(figs: Figures, cells: pd.DataFrame, row: str, col: str, row_order, col_order, title: str,
            name: str) -> Path:
    """Fraction of seeds diverged per (row, col) cell of a cell_table, annotated k/n."""
    import seaborn as sns

    frac = cells.pivot(index=row, columns=col, values="diverged_frac").reindex(index=row_order, columns=col_order)
    cells = cells.assign(label=[f"{k}/{n}" for k, n in zip(cells["diverged_k"], cells["n"])])
    labels = cells.pivot(index=row, columns=col, values="label").reindex(index=row_order, columns=col_order)
    with style():
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
        if max((len(str(r)) for r in row_order), default=0) > 18:  # long policy strings: wrapped, smaller
            ax.set_yticklabels([textwrap.fill(str(r).replace(",", ", "), 24) for r in row_order], fontsize=7)
        return figs.save(fig, name)


def mean_band(ax, d: pd.DataFrame, x: str, y: str, color, label: str | None, log: bool = False) -> None:
    """Mean over runs at each x with a ±1 sd band (where ≥ 2 runs have a value); non-finite values skipped.
    With `log`, the band is clipped to positive values."""
    g = d[[x, y]].replace([np.inf, -np.inf], np.nan).dropna().groupby(x)[y].agg(["mean", "std", "count"])
    if g.empty:
        return
    xs, m, sd = g.index.to_numpy(float), g["mean"].to_numpy(float), g["std"].to_numpy(float)
    # a series of one point is drawn as a marker (a line through one point is invisible)
    ax.plot(xs, m, color=color, linewidth=1.6, label=label, marker="o" if len(xs) == 1 else None)
    band = (g["count"].to_numpy() >= 2) & np.isfinite(sd)
    if band.any():
        lo = m - np.where(band, sd, 0.0)
        if log:
            lo = np.maximum(lo, m * 1e-3)
        ax.fill_between(xs, lo, m + np.where(band, sd, 0.0), where=band, color=color, alpha=0.2, linewidth=0)


def loss_unit(task: str) -> str:
    """Axis unit: cross-entropy in nats for the learning tasks; the convex problems' objective has no unit."""
    return " (objective)" if task.startswith("convex") else " (cross-entropy, nats)"


def tokens_axis(ax) -> None:
    """Token counts as 5k / 1.2M with at most 5 ticks (long integers overlap otherwise)."""
    from matplotlib.ticker import EngFormatter, MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))


def curve_column(m: pd.DataFrame) -> tuple[pd.DataFrame, str, str]:
    """Validation-loss rows when the run logged them, else the training loss: (frame, column, label)."""
    if "val_loss" in m.columns and m["val_loss"].notna().sum() >= 2:
        return m[m["val_loss"].notna()], "val_loss", "validation loss"
    return m[m["loss"].notna()] if "loss" in m.columns else m.iloc[0:0], "loss", "training loss"


def loss_curves(figs: Figures, metrics: pd.DataFrame, task: str, precisions: list[str], optimizers: list[str],
                 target: float | None) -> Path | None:
    """One panel per precision (rows) and optimizer (columns): the mean ± sd validation (or training) loss vs
    tokens; diverged runs' training loss in red with ✕ where they stopped; the target as a dotted line."""
    mt = metrics[metrics["task"] == task]
    if mt.empty or "tokens" not in mt.columns:
        return None
    data, ycol, ylabel = curve_column(mt)
    if data.empty:
        return None
    data = data.assign(y=data[ycol].where(np.isfinite(data[ycol])))
    start = data.sort_values("tokens").groupby("run_id")["y"].first()
    finite = data["y"].dropna()
    top = float(np.nanmax(start)) * 1.15 if start.notna().any() else float(finite.quantile(0.99))
    bottom = float(finite.min()) if len(finite) else 0.0
    bottom -= 0.05 * (top - bottom)
    with style():
        fig, axes = figs.new(len(precisions), len(optimizers), w=3.4, h=2.5, sharex=True, sharey=True)
        marked = False
        for i, prec in enumerate(precisions):
            for j, opt in enumerate(optimizers):
                ax = axes[i, j]
                d = data[(data["precision"] == prec) & (data["optimizer"] == opt)]
                if d.empty:
                    ax.text(0.5, 0.5, "no runs", ha="center", va="center", transform=ax.transAxes, color="grey")
                else:
                    mean_band(ax, d, "tokens", "y", figs.palette[opt], "mean ± sd over seeds")
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
                tokens_axis(ax)
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
        fig.supylabel(f"{ylabel}{loss_unit(task)}", fontsize=10)
        fig.suptitle(f"{task}: {ylabel} vs tokens per precision (rows) and optimizer (columns)"
                     + (" — diverged runs marked ✕" if marked else ""), fontsize=10)
        return figs.save(fig, f"loss_curves_{slug(task)}")


def xticks(ax, labels: list[str]) -> None:
    """Categorical x tick labels, wrapped and smaller when long."""
    ax.set_xticks(range(len(labels)))
    long = max((len(v) for v in labels), default=0) > 12
    shown = [textwrap.fill(v.replace(",", ", "), 18) if long else v for v in labels]
    ax.set_xticklabels(shown, fontsize=8 if long else 9)


def point_ci(figs: Figures, table: pd.DataFrame, x: str, hue: str, x_order, hue_order, y: str, lo: str, hi: str,
              ylabel: str, title: str, name: str, missing: dict | None = None, notes: dict | None = None,
              ref_line: float | None = None, band: tuple[float, float] | None = None, band_label: str = "",
              hue_colors: dict | None = None, band_x: set | None = None) -> Path:
    """Points with interval bars: one group per x, one colour per hue.

    `missing[(x, hue)]`: text written vertically at the foot of the panel (in axes coordinates, so it marks no
    value on the data axis) where the value is nan (e.g. "not reached");
    `notes[(x, hue)]`: small text next to a plotted point (e.g. "1/2 diverged");
    `band`: a shaded y range, over the x groups in `band_x` only (every group when None).
    """
    import seaborn as sns
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    missing, notes = missing or {}, notes or {}
    with style():
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
        handles = []
        if ref_line is not None:
            ax.axhline(ref_line, color="black", linewidth=1, linestyle="--")
            handles.append(Line2D([], [], color="black", linestyle="--", label=f"{ref_line:g} = baseline"))
        shown = [i for i, xv in enumerate(x_order) if band_x is None or xv in band_x]
        if band is not None and shown:
            for i in shown:
                ax.fill_between([i - 0.45, i + 0.45], band[0], band[1], color="gold", alpha=0.25, linewidth=0)
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
                    ax.annotate(missing.get((xv, hv), "no value"), (xpos, 0.03), xycoords=("data", "axes fraction"),
                                ha="center", va="bottom", fontsize=7, rotation=90, color=colors[hv])
            handles.append(Line2D([], [], marker="o", color=colors[hv], linestyle="none", label=str(hv)))
        ax.set_ylim(lo_v - 0.08 * span, hi_v + 0.08 * span)
        xticks(ax, [str(v) for v in x_order])
        ax.set_xlim(-0.6, len(x_order) - 0.4)
        ax.set_xlabel(x)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        fig.legend(handles=handles, loc="outside right upper", fontsize=8, title=hue, title_fontsize=8)
        return figs.save(fig, name)


def telemetry_fig(figs: Figures, metrics: pd.DataFrame, task: str, prec: str, optimizers: list[str]) -> Path | None:
    """Underflow/overflow fractions per role and the state-zero / lost-update fractions per step, one line per run
    (None when every value is zero or absent)."""
    m = metrics[(metrics["task"] == task) & (metrics["precision"] == prec)]
    if m.empty or "step" not in m.columns:
        return None
    panels: list[tuple[str, list[tuple[str, str]]]] = []
    for kind in ("underflow", "overflow"):
        cols = [(f"{r}_{kind}", r) for r in ROLES if f"{r}_{kind}" in m.columns]
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
            long.append(pd.DataFrame({"step": m["step"], "optimizer": m["optimizer"], "run_id": m["run_id"],
                                      "panel": title, "role": role, "value": m[c]}))
    d = pd.concat(long, ignore_index=True).dropna(subset=["value"])
    if d.empty or not (d["value"].abs() > 0).any():
        return None
    opts = [o for o in optimizers if o in set(d["optimizer"])]
    roles = ordered(d["role"], ROLES)
    with style():
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
        return figs.save(fig, f"telemetry_{slug(task)}_{slug(prec)}")


def mechanism_fig(figs: Figures, metrics: pd.DataFrame, optimal: dict[str, float]) -> tuple[Path | None, str]:
    """Loss minus the known optimum (log scale) per step and optimizer, one panel per task; and a note naming the
    tasks whose optimum is unknown (their raw loss is plotted)."""
    tasks = ordered(metrics["task"], ())
    if not tasks:
        return None, ""
    notes = []
    with style():
        fig, axes = figs.new(1, len(tasks), w=max(5.6, 9.0 / len(tasks)), h=3.6)
        for ax, task in zip(axes[0], tasks):
            m = metrics[metrics["task"] == task]
            d, ycol, ylabel = curve_column(m)
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
            for o in ordered(d["optimizer"], OPTIMIZER_ORDER):
                mean_band(ax, d[d["optimizer"] == o], xcol, "gap", figs.palette[o], o, log=True)
            ax.legend(title="optimizer", fontsize=8)
            ax.set_yscale("log")
            ax.set_xlabel(xcol)
            ax.set_ylabel(label)
            ax.set_title(f"{task}: mean ± sd over seeds", fontsize=10)
        fig.suptitle("Mechanism on non-smooth convex problems: distance to the optimum", fontsize=10)
        note = (f"Optimal loss unknown for {', '.join(notes)}: the raw loss is plotted." if notes else "")
        return figs.save(fig, "mechanism"), note
