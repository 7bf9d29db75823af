"""The report renders from small synthetic results folders (schema of INTERFACES.md) with every figure present.

The synthetic validation curves are linear in tokens, so tokens-to-target is known in closed form and the
speedup table can be checked against a hand computation.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from studies.report import render_report, summary_text

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TARGET = 2.0
START = 4.0  # every validation curve starts at 4.0 and falls linearly (or stays flat)
EVAL_TOKENS = 100  # one evaluation every 100 tokens
STEPS, TOKENS_PER_STEP = 40, 50  # 2000 tokens per run
ROUND_A, ROUND_B = "weight=e4m3,master=bf16", "weight=e4m3,master=bf16:stochastic"

RESULT_COLUMNS = [
    "run_id", "phase", "task", "optimizer", "precision", "lr", "seed", "steps", "steps_done", "tokens",
    "final_loss", "final_val_loss", "best_val_loss", "diverged", "diverged_step", "divergence_reason",
    "divergence_site", "explanation", "target_loss", "tokens_to_target", "wall_s", "state_bytes_per_param",
    "config_json",
]

# Main-phase runs: (optimizer, precision, seed) -> tokens at which val loss crosses TARGET (None: never, i.e. the
# curve plateaus above the target), and whether/when the run diverged.
MAIN = {
    ("adamw", "fp32", 0): (1000.0, None),
    ("adamw", "fp32", 1): (1250.0, None),
    ("signum", "fp32", 0): (None, None),  # never reaches: "not reached by optimizer"
    ("signum", "fp32", 1): (None, None),
    ("stosignsgd", "fp32", 0): (600.0, None),
    ("stosignsgd", "fp32", 1): (800.0, None),
    ("adamw", "fp8-all", 0): (None, 14),  # diverges at step 14 (nan)
    ("adamw", "fp8-all", 1): (None, None),  # AdamW never reaches at fp8-all: "baseline never reached target"
    ("signum", "fp8-all", 0): (1500.0, None),
    ("signum", "fp8-all", 1): (1700.0, None),
    ("stosignsgd", "fp8-all", 0): (700.0, None),
    ("stosignsgd", "fp8-all", 1): (900.0, None),
    # bf16: every optimizer reaches; signum only in one seed (partial)
    ("adamw", "bf16", 0): (1100.0, None),
    ("adamw", "bf16", 1): (1300.0, None),
    ("signum", "bf16", 0): (1000.0, None),
    ("signum", "bf16", 1): (None, None),
    ("stosignsgd", "bf16", 0): (500.0, None),
    ("stosignsgd", "bf16", 1): (700.0, None),
}
ABLATION = {("stosignsgd", 0): False, ("stosignsgd", 1): False, ("stosign-nonoise", 0): False,
            ("stosign-nonoise", 1): True, ("stosign-instant", 0): False, ("stosign-instant", 1): False}
ROUNDING = [("adamw", ROUND_A), ("adamw", ROUND_B), ("stosignsgd", ROUND_A), ("stosignsgd", ROUND_B)]


def _val_curve(cross: float | None, tokens: np.ndarray) -> np.ndarray:
    """Linear from START to below TARGET, crossing exactly at `cross`; flat at 2.6 when it never crosses."""
    if cross is None:
        return np.maximum(START - tokens * (START - 2.6) / 800.0, 2.6)
    return START - tokens * (START - TARGET) / cross


def _metrics(cross, diverged_step, precision: str, seed: int) -> pd.DataFrame:
    steps = np.arange(1, STEPS + 1)
    if diverged_step is not None:
        steps = steps[steps <= diverged_step]
    tokens = steps * TOKENS_PER_STEP
    val = _val_curve(cross, tokens.astype(float))
    loss = val + 0.05 * np.sin(steps + seed)
    if diverged_step is not None:
        loss[-1] = np.nan
    evaluated = tokens % EVAL_TOKENS == 0
    low = precision != "fp32"
    frac = np.linspace(0.0, 0.3, steps.size) if low else np.zeros(steps.size)
    df = pd.DataFrame({
        "step": steps, "tokens": tokens, "loss": loss, "val_loss": np.where(evaluated, val, np.nan),
        "lr": 1e-3, "grad_norm": 1.0, "update_ratio": 1e-3,
    })
    for role in ("weight", "activation", "grad", "state", "master"):
        df[f"{role}_underflow"] = frac * (0.5 if role == "grad" else 1.0)
        df[f"{role}_overflow"] = frac * 0.01
    df["state_zero_frac"] = frac * 2
    df["lost_update_frac"] = frac / 3
    return df


def _row(run_id, phase, task, opt, prec, seed, *, diverged=False, dstep=None, final=2.1, ttt=math.nan,
         target=TARGET, explanation="", site="", reason=""):
    return {
        "run_id": run_id, "phase": phase, "task": task, "optimizer": opt, "precision": prec, "lr": 1e-3,
        "seed": seed, "steps": STEPS, "steps_done": dstep or STEPS, "tokens": (dstep or STEPS) * TOKENS_PER_STEP,
        "final_loss": math.nan if diverged else final, "final_val_loss": math.nan if diverged else final,
        "best_val_loss": final, "diverged": diverged, "diverged_step": dstep if dstep else math.nan,
        "divergence_reason": reason, "divergence_site": site, "explanation": explanation,
        "target_loss": target, "tokens_to_target": ttt, "wall_s": 1.0, "state_bytes_per_param": 8.0,
        "config_json": json.dumps({"optimizer": opt, "precision": prec}),
    }


def build_folder(root: Path, *, with_runs: bool = True) -> Path:
    """A small results folder in the INTERFACES.md schema with phases main/ablation/rounding/mechanism/tune."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    n = 0

    def add(row, metrics=None):
        nonlocal n
        n += 1
        rows.append(row)
        if with_runs and metrics is not None:
            d = root / "runs" / row["run_id"]
            d.mkdir(parents=True)
            out = metrics.copy()
            out["val_loss"] = out["val_loss"].map(lambda v: "" if pd.isna(v) else repr(float(v)))
            out.to_csv(d / "metrics.csv", index=False)

    for (opt, prec, seed), (cross, dstep) in MAIN.items():
        rid = f"main{len(rows):03d}"
        m = _metrics(cross, dstep, prec, seed)
        diverged = dstep is not None
        final = float(m["val_loss"].dropna().iloc[-1]) if not diverged else math.nan
        expl = ("AdamW fp8-all diverged at step 14 (nan); before it, 93% of exp_avg_sq entries were zero in E4M3"
                if diverged else ("closest: state underflow 30%" if prec == "fp8-all" else ""))
        add(_row(rid, "main", "gpt", opt, prec, seed, diverged=diverged, dstep=dstep, final=final,
                 ttt=cross if cross is not None else math.nan, explanation=expl,
                 site="optimizer.exp_avg_sq" if prec == "fp8-all" else "", reason="nan" if diverged else ""), m)
    for (opt, seed), div in ABLATION.items():
        rid = f"abl{len(rows):03d}"
        add(_row(rid, "ablation", "gpt", opt, "fp8-all", seed, diverged=div, dstep=20 if div else None,
                 final=2.2 + 0.1 * seed + (0.3 if opt == "stosign-instant" else 0.0), reason="spike" if div else ""),
            _metrics(900.0, 20 if div else None, "fp8-all", seed))
    for opt, prec in ROUNDING:
        for seed in (0, 1):
            rid = f"rnd{len(rows):03d}"
            add(_row(rid, "rounding", "gpt", opt, prec, seed, final=2.3 - (0.2 if "stochastic" in prec else 0)
                     + 0.05 * seed), _metrics(900.0, None, prec, seed))
    for opt in ("signsgd", "stosignsgd"):
        for seed in (0, 1):
            rid = f"mech{len(rows):03d}"
            steps = np.arange(1, 61)
            loss = 0.5 + (np.full(60, 0.8) if opt == "signsgd" else 0.8 * np.exp(-steps / 10.0)) + 1e-3 * seed
            m = pd.DataFrame({"step": steps, "tokens": steps * 8, "loss": loss, "val_loss": loss})
            add(_row(rid, "mechanism", "convex-l1", opt, "fp32", seed, final=float(loss[-1]), target=math.nan), m)
    for lr in (1e-3, 3e-3):
        add(_row(f"tune{len(rows):03d}", "tune", "gpt", "adamw", "fp32", 0, final=2.0 + lr))

    pd.DataFrame(rows, columns=RESULT_COLUMNS).to_csv(root / "results.csv", index=False)
    if with_runs:
        tel = pd.DataFrame({"step": [10, 10, 20, 20], "site": ["blocks.0.attn.weight", "optimizer.exp_avg_sq"] * 2,
                            "role": ["weight", "state"] * 2, "flushed_frac": [0.01, 0.6, 0.02, 0.9],
                            "saturated_frac": [0.0, 0.0, 0.001, 0.0]})
        tel.to_csv(root / "runs" / "main006" / "telemetry.csv", index=False)
    study = {
        "tasks": ["gpt"], "optimizers": ["adamw", "signum", "stosignsgd"], "precisions": ["fp32", "bf16", "fp8-all"],
        "seeds": [0, 1], "steps": STEPS, "lr_grid": {"adamw": [1e-3, 3e-3]}, "chosen_lrs": {"adamw": 1e-3},
        "thresholds": {"spike_factor": 3.0}, "target_loss": {"gpt": TARGET},
        "target_rule": "the fp32 AdamW baseline's final validation loss plus 2% slack",
        "optimal_loss": {"convex-l1": 0.5}, "date": "2026-11-23", "command": "precision-sweep run --quick",
    }
    (root / "study.json").write_text(json.dumps(study))
    return root


