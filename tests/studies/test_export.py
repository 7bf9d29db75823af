"""`precision-sweep export DIR --tensorboard LOGDIR`: every run's metrics.csv scalars land in its own TensorBoard
run at their steps. Oracle: tensorboard's own event reader (EventAccumulator) against metrics.csv read by pandas."""
from __future__ import annotations

import builtins
import math

import pandas as pd
import pytest

from studies import cli
from studies.config import StudyConfig
from studies.protocol import run_study


from tests.studies.clirun import run_cli as _run  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "study"
    cfg = StudyConfig(tasks=["gpt"], size="quick", optimizers=["adamw", "stosignsgd"], precisions=["fp32", "fp8-all"],
                      seeds=[0], phases=["main"], steps=6, eval_every=3, telemetry_every=2, workers=1, out=str(out),
                      report=False).validate()
    run_study(cfg, progress=False)
    return out


def test_export_writes_every_scalar_of_every_run(folder, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = tmp_path / "tb"
    code, stdout, err = _run(capsys, "export", str(folder), "--tensorboard", str(logdir))
    assert code == 0, err
    assert "exported 4 runs" in stdout
    res = pd.read_csv(folder / "results.csv")
    for _, row in res.iterrows():
        sub = logdir / "main" / "gpt" / row["optimizer"] / row["precision"] / f"lr={row['lr']:g},seed={row['seed']}"
        acc = EventAccumulator(str(sub), size_guidance={"scalars": 0})
        acc.Reload()
        m = pd.read_csv(folder / "runs" / row["run_id"] / "metrics.csv")
        tags = set(acc.Tags()["scalars"])
        for col, tag in (("loss", "loss"), ("val_loss", "val_loss"), ("lr", "lr"), ("grad_norm", "grad_norm"),
                         ("weight_underflow", "telemetry/weight_underflow")):
            want = m[["step", col]].dropna()
            if want.empty:
                assert tag not in tags
                continue
            got = [(e.step, e.value) for e in acc.Scalars(tag)]
            assert [s for s, _ in got] == [int(s) for s in want["step"]], (row["run_id"], col)
            for (_, v), w in zip(got, want[col]):
                assert v == pytest.approx(w, rel=1e-6) or (math.isinf(v) and v == w)
        assert "loss" in tags and "val_loss" in tags
        if row["precision"] == "fp8-all":                       # quantized weights have telemetry
            assert "telemetry/weight_underflow" in tags


def test_missing_tensorboard_is_a_clear_one_line_error(folder, tmp_path, capsys, monkeypatch):
    real = builtins.__import__

    def fake(name, *a, **kw):
        if name.startswith("torch.utils.tensorboard") or name.startswith("tensorboard"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", fake)
    code, _, err = _run(capsys, "export", str(folder), "--tensorboard", str(tmp_path / "tb"))
    assert code == 2 and err.count("\n") == 1 and "pip install" in err and "tensorboard" in err
