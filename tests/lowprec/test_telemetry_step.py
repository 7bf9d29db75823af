"""Telemetry's own step counter (set_step / next_step) and the ``unpacked`` column, against hand-written cases."""
import pytest
import torch

from lowprec.telemetry import COLUMNS, Telemetry


def test_set_step_numbers_rows_and_decides_sampling():
    t = Telemetry(every=5)
    nan = torch.tensor([1.0, float("nan")])
    for k in (1, 2, 5, 7, 10):                     # a run loop numbering its steps from 1
        t.set_step(k)
        t.record("l:weight", "weight", torch.ones(2), torch.ones(2))
        t.record("l:grad", "grad", nan, nan)       # non-finite: recorded on every step
    df = t.frame()
    assert list(df[df.site == "l:weight"].step) == [5, 10]          # sampled iff k % 5 == 0
    assert list(df[df.site == "l:grad"].step) == [1, 2, 5, 7, 10]
    assert list(df[df.site == "l:grad"].sampled) == [False, False, True, False, True]
    t.next_step()
    assert t.step == 11
    for bad in (-1, 1.0, True, "3"):
        with pytest.raises(ValueError, match="step"):
            t.set_step(bad)


def test_unpacked_column_recorded_even_unsampled_and_unchecked():
    t = Telemetry(every=10, check_nonfinite=False)
    t.set_step(3)
    v = torch.tensor([1.0, float("inf"), 2.0])
    t.record("optim:exp_avg", "state", v, v, fmt="e2m1", unpacked=True)
    t.record("optim:grad", "grad", v, v)           # unsampled and unchecked: not recorded
    df = t.frame()
    assert list(df.columns) == list(COLUMNS) and len(df) == 1
    row = df.iloc[0]
    assert (row["step"], row["unpacked"], row["inf_count"], row["nan_count"]) == (3, 3, 1, 0)
    t.next_step()
    assert t.unpacked_sites() == ["optim:exp_avg"] and t.unpacked_sites(step=2) == []
    t.set_step(0)
    t.record("optim:exp_avg", "state", torch.ones(2), torch.ones(2))
    assert t.frame().iloc[-1]["unpacked"] == 0
