"""The tune, ablation, rounding and mechanism sections of the report of a real tiny study (``phases_study`` in
tests/studies/conftest.py), checked against the csv module's reading of results.csv and json's of study.json."""
from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from studies.report import render_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report(phases_study, tmp_path_factory):
    root = tmp_path_factory.mktemp("phases_report") / "r"
    shutil.copytree(phases_study, root)
    written = render_report(root)
    rows = list(csv.DictReader(open(root / "results.csv", newline="", encoding="utf-8")))
    return root, written, rows, json.loads((root / "study.json").read_text())


def test_phase_figures_written(report):
    root, written, _, _ = report
    figures = {k.split(":", 1)[1]: p for k, p in written.items() if k.startswith("figure:")}
    assert {"ablation_stability_gpt", "ablation_gpt", "rounding_gpt", "mechanism"} <= set(figures)
    assert all(Path(p).read_bytes()[:8] == PNG_MAGIC for p in figures.values())


def test_phase_sections_present_with_data(report):
    _, written, _, _ = report
    md = written["md"].read_text()
    for heading in ("## Learning-rate tuning", "# Ablation of StoSignSGD", "# Nearest vs stochastic rounding",
                    "# Mechanism: SignSGD vs StoSignSGD"):
        assert heading in md, heading
    assert "-phase runs in this study: section omitted" not in md


def test_tune_table_counts_each_lr_apart(report):
    _, written, rows, study = report
    md = written["md"].read_text()
    tune = Counter((r["optimizer"], float(r["lr"])) for r in rows if r["phase"] == "tune")
    # 2 optimizers and the ablation variant (tuned by the same rule) x 2 LRs x tune seed 0
    assert len(tune) == 6 and set(tune.values()) == {1}
    for (opt, lr), n in tune.items():
        k = sum(r["diverged"] == "True" for r in rows if r["phase"] == "tune" and r["optimizer"] == opt
                and float(r["lr"]) == lr)
        assert f"| gpt | fp32 | {opt} | {lr:.4g} | {k}/{n} |" in md
    for opt, lr in study["chosen_lrs"]["gpt"]["fp32"].items():
        grid = ", ".join(f"{v:.4g}" for v in study["lr_grid"]["gpt"][opt])
        assert f"| gpt | {opt} | {grid} |" in md and f"| {lr:.4g}" in md


def test_rounding_variants_labelled_and_counted(report):
    _, written, rows, _ = report
    cells = {}
    for r in rows:
        if r["phase"] == "rounding":
            cells.setdefault(r["precision"], []).append(r)
    assert len(cells) == 4
    md = written["md"].read_text()
    for label in ("master nearest, state nearest", "master nearest, state stochastic",
                  "master stochastic, state nearest", "master stochastic, state stochastic"):
        assert f"| gpt | {label} |" in md
    for prec, runs in cells.items():
        assert f"| {prec} | stosignsgd | {float(runs[0]['lr']):.4g} | {len(runs)} |" in md


def test_ablation_cells_counted_per_variant(report):
    _, written, rows, _ = report
    md = written["md"].read_text()
    abl = Counter(r["optimizer"] for r in rows if r["phase"] == "ablation")
    assert set(abl) == {"stosignsgd", "stosign-nonoise"}
    for opt, n in abl.items():
        k = sum(r["diverged"] == "True" for r in rows if r["phase"] == "ablation" and r["optimizer"] == opt)
        assert f"| {opt} | " in md and f"| {n} | {k}/{n} |" in md


def test_mechanism_uses_the_recorded_optimum(report):
    _, written, rows, study = report
    assert "convex-l1" in study["optimal_loss"]
    md = written["md"].read_text()
    assert "Loss minus the known optimum" in md and "Optimal loss unknown" not in md
    mech = pd.DataFrame([r for r in rows if r["phase"] == "mechanism"])
    assert set(mech["task"]) == {"convex-l1"} and len(mech) == 4