def _hand_speedups() -> dict[tuple[str, str], tuple[float, str]]:
    """(optimizer, precision) -> (mean AdamW tokens / mean optimizer tokens over reached seeds, status)."""
    out = {}
    for prec in ("fp32", "bf16", "fp8-all"):
        base = [MAIN[("adamw", prec, s)][0] for s in (0, 1)]
        base = [b for b in base if b is not None]
        for opt in ("signum", "stosignsgd"):
            o_all = [MAIN[(opt, prec, s)][0] for s in (0, 1)]
            o = [v for v in o_all if v is not None]
            if not base:
                out[(opt, prec)] = (math.nan, "baseline never reached target")
            elif not o:
                out[(opt, prec)] = (math.nan, "not reached by optimizer")
            else:
                out[(opt, prec)] = (sum(base) / len(base) / (sum(o) / len(o)), "ok" if len(o) == 2 else "partial")
    return out


def _check_png(path: Path) -> None:
    import matplotlib.image as mpimg

    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    root = build_folder(tmp_path_factory.mktemp("full"))
    return root, render_report(root)


def test_every_figure_written_and_valid(full_report):
    root, written = full_report
    expected = {"stability_gpt", "loss_curves_gpt", "speedup_gpt", "telemetry_gpt_bf16", "telemetry_gpt_fp8-all",
                "ablation_stability_gpt", "ablation_gpt", "rounding_gpt", "mechanism"}
    figures = {k.split(":", 1)[1] for k in written if k.startswith("figure:")}
    assert expected <= figures, f"missing figures: {expected - figures}"
    assert "telemetry_gpt_fp32" not in figures  # fp32 telemetry is all zero: noted, not plotted
    for k, p in written.items():
        if k.startswith("figure:"):
            assert p.parent == root / "figures"
            _check_png(p)
    assert sorted(p.name for p in (root / "figures").glob("*.png")) == sorted(f"{f}.png" for f in figures)


