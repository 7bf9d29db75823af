"""Stochastic rounding: two neighbours only, unbiased (P(up) = fractional distance), reproducible."""

import math

import ml_dtypes
import numpy as np
import pytest
import torch

from lowprec import FORMATS, quantize

ML = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2, "e2m1": ml_dtypes.float4_e2m1fn,
      "e3m2": ml_dtypes.float6_e3m2fn, "e2m3": ml_dtypes.float6_e2m3fn}
N = 20000  # draws per probability check
Z = 5.0  # tolerance in standard errors: a correct implementation fails with probability < 1e-6 per check


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def grid(name) -> np.ndarray:
    if name in ML:
        bits = ml_dtypes.finfo(ML[name]).bits
        v = np.arange(2**bits, dtype=np.uint8).view(ML[name]).astype(np.float64)
        return np.unique(v[np.isfinite(v)])
    if name.startswith("int"):
        f = FORMATS[name]
        return np.arange(f.min, f.max + 1)
    raise KeyError(name)


def neighbours(name, x: np.ndarray):
    g = grid(name)
    lo = g[np.clip(np.searchsorted(g, x, side="right") - 1, 0, len(g) - 1)]
    hi = g[np.clip(np.searchsorted(g, x, side="left"), 0, len(g) - 1)]
    return lo, hi


@pytest.mark.parametrize("name", ["e4m3", "e5m2", "e2m1", "e3m2", "e2m3", "int8", "int4"])
def test_lands_on_the_two_neighbours(name):
    f = FORMATS[name]
    g = gen(1)
    x = (torch.rand(50000, generator=g) * 2 - 1) * f.max * torch.rand(50000, generator=g) ** 4
    q = quantize(x, name, rounding="stochastic", generator=gen(2))
    lo, hi = neighbours(name, x.double().numpy())
    qd = q.double().numpy()
    assert np.all((qd == lo) | (qd == hi))
    assert ((qd == lo) & (lo != hi)).any() and ((qd == hi) & (lo != hi)).any()


CASES = [
    # (format, lower neighbour, upper neighbour): normal range, subnormal range, around zero, negative
    ("e4m3", 1.0, 1.125), ("e4m3", 240.0, 256.0), ("e4m3", 2.0**-9, 2 * 2.0**-9), ("e4m3", 0.0, 2.0**-9),
    ("e4m3", -1.125, -1.0), ("e5m2", 2.0**-16, 2.0**-15), ("e5m2", 40960.0, 49152.0),
    ("e2m1", 0.0, 0.5), ("e2m1", 1.0, 1.5), ("e2m1", 4.0, 6.0), ("e2m1", -6.0, -4.0),
    ("bf16", 1.0, 1.0 + 2.0**-7), ("bf16", 2.0**-133, 2.0**-132), ("fp16", 2.0**-24, 2.0**-23),
    ("int8", 3.0, 4.0), ("int8", -4.0, -3.0), ("int4", -1.0, 0.0),
]


@pytest.mark.parametrize("name,lo,hi", CASES)
@pytest.mark.parametrize("frac", [0.1, 0.5, 0.77])
def test_unbiased(name, lo, hi, frac):
    x = torch.full((N,), lo + frac * (hi - lo))
    q = quantize(x, name, rounding="stochastic", generator=gen(3))
    assert set(q.unique().tolist()) <= {lo, hi}
    p_far = ((q == hi).double().mean().item() if lo >= 0 else (q == lo).double().mean().item())
    p = frac if lo >= 0 else 1 - frac  # probability of moving away from zero
    se = math.sqrt(p * (1 - p) / N)
    assert abs(p_far - p) < Z * se, (p_far, p, se)
    assert abs(q.double().mean().item() - x[0].item()) < Z * se * (hi - lo)


def test_mean_of_many_draws_is_the_value():
    # torchao's bf16 SR check (mean of 100k samples near the fp32 value), with a tolerance in standard errors
    n = 100000
    v = torch.rand(4, generator=gen(4)) + 0.5
    q = quantize(v.repeat_interleave(n), "bf16", rounding="stochastic", generator=gen(5)).view(4, -1)
    lo = v.to(torch.bfloat16).float()
    lo = torch.where(lo > v, lo - 2.0 ** (torch.floor(torch.log2(v)) - 7), lo)
    ulp = 2.0 ** (torch.floor(torch.log2(v)) - 7)
    p = (v - lo) / ulp
    se = ulp * torch.sqrt(p * (1 - p) / n)
    assert ((q.double().mean(1) - v.double()).abs() < Z * se + 1e-12).all()


