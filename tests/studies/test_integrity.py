"""Integrity of a results folder: input limits before allocation, the dry run, one study per folder, data content
in run ids, damaged/duplicated rows named, and numbers independent of --workers.

Oracles: counts written out by hand from the grid; file lines counted from the text we wrote; numbers compared
between two independent executions (never against constants taken from the code)."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
import tracemalloc

import pandas as pd
import pytest

from studies import cli
from studies.config import RunSpec, StudyConfig
from studies.protocol import run_study


from tests.studies.clirun import run_cli as _run  # noqa: E402


def _convex(out, **kw) -> list[str]:
    argv = ["run", "--tasks", "convex-l1", "--size", "quick", "--optimizers", "signsgd,sgd", "--precisions", "fp32",
            "--seeds", "2", "--phases", "main", "--steps", "4", "--workers", "1", "--out", str(out), "--no-report"]
    for k, v in kw.items():
        argv += [f"--{k}", str(v)]
    return argv


# ------------------------------------------------------------------------------------------- input guards
def test_a_huge_seed_count_is_refused_before_any_list_is_built(capsys):
    tracemalloc.start()
    t0 = time.perf_counter()
    code, _, err = _run(capsys, "run", "--seeds", "1000000000")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert code == 2 and err.count("\n") == 1 and "seeds" in err and "10000" in err
    assert peak < 50 * 2**20 and time.perf_counter() - t0 < 5      # a list of 1e9 ints would be ~ 36 GB


@pytest.mark.parametrize("flag, value, must_name", [
    ("--steps", str(10**12), "steps"), ("--tokens", str(10**15), "tokens"), ("--threads", "4096", "threads")])
def test_budgets_above_the_limits_exit_2_with_one_line(capsys, flag, value, must_name):
    code, _, err = _run(capsys, "run", "--quick", flag, value)
    assert code == 2 and err.count("\n") == 1 and must_name in err


@pytest.mark.skipif((os.cpu_count() or 1) >= 64, reason="needs fewer than 64 cores")
def test_more_local_workers_than_cores_exit_2(capsys):
    code, _, err = _run(capsys, "run", "--quick", "--workers", "64")
    assert code == 2 and err.count("\n") == 1 and "cores" in err


def test_dry_run_counts_every_phase_and_times_it(tmp_path, capsys):
    out = tmp_path / "dry"
    code, stdout, err = _run(capsys, "run", "--tasks", "convex-l1", "--size", "quick", "--optimizers", "signsgd,sgd",
                             "--precisions", "fp32,bf16", "--seeds", "3", "--phases", "tune,main",
                             "--lrs", "1e-3,3e-3,1e-2", "--steps", "5", "--workers", "1", "--out", str(out),
                             "--dry-run")
    assert code == 0, err
    # by hand: tune = 3 optimizers (the two + the target optimizer adamw) x 3 LRs x 1 tune seed at fp32;
    # main = 2 optimizers x 2 precisions x 3 seeds
    assert "tune       9 runs" in stdout and "main       12 runs" in stdout
    assert "up to 3 more runs" in stdout          # 1 extension round x 3 grids x 1 seed
    assert "ETA ~" in stdout
    assert not out.exists()                      # nothing was run or written


# ------------------------------------------------------------------------------------------- one folder, one study
def test_a_different_study_into_the_same_folder_is_refused_unless_appended(tmp_path, capsys):
    out = tmp_path / "one"
    assert _run(capsys, *_convex(out))[0] == 0
    code, _, err = _run(capsys, *_convex(out, size="default"))
    assert code == 2 and err.count("\n") == 1
    assert "different study" in err and "size" in err and "--append" in err
    assert len(pd.read_csv(out / "results.csv")) == 4                    # nothing was added
    # the same study resumes (a shard, more workers or another phase subset are the same study)
    code, stdout, _ = _run(capsys, *_convex(out))
    assert code == 0 and "4 already done" in stdout
    code, _, err = _run(capsys, *_convex(out, size="default"), "--append")
    assert code == 0, err
    res = pd.read_csv(out / "results.csv")
    assert len(res) == 8 and res["run_id"].is_unique
    code, stdout, _ = _run(capsys, *_convex(out))                       # the first study is still accepted
    assert code == 0 and "4 already done" in stdout


def test_changing_the_data_file_changes_the_run_ids(tmp_path, capsys):
    data = tmp_path / "corpus.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    out = tmp_path / "d"
    argv = ["run", "--data", str(data), "--size", "quick", "--optimizers", "adamw", "--precisions", "fp32",
            "--seeds", "1", "--phases", "main", "--steps", "2", "--workers", "1", "--out", str(out), "--no-report"]
    assert _run(capsys, *argv)[0] == 0
    first = set(pd.read_csv(out / "results.csv")["run_id"])
    data.write_text("pack my box with five dozen liquor jugs! " * 400)      # same path, new content
    code, _, err = _run(capsys, *argv)
    assert code == 2 and "data content" in err                             # a different study now
    code, stdout, err = _run(capsys, *argv, "--append")
    assert code == 0, err
    assert "already done" in stdout and "0 already done" in stdout           # not reused as stale
    res = pd.read_csv(out / "results.csv")
    assert len(res) == 2 and set(res["run_id"]) > first


def test_the_data_hash_enters_the_run_id_only_when_there_is_data():
    base = dict(task="gpt", optimizer="adamw", precision="fp32", lr=1e-3, seed=0)
    plain = RunSpec(**base)
    assert "data_sha256" not in plain.config_json                          # old run ids unchanged
    a = RunSpec(**base, data="x.txt", data_sha256="a" * 64)
    b = RunSpec(**base, data="x.txt", data_sha256="b" * 64)
    assert a.run_id != b.run_id and a.run_id != plain.run_id


# ------------------------------------------------------------------------------------------- damaged rows
def _lines(path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def test_a_duplicated_row_is_named_on_report_and_never_counted_twice_on_run(tmp_path, capsys):
    out = tmp_path / "dup"
    assert _run(capsys, *_convex(out))[0] == 0
    path = out / "results.csv"
    lines = _lines(path)
    path.write_text("".join(lines + [lines[2]]))                 # the row of line 3 again, as line 6
    code, _, err = _run(capsys, "report", str(out))
    assert code == 2 and err.count("\n") == 1 and "results.csv line 6" in err and "line 3" in err
    code, stdout, err = _run(capsys, *_convex(out))
    assert code == 0 and "4 already done" in stdout and "line 6" in err
    rows = list(csv.DictReader(open(path)))
    assert len(rows) == 4 and len({r["run_id"] for r in rows}) == 4


def test_a_truncated_last_row_is_named_and_rebuilt_from_its_record(tmp_path, capsys):
    out = tmp_path / "trunc"
    assert _run(capsys, *_convex(out))[0] == 0
    path = out / "results.csv"
    text = path.read_text()
    full = pd.read_csv(path)
    assert (full["status"] == "ok").all()
    path.write_text(text[: text.rindex(",ok,") + 1])           # cut inside the last row's status cell
    code, _, err = _run(capsys, "report", str(out))
    assert code == 2 and err.count("\n") == 1 and f"{path} line 5" in err
    code, stdout, err = _run(capsys, *_convex(out))
    assert code == 0 and "4 already done" in stdout and "line 5" in err and "rebuilt" in err
    again = pd.read_csv(path)
    pd.testing.assert_frame_equal(again.drop(columns="wall_s"), full.drop(columns="wall_s"))


def test_a_damaged_row_without_a_record_is_refused_with_file_and_line(tmp_path, capsys):
    out = tmp_path / "legacy"
    assert _run(capsys, *_convex(out))[0] == 0
    path = out / "results.csv"
    last = pd.read_csv(path)["run_id"].iloc[-1]
    (out / "runs" / last / "result.json").unlink()               # as in a folder written before records
    text = path.read_text()
    path.write_text(text[: text.rindex(",ok,") + 1])
    code, _, err = _run(capsys, *_convex(out))
    assert code == 2 and err.count("\n") == 1 and f"{path} line 5" in err and "no record" in err


# ------------------------------------------------------------------------------------------- --workers
def test_workers_1_and_2_give_identical_numbers(tmp_path):
    """The tiny GPT's matmuls are where a thread count changes summation order; each run uses --threads (1)."""
    res = {}
    for w in (1, 2):
        out = tmp_path / f"w{w}"
        cfg = StudyConfig(tasks=["gpt"], size="quick", optimizers=["adamw", "stosignsgd"], precisions=["fp32"],
                          seeds=[0], phases=["main"], steps=4, workers=w, out=str(out), report=False).validate()
        run_study(cfg, progress=False)
        res[w] = pd.read_csv(out / "results.csv").drop(columns="wall_s")
        assert (res[w]["status"] == "ok").all()
    pd.testing.assert_frame_equal(res[1], res[2])
    for rid in res[1]["run_id"]:
        a = (tmp_path / "w1" / "runs" / rid / "metrics.csv").read_bytes()
        assert a == (tmp_path / "w2" / "runs" / rid / "metrics.csv").read_bytes()