def test_html_self_contained_and_complete(full_report):
    root, written = full_report
    text = written["html"].read_text()
    assert written["html"] == root / "report.html"
    assert "http://" not in text and "https://" not in text
    assert "<script" not in text.lower() and "<link" not in text.lower()
    srcs = re.findall(r"<img[^>]*src='([^']*)'", text)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    n_figs = sum(1 for k in written if k.startswith("figure:"))
    assert len(srcs) == n_figs
    for name in ("adamw", "signum", "stosignsgd", "stosign-nonoise", "stosign-instant", "signsgd",
                 "fp32", "bf16", "fp8-all", ROUND_A, ROUND_B, "convex-l1"):
        assert name in text, name
    for heading in ("Study definition", "Stability", "Loss curves", "Tokens to target", "Telemetry",
                    "Why runs diverged", "Ablation", "Nearest vs stochastic rounding", "Mechanism", "Final loss",
                    "All runs", "Compared with the paper", "Learning-rate tuning"):
        assert heading in text, heading
    # the divergence explanation is carried through; the target and how it was chosen are stated
    assert "93% of exp_avg_sq entries were zero in E4M3" in text
    assert "diverged at step 14 (nan)" in text
    assert "fp32 AdamW baseline" in text and "2.0" in text


def test_markdown_references_relative_figures(full_report):
    root, written = full_report
    md = written["md"].read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert links and all(l.startswith("figures/") and (root / l).is_file() for l in links)
    assert "| precision | optimizer |" in md


