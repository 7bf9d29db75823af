"""Tests of studies.stats against closed-form math, scipy (when installed) and coverage on known distributions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from studies.stats import (
    STATUS_BASE_NOT_REACHED,
    STATUS_NO_DATA,
    STATUS_OK,
    STATUS_OPT_NOT_REACHED,
    STATUS_PARTIAL,
    bootstrap_ci,
    divergence_fraction,
    mean_ci,
    speedup_ci,
    t_quantile,
    tokens_to_target,
    wilson_ci,
)

# ------------------------------------------------------------------------------------------ t quantile

# Classic two-sided 95% / 99% critical values (any statistics table), 3-4 significant digits.
T_TABLE_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 10: 2.228, 20: 2.086, 30: 2.042, 120: 1.980}
T_TABLE_995 = {1: 63.657, 2: 9.925, 5: 4.032, 10: 3.169, 30: 2.750}


@pytest.mark.parametrize("df,expected", sorted(T_TABLE_975.items()))
def test_t_quantile_matches_table_975(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=6e-4)


@pytest.mark.parametrize("df,expected", sorted(T_TABLE_995.items()))
def test_t_quantile_matches_table_995(df, expected):
    assert t_quantile(0.995, df) == pytest.approx(expected, abs=6e-4)


def test_t_quantile_closed_forms():
    # df=1 is Cauchy: q(p) = tan(pi (p - 1/2)); df=2: q(p) = (2p-1) / sqrt(2 p (1-p))
    for p in (0.55, 0.8, 0.95, 0.99, 0.999):
        assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)
        assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)
        assert t_quantile(1 - p, 2) == pytest.approx(-t_quantile(p, 2), rel=1e-12)
    # large df tends to the normal quantile
    assert t_quantile(0.975, 1e7) == pytest.approx(1.959964, abs=1e-5)


def test_t_quantile_matches_scipy_when_available():
    st = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 7, 15, 29, 31, 200):
        for p in (0.6, 0.9, 0.975, 0.995, 0.9995):
            assert t_quantile(p, df) == pytest.approx(st.t.ppf(p, df), rel=1e-8)


def test_t_quantile_rejects_bad_input():
    with pytest.raises(ValueError, match="p must be"):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError, match="df must be"):
        t_quantile(0.9, 0)


# ------------------------------------------------------------------------------------------ mean_ci


def test_mean_ci_hand_computed():
    # values 1,2,3,4: mean 2.5, s = sqrt(5/3), sem = s/2, t_{0.975,3} = 3.182446
    m, lo, hi = mean_ci([1.0, 2.0, 3.0, 4.0])
    half = 3.182446305 * math.sqrt(5 / 3) / 2
    assert m == 2.5
    assert lo == pytest.approx(2.5 - half, rel=1e-8)
    assert hi == pytest.approx(2.5 + half, rel=1e-8)


def test_mean_ci_edge_cases():
    assert mean_ci([]) == (math.nan,) * 3 or all(math.isnan(v) for v in mean_ci([]))
    m, lo, hi = mean_ci([3.0])
    assert m == 3.0 and math.isnan(lo) and math.isnan(hi)
    assert all(math.isnan(v) for v in mean_ci([math.nan, math.nan]))
    # non-finite values are dropped (diverged runs)
    assert mean_ci([1.0, math.nan, 3.0, math.inf])[0] == 2.0
    # identical values: zero width
    assert mean_ci([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)
    with pytest.raises(ValueError, match="level"):
        mean_ci([1.0, 2.0], level=95)
    with pytest.raises(ValueError, match="one-dimensional"):
        mean_ci(np.ones((2, 2)))


def test_mean_ci_coverage_normal():
    """95% t interval covers the true mean in 95% +- 2% of 2000 trials (normal, n=5; binomial sd ~0.5%)."""
    rng = np.random.default_rng(2)
    true_mean, trials, n = 3.0, 2000, 5
    covered = 0
    for _ in range(trials):
        _, lo, hi = mean_ci(rng.normal(true_mean, 2.0, size=n))
        covered += lo <= true_mean <= hi
    assert abs(covered / trials - 0.95) <= 0.02


def test_mean_ci_coverage_90_percent_level():
    rng = np.random.default_rng(99)
    covered = sum(lo <= 0.0 <= hi for _, lo, hi in (mean_ci(rng.normal(0, 1, 3), level=0.9) for _ in range(2000)))
    assert abs(covered / 2000 - 0.90) <= 0.025


# ------------------------------------------------------------------------------------------ bootstrap_ci


def test_bootstrap_ci_coverage_normal():
    """Percentile bootstrap of the mean (n=40) covers the true mean in 95% +- 3% of 1000 trials.

    The percentile bootstrap under-covers slightly at small n (about 1 - 0.05 - O(1/n)); 3% allows for that
    plus the binomial noise (sd ~0.7%).
    """
    rng = np.random.default_rng(7)
    trials, covered = 1000, 0
    for i in range(trials):
        _, lo, hi = bootstrap_ci(rng.normal(10.0, 1.0, size=40), n_boot=500, seed=i)
        covered += lo <= 10.0 <= hi
    assert abs(covered / trials - 0.95) <= 0.03


def test_bootstrap_ci_seeded_and_generic_stat():
    x = [1.0, 4.0, 2.0, 8.0, 5.0, 7.0]
    assert bootstrap_ci(x, seed=3) == bootstrap_ci(x, seed=3)
    est, lo, hi = bootstrap_ci(x, stat=np.median, seed=0)
    assert est == 4.5 and min(x) <= lo <= est <= hi <= max(x)

    # a stat without axis= works through the fallback path and gives the same numbers
    def mean_no_axis(v):
        return float(sum(v) / len(v))

    assert bootstrap_ci(x, stat=mean_no_axis, n_boot=300, seed=5) == pytest.approx(
        bootstrap_ci(x, stat=np.mean, n_boot=300, seed=5)
    )


def test_bootstrap_ci_edge_cases():
    assert all(math.isnan(v) for v in bootstrap_ci([]))
    assert all(math.isnan(v) for v in bootstrap_ci([math.nan, math.nan]))
    est, lo, hi = bootstrap_ci([2.5, math.nan])
    assert est == 2.5 and math.isnan(lo) and math.isnan(hi)
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_ci([1.0, 2.0], n_boot=0)
    with pytest.raises(TypeError, match="sequence of numbers"):
        bootstrap_ci(["a", "b"])


# ------------------------------------------------------------------------------------------ wilson / divergence


def test_wilson_known_values():
    # Wilson 95% interval for 3/10 (textbook: 0.1078, 0.6032) and 0/10 (0, 0.2775)
    p, lo, hi = wilson_ci(3, 10)
    assert p == 0.3 and lo == pytest.approx(0.1078, abs=1e-4) and hi == pytest.approx(0.6032, abs=1e-4)
    p, lo, hi = wilson_ci(0, 10)
    assert p == 0.0 and lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    p, lo, hi = wilson_ci(10, 10)
    assert p == 1.0 and hi == 1.0 and lo == pytest.approx(1 - 0.2775, abs=1e-4)
    assert all(math.isnan(v) for v in wilson_ci(0, 0))
    with pytest.raises(ValueError, match="successes"):
        wilson_ci(3, 2)


def test_wilson_coverage():
    """Wilson 95% interval for p=0.3, n=40 covers p in 95% +- 3% of 2000 binomial trials."""
    rng = np.random.default_rng(5)
    ks = rng.binomial(40, 0.3, size=2000)
    covered = sum(lo <= 0.3 <= hi for _, lo, hi in (wilson_ci(int(k), 40) for k in ks))
    assert abs(covered / 2000 - 0.95) <= 0.03


def test_divergence_fraction_accepts_csv_strings():
    frac, lo, hi, k, n = divergence_fraction(["True", "False", "False", True])
    assert (k, n) == (2, 4) and frac == 0.5 and 0 < lo < 0.5 < hi < 1
    with pytest.raises(ValueError, match="diverged entries"):
        divergence_fraction(["maybe"])


# ------------------------------------------------------------------------------------------ tokens_to_target


def test_tokens_to_target_linear_crossing_closed_form():
    # piecewise-linear loss between evaluations: crossing of 2.3 between (200, 2.5) and (300, 2.0) is at
    # 200 + (2.5 - 2.3) / (2.5 - 2.0) * 100 = 240
    assert tokens_to_target([0, 100, 200, 300, 400], [4.0, 3.0, 2.5, 2.0, 1.9], 2.3) == pytest.approx(240.0)


def test_tokens_to_target_exponential_curve_dense_evaluations():
    # loss(t) = 1 + 3 exp(-t / 1000): exact crossing of target L at t* = -1000 ln((L - 1) / 3)
    t = np.linspace(0, 10_000, 2001)
    loss = 1 + 3 * np.exp(-t / 1000)
    for target in (3.0, 2.0, 1.5, 1.1):
        exact = -1000 * math.log((target - 1) / 3)
        # linear interpolation of a convex curve: error below (dt^2/8) * max|loss''| / |loss'| ~ dt^2/(8*1000)
        assert tokens_to_target(t, loss, target) == pytest.approx(exact, abs=0.01)


def test_tokens_to_target_not_reached_and_nan():
    assert math.isnan(tokens_to_target([0, 10, 20], [3.0, 2.0, 1.5], 1.0))
    assert math.isnan(tokens_to_target([0, 10, 20], [math.nan] * 3, 1.0))
    assert math.isnan(tokens_to_target([], [], 1.0))
    # a NaN evaluation (divergence) is not a crossing even though NaN <= x comparisons are False anyway
    assert math.isnan(tokens_to_target([0, 10, 20], [3.0, math.nan, math.inf], 1.0))
    # NaN right before the crossing: no interpolation, the crossing's own tokens
    assert tokens_to_target([0, 10, 20], [3.0, math.nan, 0.5], 1.0) == 20.0
    # first evaluation already below target -> its tokens
    assert tokens_to_target([50, 100], [0.5, 0.4], 1.0) == 50.0
    # exactly equal counts as reached, no interpolation needed
    assert tokens_to_target([0, 10, 20], [3.0, 2.0, 1.0], 2.0) == pytest.approx(10.0)
    # the first crossing counts even if the loss goes back up
    assert tokens_to_target([0, 10, 20, 30], [3.0, 1.0, 5.0, 0.5], 2.0) == pytest.approx(5.0)


def test_tokens_to_target_validation():
    with pytest.raises(ValueError, match="same length"):
        tokens_to_target([0, 1], [1.0], 0.5)
    with pytest.raises(ValueError, match="non-decreasing"):
        tokens_to_target([0, 20, 10], [3.0, 2.0, 1.0], 0.5)
    with pytest.raises(ValueError, match="target"):
        tokens_to_target([0, 1], [1.0, 0.5], math.nan)


# ------------------------------------------------------------------------------------------ speedup_ci


def test_speedup_ratio_of_means_and_interval():
    base, opt = [1000.0, 1200.0, 1100.0], [500.0, 600.0, 550.0]
    r = speedup_ci(base, opt)
    assert r.status == STATUS_OK and r.ratio == pytest.approx(3300 / 1650)
    assert r.base_reached == 1.0 and r.opt_reached == 1.0 and (r.n_base, r.n_opt) == (3, 3)
    # interval: bootstrap ratio of means lies between extreme resamples min(base)/max(opt) .. max(base)/min(opt)
    assert 1000 / 600 <= r.lo <= r.ratio <= r.hi <= 1200 / 500
    ratio, lo, hi = r  # unpacks like the contract's (ratio, lo, hi)
    assert (ratio, lo, hi) == (r.ratio, r.lo, r.hi)
    assert r.to_dict()["speedup"] == r.ratio


def test_speedup_interval_covers_true_ratio():
    """Bootstrap interval of a ratio of means (10 seeds each) covers the true ratio 1.5 in >= 88% of trials."""
    rng = np.random.default_rng(11)
    trials, covered = 400, 0
    for i in range(trials):
        base = rng.normal(1500.0, 100.0, 10)
        opt = rng.normal(1000.0, 80.0, 10)
        r = speedup_ci(base, opt, n_boot=400, seed=i)
        covered += r.lo <= 1.5 <= r.hi
    # percentile bootstrap at n=10 under-covers (nominal 95%); 88% is a loose, stated floor
    assert covered / trials >= 0.88


def test_speedup_optimizer_never_reaches():
    r = speedup_ci([1000.0, 1100.0], [math.nan, math.nan])
    assert r.status == STATUS_OPT_NOT_REACHED
    assert math.isnan(r.ratio) and math.isnan(r.lo) and math.isnan(r.hi)
    assert r.opt_reached == 0.0 and r.base_reached == 1.0


def test_speedup_baseline_never_reaches():
    r = speedup_ci([math.nan, math.inf], [500.0, 600.0])
    assert r.status == STATUS_BASE_NOT_REACHED and math.isnan(r.ratio)
    assert r.base_reached == 0.0 and r.opt_reached == 1.0


def test_speedup_partial_and_single_seed():
    r = speedup_ci([1000.0, 1200.0], [500.0, math.nan, 700.0])
    assert r.status == STATUS_PARTIAL
    assert r.ratio == pytest.approx(1100 / 600) and r.opt_reached == pytest.approx(2 / 3)
    r1 = speedup_ci([1000.0], [400.0])
    assert r1.status == STATUS_OK and r1.ratio == 2.5 and math.isnan(r1.lo) and math.isnan(r1.hi)
    r0 = speedup_ci([], [400.0])
    assert r0.status == STATUS_NO_DATA and math.isnan(r0.ratio)
    with pytest.raises(ValueError, match="> 0"):
        speedup_ci([0.0, 1.0], [1.0])


def test_run_tokens_to_target_uses_only_evaluation_rows_in_token_order():
    from studies.stats import run_tokens_to_target

    # metrics.csv logs val_loss only every few steps (NaN elsewhere); the crossing of 2.0 lies halfway between the
    # evaluations at 200 (loss 3.0) and 400 (loss 1.0): 300 tokens.
    tokens = [400, 100, 200, 300]
    val = [1.0, math.nan, 3.0, math.nan]
    assert run_tokens_to_target(tokens, val, 2.0) == pytest.approx(300.0)
    assert math.isnan(run_tokens_to_target([100, 200], [math.nan, math.nan], 2.0))
    assert math.isnan(run_tokens_to_target([], [], 2.0))
    with pytest.raises(ValueError, match="same length"):
        run_tokens_to_target([1, 2], [1.0], 2.0)
