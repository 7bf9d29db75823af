"""Shared fixture of the studies tests: one real tiny study, run once per session by the real writer.

``precision-sweep run --quick`` (tiny GPT, adamw and stosignsgd × fp32 and fp8-all) with 2 seeds, 24 steps and the
learning rates 0.01 and 3 (no tune phase): the LR-3 runs diverge (loss spike), fp8-all writes telemetry, so the
folder holds every kind of main-phase row the report reads. About 6-10 s on 2 cores.

``phases_study``: the other phases (tune with a 2-LR grid, ablation, rounding, mechanism) on the same tiny GPT at
8 steps, trimmed by a TOML file to 17 runs (about 18 s of CPU).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

TINY_STUDY_ARGS = ["run", "--quick", "--seeds", "2", "--steps", "24", "--lrs", "0.01,3", "--no-report"]
PHASES_STUDY_ARGS = ["run", "--size", "quick", "--tasks", "gpt", "--optimizers", "adamw,stosignsgd", "--precisions",
                     "fp32", "--seeds", "2", "--steps", "8", "--lrs", "0.01,0.003", "--tune-max-extensions", "0",
                     "--no-report"]
PHASES_TOML = """\
ablation_optimizers = ["stosignsgd", "stosign-nonoise"]
rounding_optimizers = ["stosignsgd"]
mechanism_optimizers = ["signsgd", "stosignsgd"]
mechanism_tasks = ["convex-l1"]
phases = ["tune", "main", "ablation", "rounding", "mechanism"]
mechanism_seeds = [0, 1]
mechanism_steps = 100
"""


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory) -> Path:
    """A results folder written by ``studies.cli.main`` from a real tiny run (read-only: copy it to change it)."""
    from studies.cli import main

    out = tmp_path_factory.mktemp("tiny_study") / "out"
    assert main([*TINY_STUDY_ARGS, "--out", str(out)]) == 0
    assert (out / "results.csv").is_file() and (out / "study.json").is_file()
    return out


@pytest.fixture(scope="session")
def phases_study(tmp_path_factory) -> Path:
    """A results folder with the tune, main, ablation, rounding and mechanism phases, written by
    ``studies.cli.main`` from a real tiny run (read-only: copy it to change it)."""
    from studies.cli import main

    root = tmp_path_factory.mktemp("phases_study")
    (root / "phases.toml").write_text(PHASES_TOML)
    out = root / "out"
    assert main([*PHASES_STUDY_ARGS, "--config", str(root / "phases.toml"), "--out", str(out)]) == 0
    return out


@pytest.fixture
def tiny_copy(tiny_study, tmp_path) -> Path:
    """A private copy of the tiny study's folder that a test may change."""
    dst = tmp_path / "copy"
    shutil.copytree(tiny_study, dst)
    return dst