def test_speedup_table_matches_hand_computation(full_report):
    root, written = full_report
    table = pd.read_csv(written["table:speedup"])
    hand = _hand_speedups()
    assert len(table) == len(hand)
    for r in table.itertuples(index=False):
        ratio, status = hand[(r.optimizer, r.precision)]
        assert r.status == status, (r.optimizer, r.precision)
        if math.isnan(ratio):
            assert math.isnan(r.speedup)
        else:
            assert r.speedup == pytest.approx(ratio, rel=1e-9)
    # e.g. stosignsgd at fp32: (1000+1250)/2 / ((600+800)/2) = 1.607..; shown in both documents
    shown = f"{(2250 / 1400):.3f}"
    assert shown in written["md"].read_text() and shown in written["html"].read_text()


def test_speedup_recomputed_from_metrics_when_results_lack_it(tmp_path):
    root = build_folder(tmp_path / "r")
    res = pd.read_csv(root / "results.csv")
    res["tokens_to_target"] = np.nan
    res["target_loss"] = np.nan  # the report falls back to study.json's target and the metrics' val curves
    res.to_csv(root / "results.csv", index=False)
    table = pd.read_csv(render_report(root)["table:speedup"])
    hand = _hand_speedups()
    for r in table.itertuples(index=False):
        ratio, status = hand[(r.optimizer, r.precision)]
        assert r.status == status
        if not math.isnan(ratio):
            assert r.speedup == pytest.approx(ratio, rel=1e-9)


def test_paper_comparison_is_computed(full_report):
    root, written = full_report
    text = written["md"].read_text()
    # fp8-all: AdamW diverged in 1/2 seeds, StoSignSGD 0/2 -> agrees on stability; AdamW never reached the target
    assert "gpt, fp8-all: AdamW diverged in 1/2 seeds, StoSignSGD in 0/2" in text
    assert "agrees with the paper (AdamW fails, StoSignSGD stable)" in text
    assert "AdamW never reached the target at this precision" in text


def test_results_only_folder_renders_with_notes(tmp_path):
    root = build_folder(tmp_path / "bare", with_runs=False)
    (root / "study.json").unlink()
    written = render_report(root)
    text = written["html"].read_text()
    assert "study.json is absent" in text
    assert "loss curves omitted" in text and "telemetry omitted" in text
    assert "only the table is shown" in text  # mechanism without metrics
    figures = {k.split(":", 1)[1] for k in written if k.startswith("figure:")}
    assert {"stability_gpt", "speedup_gpt", "ablation_gpt", "rounding_gpt"} <= figures
    assert "loss_curves_gpt" not in figures and "mechanism" not in figures
    for k, p in written.items():
        if k.startswith("figure:"):
            _check_png(p)
    # the speedup still comes from results.csv (target_loss column, tokens_to_target column)
    table = pd.read_csv(written["table:speedup"])
    row = table[(table.optimizer == "stosignsgd") & (table.precision == "fp32")].iloc[0]
    assert row.speedup == pytest.approx(2250 / 1400)


def test_minimal_folder_without_phases_or_optional_columns(tmp_path):
    rows = pd.DataFrame({"task": ["mlp"] * 4, "optimizer": ["adamw", "adamw", "sgd", "sgd"],
                         "precision": ["fp32"] * 4, "seed": [0, 1, 0, 1], "diverged": [False, True, False, False]})
    rows.to_csv(tmp_path / "results.csv", index=False)
    written = render_report(tmp_path)
    text = written["html"].read_text()
    assert "tokens-to-target omitted" in text and "No ablation-phase runs" in text
    assert "sgd" in text and "1/2" in text
    summary = summary_text(tmp_path)
    assert "[mlp]" in summary and "1/2" in summary


