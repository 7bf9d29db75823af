"""precision-sweep command line: parsing, layering of settings, and one-line errors with exit status 2."""
from __future__ import annotations

import subprocess
import sys

import pytest

from studies import cli
from studies.config import (StudyConfig, apply_overrides, load_toml, paper_config_path, parse_precisions,
                            parse_seeds, parse_shard)


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as e:  # argparse errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv, must_name", [
    (["run", "--optimizers", "adamw,nosuchopt"], "stosignsgd"),
    (["run", "--tasks", "nosuchtask"], "gpt"),
    (["run", "--precisions", "fp32,fp9"], "fp8-all"),
    (["run", "--phases", "main,warmup"], "ablation"),
    (["run", "--seeds", "two"], "seeds"),
    (["run", "--seeds", "0"], "seeds"),
    (["run", "--steps", "0"], "positive integer"),
    (["run", "--lrs", "1e-3,abc"], "lrs"),
    (["run", "--shard", "3/2"], "K/N"),
    (["run", "--shard", "x"], "K/N"),
    (["run", "--workers", "-1"], "positive integer"),
    (["run", "--steps", "10", "--tokens", "100"], "not allowed with"),
    (["run", "--size", "huge"], "paper"),
    (["run", "--config", "/nonexistent/study.toml"], "not found"),
    (["report", "/nonexistent/folder"], "results.csv"),
    (["run", "--executor", "ray"], "submitit"),
    (["run", "--threads", "0"], "positive integer"),
    (["merge", "/nonexistent/out", "/nonexistent/shard"], "not a results folder"),
    (["export", "/nonexistent/folder"], "--tensorboard"),
    (["frobnicate"], "run"),
])
def test_bad_input_exits_2_with_one_line(capsys, argv, must_name):
    code, out, err = _run(capsys, *argv)
    assert code == 2, (argv, out, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert must_name in lines[0], lines[0]
    assert "Traceback" not in err


def test_bad_toml_keys_and_values_exit_2(tmp_path, capsys):
    f = tmp_path / "s.toml"
    f.write_text('optimizers = ["adamw"]\nnot_a_setting = 3\n')
    code, _, err = _run(capsys, "run", "--config", str(f))
    assert code == 2 and "not_a_setting" in err and "optimizers" in err and len(err.strip().splitlines()) == 1
    f.write_text('steps = "many"\n')
    code, _, err = _run(capsys, "run", "--config", str(f))
    assert code == 2 and "steps" in err
    f.write_text('steps = [\n')
    code, _, err = _run(capsys, "run", "--config", str(f))
    assert code == 2 and "TOML" in err


def test_subprocess_errors_have_no_traceback():
    for argv in (["run", "--optimizers", "bogus"], ["run", "--seeds", "x"]):
        p = subprocess.run([sys.executable, "-m", "studies.cli", *argv], capture_output=True, text=True,
                           timeout=120)
        assert p.returncode == 2, p.stderr
        assert "Traceback" not in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_list_names_tasks_optimizers_presets_formats(capsys):
    code, out, _ = _run(capsys, "list")
    assert code == 0
    for name in ("gpt", "moe", "convex-l1", "adamw", "stosignsgd", "stosign-adamw", "fp8-all", "nvfp4", "e4m3"):
        assert name in out, name


def test_seed_and_shard_and_precision_parsing():
    assert parse_seeds("3") == [0, 1, 2]
    assert parse_seeds(2) == [0, 1]
    assert parse_seeds("0,5,7") == [0, 5, 7]
    assert parse_seeds("7,") == [7]
    assert parse_seeds([4, 1]) == [4, 1]
    assert parse_shard("1/4") == (1, 4)
    assert parse_precisions("fp32,fp8-all") == ["fp32", "fp8-all"]
    assert parse_precisions("fp32;weight=e4m3,grad=e5m2") == ["fp32", "weight=e4m3,grad=e5m2"]
    with pytest.raises(ValueError, match="seeds"):
        parse_seeds(True)


def test_settings_layer_defaults_then_file_then_flags(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text('seeds = 3\nsteps = 50\n[thresholds]\nspike_factor = 5.0\n')
    args = cli.build_parser().parse_args(["run", "--quick", "--config", str(f), "--seeds", "0,4", "--workers", "1"])
    cfg = cli.config_from_args(args)
    assert cfg.size == "quick" and cfg.optimizers == ["adamw", "stosignsgd"]   # from --quick
    assert cfg.steps == 50 and cfg.thresholds.spike_factor == 5.0                # from the file
    assert cfg.seeds == [0, 4] and cfg.workers == 1                              # flags win
    args = cli.build_parser().parse_args(["run", "--config", str(f), "--tokens", "1000"])
    cfg = cli.config_from_args(args)
    assert cfg.tokens == 1000 and cfg.steps is None


def test_data_flag_selects_the_text_task(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text("hello world, this is a small corpus. " * 400)
    args = cli.build_parser().parse_args(["run", "--data", str(f), "--quick"])
    cfg = cli.config_from_args(args)
    assert cfg.tasks == ["text"] and cfg.data == str(f) and "mechanism" not in cfg.phases


def test_paper_toml_is_a_valid_full_size_study():
    data = load_toml(paper_config_path())
    cfg = apply_overrides(StudyConfig(), data).validate()
    assert cfg.size == "paper" and len(cfg.seeds) >= 3
    assert {"adamw", "signum", "stosignsgd"} <= set(cfg.optimizers)
    assert {"fp32", "bf16", "fp8-hybrid", "fp8-states", "fp8-all"} <= set(cfg.precisions)


# ------------------------------------------------------------------------------------------- end to end
def _read(path):
    import pandas as pd

    return pd.read_csv(path)


def test_quick_end_to_end_with_report(tmp_path, capsys):
    out = tmp_path / "q"
    code, stdout, err = _run(capsys, "run", "--quick", "--out", str(out))
    assert code == 0, err
    res = _read(out / "results.csv")
    assert len(res) == 4 and set(res["optimizer"]) == {"adamw", "stosignsgd"}
    assert set(res["precision"]) == {"fp32", "fp8-all"} and (res["status"] != "error").all()
    assert res["run_id"].is_unique
    for rid in res["run_id"]:
        assert (out / "runs" / rid / "metrics.csv").is_file()
    # no tune phase: the target is the fp32 AdamW run's final validation loss x 1.02, reached by that run
    base = res[(res["optimizer"] == "adamw") & (res["precision"] == "fp32")].iloc[0]
    assert res["target_loss"].iloc[0] == pytest.approx(base["final_val_loss"] * 1.02)
    assert base["tokens_to_target"] <= base["tokens"]
    for f in ("report.html", "report.md", "study.json"):
        assert (out / f).is_file(), f
    assert any((out / "figures").glob("*.png"))
    assert "report" in stdout and "report.html" in stdout
    # rerun: everything is skipped, nothing duplicated
    code, stdout, _ = _run(capsys, "run", "--quick", "--out", str(out), "--no-report")
    assert code == 0 and "0 runs" in stdout and "4 already done" in stdout
    assert len(_read(out / "results.csv")) == 4


def test_full_protocol_small(tmp_path, capsys):
    """tune -> chosen LRs and target -> main, ablation, rounding, mechanism, on a tiny budget."""
    import json

    out = tmp_path / "p"
    toml = tmp_path / "small.toml"
    toml.write_text('''
        ablation_optimizers = ["stosignsgd", "stosign-nonoise", "stosign-adamw"]
        rounding_optimizers = ["stosignsgd"]
        failure_precisions = ["state=e4m3"]
        failure_optimizers = ["adamw"]
        failure_seeds = [0, 1]
        mechanism_tasks = ["convex-l1"]
        mechanism_optimizers = ["signsgd", "signum", "stosignsgd"]
        mechanism_seeds = [0]
        mechanism_steps = 40
        eval_every = 3
    '''.replace("        ", ""))
    code, _, err = _run(capsys, "run", "--config", str(toml), "--tasks", "gpt", "--size", "quick",
                        "--optimizers", "adamw,stosignsgd", "--precisions", "fp32,fp8-all", "--seeds", "1",
                        "--steps", "6", "--lrs", "1e-3,3e-3", "--workers", "1", "--out", str(out), "--no-report")
    assert code == 0, err
    res = _read(out / "results.csv")
    study = json.loads((out / "study.json").read_text())
    assert res["run_id"].is_unique and (res["status"] != "error").all()
    assert set(res["phase"]) == {"tune", "main", "ablation", "rounding", "failure", "mechanism"}
    tune = res[res["phase"] == "tune"]
    # every ablation variant is tuned by the same rule as the main optimizers (2-point grid + 1 extension each)
    assert set(tune["optimizer"]) == {"adamw", "stosignsgd", "stosign-nonoise", "stosign-adamw"}
    assert len(tune) == 12 and set(tune["precision"]) == {"fp32"}
    for opt in ("adamw", "stosignsgd", "stosign-nonoise", "stosign-adamw"):  # a 2-point grid's best is at an edge: one LR outward (default limit 1)
        assert sorted(set(tune.loc[tune["optimizer"] == opt, "lr"])) in ([3.3e-4, 1e-3, 3e-3], [1e-3, 3e-3, 9e-3])
    # chosen LR = lowest mean final validation loss over the tune seeds (independent recomputation)
    for opt in ("adamw", "stosignsgd"):
        t = tune[tune["optimizer"] == opt]
        best = t.loc[t["final_val_loss"].idxmin(), "lr"]
        assert study["chosen_lrs"]["gpt"]["fp32"][opt] == best
        main = res[(res["phase"] == "main") & (res["optimizer"] == opt)]
        assert set(main["lr"]) == {best} and set(main["precision"]) == {"fp32", "fp8-all"}
    # target = the tuned fp32 AdamW loss x 1.02
    a = tune[tune["optimizer"] == "adamw"]["final_val_loss"].min()
    assert study["targets"]["gpt"]["target_loss"] == pytest.approx(a * 1.02)
    assert res.loc[res["task"] == "gpt", "target_loss"].dropna().nunique() == 1
    # ablation: every variant at fp8-all with its own tuned LR
    abl = res[res["phase"] == "ablation"]
    assert set(abl["optimizer"]) == {"stosignsgd", "stosign-nonoise", "stosign-adamw"}
    assert set(abl["precision"]) == {"fp8-all"}
    for opt in ("stosignsgd", "stosign-nonoise", "stosign-adamw"):
        assert set(abl.loc[abl["optimizer"] == opt, "lr"]) == {study["chosen_lrs"]["gpt"]["fp32"][opt]}
    # failure map: adamw with unscaled E4M3 states at its fp32-tuned LR, 2 seeds, counted with a Wilson interval
    fail = res[res["phase"] == "failure"]
    assert len(fail) == 2 and set(fail["lr"]) == {study["chosen_lrs"]["gpt"]["fp32"]["adamw"]}
    cell = study["summary"]["failure_map"]["gpt"]["state=e4m3"]["adamw"]
    assert (cell["k"], cell["n"]) == ((fail["diverged"].astype(str) == "True").sum(), 2)
    # rounding: the 4 master x state rounding variants of fp8-all
    rnd = res[res["phase"] == "rounding"]
    assert len(rnd) == 4 and rnd["precision"].str.contains("master=bf16:stochastic").sum() == 2
    assert rnd["precision"].str.contains("state=e4m3:stochastic").sum() == 2
    # identical configurations in two phases ran once (copied), with identical numbers
    m = res[(res["phase"] == "main") & (res["optimizer"] == "stosignsgd") & (res["precision"] == "fp8-all")]
    b = abl[abl["optimizer"] == "stosignsgd"]
    assert m["final_val_loss"].iloc[0] == b["final_val_loss"].iloc[0]
    mech = res[res["phase"] == "mechanism"]
    assert set(mech["task"]) == {"convex-l1"} and set(mech["optimizer"]) == {"signsgd", "signum", "stosignsgd"}
    assert set(mech["steps"]) == {40}                      # its own step count, not the LM's --steps
    assert "convex-l1" in study["optimal_loss"]


def test_shards_of_a_sweep_cover_it_exactly_once(tmp_path, capsys):
    out = tmp_path / "s"
    base = ["run", "--tasks", "gpt", "--size", "quick", "--optimizers", "adamw,signum", "--precisions", "fp32",
            "--seeds", "2", "--phases", "main", "--steps", "3", "--workers", "1", "--out", str(out), "--no-report"]
    assert _run(capsys, *base, "--shard", "0/2")[0] == 0
    n0 = len(_read(out / "results.csv"))
    assert _run(capsys, *base, "--shard", "1/2")[0] == 0
    res = _read(out / "results.csv")
    assert n0 == 2 and len(res) == 4 and res["run_id"].is_unique
    code, stdout, _ = _run(capsys, *base)
    assert code == 0 and "0 runs" in stdout and "4 already done" in stdout
