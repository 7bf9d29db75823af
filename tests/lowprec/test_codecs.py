"""Codecs: codes are the formats' bit patterns (torch float8 / ml_dtypes / OCP FP4), exact round trips."""

import io

import ml_dtypes
import numpy as np
import pytest
import torch

import lowprec
from lowprec import Encoded, decode, encode, quantize
from lowprec.codecs import codes_to_values, pack_nibbles, unpack_nibbles, values_to_codes

# ml_dtypes warns when it casts NaN/inf into formats without them; that is part of what we compare
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")

ML = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2, "e3m2": ml_dtypes.float6_e3m2fn,
      "e2m3": ml_dtypes.float6_e2m3fn, "e2m1": ml_dtypes.float4_e2m1fn, "e8m0": ml_dtypes.float8_e8m0fnu}


def same(a, b):
    a, b = a.float(), b.float()
    return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(
        a[~torch.isnan(a)].view(torch.int32), b[~torch.isnan(b)].view(torch.int32))


@pytest.mark.parametrize("name", sorted(ML))
def test_every_code_matches_ml_dtypes(name):
    dt = ML[name]
    bits = ml_dtypes.finfo(dt).bits
    codes = np.arange(2**bits, dtype=np.uint8)
    vals = torch.from_numpy(codes.view(dt).astype(np.float32))
    f = lowprec.get_format(name)
    ours = codes_to_values(torch.from_numpy(codes), f)
    assert same(ours, vals)
    back = values_to_codes(vals, f)
    canonical = torch.from_numpy(codes)
    nan = torch.isnan(vals)
    assert torch.equal(back[~nan], canonical[~nan])  # NaN has several codes; one canonical NaN code is enough
    assert torch.isnan(codes_to_values(back[nan], f)).all()


@pytest.mark.parametrize("name,dt", [("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)])
def test_codes_are_torch_float8_bit_patterns(name, dt):
    x = torch.cat([torch.randn(5000) * 100, torch.tensor([0.0, -0.0, float("nan"), 1e-4])])
    enc = encode(x, name)
    assert enc.codes.dtype == torch.uint8
    assert torch.equal(enc.codes, quantize(x, name).to(dt).view(torch.uint8))
    assert same(enc.codes.view(dt).float(), quantize(x, name))  # hand the codes to native kernels as is


def test_fp4_codes_and_packing_follow_float4_e2m1fn_x2():
    # torch.float4_e2m1fn_x2: two OCP FP4 values per byte, the first in bits 3..0, the second in bits 7..4
    x = torch.randn(3, 25) * 3  # 75 values: an odd count
    enc = encode(x, "e2m1")
    q = quantize(x, "e2m1").reshape(-1)
    ref = torch.from_numpy(q.numpy().astype(ml_dtypes.float4_e2m1fn).view(np.uint8)) & 0xF
    assert enc.packed and enc.codes.numel() == (x.numel() + 1) // 2
    assert torch.equal(enc.codes[: x.numel() // 2], ref[0:-1:2] | (ref[1::2] << 4))
    assert torch.equal(enc.codes[-1], ref[-1])  # odd count: high nibble padded with 0
    assert enc.codes.view(torch.float4_e2m1fn_x2).dtype == torch.float4_e2m1fn_x2
    unpacked = encode(x, "e2m1", pack=False)
    assert torch.equal(unpacked.codes.reshape(-1), ref) and not unpacked.packed
    assert torch.equal(unpack_nibbles(pack_nibbles(ref), ref.numel()), ref)


def test_int_codes_twos_complement():
    x = torch.tensor([-8.0, -1.0, 0.0, 1.0, 7.0, 100.0])
    assert encode(x, "int4", pack=False).codes.tolist() == [8, 15, 0, 1, 7, 7]
    assert encode(x, "int8").codes.tolist() == [248, 255, 0, 1, 7, 100]
    with pytest.raises(ValueError, match="NaN"):
        encode(torch.tensor([float("nan")]), "int8")


@pytest.mark.parametrize("f", ["e4m3", "e5m2", "e3m2", "e2m3", "e2m1", "int8", "int4", "bf16", "fp16", "fp32",
                               "mxfp8", "mxfp6", "mxfp4", "nvfp4", "e4m3:channel:axis=0", "int8:block16",
                               "e5m2:tensor", "e4m3:block128:scale=e4m3", "e2m1:stochastic", "nvfp4:stochastic",
                               "e4m3:nosat", "e3m2:flush"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_encode_equals_quantize(f, dtype):
    gx = torch.Generator().manual_seed(0)
    x = (torch.randn(5, 45, generator=gx) * torch.exp(torch.randn(5, 45, generator=gx) * 2)).to(dtype)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    enc = encode(x, f, generator=g1)
    d = decode(enc)
    assert d.dtype == dtype and d.shape == x.shape
    assert same(d, quantize(x, f, generator=g2))
    # re-encoding the decoded tensor reproduces the codes (exact round trip) for deterministic rounding with
    # unscaled or power-of-two scaled specs (fp32/E4M3 scales are recomputed from the decoded amax, which moved)
    sc = lowprec.spec(f).scaling
    if "stochastic" not in f and (sc is None or sc.scale_format == "e8m0"):
        again = encode(d, f)
        if enc.packed:
            assert torch.equal(again.codes, enc.codes)
        else:  # NaN has several codes (its sign may change through a bf16 round trip)
            fin = ~torch.isnan(d)
            assert torch.equal(again.codes[fin], enc.codes[fin])


def test_nbytes_and_state_dict_round_trip():
    x = torch.randn(64, 64)
    assert encode(x, "e4m3").nbytes == 4096
    assert encode(x, "mxfp8").nbytes == 4096 + 64 * 2  # one E8M0 byte per 32 values
    assert encode(x, "mxfp4").nbytes == 2048 + 64 * 2
    assert encode(x, "nvfp4").nbytes == 2048 + 64 * 4 + 4  # E4M3 per 16 + fp32 tensor scale
    assert encode(x, "bf16").nbytes == 8192
    enc = encode(x, "nvfp4")
    buf = io.BytesIO()
    torch.save(enc.to_dict(), buf)
    buf.seek(0)
    back = Encoded.from_dict(torch.load(buf, weights_only=True))
    assert back.spec == enc.spec and torch.equal(decode(back), decode(enc))


def test_e4m3_widening_equals_torch_on_every_code():
    from lowprec.rounding import e4m3_to_float32

    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    assert same(e4m3_to_float32(codes), codes.to(torch.float32))
    assert torch.equal(torch.signbit(e4m3_to_float32(codes)), torch.signbit(codes.to(torch.float32)))
    no_nan = codes[(torch.arange(256) & 0x7F) != 0x7F]
    assert same(e4m3_to_float32(no_nan), no_nan.to(torch.float32))
    t = codes.reshape(16, 16).t()  # non-contiguous
    assert same(e4m3_to_float32(t), t.to(torch.float32))
