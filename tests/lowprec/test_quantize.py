"""Round-to-nearest / toward-zero against independent oracles: ml_dtypes casts, torch's casts, numpy."""

import dataclasses

import ml_dtypes
import numpy as np
import pytest
import torch

import lowprec
from tests.lowprec.oracles import ML_DTYPES
from lowprec import FORMATS, float_format, quantize

# ml_dtypes warns when it casts NaN/inf into formats without them; that is part of what we compare
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")

ML = {k: v for k, v in ML_DTYPES.items() if k != "e8m0"}  # e8m0 (a scale format) is tested in test_formats
NO_NAN = ("e3m2", "e2m3", "e2m1")  # ml_dtypes turns NaN into 0 there; we keep NaN (tested separately)


def grid(dt) -> np.ndarray:
    """All finite values of an ml_dtypes format (float64, sorted, unique, +0 only)."""
    bits = ml_dtypes.finfo(dt).bits
    v = np.arange(2**bits, dtype=np.uint8).view(dt).astype(np.float64)
    v = v[np.isfinite(v)]
    return np.unique(v)


def oracle_inputs(dt) -> np.ndarray:
    """Every representable value, every midpoint, values just beside each midpoint, gfloat's fractions,
    signed zeros, ±inf, NaN, huge and tiny values (float32)."""
    g = grid(dt)
    lo, hi = g[:-1], g[1:]
    mids = (lo + hi) / 2
    xs = [g, mids]
    m32 = mids.astype(np.float32)
    assert np.all(m32.astype(np.float64) == mids)  # midpoints are exact in float32
    xs += [np.nextafter(m32, np.float32(np.inf)), np.nextafter(m32, np.float32(-np.inf))]
    for f in (0.3, 0.6, 0.9, 1.25):
        xs.append(lo + f * (hi - lo))
    mx = float(g.max())
    xs.append(np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e30, -1e30, 3.4e38, 1e-30, -1e-30, 1e-45, -1e-45,
                        mx * 1.01, mx * 1.1, mx * 2, mx * 4, -mx * 1.1]))
    x = np.concatenate([np.asarray(a, dtype=np.float64) for a in xs]).astype(np.float32)
    return np.concatenate([x, -x])


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal, with any NaN equal to any NaN."""
    a, b = a.float(), b.float()
    na, nb = torch.isnan(a), torch.isnan(b)
    if not torch.equal(na, nb):
        return False
    return torch.equal(a[~na].view(torch.int32), b[~nb].view(torch.int32))


def ml_cast(x: torch.Tensor, dt) -> torch.Tensor:
    return torch.from_numpy(x.float().numpy().astype(dt).astype(np.float32))


def emulated(name: str):
    """The same format, unregistered, so quantize takes the bit-arithmetic path instead of torch's casts."""
    return dataclasses.replace(FORMATS[name], name=name + "_emul")


def all_bf16() -> torch.Tensor:
    return torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


@pytest.mark.parametrize("name", sorted(ML))
def test_nearest_nosat_matches_ml_dtypes(name):
    x = torch.from_numpy(oracle_inputs(ML[name]))
    if name in NO_NAN:
        x = x[~torch.isnan(x)]
    ref = ml_cast(x, ML[name])
    assert same(quantize(x, name, saturate=False), ref)
    if name in ("e4m3", "e5m2"):  # the emulation path agrees as well
        assert same(quantize(x, emulated(name), saturate=False), ref)


@pytest.mark.parametrize("name", sorted(ML))
def test_all_bf16_bit_patterns(name):
    x = all_bf16()
    keep = ~torch.isnan(x) if name in NO_NAN else torch.ones_like(x, dtype=torch.bool)
    ref = ml_cast(x[keep], ML[name])
    q = quantize(x, name, saturate=False)
    assert q.dtype == torch.bfloat16
    assert same(q[keep], ref)
    assert same(quantize(x.float(), name, saturate=False)[keep], ref)  # float32 input too
    if name in ("e4m3", "e5m2"):
        assert same(quantize(x, emulated(name), saturate=False)[keep], ref)


@pytest.mark.parametrize("name", sorted(NO_NAN))
def test_nan_stays_nan_where_ml_dtypes_gives_zero(name):
    x = torch.tensor([float("nan"), 1.0, float("inf"), -float("inf")])
    q = quantize(x, name, saturate=False)
    assert torch.isnan(q[0]) and q[1] == 1.0
    assert q[2] == FORMATS[name].max and q[3] == -FORMATS[name].max  # no inf in the format: saturates