def test_the_thread_count_is_recorded_per_run(tmp_path):
    import json

    out = tmp_path / "t"
    cfg = StudyConfig(tasks=["convex-l1"], size="quick", optimizers=["sgd"], precisions=["fp32"], seeds=[0],
                      phases=["main"], steps=2, workers=1, out=str(out), report=False).validate()
    study = run_study(cfg, progress=False, threads=2)
    assert study["fingerprint"]["torch_threads"] == 2
    rid = pd.read_csv(out / "results.csv")["run_id"].iloc[0]
    assert json.loads((out / "runs" / rid / "result.json").read_text())["torch_threads"] == 2


def test_subprocess_refusal_is_one_line():
    p = subprocess.run([sys.executable, "-m", "studies.cli", "run", "--seeds", "1000000000"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr


def test_an_unreadable_metrics_file_is_named(tmp_path):
    out = tmp_path / "m"
    cfg = StudyConfig(tasks=["convex-l1"], size="quick", optimizers=["sgd"], target_optimizer="sgd",
                      precisions=["fp32"], seeds=[0, 1], phases=["main"], steps=3, workers=1, out=str(out),
                      report=False).validate()
    run_study(cfg, progress=False)
    rid = pd.read_csv(out / "results.csv")["run_id"].iloc[0]
    path = out / "runs" / rid / "metrics.csv"
    path.write_bytes(b"\x00\xff garbage without the columns\n")
    with pytest.raises(ValueError, match=str(path)):       # filling the targets reads every metrics.csv
        run_study(cfg, progress=False)


def test_quick_then_default_into_one_folder_is_refused(tmp_path, capsys):
    """The issue's case: `--quick` and the default study both wrote ./precision-sweep-results and got pooled."""
    out = tmp_path / "precision-sweep-results"
    assert _run(capsys, "run", "--quick", "--steps", "2", "--out", str(out), "--no-report")[0] == 0
    t0 = time.perf_counter()
    code, _, err = _run(capsys, "run", "--steps", "2", "--out", str(out), "--no-report")
    assert code == 2 and err.count("\n") == 1 and "different study" in err
    assert "size" in err and "optimizers" in err and "seeds" in err
    assert time.perf_counter() - t0 < 30                                     # refused before any run
    assert len(pd.read_csv(out / "results.csv")) == 4
