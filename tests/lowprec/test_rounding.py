"""lowprec.rounding against gfloat 0.5.2 (an independent scalar implementation) and the eager reference against its
torch.compile twin, on every code, every midpoint and the float32 values beside each midpoint.

Also the numerics bugs of issue 9 that live in the rounding: 1 and 2 (toward_zero without saturation), 3 (e8m0 on
float32 subnormals), 7 (degenerate formats) and 8 (one stochastic-rounding rule for integers and floats).
"""

import dataclasses
import math

import gfloat
import ml_dtypes
import numpy as np
import pytest
import torch
from gfloat import RoundMode
from gfloat.formats import format_info_ocp_int8

import lowprec
from lowprec import FORMATS, decode, encode, float_format, quantize
from lowprec.codecs import codes_to_values
from lowprec.rounding import functional_round, random_bits, round_to_format

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")


def gf_info(f: lowprec.Format) -> gfloat.FormatInfo:
    """The gfloat description of a lowprec float format, from the format's defining fields only."""
    m = f.man_bits
    return gfloat.FormatInfo(
        f.name, f.bits, m + 1, bias=f.bias, is_signed=True,
        domain=gfloat.Domain.Extended if f.has_inf else gfloat.Domain.Finite, has_nz=True,
        num_high_nans=(2**m - 1) if f.has_inf else int(f.has_nan), has_subnormals=True, is_twos_complement=False)


def gf_grid(fi: gfloat.FormatInfo) -> np.ndarray:
    """gfloat's finite non-negative values of the format, sorted."""
    v = np.array([gfloat.decode_float(fi, c).fval for c in range(2 ** (fi.k - 1))], dtype=np.float64)
    return np.unique(v[np.isfinite(v)])