@pytest.mark.parametrize("name", ["e4m3", "e5m2"])
def test_saturate_true_matches_torch_cast(name):
    x = torch.cat([torch.from_numpy(oracle_inputs(ML[name])), all_bf16().float()])
    if name == "e4m3":  # torch's CPU cast saturates; that is the reference
        ref = x.to(torch.float8_e4m3fn).float()
    else:  # torch's e5m2 cast does not saturate; clamping first is the saturating reference
        ref = x.clamp(-57344, 57344).to(torch.float8_e5m2).float()
    assert same(quantize(x, name), ref)
    assert same(quantize(x, emulated(name)), ref)
    fin = x[torch.isfinite(x)]
    assert quantize(fin, name).abs().max() <= FORMATS[name].max


@pytest.mark.parametrize("name,dt", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_16bit_targets_match_torch_casts(name, dt):
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(20000, generator=g) * 10.0 ** torch.randint(-30, 30, (20000,), generator=g).float(),
                   all_bf16().float(), torch.tensor([0.0, -0.0, float("nan"), 1e-45, 65519.0, 65520.0])])
    x = x[torch.isfinite(x)] if name == "bf16" else x
    ref = x.to(dt).float()
    assert same(quantize(x, name, saturate=False), ref)
    assert same(quantize(x, emulated(name), saturate=False), ref)
    sat = quantize(x, name)
    assert torch.isfinite(sat[~torch.isnan(x)]).all()


@pytest.mark.parametrize("fmt,dt", [(float_format(3, 4), ml_dtypes.float8_e3m4),
                                    (float_format(4, 3), ml_dtypes.float8_e4m3)])
def test_custom_ieee_formats_match_ml_dtypes(fmt, dt):
    x = torch.from_numpy(oracle_inputs(dt))
    assert same(quantize(x, fmt, saturate=False), ml_cast(x, dt))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtype_and_shape_preserved(dtype):
    x = torch.randn(3, 5, 7).to(dtype)
    for f in ("e4m3", "e2m1", "int4", "mxfp4", "e5m2:stochastic", "nvfp4"):
        q = quantize(x, f, generator=torch.Generator().manual_seed(0))
        assert q.dtype == dtype and q.shape == x.shape and q.device == x.device


def test_fp32_is_identity():
    x = torch.randn(100)
    x[0] = float("nan")
    assert same(quantize(x, "fp32"), x)


@pytest.mark.parametrize("bits", [4, 8])
def test_int_round_half_even_and_clamp(bits):
    hi = 2 ** (bits - 1) - 1
    vals = np.concatenate([np.arange(-2 * hi - 3, 2 * hi + 3, 0.25), [0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 1e9, -1e9,
                                                                      np.inf, -np.inf]]).astype(np.float32)
    x = torch.from_numpy(vals)
    ref = np.clip(np.round(vals.astype(np.float64)), -hi - 1, hi)  # numpy rounds half to even
    q = quantize(x, f"int{bits}")
    assert np.array_equal(q.numpy().astype(np.float64), ref)
    assert not torch.signbit(q[q == 0]).any()  # no negative zero for integers
    qs = quantize(x, lowprec.int_format(bits, symmetric=True))
    assert qs.min() == -hi
    qz = quantize(x, f"int{bits}", rounding="toward_zero")
    assert np.array_equal(qz.numpy().astype(np.float64), np.clip(np.trunc(vals.astype(np.float64)), -hi - 1, hi))
    assert torch.isnan(quantize(torch.tensor([float("nan")]), f"int{bits}")).all()  # NaN in, NaN out


