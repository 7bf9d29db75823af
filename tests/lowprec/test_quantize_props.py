"""Property tests (hypothesis) and bad-input errors."""

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import lowprec
from lowprec import QuantSpec, Rounding, Scaling, quantize, spec

FMTS = ["e4m3", "e5m2", "e3m2", "e2m3", "e2m1", "bf16", "fp16", "int8", "int4"]
floats = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, width=32)
arrays = st.lists(floats, min_size=1, max_size=64).map(lambda v: torch.tensor(v, dtype=torch.float32))


@settings(max_examples=60, deadline=None)
@given(x=arrays, fmt=st.sampled_from(FMTS + ["mxfp8", "mxfp4", "mxfp6"]),
       rounding=st.sampled_from(["nearest", "toward_zero", "stochastic"]), seed=st.integers(0, 2**31))
def test_idempotent(x, fmt, rounding, seed):
    g = torch.Generator().manual_seed(seed)
    q = quantize(x, fmt, rounding=rounding, generator=g)
    assert torch.equal(quantize(q, fmt, rounding=rounding, generator=g), q)


wide = st.one_of(floats, st.floats(width=32, allow_nan=False, allow_infinity=True))  # up to ±inf
wide_arrays = st.lists(wide, min_size=1, max_size=64).map(lambda v: torch.tensor(v, dtype=torch.float32))


@settings(max_examples=150, deadline=None)
@given(x=wide_arrays, fmt=st.sampled_from(FMTS + ["e8m0", "qtorch_e4m3"]),
       rounding=st.sampled_from(["nearest", "toward_zero"]), saturate=st.booleans())
def test_monotone(x, fmt, rounding, saturate):
    # NaN outputs are not dropped: from NaN-free input a NaN may only be a non-saturating overflow of a format whose
    # overflow value is NaN (e4m3: no inf), never with toward_zero (IEEE: a finite value truncates to ±max); such
    # a NaN counts as ±inf (its input's sign) in the order
    f = lowprec.get_format(fmt)
    if f.kind == "scale":
        x = x.abs() + 2.0**-126  # e8m0 holds positive values only
    xs, _ = torch.sort(x)
    q = quantize(xs, fmt, rounding=rounding, saturate=saturate)
    nan = torch.isnan(q)
    allowed = (xs.abs() > f.max) & (not saturate) & f.has_nan & (not f.has_inf)
    if rounding == "toward_zero":
        allowed &= torch.isinf(xs)
    assert not (nan & ~allowed).any(), (xs[nan & ~allowed], q[nan & ~allowed])
    ordered = torch.where(nan, torch.copysign(torch.full_like(q, float("inf")), xs), q)
    assert (ordered[1:] >= ordered[:-1]).all()


@settings(max_examples=60, deadline=None)
@given(x=arrays, fmt=st.sampled_from(FMTS[:-2] + ["mxfp8", "mxfp4", "e4m3:channel", "e2m1:tensor"]),
       rounding=st.sampled_from(["nearest", "toward_zero"]), saturate=st.booleans())
def test_sign_symmetric(x, fmt, rounding, saturate):
    q = quantize(x, fmt, rounding=rounding, saturate=saturate)
    qn = quantize(-x, fmt, rounding=rounding, saturate=saturate)
    nan = torch.isnan(q)
    assert torch.equal(torch.isnan(qn), nan) and torch.equal(qn[~nan], -q[~nan])  # NaN where NaN, not dropped


@settings(max_examples=40, deadline=None)
@given(x=arrays, fmt=st.sampled_from(FMTS), rounding=st.sampled_from(["nearest", "toward_zero", "stochastic"]))
def test_error_within_one_ulp_and_nearest_is_nearest(x, fmt, rounding):
    f = lowprec.get_format(fmt)
    xc = x.clamp(f.min, f.max)
    q = quantize(xc, fmt, rounding=rounding, generator=torch.Generator().manual_seed(0))
    a = xc.abs().double()
    ulp = torch.where(a < f.min_normal, torch.full_like(a, f.min_subnormal),
                      2.0 ** (torch.floor(torch.log2(a.clamp_min(1e-300))) - (0 if f.kind == "int" else f.man_bits)))
    ulp = torch.ones_like(a) if f.kind == "int" else ulp.clamp_min(f.min_subnormal)
    err = (q.double() - xc.double()).abs()
    assert (err <= ulp * (0.5 if rounding == "nearest" else 1.0) + 1e-30).all()


@given(fmt=st.sampled_from(FMTS + ["mxfp8", "nvfp4"]), rounding=st.sampled_from(list(Rounding)),
       scaling=st.sampled_from([None, Scaling("tensor"), Scaling("channel", axis=0),
                                Scaling("block", 1, 16, "e8m0"), Scaling("block", -1, 128, "e4m3")]),
       saturate=st.booleans(), flush=st.booleans(), rand_bits=st.sampled_from([None, 4, 16]))
def test_spec_string_round_trip(fmt, rounding, scaling, saturate, flush, rand_bits):
    assume(not (fmt == "bf16" and scaling is not None and scaling.scale_format == "e4m3"))  # rejected (below)
    s = spec(fmt, rounding=rounding, scaling=scaling, saturate=saturate, flush_subnormals=flush,
             rand_bits=rand_bits)
    assert QuantSpec.parse(str(s)) == s


def test_spec_examples():
    assert str(spec("mxfp8")) == "mxfp8"
    assert spec("mxfp8") == QuantSpec("e4m3", scaling=Scaling("block", -1, 32, "e8m0"))
    assert spec("nvfp4").scaling == Scaling("block", -1, 16, "e4m3")
    assert spec("nvfp4:stochastic").rounding is Rounding.STOCHASTIC
    assert spec("e4m3:block128").scaling == Scaling("block", block_size=128)
    assert spec("e4m3:nosat").saturate is False
    assert spec("int4:block32").format.name == "int4"
    assert spec("e5m2:stochastic").rounding == "stochastic"  # str enum
    assert spec(spec("e4m3"), rounding="stochastic").rounding is Rounding.STOCHASTIC
    assert spec("mxfp8", scaling="none").scaling is None


def test_bad_inputs():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="e4m3"):
        quantize(x, "e9m9x")
    with pytest.raises(TypeError, match="float32"):
        quantize(torch.arange(4), "e4m3")
    with pytest.raises(TypeError, match="float32"):
        quantize(torch.ones(4, dtype=torch.float64), "e4m3")
    with pytest.raises(TypeError, match="Tensor"):
        quantize([1.0, 2.0], "e4m3")
    for bs in (0, -16, 3.5, "32"):
        with pytest.raises(ValueError, match="block size"):
            Scaling("block", block_size=bs)
    with pytest.raises(ValueError, match="block size"):
        quantize(x, "e4m3:block0")
    with pytest.raises(ValueError, match="nearest"):
        quantize(x, "e4m3", rounding="up")
    with pytest.raises(ValueError, match="tensor"):
        Scaling("row")
    with pytest.raises(ValueError, match="e8m0"):
        Scaling("block", scale_format="e5m2")
    with pytest.raises(ValueError, match="token"):
        spec("e4m3:fast")
    with pytest.raises(ValueError, match="axis"):
        quantize(x, "e4m3:channel:axis=2")
    with pytest.raises(ValueError, match="rand_bits"):
        spec("e4m3", rand_bits=0)
    with pytest.raises(ValueError):
        spec("")
    for f in ("fp32:block16:scale=e4m3", "bf16:tensor:scale=e4m3"):  # the global scale would zero every block
        with pytest.raises(ValueError, match="E4M3 block scales"):
            spec(f)