def probe_inputs(grid: np.ndarray, fmax: float) -> torch.Tensor:
    """Every value, every midpoint, the float32 values beside each midpoint, overflow, ±inf, NaN, both signs."""
    lo, hi = grid[:-1], grid[1:]
    mids = ((lo + hi) / 2).astype(np.float32)
    xs = [grid.astype(np.float32), mids, np.nextafter(mids, np.float32(np.inf)),
          np.nextafter(mids, np.float32(-np.inf)), (lo + 0.3 * (hi - lo)).astype(np.float32),
          np.array([fmax * 1.01, fmax * 1.99, fmax * 2, fmax * 4, 1e30, 3.4e38, np.inf, np.nan, 1e-40, 1e-45],
                   dtype=np.float32)]
    x = np.concatenate(xs)
    return torch.from_numpy(np.concatenate([x, -x]))


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal, any NaN equal to any NaN."""
    na, nb = torch.isnan(a), torch.isnan(b)
    return torch.equal(na, nb) and torch.equal(a[~na].view(torch.int32), b[~nb].view(torch.int32))


GF_MODE = {"nearest": RoundMode.TiesToEven, "toward_zero": RoundMode.TowardZero, "ties_away": RoundMode.TiesToAway}
CUSTOM = [float_format(3, 2), float_format(4, 3), float_format(5, 2), float_format(3, 4, has_inf=False),
          float_format(2, 2, has_inf=False), float_format(3, 1, has_inf=False, has_nan=False),
          float_format(1, 2, has_inf=False), float_format(1, 1, has_inf=False, has_nan=False),
          float_format(2, 0, has_inf=False), float_format(3, 0, has_inf=False), float_format(4, 3, bias=3)]
ORACLE_FORMATS = [FORMATS[n] for n in ("e4m3", "e5m2", "e3m2", "e2m3", "e2m1")] + CUSTOM


def gf_round(fi, x: torch.Tensor, mode: str, sat: bool) -> torch.Tensor:
    out = []
    sat = sat or fi.num_nans == 0  # no inf and no NaN: lowprec saturates anyway (gfloat raises)
    for v in x.tolist():
        if math.isnan(v) and fi.num_nans == 0:
            out.append(math.nan)  # lowprec keeps NaN as NaN where the format has none (gfloat raises)
        else:
            out.append(gfloat.round_float(fi, v, GF_MODE[mode], sat=sat))
    return torch.tensor(out, dtype=torch.float32)


@pytest.mark.parametrize("fmt", ORACLE_FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("mode", ["nearest", "toward_zero"])
@pytest.mark.parametrize("sat", [True, False])
def test_round_to_format_matches_gfloat(fmt, mode, sat):
    fi = gf_info(fmt)
    x = probe_inputs(gf_grid(fi), fmt.max)
    ref = gf_round(fi, x, mode, sat)
    if fmt.man_bits == 0 and mode == "nearest":
        # no mantissa bits: lowprec breaks ties to the even integer significand (0 between 0 and the smallest
        # normal, else the larger power of two: away from zero, ml_dtypes' e8m0 rule); gfloat/P3109 to the even code
        ref = gf_round(fi, x, "ties_away", sat)
        ref = torch.where(x.abs() == fmt.min_normal / 2, x * 0.0, ref)
    assert same(quantize(x, fmt, rounding=mode, saturate=sat), ref)


def test_bugs_1_2_toward_zero_without_saturation_follows_ieee():
    # IEEE 754 round-toward-zero: a finite overflow gives ±max, ±inf stays ±inf (NaN without inf)
    tz = dict(rounding="toward_zero", saturate=False)
    assert quantize(torch.tensor([479.0, 480.0, 1e6, -1e6]), "e4m3", **tz).tolist() == [448.0, 448.0, 448.0, -448.0]
    assert torch.isnan(quantize(torch.tensor([float("inf")]), "e4m3", **tz)).all()
    assert quantize(torch.tensor([65536.0, 1e30]), "e5m2", **tz).tolist() == [57344.0, 57344.0]
    bf_max = float(torch.finfo(torch.bfloat16).max)
    for f in ("bf16", "fp16", float_format(8, 3), float_format(8, 7, name="bf16_emul")):
        q = quantize(torch.tensor([float("inf"), -float("inf"), 3.4e38]), f, **tz)
        fmax = lowprec.get_format(f).max
        assert q[0] == float("inf") and q[1] == -float("inf") and q[2] == min(fmax, 3.4e38 if fmax > 3.4e38 else fmax)
    assert quantize(torch.tensor([3.4e38]), "bf16", **tz).item() == bf_max


# ---------------------------------------------------------------------------------------------- the twin
TWIN_FORMATS = ([FORMATS[n] for n in ("e4m3", "e5m2", "e3m2", "e2m3", "e2m1", "fp16")]
                + [dataclasses.replace(FORMATS[n], name=n + "_emul") for n in ("e4m3", "e5m2")] + CUSTOM)


@pytest.mark.parametrize("fmt", TWIN_FORMATS, ids=lambda f: f.name)
def test_functional_twin_equals_eager_on_every_code_and_midpoint(fmt):
    if fmt.name == "fp16":
        grid = np.unique(np.abs(np.arange(2**15, dtype=np.uint16).view(np.float16).astype(np.float64)))
        grid = grid[np.isfinite(grid)]
    else:
        grid = gf_grid(gf_info(fmt))
    x = torch.cat([probe_inputs(grid, fmt.max), torch.randn(2000) * 1e-39])
    for rounding in ("nearest", "toward_zero", "stochastic"):
        for sat in (True, False):
            for flush in (False, True):
                for rb in ((None, 3) if rounding == "stochastic" else (None,)):
                    rnd = random_bits(x.shape, x.device, torch.Generator().manual_seed(1))
                    eager = round_to_format(x, fmt, rounding, saturate=sat, flush_subnormals=flush, rand_bits=rb,
                                            generator=torch.Generator().manual_seed(1))
                    twin = functional_round(x, fmt, rounding, saturate=sat, flush_subnormals=flush, rand_bits=rb,
                                            random=rnd)
                    assert same(eager, twin), (fmt.name, rounding, sat, flush, rb)


def test_functional_twin_bf16_toward_zero_and_stochastic():
    x = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    x = torch.cat([x, torch.tensor([3.4e38, -3.4e38, float("inf")])])
    for rounding in ("toward_zero", "stochastic"):
        for sat in (True, False):
            rnd = random_bits(x.shape, x.device, torch.Generator().manual_seed(2))
            eager = round_to_format(x, FORMATS["bf16"], rounding, saturate=sat,
                                    generator=torch.Generator().manual_seed(2))
            assert same(eager, functional_round(x, FORMATS["bf16"], rounding, saturate=sat, random=rnd))


# ---------------------------------------------------------------------------------------------- bug 3
def test_bug_3_e8m0_on_float32_subnormals_matches_ml_dtypes():
    t = 2.0**-127
    x = torch.tensor([t, 1.2 * t, 1.4999 * t, 1.5 * t, 1.7 * t, 2.0**-126 * 0.99999, 2.0**-126, 0.7 * t, 0.5 * t])
    ref = torch.from_numpy(x.numpy().astype(ml_dtypes.float8_e8m0fnu).astype(np.float32))
    assert torch.equal(quantize(x, "e8m0"), ref)
    assert quantize(torch.tensor([t]), "e8m0").item() == t  # 2**-127 itself was sent to 2**-126
    assert quantize(torch.tensor([1.7 * t]), "e8m0", rounding="toward_zero").item() == t
    # stochastic: between 2**-127 and 2**-126, P(up) = (x - 2**-127) / 2**-127 (closed form)
    n = 20000
    q = quantize(torch.full((n,), 1.25 * t), "e8m0", rounding="stochastic", generator=torch.Generator().manual_seed(0))
    assert set(q.unique().tolist()) == {t, 2 * t}
    assert abs((q == 2 * t).double().mean().item() - 0.25) < 5 * math.sqrt(0.25 * 0.75 / n)


# ---------------------------------------------------------------------------------------------- bug 7
@pytest.mark.parametrize("e", [1, 2, 3, 4])
@pytest.mark.parametrize("m", [0, 1, 2, 3])
@pytest.mark.parametrize("flavour", ["", "fn", "fnn"])
def test_bug_7_every_accepted_format_is_consistent(e, m, flavour):
    name = f"e{e}m{m}{flavour}"
    if flavour == "" and m == 0:  # IEEE-like: NaN would need a non-zero mantissa
        with pytest.raises(ValueError, match="man_bits >= 1"):
            lowprec.get_format(name)
        return
    reserves_top = flavour == "" or (flavour == "fn" and m == 0)  # inf, or NaN with no mantissa bits
    if e == 1 and reserves_top:  # no exponent code left for normal numbers
        with pytest.raises(ValueError, match="exp_bits >= 2"):
            lowprec.get_format(name)
        return
    f = lowprec.get_format(name)
    fi = gf_info(f)
    grid = gf_grid(fi)
    assert f.max == fi.max == grid.max() and f.min_subnormal == grid[grid > 0].min()
    codes = torch.arange(2**f.bits, dtype=torch.uint8 if f.bits <= 8 else torch.int32)
    ref = torch.tensor([gfloat.decode_float(fi, c).fval for c in range(2**f.bits)], dtype=torch.float32)
    assert same(codes_to_values(codes, f), ref)
    x = probe_inputs(grid, f.max)
    x = x[~torch.isnan(x)] if not f.has_nan else x
    q = quantize(x, f)
    assert same(decode(encode(x, f)), q)
    assert (q[torch.isfinite(x)].abs() <= f.max).all()
    assert quantize(torch.tensor([3.0 * f.max]), f).item() == f.max


def test_bug_7_e1m1_is_rejected_with_what_is_valid():
    with pytest.raises(ValueError, match="e1m2fn, e1m1fnn"):
        float_format(1, 1)


# ---------------------------------------------------------------------------------------------- bug 8
def exact_p_away(fi, v: float, nbits: int, scale: float = 1.0) -> float:
    """gfloat's RoundMode.StochasticFastest, averaged exactly over all 2**nbits random values."""
    lo_mag = abs(gfloat.round_float(fi, v / scale, RoundMode.TowardZero)) * scale
    away = sum(abs(gfloat.round_float(fi, v / scale, RoundMode.StochasticFastest, srbits=k, srnumbits=nbits)) * scale
               > lo_mag for k in range(2**nbits))
    return away / 2**nbits


