"""Edges of the quantize path (issue 9, bugs 4-6) and encode's NonFiniteError, against closed-form math and torch's
own casts."""

import pytest
import torch

import lowprec
from lowprec import DelayedScaler, decode, encode, quantize, quantize_with_scale
from lowprec.codecs import NonFiniteError

SPECS = ["e4m3", "e2m1", "int8", "bf16", "e4m3:tensor", "e4m3:channel", "e4m3:channel:axis=0", "e4m3:delayed16",
         "mxfp8", "mxfp4", "nvfp4", "e2m1:block16:scale=e4m3", "int4:block32", "e4m3:stochastic:tensor",
         "nvfp4:stochastic", "fp32:tensor"]


# ---------------------------------------------------------------------------------------------- bug 4
@pytest.mark.parametrize("f", SPECS)
@pytest.mark.parametrize("shape", [(0,), (0, 8), (4, 0), (2, 0, 3)])
def test_bug_4_empty_tensors(f, shape):
    x = torch.empty(shape)
    g = torch.Generator().manual_seed(0)
    q = quantize(x, f, generator=g)
    assert q.shape == x.shape and q.dtype == x.dtype
    q2, scale = quantize_with_scale(x, f, g)
    assert q2.shape == x.shape
    if scale is not None:
        assert torch.isfinite(scale).all()
    enc = encode(x, f, generator=g)
    assert decode(enc).shape == x.shape
    if lowprec.spec(f).scaling is not None and lowprec.spec(f).scaling.mode == "delayed":
        ds = DelayedScaler.from_spec(f)
        assert ds(x).shape == x.shape and ds.steps == 1 and torch.equal(ds.scale_inv, torch.tensor(1.0))


def test_bug_4_empty_finite_amax():
    from lowprec.scaling import finite_amax

    assert finite_amax(torch.empty(0)).item() == 0.0
    assert finite_amax(torch.empty(3, 0), dim=1, keepdim=True).shape == (3, 1)
    assert finite_amax(torch.empty(0, 4), keepdim=True).shape == (1, 1)


# ---------------------------------------------------------------------------------------------- bug 5
@pytest.mark.parametrize("f", ["fp32:tensor", "fp32:block32", "fp32:channel", "fp32:delayed16:margin=2",
                               "bf16:tensor", "bf16:block32"])
def test_bug_5_wide_element_formats_with_scaling_stay_finite(f):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 64, generator=g) * torch.exp(torch.randn(8, 64, generator=g) * 8)
    x[0, :4] = torch.tensor([3.0e38, -3.3e38, 1e-38, 1e-45])  # near float32's max, and subnormal
    x[1] = torch.randn(64, generator=g) * 1e-30
    q = quantize(x, f)
    assert torch.isfinite(q).all()
    # closed form: the element format's relative precision (2**-24 for fp32: one rounding each for x / s and
    # q * s, 2**-8 for bf16), plus float32's subnormal spacing 2**-149 for the tiny values
    rel = 2.0**-22 if f.startswith("fp32") else 2.0**-8
    assert ((q.double() - x.double()).abs() <= rel * x.double().abs() + 2.0**-148).all()


# ---------------------------------------------------------------------------------------------- bug 6
def test_bug_6_saturate_within_the_output_dtype():
    x = torch.tensor([65504.0, -65504.0, 60000.0, float("inf")], dtype=torch.float16)
    q = quantize(x, "bf16")  # bf16 rounds 65504 to 65536, which float16 cannot hold
    # the largest bf16 value float16 holds: 65280 = 255 * 2**8 (bf16 keeps 8 significant bits)
    assert q.tolist() == [65280.0, -65280.0, 59904.0, 65280.0] and q.dtype == torch.float16
    assert torch.equal(q.bfloat16().half(), q)  # representable in both
    assert quantize(x, "e8m0").tolist()[:1] == [32768.0]  # the largest power of two below 65504
    assert torch.equal(quantize(x, "fp32"), x)  # fp32 holds every float16 value
    sr = quantize(x.repeat(100), "bf16", rounding="stochastic", generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(sr).all()
    # without saturation the format's own overflow (inf) is what a float16 tensor shows
    assert quantize(x[:1], "bf16", saturate=False).item() == float("inf")


# ---------------------------------------------------------------------------------------------- encode
@pytest.mark.parametrize("f,named", [("e2m1", "e2m1"), ("mxfp4", "mxfp4"), ("nvfp4", "nvfp4"), ("int8", "int8"),
                                     ("e3m2", "e3m2"), ("e2m3:block32", "e2m3"), ("int4:channel", "int4")])
def test_encode_raises_non_finite_error_naming_the_format(f, named):
    x = torch.randn(4, 32)
    x[1, 3] = float("nan")
    with pytest.raises(NonFiniteError, match=named) as info:
        encode(x, f)
    assert isinstance(info.value, ValueError)
    enc = encode(torch.nan_to_num(x), f)  # finite values encode
    assert torch.equal(decode(enc), quantize(torch.nan_to_num(x), f))


def test_formats_with_nan_encode_it():
    x = torch.tensor([1.0, float("nan"), float("inf")])
    for f in ("e4m3", "e5m2", "mxfp8", "bf16", "e4m3:nosat"):
        got, ref = decode(encode(x, f)), quantize(x, f)
        assert torch.equal(torch.isnan(got), torch.isnan(ref)) and torch.equal(got[0], ref[0])