def test_limited_random_bits_truncate_the_fraction():
    # with r random bits, P(up) = floor(frac * 2**r) / 2**r  (the hardware behaviour)
    for r, frac in ((2, 0.3), (3, 0.3), (1, 0.9)):
        x = torch.full((N,), 1.0 + frac * 0.125)
        q = quantize(x, "e4m3", rounding="stochastic", rand_bits=r, generator=gen(6))
        p = math.floor(frac * 2**r) / 2**r
        se = math.sqrt(max(p * (1 - p), 1e-12) / N)
        assert abs((q == 1.125).double().mean().item() - p) <= Z * se


def test_seeded_reproducibility():
    x = torch.randn(10000)
    for f in ("e4m3", "e2m1", "bf16", "int4", "mxfp4", "nvfp4"):
        a = quantize(x, f, rounding="stochastic", generator=gen(7))
        b = quantize(x, f, rounding="stochastic", generator=gen(7))
        c = quantize(x, f, rounding="stochastic", generator=gen(8))
        assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("name", sorted(ML) + ["int8", "int4"])
def test_representable_values_never_move(name):
    g = torch.from_numpy(grid(name)).float()
    x = torch.cat([g, -g[g == 0]]).repeat(50)  # the grid holds both signs; add -0
    q = quantize(x, name, rounding="stochastic", generator=gen(9))
    assert torch.equal(q, x)


def test_overflow_and_nan():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e6, 470.0] * 200)
    sat = quantize(x, "e4m3", rounding="stochastic", generator=gen(10))
    assert torch.isnan(sat[0::5]).all() and (sat[1::5] == 448).all() and (sat[2::5] == -448).all()
    assert (sat[3::5] == 448).all() and (sat[4::5] == 448).all()
    nosat = quantize(x, "e4m3", rounding="stochastic", saturate=False, generator=gen(10))
    assert torch.isnan(nosat[1::5]).all() and torch.isnan(nosat[3::5]).all()
    v470 = nosat[4::5]  # between 448 and 480 (the NaN code): rounding up overflows
    assert ((v470 == 448) | torch.isnan(v470)).all() and torch.isnan(v470).any() and (v470 == 448).any()
    e5 = quantize(x, "e5m2", rounding="stochastic", saturate=False, generator=gen(10))
    assert (e5[1::5] == float("inf")).all() and (e5[2::5] == -float("inf")).all() and torch.isnan(e5[0::5]).all()
    assert torch.isnan(quantize(x, "int8", rounding="stochastic", generator=gen(1))[0::5]).all()


def test_signed_zero_and_subnormal_flush():
    x = torch.tensor([-0.0, 0.0] * 100)
    q = quantize(x, "e4m3", rounding="stochastic", generator=gen(11))
    assert torch.equal(torch.signbit(q), torch.signbit(x)) and (q == 0).all()
    tiny = torch.full((1000,), 2.0**-9 * 0.5)
    assert (quantize(tiny, "e4m3", rounding="stochastic", flush_subnormals=True, generator=gen(1)) == 0).all()


def test_int_stochastic_probability_resolution():
    # exact fractions far from zero (float addition x + u would bias these) and a limited number of random bits
    for x0, frac in ((100.0, 0.3), (-57.0, 0.9), (5.0, 2.0**-20)):
        x = torch.full((N,), x0 + frac)
        q = quantize(x, "int8", rounding="stochastic", generator=gen(12))
        p = (q == x0 + 1).double().mean().item()
        se = math.sqrt(max(frac * (1 - frac), 1e-6) / N)
        assert abs(p - frac) < Z * se
    q = quantize(torch.full((N,), 2.3), "int8", rounding="stochastic", rand_bits=2, generator=gen(13))
    assert abs((q == 3).double().mean().item() - 0.25) < Z * math.sqrt(0.25 * 0.75 / N)


@pytest.mark.parametrize("name", ["e4m3", "e5m2", "e2m1", "e3m2"])
def test_all_bf16_bit_patterns_land_on_neighbours(name):
    x = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    q = quantize(x, name, rounding="stochastic", generator=gen(14)).float()
    xf = x.float()
    assert torch.equal(torch.isnan(q), torch.isnan(xf))
    f = FORMATS[name]
    fin = torch.isfinite(xf) & (xf.abs() <= f.max)
    lo, hi = neighbours(name, xf[fin].double().numpy())
    qd = q[fin].double().numpy()
    assert np.all((qd == lo) | (qd == hi))
    big = torch.isinf(xf) | (xf.abs() > f.max)
    assert torch.equal(q[big].abs(), torch.full_like(q[big], f.max))  # saturate=True