@pytest.mark.parametrize("name", sorted(ML) + ["bf16", "fp16"])
def test_toward_zero_against_grid(name):
    if name in ML:
        g = grid(ML[name])
        x = torch.from_numpy(oracle_inputs(ML[name]))
    else:
        dt = torch.bfloat16 if name == "bf16" else torch.float16
        x = torch.cat([all_bf16().float(), torch.randn(5000) * 1e-5])
        x = x[torch.isfinite(x) & (x.abs() <= FORMATS[name].max)]
        g = np.unique(np.abs(x.to(dt).float().numpy().astype(np.float64)))
        g = np.unique(np.concatenate([g, [FORMATS[name].max]]))
        # every truncation lands on a value of the format: check with the format's own cast
    x = x[~torch.isnan(x)]
    q = quantize(x, name, rounding="toward_zero", saturate=True)
    a = np.abs(x.numpy().astype(np.float64))
    if name in ML:
        idx = np.searchsorted(g, a, side="right") - 1
        ref = np.sign(x.numpy()) * g[idx]
        assert np.array_equal(q.numpy().astype(np.float64), ref.astype(np.float64) + 0.0 * ref)
    else:
        dt = torch.bfloat16 if name == "bf16" else torch.float16
        assert torch.equal(q.to(dt).float(), q)  # representable
        assert (q.abs() <= x.abs()).all()  # toward zero
        # and it is the largest such value: the next value up exceeds |x|
        nxt = torch.nextafter(q.abs().to(dt), torch.tensor(float("inf"), dtype=dt)).float()
        assert (nxt > x.abs()).all()
    assert torch.equal(torch.signbit(q), torch.signbit(x))


def test_flush_subnormals():
    f = FORMATS["e4m3"]
    x = torch.tensor([f.min_subnormal, -f.min_subnormal * 3, f.min_normal, f.min_normal * 0.99, 1.0, -1e-3])
    q = quantize(x, "e4m3", flush_subnormals=True)
    assert q.tolist() == [0.0, 0.0, f.min_normal, f.min_normal, 1.0, 0.0]
    assert torch.signbit(q[1]) and torch.signbit(q[5])
    q2 = quantize(x, "e2m1:flush")
    assert q2.tolist()[:3] == [0.0, 0.0, 0.0]


def test_e8m0_matches_ml_dtypes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50000, generator=g) * 10.0 ** torch.randint(-37, 38, (50000,), generator=g).float()
    x = torch.cat([x, torch.tensor([1.5, 3.0, 6.0, 0.75, 2.0**-126 * 1.5, 2.0**127 * 1.5, 2.0**127 * 1.2, 0.0, -1.0,
                                    float("nan"), float("inf")])])
    x = x[x.abs() >= 2.0**-126]
    ref = ml_cast(x, ml_dtypes.float8_e8m0fnu)
    assert same(quantize(x, "e8m0", saturate=False), ref)
    q = quantize(torch.tensor([2.0**-130, 2.0**127 * 1.9, 0.0, -1.0]), "e8m0")
    assert q[0] == 2.0**-127 and q[1] == 2.0**127 and torch.isnan(q[2:]).all()  # no zero, no sign


@pytest.mark.parametrize("name", ["e4m3", "e5m2", "e3m2", "e2m3", "e2m1", "fp16"])
@pytest.mark.parametrize("rounding", ["nearest", "toward_zero"])
@pytest.mark.parametrize("saturate", [True, False])
def test_functional_round_equals_eager(name, rounding, saturate):
    # the torch.compile-friendly twin gives the same bits as the eager path (and hence as the oracles above)
    from lowprec.quantize import functional_round

    dt = ML.get(name, ml_dtypes.float8_e5m2)
    x = torch.cat([torch.from_numpy(oracle_inputs(dt)), all_bf16().float()])
    q = quantize(x, name, rounding=rounding, saturate=saturate)
    assert same(functional_round(x, FORMATS[name], rounding, saturate=saturate), q)


def test_functional_stochastic_equals_eager_and_is_unbiased():
    from lowprec.rounding import functional_round, random_bits

    x = torch.cat([torch.from_numpy(oracle_inputs(ML["e4m3"])), torch.randn(5000) * 1e-39])
    for name in ("e4m3", "e2m1", "bf16"):
        for sat in (True, False):
            rnd = random_bits(x.shape, x.device, torch.Generator().manual_seed(4))
            got = functional_round(x, FORMATS[name], "stochastic", saturate=sat, random=rnd)
            ref = quantize(x, name, rounding="stochastic", saturate=sat, generator=torch.Generator().manual_seed(4))
            assert same(got, ref)
    torch.manual_seed(0)  # without `random`: torch's global RNG
    x = torch.full((20000,), 1.0 + 0.3 * 0.125)
    q = functional_round(x, FORMATS["e4m3"], "stochastic")
    assert set(q.unique().tolist()) == {1.0, 1.125}
    assert abs((q == 1.125).double().mean().item() - 0.3) < 5 * (0.3 * 0.7 / 20000) ** 0.5


