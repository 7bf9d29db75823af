"""The report of a real tiny study (tests/studies/conftest.py: written by the real sweep), checked against
independent readings of the same files: results.csv through the csv module, study.json through json, metrics
and telemetry through pandas, statistics through numpy/scipy.

Every optimizer ran at two learning rates (0.01 and 3), so a report that pooled them would show n = 4 seeds per
cell instead of 2; the LR-3 runs diverge, fp8-all logs telemetry.
"""
from __future__ import annotations

import csv
import html
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from studies.report import prepare, render_report, render_with_summary, summary_text

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def raw_rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "results.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def label(r: dict[str, str]) -> str:
    """The optimizer as the report must label it: every optimizer ran at two LRs, so "name@lr"."""
    return f"{r['optimizer']}@{float(r['lr']):g}"


def cells_of(rows: list[dict[str, str]]) -> dict[tuple[str, str], list[dict[str, str]]]:
    out: dict[tuple[str, str], list] = {}
    for r in rows:
        out.setdefault((r["precision"], label(r)), []).append(r)
    return out


def _check_png(path: Path) -> None:
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == PNG_MAGIC, f"{path} is not a PNG"
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


@pytest.fixture(scope="module")
def rendered(tiny_study, tmp_path_factory):
    root = tmp_path_factory.mktemp("rendered") / "r"
    shutil.copytree(tiny_study, root)
    written, summary = render_with_summary(root)
    return root, written, summary


def test_fixture_is_what_the_tests_assume(tiny_study):
    rows = raw_rows(tiny_study)
    assert len(rows) == 16 and {r["status"] for r in rows} <= {"ok", "diverged"}
    assert {r["diverged"] for r in rows if float(r["lr"]) == 3.0} == {"True"}
    assert {r["diverged"] for r in rows if float(r["lr"]) == 0.01} == {"False"}
    assert all(len(v) == 2 for v in cells_of(rows).values())


def test_every_figure_written_and_valid(rendered):
    root, written, _ = rendered
    figures = {k.split(":", 1)[1] for k in written if k.startswith("figure:")}
    assert {"stability_gpt", "loss_curves_gpt", "speedup_gpt", "telemetry_gpt_fp8-all"} <= figures
    for k, p in written.items():
        if k.startswith("figure:"):
            assert p.parent == root / "figures"
            _check_png(p)
    assert sorted(p.name for p in (root / "figures").glob("*.png")) == sorted(f"{f}.png" for f in figures)


def test_html_self_contained_and_every_section_present(rendered):
    root, written, _ = rendered
    text = written["html"].read_text()
    assert "http://" not in text and "https://" not in text and "<script" not in text.lower()
    srcs = re.findall(r"<img[^>]*src='([^']*)'", text)
    assert len(srcs) == sum(1 for k in written if k.startswith("figure:"))
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    for heading in ("Study definition", "Stability", "Loss curves", "Tokens to target", "Compared with the paper",
                    "Telemetry over training", "Most affected sites", "Why runs diverged", "Ablation",
                    "Nearest vs stochastic rounding", "Mechanism", "Final loss per cell", "Appendix: all runs",
                    "Verdict"):
        assert f">{heading}" in text, heading
    # the answer first, the study definition in the appendix
    assert text.index(">Verdict") < text.index(">Stability") < text.index(">Appendix: all runs") < text.index(
        ">Study definition")
    for absent in ("ablation", "rounding", "mechanism"):
        assert f"No {absent}-phase runs in this study" in text
    assert "Data problems" not in text  # a clean folder has none
    assert "Seeds: 0, 1 (2 per cell)" in text  # every optimizer@lr x precision cell has both seeds


def test_target_and_rule_come_from_study_json(rendered, tiny_study):
    root, written, summary = rendered
    target = json.loads((tiny_study / "study.json").read_text())["targets"]["gpt"]
    md = written["md"].read_text()
    assert f"Target loss (gpt): {target['target_loss']:.4g} — {target['rule']}" in md
    assert f"target loss {target['target_loss']:.4g}" in summary


def test_cells_match_an_independent_computation(rendered, tiny_study):
    """Seeds, diverged k/n, final-loss mean and 95% t interval per (precision, optimizer@lr) cell (tables/cells.csv
    and the text table of the report)."""
    root, written, _ = rendered
    cells = pd.read_csv(written["table:cells"])
    expected = cells_of(raw_rows(tiny_study))
    assert len(cells) == len(expected) == 8
    md = written["md"].read_text()
    for _, r in cells.iterrows():
        runs = expected[(r["precision"], r["optimizer"])]
        k = sum(x["diverged"] == "True" for x in runs)
        assert (r["n"], r["diverged_k"]) == (2, k)
        assert f"| gpt | {r['precision']} | {r['optimizer']} | {float(runs[0]['lr']):.4g} | 2 | {k}/2 |" in md
        finals = np.array([float(x["final_val_loss"]) for x in runs if x["diverged"] != "True"])
        if finals.size == 0:
            assert math.isnan(r["final_mean"])
            continue
        half = sps.t.ppf(0.975, finals.size - 1) * finals.std(ddof=1) / math.sqrt(finals.size)
        assert r["final_mean"] == pytest.approx(finals.mean(), rel=1e-12)
        assert r["final_lo"] == pytest.approx(finals.mean() - half, rel=1e-9)
        assert r["final_hi"] == pytest.approx(finals.mean() + half, rel=1e-9)


