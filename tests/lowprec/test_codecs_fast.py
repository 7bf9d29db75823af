"""Fast paths of the codecs and telemetry give the same bits as independent oracles (ml_dtypes, torch's float8
casts and widenings, closed-form counts): table decodes on every code, packed 4-bit bytes, single-cast float8
encodes on special values, the stored scales, telemetry counts on finite data."""

import math

import ml_dtypes
import numpy as np
import pytest
import torch

import lowprec
from lowprec import Encoded, decode, encode, quantize
from lowprec.codecs import element_scale, codes_to_values
from lowprec.quantize import quantize_with_scale
from lowprec.telemetry import Telemetry

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")

ML = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2, "e3m2": ml_dtypes.float6_e3m2fn,
      "e2m3": ml_dtypes.float6_e2m3fn, "e2m1": ml_dtypes.float4_e2m1fn, "e8m0": ml_dtypes.float8_e8m0fnu}
ALL_BYTES = np.arange(256, dtype=np.uint8)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same values bit for bit, except that any NaN matches any NaN of the same sign."""
    a, b = a.float().reshape(-1), b.float().reshape(-1)
    na, nb = torch.isnan(a), torch.isnan(b)
    if not torch.equal(na, nb) or not torch.equal(torch.signbit(a[na]), torch.signbit(b[nb])):
        return False
    return torch.equal(a[~na].view(torch.int32), b[~nb].view(torch.int32))


def ml_values(name: str, codes: np.ndarray) -> torch.Tensor:
    dt = ML[name]
    mask = (1 << ml_dtypes.finfo(dt).bits) - 1
    return torch.from_numpy((codes & mask).view(dt).astype(np.float32))


@pytest.mark.parametrize("name", sorted(ML))
def test_every_byte_decodes_as_ml_dtypes(name):
    # every byte value (bits above a 4/6-bit format's width are ignored); signs of zeros and NaNs included
    ours = codes_to_values(torch.from_numpy(ALL_BYTES), lowprec.get_format(name))
    assert bits_equal(ours, ml_values(name, ALL_BYTES))
    # non-contiguous and multi-dimensional codes keep their shape
    t = torch.from_numpy(ALL_BYTES).reshape(16, 16).t()
    ours_t = codes_to_values(t, lowprec.get_format(name))
    assert ours_t.shape == (16, 16)
    assert bits_equal(ours_t, ml_values(name, t.contiguous().numpy()).reshape(16, 16))


@pytest.mark.parametrize("name,dt", [("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)])
def test_float8_decode_equals_torch_widening_on_every_code(name, dt):
    codes = torch.arange(256, dtype=torch.uint8)
    ours = codes_to_values(codes, lowprec.get_format(name))
    ref = codes.view(dt).to(torch.float32)
    assert bits_equal(ours, ref)


def test_e4m3_table_and_bit_trick_agree_bit_for_bit():
    # small CPU tensors decode by the table, large ones by e4m3_to_float32: identical bits, NaNs included
    from lowprec.rounding import e4m3_to_float32

    codes = torch.arange(256, dtype=torch.uint8)
    small = codes_to_values(codes, lowprec.get_format("e4m3"))
    ref = e4m3_to_float32(codes.view(torch.float8_e4m3fn))
    assert torch.equal(small.view(torch.int32), ref.view(torch.int32))
    big = codes.repeat(300)  # 76800 codes: above the table's size limit
    assert torch.equal(codes_to_values(big, lowprec.get_format("e4m3")).view(torch.int32),
                       small.repeat(300).view(torch.int32))


@pytest.mark.parametrize("name,bits", [("int8", 8), ("int4", 4)])
def test_int_codes_decode_as_twos_complement(name, bits):
    ours = codes_to_values(torch.from_numpy(ALL_BYTES), lowprec.get_format(name))
    low = ALL_BYTES.astype(np.int64) & ((1 << bits) - 1)
    ref = np.where(low >= 1 << (bits - 1), low - (1 << bits), low).astype(np.float32)
    assert torch.equal(ours, torch.from_numpy(ref))


@pytest.mark.parametrize("numel", [512, 511, 1])
@pytest.mark.parametrize("name", ["e2m1", "int4"])
def test_packed_bytes_decode_low_nibble_first(name, numel):
    # every byte value as packed codes: element 2i is byte i's low nibble, element 2i+1 its high nibble
    packed = torch.from_numpy(ALL_BYTES)[: (numel + 1) // 2]
    enc = Encoded(packed, None, lowprec.spec(name), torch.Size([numel]), torch.float32, None, True)
    nib = np.stack([ALL_BYTES & 0xF, ALL_BYTES >> 4], axis=-1).reshape(-1)[:numel]
    if name == "e2m1":
        ref = ml_values("e2m1", nib)
    else:
        ref = torch.from_numpy(np.where(nib >= 8, nib.astype(np.int64) - 16, nib).astype(np.float32))
    assert bits_equal(decode(enc), ref)


def test_packed_scaled_decode_matches_quantize():
    x = torch.randn(7, 33, generator=torch.Generator().manual_seed(3)) * 5  # odd count, ragged blocks
    for f in ("nvfp4", "mxfp4", "int4:block16"):
        enc = encode(x, f)
        assert enc.packed
        assert bits_equal(decode(enc), quantize(x, f))


SPECIAL = [0.0, -0.0, float("inf"), -float("inf"), float("nan"), -float("nan"), 448.0, 464.0, 465.0, -480.0,
           57344.0, 61439.0, 61440.0, -1e9, 2.0**-9, 2.0**-10, -2.0**-17, 3 * 2.0**-18, 1e-30]


@pytest.mark.parametrize("f", ["e4m3", "e5m2", "e5m2:nosat", "e4m3:tensor", "e5m2:tensor", "e4m3:block128",
                               "e4m3:block16:axis=0", "e4m3:channel:axis=0", "mxfp8", "mxfp8_e5m2",
                               "e5m2:block32:nosat", "e4m3:nosat", "e4m3:flush", "e4m3:block16:scale=e4m3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float8_codes_are_casts_of_quantized_values(f, dtype):
    # codes = torch's float8 cast of quantize()'s output (NaN codes included), and ml_dtypes agrees on the rest
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 50, generator=g) * torch.exp(torch.randn(6, 50, generator=g) * 3)
    x.view(-1)[: len(SPECIAL)] = torch.tensor(SPECIAL)
    x.view(-1)[-len(SPECIAL):] = torch.tensor(SPECIAL) * 1e-3
    x = x.to(dtype)
    s = lowprec.spec(f)
    dt = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}[s.format.name]
    enc = encode(x, f)
    unscaled = lowprec.spec(s, scaling="none")
    if s.scaling is None:
        v = quantize(x.float(), unscaled)
    else:  # the element values: the input divided by its (exact, decoded) scale, quantized unscaled
        scale = element_scale(enc, x.float()).expand(x.shape)
        v = quantize(x.float() / torch.where(scale == 0, torch.ones_like(scale), scale), unscaled)
        v = torch.where(scale == 0, v * 0.0, v)  # a zero (E4M3) block scale zeroes its block
    ref = v.to(dt).view(torch.uint8)
    assert enc.codes.dtype == torch.uint8 and enc.codes.shape == x.shape
    nan = torch.isnan(v)
    assert torch.equal(enc.codes[~nan], ref[~nan])
    assert torch.equal(enc.codes[nan] & 0x7F, torch.full_like(enc.codes[nan], 0x7F))
    assert torch.equal(enc.codes[nan] >> 7, torch.signbit(v[nan]).to(torch.uint8))
    ml = torch.from_numpy(v[~nan].numpy().astype(ML[s.format.name]).view(np.uint8))
    assert torch.equal(enc.codes[~nan], ml)
    assert bits_equal(decode(enc), quantize(x, f))


@pytest.mark.parametrize("f", ["e4m3:block128", "e4m3:block16:axis=0", "e4m3:channel:axis=0", "e5m2:tensor",
                               "mxfp8", "nvfp4", "mxfp6", "int8:block16"])
def testelement_scale_equals_quantize_with_scale(f):
    x = torch.randn(9, 70, generator=torch.Generator().manual_seed(1)) * 3
    x[2] = 0.0  # an all-zero row (zero amax)
    enc = encode(x, f)
    q = decode(enc)
    _, ref = quantize_with_scale(x, f)
    ours = element_scale(enc, q)
    assert torch.equal(ours.expand_as(x).view(torch.int32), ref.expand_as(x).view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_telemetry_counts_on_finite_data_closed_form(dtype):
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(4000, generator=g) * torch.exp(torch.randn(4000, generator=g) * 4)).to(dtype)
    x[:50] = 0.0
    x[50:60] = -0.0
    q = quantize(x, "e4m3")
    scale = torch.rand(4000, generator=g) + 0.5
    tel = Telemetry(every=1)
    tel.record("s", "state", x, q, fmt_max=448.0, fmt="e4m3")
    tel.record("t", "state", x, q, scale=scale, fmt_max=448.0, fmt="e4m3")
    tel.record("u", "state", x, q, fmt="e4m3")
    xs, qs = x.double().numpy(), q.double().numpy()
    ax = np.abs(xs)
    nonzero = np.count_nonzero(xs)
    flushed = np.count_nonzero((xs != 0) & (qs == 0))
    rows = {r["site"]: r for r in tel.rows()}
    lim32 = np.float32(448.0 * (1 + 1e-6))
    lims = {"s": np.float32(lim32).astype(np.float64)}
    for site, r in rows.items():
        assert r["numel"] == 4000 and r["nan_count"] == 0 and r["inf_count"] == 0
        assert r["flushed_frac"] == flushed / nonzero
        assert r["zero_frac"] == np.count_nonzero(qs == 0) / 4000
        if site != "t":  # (site t: limits scaled per element, the same expression in every branch)
            sat = np.count_nonzero(ax > lims[site]) if site in lims else 0
            assert r["saturated_frac"] == sat / 4000
    assert rows["s"]["saturated_frac"] > 0 and rows["s"]["flushed_frac"] > 0
    sig2, err2 = float(np.sum(xs * xs)), float(np.sum((xs - qs) ** 2))
    if dtype == torch.float32:  # (bf16 inputs: x - q is rounded to bf16 before the norm)
        assert math.isclose(rows["s"]["sqnr_db"], 10 * math.log10(sig2 / err2), rel_tol=1e-9)