@pytest.mark.slow
def test_compiled_quantizer_matches_eager():
    # the torch.compile'd path gives the eager path's bits, stochastic rounding included (same generator seed)
    x = torch.cat([torch.from_numpy(oracle_inputs(ML["e2m1"])), all_bf16().float(), torch.randn(5000) * 1e-39])
    for fmt, rounding, saturate in (("e2m1", "nearest", False), ("e4m3", "stochastic", True),
                                    ("bf16", "stochastic", False)):
        f = lowprec.compiled_quantizer(fmt, rounding=rounding, saturate=saturate)
        got = f(x, torch.Generator().manual_seed(5))
        ref = quantize(x, fmt, rounding=rounding, saturate=saturate, generator=torch.Generator().manual_seed(5))
        assert same(got, ref), (fmt, rounding)
    # a float16 input saturates within float16 there too (bug 6): bf16's 65536 would be inf
    h = torch.tensor([65504.0, -65504.0, 65000.0, 1.0] * 50, dtype=torch.float16)
    f = lowprec.compiled_quantizer("bf16", rounding="stochastic")
    got = f(h, torch.Generator().manual_seed(6))
    assert torch.equal(got, quantize(h, "bf16", rounding="stochastic", generator=torch.Generator().manual_seed(6)))
    assert torch.isfinite(got).all() and got.abs().max() == 65280.0
    with pytest.raises(ValueError):
        lowprec.compiled_quantizer("mxfp8")


@pytest.mark.slow
def test_qtorch_agrees_where_semantics_agree():
    # qtorch (the peer) rounds ties away from zero and has no reserved codes; away from ties and inside the
    # OCP range its e5m2 and e2m1 grids agree with ours, and FloatingPoint(4, 3) is our qtorch_e4m3 (max 480)
    qtorch_quant = pytest.importorskip("qtorch.quant")
    from qtorch import FloatingPoint

    g = torch.Generator().manual_seed(0)
    for (e, m), name in (((5, 2), "e5m2"), ((2, 1), "e2m1"), ((4, 3), FloatingPoint(exp=4, man=3))):
        fmt = lowprec.get_format(name)
        x = (torch.rand(20000, generator=g) * 2 - 1) * fmt.max
        x = x[x.abs() >= fmt.min_normal]  # qtorch's subnormal handling differs
        ours = quantize(x, name)
        # exclude ties, where the two tie rules legitimately differ: nudging x by one float32 ulp toward and
        # away from zero changes the rounded value only next to a midpoint
        inward = quantize(torch.nextafter(x, torch.zeros_like(x)), name)
        outward = quantize(torch.nextafter(x, x * float("inf")), name)
        keep = inward == outward
        theirs = qtorch_quant.float_quantize(x, e, m, rounding="nearest")
        assert keep.float().mean() > 0.99 and torch.equal(ours[keep], theirs[keep]), name


def test_not_differentiable_and_input_untouched():
    x = torch.randn(50, requires_grad=True)
    before = x.detach().clone()
    for f in ("e4m3", "e2m1", "e4m3:stochastic", "mxfp8", "int4", "bf16"):
        q = quantize(x, f)
        assert not q.requires_grad
    assert torch.equal(x.detach(), before)


@pytest.mark.parametrize("rounding", ["nearest", "toward_zero", "stochastic"])
def test_signalling_nan_payloads_stay_nan(rounding):
    # float32 NaNs with only low mantissa bits (e.g. widened bf16 NaNs) must not become inf when bits are dropped
    x = torch.tensor([0x7F810000, 0x7F800001, 0xFF810000 - 2**32, 0x7FC00000, 0x7FFFFFFF, 0xFFFF0000 - 2**32,
                      0x7FBFFFFF], dtype=torch.int32).view(torch.float32).repeat(100)
    for name in ("e4m3", "e5m2", "e2m1", "bf16", "fp16", lowprec.float_format(8, 3), lowprec.float_format(8, 0, has_inf=False)):
        q = quantize(x, name, rounding=rounding, saturate=False, generator=torch.Generator().manual_seed(0))
        assert torch.isnan(q).all(), (name, q)
