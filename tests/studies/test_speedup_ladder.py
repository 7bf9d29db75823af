"""studies.scaling: the speedup read off a baseline's end-of-schedule scaling curve, on synthetic curves whose
answer is known in closed form (L(T) = a - b ln T is a straight line in log-tokens, so interpolation is exact)."""
import math

import numpy as np
import pytest

from studies.scaling import STATUS_BEYOND, ladder_speedup, paired_difference, tokens_on_curve, verdict

A, B = 3.0, 0.25
T = np.exp([6.0, 7.0, 8.0])  # horizons of the ladder, in tokens


def law(t):
    return A - B * np.log(t)


def test_tokens_on_curve_inverts_a_log_linear_law():
    for x in (6.0, 6.3, 7.0, 7.9, 8.0):
        got, status = tokens_on_curve(T, law(T), float(law(math.exp(x))))
        assert status == "ok"
        assert got == pytest.approx(math.exp(x), rel=1e-12)


def test_beyond_the_curve_on_both_sides():
    assert tokens_on_curve(T, law(T), law(math.exp(8.5))) == (math.inf, STATUS_BEYOND)   # better than all
    assert tokens_on_curve(T, law(T), law(math.exp(5.5))) == (-math.inf, STATUS_BEYOND)  # worse than the first


def test_first_crossing_of_a_non_monotone_curve_and_a_diverged_horizon():
    y = np.array([2.0, 1.0, 1.5])  # the longest horizon got worse: the first crossing counts
    t, _ = tokens_on_curve(T, y, 1.2)
    assert t == pytest.approx(math.exp(6.0 + 0.8), rel=1e-12)  # 2.0 -> 1.0 over one log-unit: 0.8 of the way
    t, _ = tokens_on_curve(T, np.array([2.0, math.nan, 1.0]), 1.5)  # NaN horizon: no line through it
    assert t == pytest.approx(T[2])


def test_ladder_speedup_closed_form_and_paired_interval_is_exact():
    # the optimizer at e^6.5 tokens reaches the loss AdamW reaches at e^7.2: speedup e^0.7 for every seed.
    # Seed offsets shift both series alike (shared data order): the paired bootstrap sees no spread at all.
    offs = np.array([-0.05, 0.0, 0.02, 0.08])
    curve = [law(t) + offs for t in T]
    opt = law(math.exp(7.2)) + offs
    r = ladder_speedup(T, curve, math.exp(6.5), opt, paired=True)
    assert r.status == "ok" and r.n == 4
    assert r.ratio == pytest.approx(math.exp(0.7), rel=1e-9)
    assert r.lo == pytest.approx(math.exp(0.7), rel=1e-9) and r.hi == pytest.approx(math.exp(0.7), rel=1e-9)
    u = ladder_speedup(T, curve, math.exp(6.5), opt, paired=False)  # unpaired: the offsets widen it
    assert u.ratio == pytest.approx(r.ratio) and u.lo < r.ratio * 0.9 and u.hi > r.ratio * 1.1


def test_ladder_speedup_beyond_range_and_slower():
    curve = [law(t) + np.zeros(3) for t in T]
    r = ladder_speedup(T, curve, math.exp(7.0), law(math.exp(9.0)) + np.zeros(3))
    assert r.status == STATUS_BEYOND and r.ratio == math.inf
    s = ladder_speedup(T, curve, math.exp(7.5), law(math.exp(7.0)) + np.zeros(3))  # needs e^0.5 x more
    assert s.ratio == pytest.approx(math.exp(-0.5))


def test_ladder_speedup_checks_pairing():
    with pytest.raises(ValueError):
        ladder_speedup(T, [np.zeros(3), np.zeros(2), np.zeros(3)], 10.0, np.zeros(3), paired=True)


def test_paired_difference_is_the_t_interval_of_differences():
    a = {0: 1.0, 1: 2.0, 2: 3.0, 3: 9.0}
    b = {0: 1.5, 1: 2.1, 2: 3.7, 4: 0.0}  # seed 3 and 4 are unpaired: left out
    mean, lo, hi, n = paired_difference(a, b)
    d = np.array([0.5, 0.1, 0.7])
    half = 4.302652729911275 * d.std(ddof=1) / math.sqrt(3)  # t_{0.975, 2} (tables)
    assert n == 3 and mean == pytest.approx(d.mean()) and (lo, hi) == pytest.approx((d.mean() - half,
                                                                                     d.mean() + half))


def test_verdict_rule():
    assert verdict(0.1, 0.3, 3, 0.0, below="worse", above="better") == "better"
    assert verdict(-0.3, -0.1, 5, 0.0, below="worse", above="better") == "worse"
    assert verdict(-0.1, 0.3, 5, 0.0, below="worse", above="better").startswith("insufficient evidence (interval")
    assert verdict(0.1, 0.3, 2, 0.0, below="worse", above="better").startswith("insufficient evidence (n = 2")
    assert verdict(1.2, math.inf, 3, 1.0, below="slower", above="faster") == "faster"
    assert verdict(math.nan, math.nan, 3, 1.0, below="s", above="f").startswith("insufficient")
