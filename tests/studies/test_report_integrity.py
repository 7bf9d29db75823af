"""Damaged, duplicated, failed and mixed results in a real tiny study's folder (tests/studies/conftest.py): each
is named (file, line) or kept apart, never rendered or counted twice. The expected numbers come from the csv
module's reading of the same file."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from studies.report import prepare, render_report, summary_text


def lines_of(folder: Path) -> list[str]:
    return (folder / "results.csv").read_text(encoding="utf-8").splitlines(keepends=True)


def cell_n(folder: Path, precision: str, optimizer: str) -> int:
    data = prepare(folder)
    m = data.main
    return int(((m["precision"] == precision) & (m["optimizer"] == optimizer)).sum())


def test_duplicate_row_is_named_and_counted_once(tiny_copy):
    lines = lines_of(tiny_copy)
    (tiny_copy / "results.csv").write_text("".join(lines + [lines[1]]), encoding="utf-8")
    first = next(csv.DictReader(lines[:2]))
    data = prepare(tiny_copy)
    assert len(data.results) == len(lines) - 1  # 16 runs, not 17
    path = tiny_copy / "results.csv"
    assert data.problems == [f"{path} line {len(lines) + 1}: run {first['run_id']} repeats line 2 (left out; the "
                             f"run is counted once, from line 2)"]
    label = f"{first['optimizer']}@{float(first['lr']):g}"
    assert cell_n(tiny_copy, first["precision"], label) == 2
    summary = summary_text(tiny_copy)
    assert "1 problem(s)" in summary and f"line {len(lines) + 1}" in summary


def test_conflicting_duplicate_is_named(tiny_copy):
    lines = lines_of(tiny_copy)
    row = next(csv.DictReader(lines[:3][:1] + lines[2:3]))
    row["final_loss"] = "123.0"
    with open(tiny_copy / "results.csv", "a", newline="", encoding="utf-8") as f:
        csv.DictWriter(f, fieldnames=list(row)).writerow(row)
    data = prepare(tiny_copy)
    assert len(data.problems) == 1 and "conflicts with line 3" in data.problems[0]
    assert 123.0 not in set(data.results["final_loss"])


def test_truncated_last_row_is_named_not_rendered(tiny_copy):
    lines = lines_of(tiny_copy)
    cut = lines[-1][: len(lines[-1]) // 3]  # a write cut short: fewer cells, no status
    (tiny_copy / "results.csv").write_text("".join(lines[:-1]) + cut, encoding="utf-8")
    gone = next(csv.DictReader(lines[:1] + lines[-1:]))["run_id"]
    written = render_report(tiny_copy)
    text = written["html"].read_text()
    assert "Data problems" in text and f"results.csv line {len(lines)}" in text
    data = prepare(tiny_copy)
    assert gone not in set(data.results["run_id"]) and len(data.results) == len(lines) - 2


def test_row_with_invalid_cell_is_named(tiny_copy):
    lines = lines_of(tiny_copy)
    rows = list(csv.DictReader(lines))
    rows[3]["diverged"] = "maybe"
    with open(tiny_copy / "results.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    data = prepare(tiny_copy)
    assert len(data.problems) == 1 and "line 5" in data.problems[0] and "diverged" in data.problems[0]
    assert len(data.results) == len(rows) - 1


def test_unreadable_metrics_named_and_left_out(tiny_copy):
    rid = next(csv.DictReader(lines_of(tiny_copy)))["run_id"]
    path = tiny_copy / "runs" / rid / "metrics.csv"
    path.write_text("step,oops\n1,2\n")
    data = prepare(tiny_copy)
    assert len(data.problems) == 1 and str(path) in data.problems[0]
    assert rid not in set(data.metrics["run_id"])
    assert rid in set(data.results["run_id"])  # the run itself still counts (its row is fine)


def test_runs_of_another_setup_are_not_pooled(tiny_copy):
    """The same grid at another step count (new run ids) appended: two tasks "gpt [steps=...]" of 2 seeds each."""
    lines = lines_of(tiny_copy)
    rows = list(csv.DictReader(lines))
    extra = []
    for r in rows:
        cfg = json.loads(r["config_json"])
        cfg["steps"] = 48
        extra.append({**r, "run_id": "x" + r["run_id"][1:], "steps": "48", "config_json": json.dumps(cfg)})
    with open(tiny_copy / "results.csv", "a", newline="", encoding="utf-8") as f:
        csv.DictWriter(f, fieldnames=list(rows[0])).writerows(extra)
    data = prepare(tiny_copy)
    assert set(data.main["task"]) == {"gpt [steps=24]", "gpt [steps=48]"}
    sizes = data.main.groupby(["task", "precision", "optimizer"]).size()
    assert len(sizes) == 16 and set(sizes) == {2}
    assert any("2 setups (differing in steps)" in n for n in data.caveats)
    assert "[gpt [steps=48]]" in summary_text(tiny_copy)


def test_failed_runs_are_listed_and_counted_nowhere(tiny_copy):
    rows = list(csv.DictReader(lines_of(tiny_copy)))
    rows[0].update(status="error", explanation="the run failed (boom)")
    with open(tiny_copy / "results.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    label = f"{rows[0]['optimizer']}@{float(rows[0]['lr']):g}"
    assert cell_n(tiny_copy, rows[0]["precision"], label) == 1
    text = render_report(tiny_copy)["html"].read_text()
    assert "Failed runs" in text and "boom" in text
    assert "1 failed" in summary_text(tiny_copy)


def test_null_target_gives_no_speedup_and_says_why(tiny_copy):
    study = json.loads((tiny_copy / "study.json").read_text())
    study["targets"]["gpt"]["target_loss"] = None
    (tiny_copy / "study.json").write_text(json.dumps(study))
    data = prepare(tiny_copy)
    assert data.targets == {} and data.speed.empty
    assert any("records no finite target loss" in c for c in data.caveats)


def test_tokens_to_target_is_the_written_column(tiny_copy):
    """The report uses results.csv's tokens_to_target (no recomputation); a row recorded for another target loss
    is not counted, and the report says so."""
    rows = list(csv.DictReader(lines_of(tiny_copy)))
    ok = [i for i, r in enumerate(rows) if math.isfinite(float(r["tokens_to_target"]))]
    rows[ok[0]]["tokens_to_target"] = "1234.5"
    rows[ok[1]]["target_loss"] = repr(float(rows[ok[1]]["target_loss"]) + 0.5)
    with open(tiny_copy / "results.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    data = prepare(tiny_copy)
    ttt = dict(zip(data.results["run_id"], data.results["ttt"]))
    assert ttt[rows[ok[0]]["run_id"]] == 1234.5
    assert math.isnan(ttt[rows[ok[1]]["run_id"]])
    assert any("1 run(s) recorded tokens-to-target for another target loss" in c for c in data.caveats)


def test_undecodable_results_csv_names_the_file(tiny_copy):
    path = tiny_copy / "results.csv"
    path.write_bytes(path.read_bytes() + b"\xff\xfe garbage\n")
    with pytest.raises(ValueError, match=f"{path} is not a readable results.csv"):
        prepare(tiny_copy)


def test_nul_bytes_row_is_named(tiny_copy):
    path = tiny_copy / "results.csv"
    n = len(lines_of(tiny_copy))
    path.write_bytes(path.read_bytes() + b"\x00\x00\n")
    data = prepare(tiny_copy)
    assert len(data.problems) == 1 and f"{path} line {n + 1}" in data.problems[0]
    assert len(data.results) == n - 1


def test_seeds_per_cell_counted_not_assumed(tiny_copy):
    """The header's "per cell" is the counted number of runs per cell (a missing seed shows as 1–2)."""
    lines = lines_of(tiny_copy)
    (tiny_copy / "results.csv").write_text("".join(lines[:-1]), encoding="utf-8")
    md = render_report(tiny_copy)["md"].read_text()
    assert "Seeds: 0, 1 (1–2 per cell)" in md


