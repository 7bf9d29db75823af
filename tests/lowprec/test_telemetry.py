"""Telemetry counts against hand-computed cases (the quantized tensors are written out by hand here)."""
import math

import numpy as np
import pytest
import torch

from lowprec.telemetry import Telemetry


def test_counts_hand_computed():
    t = Telemetry(every=1)
    x = torch.tensor([0.0, 1e-4, -1e-4, 1.0, 3.0, 1000.0])
    q = torch.tensor([0.0, 0.0, -2e-4, 1.0, 3.0, 448.0])   # one flush, one saturation at E4M3's 448
    t.record("lin:weight", "weight", x, q, fmt_max=448.0, fmt="e4m3")
    row = t.frame().iloc[0]
    assert row["site"] == "lin:weight" and row["role"] == "weight" and row["step"] == 0
    assert row["numel"] == 6
    assert row["flushed_frac"] == pytest.approx(1 / 5)      # 5 nonzero inputs, 1e-4 became 0
    assert row["saturated_frac"] == pytest.approx(1 / 6)    # 1000 > 448
    assert row["nan_count"] == 0 and row["inf_count"] == 0
    assert row["zero_frac"] == pytest.approx(2 / 6)
    xs = np.array([0.0, 1e-4, -1e-4, 1.0, 3.0, 1000.0], dtype=np.float32).astype(np.float64)
    qs = np.array([0.0, 0.0, -2e-4, 1.0, 3.0, 448.0], dtype=np.float32).astype(np.float64)
    want = 20 * math.log10(np.linalg.norm(xs) / np.linalg.norm(xs - qs))
    assert row["sqnr_db"] == pytest.approx(want, rel=1e-9)
    assert math.isnan(row["scale_min"]) and math.isnan(row["lost_update_frac"])


def test_scaled_saturation_and_scale_range():
    t = Telemetry()
    x = torch.tensor([[1.0, 13.0, -12.0], [2.0, -3.5, 0.25]])
    scale = torch.tensor([[2.0], [0.5]])          # representable |x| <= 6*2 = 12 (row 0), 6*0.5 = 3 (row 1)
    q = torch.tensor([[1.0, 12.0, -12.0], [2.0, -3.0, 0.0]])
    t.record("s:grad", "grad", x, q, scale=scale, fmt_max=6.0)
    row = t.frame().iloc[0]
    assert row["saturated_frac"] == pytest.approx(2 / 6)   # 13 > 12 and |-3.5| > 3; -12 is exactly representable
    assert row["flushed_frac"] == pytest.approx(1 / 6)     # 0.25 -> 0
    assert (row["scale_min"], row["scale_max"]) == (0.5, 2.0)
    assert row["sqnr_db"] == pytest.approx(10 * math.log10((1 + 169 + 144 + 4 + 12.25 + 0.0625) / (1 + 0.25 + 0.0625)))


def test_overflow_to_inf_and_nan_counts_and_first_nonfinite():
    t = Telemetry(every=1)
    t.record("a:activation", "activation", torch.ones(4), torch.ones(4), fmt_max=448.0)
    x = torch.tensor([1.0, 1e6, float("nan"), 2.0])
    q = torch.tensor([1.0, float("inf"), float("nan"), 2.0])   # e5m2 without saturation: overflow -> inf
    t.record("b:grad", "grad", x, q, fmt_max=57344.0)
    t.record("c:grad", "grad", x, q, fmt_max=57344.0)
    row = t.frame().set_index("site").loc["b:grad"]
    assert row["inf_count"] == 1 and row["nan_count"] == 1
    assert row["saturated_frac"] == pytest.approx(1 / 4)       # the finite 1e6 overflowed; NaN input is not counted
    assert math.isnan(row["sqnr_db"])
    assert t.first_nonfinite() == "b:grad"


def test_sampling_every_n_and_nonfinite_between_samples():
    t = Telemetry(every=3)
    for step in range(7):
        q = torch.ones(3) if step != 4 else torch.tensor([1.0, float("nan"), 1.0])
        t.record("l:weight", "weight", torch.ones(3), torch.ones(3))
        t.record("l:activation", "activation", torch.ones(3), q)
        t.next_step()
    df = t.frame()
    assert sorted(set(df.step)) == [0, 3, 4, 6]                 # 4 only for the NaN site
    assert list(df[df.step == 4].site) == ["l:activation"]
    assert t.first_nonfinite() == "l:activation"
    quiet = Telemetry(every=3, check_nonfinite=False)
    for step in range(5):
        quiet.record("l:weight", "weight", torch.ones(3), torch.full((3,), float("nan")))
        quiet.next_step()
    assert sorted(set(quiet.frame().step)) == [0, 3]


def test_aggregation_and_summary():
    t = Telemetry()
    # two weight sites: 1 flush of 2 nonzero, and 0 flushes of 4 nonzero -> role underflow 1/6 (count weighted)
    t.record("a:weight", "weight", torch.tensor([1.0, 1e-9]), torch.tensor([1.0, 0.0]), fmt_max=448.0)
    t.record("b:weight", "weight", torch.tensor([1.0, 2.0, 3.0, 500.0]), torch.tensor([1.0, 2.0, 3.0, 448.0]),
             fmt_max=448.0)
    # the same optimizer site twice in one step (two parameters) aggregates into one row
    t.record("optim:exp_avg_sq", "state", torch.tensor([1.0, 1e-12]), torch.tensor([1.0, 0.0]), fmt_max=448.0)
    t.record("optim:exp_avg_sq", "state", torch.tensor([0.0, 4.0]), torch.tensor([0.0, 4.0]), fmt_max=448.0)
    t.record("optim:exp_avg", "state", torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0]), fmt_max=448.0)
    old = torch.tensor([1.0, 1.0, 1.0, 1.0])
    t.record_update("optim:master", old, torch.tensor([1.001, 1.0, 0.999, 2.0]), torch.tensor([1.0, 1.0, 0.99609375, 2.0]))
    assert len(t.frame()) == 5
    s = t.summary()
    assert s["weight_underflow"] == pytest.approx(1 / 6)
    assert s["weight_overflow"] == pytest.approx(1 / 6)       # 500 > 448, of 6 elements
    assert s["state_zero_frac"] == pytest.approx(2 / 4)       # exp_avg_sq only: 0 (flushed) and 0 (true zero)
    assert s["state_underflow"] == pytest.approx(1 / 5)       # 1 flush among 5 nonzero state inputs
    assert s["lost_update_frac"] == pytest.approx(1 / 3)      # 3 intended updates, the +0.001 was lost
    assert math.isnan(s["activation_underflow"]) and math.isnan(s["grad_overflow"])
    t.next_step()
    t.record("a:weight", "weight", torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0]), fmt_max=448.0)
    s2 = t.summary()                                          # latest sampled step only
    assert s2["weight_underflow"] == 0.0 and math.isnan(s2["state_zero_frac"])


def test_bad_arguments():
    with pytest.raises(ValueError, match="every"):
        Telemetry(every=0)
    with pytest.raises(ValueError, match="valid roles"):
        Telemetry().record("x", "bogus", torch.ones(1), torch.ones(1))