N, Z = 20000, 5.0


@pytest.mark.parametrize("nbits", [2, 3])
@pytest.mark.parametrize("v", [2.3, -2.3, 5.7, -5.7, -100.9, 3.6])
def test_bug_8_integer_stochastic_rounding_is_symmetric_like_float(v, nbits):
    # one rule: P(away from zero) = floor(f * 2**nb) / 2**nb, f the fractional distance of |x|; gfloat's
    # StochasticFastest on its int8 (k / 64) format is the oracle, and the closed form agrees with it
    p = exact_p_away(format_info_ocp_int8, v, nbits, scale=64.0)
    frac = abs(v) - math.floor(abs(v))
    assert p == math.floor(frac * 2**nbits) / 2**nbits
    q = quantize(torch.full((N,), v), "int8", rounding="stochastic", rand_bits=nbits,
                 generator=torch.Generator().manual_seed(3))
    away = (q.abs() > math.floor(abs(v))).double().mean().item()
    assert abs(away - p) <= Z * math.sqrt(max(p * (1 - p), 1e-4) / N)
    # the same rule for a float format: e4m3 at the same fractional distance between 2 and 2.25
    fv = math.copysign(2.0 + frac * 0.25, v)
    pf = exact_p_away(gf_info(FORMATS["e4m3"]), fv, nbits)
    assert pf == p
    qf = quantize(torch.full((N,), fv), "e4m3", rounding="stochastic", rand_bits=nbits,
                  generator=torch.Generator().manual_seed(4))
    assert abs((qf.abs() > 2.0).double().mean().item() - pf) <= Z * math.sqrt(max(pf * (1 - pf), 1e-4) / N)