def test_speedup_matches_an_independent_computation(rendered, tiny_study):
    """speedup = mean AdamW tokens_to_target / mean optimizer tokens_to_target (results.csv, reached seeds), the
    baseline being the AdamW LR with the lower mean final loss at fp32."""
    root, written, _ = rendered
    rows = raw_rows(tiny_study)
    cells = cells_of(rows)

    def mean_final_fp32(lab):
        v = [math.inf if x["diverged"] == "True" else float(x["final_val_loss"]) for x in cells[("fp32", lab)]]
        return float(np.mean(v))

    base = min(("adamw@0.01", "adamw@3"), key=mean_final_fp32)
    table = pd.read_csv(written["table:speedup"])
    assert set(table["optimizer"]) == {lab for _, lab in cells} - {base}
    for r in table.itertuples(index=False):
        b = [float(x["tokens_to_target"]) for x in cells[(r.precision, base)]]
        o = [float(x["tokens_to_target"]) for x in cells[(r.precision, r.optimizer)]]
        b, o = [v for v in b if math.isfinite(v)], [v for v in o if math.isfinite(v)]
        if not b:
            assert r.status == "baseline never reached target"
        elif not o:
            assert r.status == "not reached by optimizer" and math.isnan(r.speedup)
        else:
            assert r.speedup == pytest.approx(np.mean(b) / np.mean(o), rel=1e-9)
            assert r.status == ("ok" if len(o) == 2 and len(b) == 2 else "partial")


def test_divergences_and_explanations_carried_through(rendered, tiny_study):
    root, written, _ = rendered
    text = html.unescape(written["html"].read_text())
    for r in raw_rows(tiny_study):
        if r["diverged"] == "True":
            assert (f"{r['task']}: {label(r)} {r['precision']}, seed {r['seed']}, diverged at step "
                    f"{r['diverged_step']} ({r['divergence_reason']})") in text
        if r["explanation"]:
            assert r["explanation"] in text


def test_most_affected_sites_from_telemetry(rendered, tiny_study):
    """The site with the largest mean flushed fraction per main cell, from telemetry.csv read by pandas."""
    root, written, _ = rendered
    md = written["md"].read_text()
    rows = {r["run_id"]: r for r in raw_rows(tiny_study)}
    frames = []
    for rid, r in rows.items():
        p = tiny_study / "runs" / rid / "telemetry.csv"
        if p.is_file():
            frames.append(pd.read_csv(p).assign(cell=f"{r['precision']} | {label(r)}"))
    tel = pd.concat(frames)
    mean = tel.groupby(["cell", "site"])["flushed_frac"].mean().reset_index()
    checked = 0
    for cell, d in mean.groupby("cell"):
        best = d["flushed_frac"].max()
        if best > 0:
            shown = re.search(rf"\| gpt \| {re.escape(cell)} \| flushed_frac \| ([^|]+) \| ([^|]+) \|", md)
            assert shown, cell
            tied = set(d.loc[np.isclose(d["flushed_frac"], best, rtol=1e-12), "site"])
            assert shown.group(1).strip() in tied  # real site names (e.g. optim:exp_avg_sq), as written
            assert float(shown.group(2)) == pytest.approx(best, rel=1e-3)
            checked += 1
    assert checked > 0


def test_summary_counts_match_results_csv(rendered, tiny_study):
    _, _, summary = rendered
    rows = raw_rows(tiny_study)
    k = sum(r["diverged"] == "True" for r in rows)
    counts = [ln for ln in summary.splitlines() if " runs in " in ln]  # after the verdict lines (verdict first)
    assert len(counts) == 1 and counts[0].startswith(f"{len(rows)} runs in ") and f"({k} diverged)" in counts[0]
    for (prec, lab), runs in cells_of(rows).items():
        assert lab in summary
    line = next(l for l in summary.splitlines() if l.strip().startswith("fp8-all"))
    assert line.split()[1:] == ["0/2", "2/2", "0/2", "2/2"]  # adamw@0.01, adamw@3, stosignsgd@0.01, stosignsgd@3
    assert "report:" in summary


def test_markdown_references_relative_figures(rendered):
    root, written, _ = rendered
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", written["md"].read_text())
    assert links and all(l.startswith("figures/") and (root / l).is_file() for l in links)


def test_missing_or_foreign_results(tmp_path):
    with pytest.raises(FileNotFoundError, match="results.csv"):
        render_report(tmp_path)
    pd.DataFrame({"task": ["gpt"], "seed": [0]}).to_csv(tmp_path / "results.csv", index=False)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "results.csv")) + ".*missing"):
        render_report(tmp_path)


def test_header_only_results_renders(tiny_copy):
    text = (tiny_copy / "results.csv").read_text().splitlines()[0] + "\n"
    (tiny_copy / "results.csv").write_text(text)
    written = render_report(tiny_copy)
    assert written["html"].is_file() and not any(k.startswith("figure:") for k in written)
    assert summary_text(tiny_copy).startswith("0 runs")


def test_rounding_variant_labels():
    from studies.report import variant_labels

    base = "fp8-all,master=bf16{m},state=e4m3{s}:block128"
    precs = [base.format(m=m, s=s) for m in ("", ":stochastic") for s in ("", ":stochastic")]
    labels = variant_labels(precs)
    assert labels[precs[0]] == "master nearest, state nearest"
    assert labels[precs[3]] == "master stochastic, state stochastic"
    assert labels[precs[1]] == "master nearest, state stochastic"
    assert variant_labels(["fp32", "bf16"]) == {"fp32": "fp32", "bf16": "bf16"}
    assert variant_labels(["fp8-all", "fp8-all,master=bf16:stochastic"])["fp8-all"] == "master as in preset"