def test_summary_text(full_report):
    root, _ = full_report
    s = summary_text(root)
    assert "[gpt]" in s and "target loss 2" in s
    assert "stosignsgd" in s and "1.61x" in s
    assert "not reached by optimizer" in s and "baseline never reached target" in s
    assert "report:" in s


def test_missing_or_bad_results(tmp_path):
    with pytest.raises(FileNotFoundError, match="results.csv"):
        render_report(tmp_path)
    pd.DataFrame({"task": ["gpt"], "seed": [0]}).to_csv(tmp_path / "results.csv", index=False)
    with pytest.raises(ValueError, match="optimizer"):
        render_report(tmp_path)


def test_several_lrs_kept_apart_and_failed_runs_left_out(tmp_path):
    """Main runs at two AdamW LRs are not pooled: the baseline is the LR with the lower mean final loss at fp32;
    runs with status "error" are listed but counted nowhere."""
    rows = []
    # (optimizer, lr, precision, seed, final, ttt)
    spec = [("adamw", 1e-3, "fp32", 0, 2.5, 3000.0), ("adamw", 1e-3, "fp32", 1, 2.6, 3200.0),
            ("adamw", 3e-3, "fp32", 0, 2.1, 2000.0), ("adamw", 3e-3, "fp32", 1, 2.2, 2400.0),
            ("stosignsgd", 3e-3, "fp32", 0, 2.0, 1000.0), ("stosignsgd", 3e-3, "fp32", 1, 2.0, 1100.0)]
    for i, (opt, lr, prec, seed, final, ttt) in enumerate(spec):
        r = _row(f"r{i}", "main", "gpt", opt, prec, seed, final=final, ttt=ttt)
        r["lr"] = lr
        rows.append({**r, "status": "ok"})
    bad = _row("r9", "main", "gpt", "stosignsgd", "fp32", 2, final=math.nan, explanation="the run failed (boom)")
    rows.append({**bad, "lr": 3e-3, "status": "error"})
    pd.DataFrame(rows).to_csv(tmp_path / "results.csv", index=False)
    written = render_report(tmp_path)
    table = pd.read_csv(written["table:speedup"])
    row = table[table.optimizer == "stosignsgd"].iloc[0]
    # baseline adamw@0.003 (mean final 2.15 < 2.55): (2000+2400)/2 / ((1000+1100)/2)
    assert row.speedup == pytest.approx(2200 / 1050)
    assert set(table.optimizer) == {"adamw@0.001", "stosignsgd"}  # the other AdamW LR is compared too
    text = written["html"].read_text()
    assert "adamw@0.003, the AdamW learning rate with the lowest mean final loss" in text
    assert "Failed runs" in text and "boom" in text
    cells = pd.read_csv(written["table:cells"])
    assert cells[cells.optimizer == "stosignsgd"]["n"].iloc[0] == 2  # the failed seed is not counted


def test_header_only_results_renders(tmp_path):
    pd.DataFrame(columns=RESULT_COLUMNS).to_csv(tmp_path / "results.csv", index=False)
    written = render_report(tmp_path)
    assert written["html"].is_file() and not any(k.startswith("figure:") for k in written)
    assert "0 runs" in summary_text(tmp_path)


def test_rounding_variant_labels():
    from studies.report import _variant_labels

    base = "fp8-all+master=bf16{m}+state=e4m3{s}:block128"
    precs = [base.format(m=m, s=s) for m in ("", ":stochastic") for s in ("", ":stochastic")]
    labels = _variant_labels(precs)
    assert labels[precs[0]] == "master nearest, state nearest"
    assert labels[precs[3]] == "master stochastic, state stochastic"
    assert labels[precs[1]] == "master nearest, state stochastic"
    # unrelated precisions keep their names; a preset without the overridden role says so
    assert _variant_labels(["fp32", "bf16"]) == {"fp32": "fp32", "bf16": "bf16"}
    assert _variant_labels(["fp8-all", "fp8-all+master=bf16:stochastic"])["fp8-all"] == "master as in preset"