def test_data_parallel_columns_are_read_and_a_row_short_of_them_is_named(tiny_copy):
    """results.csv of a study with data-parallel runs has studies.schema.EXTRA_RESULT_TYPES columns after the core
    ones; the report reads it, and a row cut short inside those columns is still named as truncated."""
    from studies.schema import EXTRA_RESULT_TYPES

    rows = list(csv.DictReader(lines_of(tiny_copy)))
    extra = {"world_size": "2", "comm": "fp32", "comm_bytes_sent": "10", "comm_allreduce_bytes": "10",
             "comm_ratio": "1.0", "replicas_identical": "True"}
    assert set(extra) == set(EXTRA_RESULT_TYPES)
    with open(tiny_copy / "results.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=[*rows[0], *extra])
        w.writeheader()
        w.writerows({**r, **extra} for r in rows)
    path = tiny_copy / "results.csv"
    assert prepare(tiny_copy).problems == [] and len(prepare(tiny_copy).results) == len(rows)
    text = path.read_text(encoding="utf-8")
    path.write_text(text.rstrip("\n").rsplit(",", 2)[0] + "\n", encoding="utf-8")  # last 2 cells lost
    data = prepare(tiny_copy)
    assert len(data.problems) == 1 and f"{path} line {len(rows) + 1}" in data.problems[0]
    assert "truncated" in data.problems[0] and len(data.results) == len(rows) - 1
