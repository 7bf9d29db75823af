"""`precision-sweep merge OUT DIR...`: shard folders combine into the unsharded study (each run once), conflicting
duplicates and different studies are refused, and a sharded study with a tune phase completes after a merge.

Oracle: the same study run unsharded into one folder (deterministic runs: every number must match, wall time
aside)."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from studies import cli
from studies.config import StudyConfig
from studies.protocol import PhaseIncomplete, merge_study, run_study


from tests.studies.clirun import run_cli as _run  # noqa: E402


def _cfg(out, phases=("main",), **kw) -> StudyConfig:
    base = dict(tasks=["convex-l1"], size="quick", optimizers=["signsgd", "sgd"], target_optimizer="sgd",
                precisions=["fp32", "bf16"], seeds=[0, 1], phases=list(phases), steps=6, workers=1, out=str(out),
                report=False, schedule="constant", tune_max_extensions=1)
    base.update(kw)
    return StudyConfig(**base).validate()


def _table(out) -> pd.DataFrame:
    return pd.read_csv(out / "results.csv").drop(columns="wall_s")


def test_shards_merged_equal_the_unsharded_study(tmp_path, capsys):
    ref = tmp_path / "ref"
    run_study(_cfg(ref), progress=False)
    for k in (0, 1):
        run_study(_cfg(tmp_path / f"s{k}"), shard_kn=(k, 2), progress=False)
    n0, n1 = (len(pd.read_csv(tmp_path / f"s{k}" / "results.csv")) for k in (0, 1))
    assert n0 + n1 == 8 and min(n0, n1) > 0
    code, stdout, err = _run(capsys, "merge", str(tmp_path / "m"), str(tmp_path / "s0"), str(tmp_path / "s1"))
    assert code == 0, err
    assert "8 runs" in stdout
    pd.testing.assert_frame_equal(_table(tmp_path / "m"), _table(ref))
    for rid in _table(ref)["run_id"]:
        assert ((tmp_path / "m" / "runs" / rid / "metrics.csv").read_bytes()
                == (ref / "runs" / rid / "metrics.csv").read_bytes())
    # merging a folder twice (or overlapping shards) drops the duplicates instead of counting them twice
    c = merge_study(tmp_path / "m2", [tmp_path / "s0", tmp_path / "s1", tmp_path / "s0"])
    assert c["runs"] == 8 and c["duplicates"] == n0
    pd.testing.assert_frame_equal(_table(tmp_path / "m2"), _table(ref))
    # the merged folder is the study: a rerun of it finds everything done
    again = run_study(_cfg(tmp_path / "m"), progress=False)
    assert again["counts"]["main"]["done"] == 0 and again["counts"]["main"]["skipped"] == 8


def test_conflicting_duplicates_are_refused_naming_the_run_and_folders(tmp_path):
    for k in (0, 1):
        run_study(_cfg(tmp_path / f"s{k}"), progress=False)                # both hold every run
    rid = pd.read_csv(tmp_path / "s1" / "results.csv")["run_id"].iloc[0]
    rec = tmp_path / "s1" / "runs" / rid / "result.json"
    data = json.loads(rec.read_text())
    data["row"]["final_loss"] = repr(float(data["row"]["final_loss"]) + 1.0)
    rec.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"run {rid} differs between .*s0 and .*s1 \(final_loss"):
        merge_study(tmp_path / "m", [tmp_path / "s0", tmp_path / "s1"])


def test_different_studies_are_refused(tmp_path, capsys):
    run_study(_cfg(tmp_path / "a"), progress=False)
    run_study(_cfg(tmp_path / "b", seeds=[5]), progress=False)
    code, _, err = _run(capsys, "merge", str(tmp_path / "m"), str(tmp_path / "a"), str(tmp_path / "b"))
    assert code == 2 and err.count("\n") == 1 and "different study" in err and "seeds" in err


def test_a_sharded_study_with_a_tune_phase_completes_after_merge(tmp_path):
    phases = ("tune", "main")
    lrs = [0.01, 0.03]
    ref = tmp_path / "ref"
    ref_study = run_study(_cfg(ref, phases, lrs=lrs), progress=False)
    assert ref_study["status"] == "complete"
    for k in (0, 1):
        with pytest.raises(PhaseIncomplete, match="merge"):
            run_study(_cfg(tmp_path / f"s{k}", phases, lrs=lrs), shard_kn=(k, 2), progress=False)
    merged = tmp_path / "m"
    merge_study(merged, [tmp_path / "s0", tmp_path / "s1"])
    study = run_study(_cfg(merged, phases, lrs=lrs), progress=False)   # extension round + main run here
    assert study["status"] == "complete"
    assert study["chosen_lrs"] == ref_study["chosen_lrs"] and study["lr_tried"] == ref_study["lr_tried"]
    pd.testing.assert_frame_equal(_table(merged), _table(ref))


def test_shards_sharing_a_folder_with_wait_each_finish_the_tuned_study(tmp_path):
    """A plain job array: two shard processes at once into one --out; each waits for the other's tune runs."""
    import subprocess
    import sys

    shared, ref = tmp_path / "shared", tmp_path / "ref"
    argv = [sys.executable, "-m", "studies.cli", "run", "--tasks", "convex-l1", "--size", "quick", "--optimizers",
            "sgd", "--precisions", "fp32,bf16", "--seeds", "2", "--phases", "tune,main", "--lrs", "0.01,0.03",
            "--steps", "6", "--workers", "1", "--no-report"]
    procs = [subprocess.Popen([*argv, "--out", str(shared), "--shard", f"{k}/2", "--wait", "2"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert subprocess.run([*argv, "--out", str(ref)], capture_output=True, timeout=300).returncode == 0
    study, ref_study = (json.loads((d / "study.json").read_text()) for d in (shared, ref))
    assert study["status"] == "complete" and study["chosen_lrs"] == ref_study["chosen_lrs"]
    assert study["targets"] == ref_study["targets"]
    pd.testing.assert_frame_equal(_table(shared), _table(ref))
