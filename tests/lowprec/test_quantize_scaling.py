"""Scaled quantization against numpy/ml_dtypes re-implementations of the published rules (OCP MX, NVFP4, TE)."""

import math

import ml_dtypes
import numpy as np
import pytest
import torch

import lowprec
from lowprec import DelayedScaler, QuantSpec, Scaling, quantize, quantize_with_scale

ML = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2, "e2m1": ml_dtypes.float4_e2m1fn,
      "e3m2": ml_dtypes.float6_e3m2fn, "e2m3": ml_dtypes.float6_e2m3fn}
EMAX = {"e4m3": 8, "e5m2": 15, "e2m1": 2, "e3m2": 4, "e2m3": 2}  # OCP MX v1.0 table
MAX = {"e4m3": 448.0, "e5m2": 57344.0, "e2m1": 6.0, "e3m2": 28.0, "e2m3": 7.5}


def sat_cast(v: np.ndarray, name: str) -> np.ndarray:
    """Saturating round-to-nearest-even cast via ml_dtypes (clip first; ml_dtypes itself does not saturate)."""
    return np.clip(v, -MAX[name], MAX[name]).astype(np.float32).astype(ML[name]).astype(np.float32)


def mx_oracle(x: np.ndarray, name: str, block: int = 32) -> np.ndarray:
    """OCP MX: per block of `block` along the last axis, X = 2**(floor(log2(amax)) - emax_elem)."""
    out = np.empty_like(x)
    for idx in np.ndindex(*x.shape[:-1]):
        row = x[idx]
        for s in range(0, row.shape[0], block):
            b = row[s:s + block].astype(np.float32)
            amax = float(np.max(np.abs(b)))
            e = -127 if amax == 0 else max(-127, min(127, math.floor(math.log2(amax)) - EMAX[name]))
            scale = np.float32(2.0**e)
            out[idx][s:s + block] = sat_cast(b / scale, name) * scale
    return out


def nvfp4_oracle(x: np.ndarray) -> np.ndarray:
    """NVFP4 (TE): s_global = amax / (448 * 6); per 16 values s_block = e4m3((block_amax / 6) / s_global)."""
    amax = np.float32(np.max(np.abs(x)))
    g = np.float32(amax / np.float32(448.0 * 6.0))
    out = np.empty_like(x)
    for idx in np.ndindex(*x.shape[:-1]):
        row = x[idx]
        for s in range(0, row.shape[0], 16):
            b = row[s:s + 16]
            sb = sat_cast(np.float32(np.float32(np.max(np.abs(b))) / np.float32(6.0)) / g, "e4m3")
            scale = np.float32(sb * g)
            out[idx][s:s + 16] = 0.0 if scale == 0 else sat_cast(b / scale, "e2m1") * scale
    return out


def rand(shape, seed=0, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * torch.exp(torch.randn(*shape, generator=g) * spread)


@pytest.mark.parametrize("name,elem", [("mxfp8", "e4m3"), ("mxfp8_e5m2", "e5m2"), ("mxfp6", "e2m3"),
                                       ("mxfp6_e3m2", "e3m2"), ("mxfp4", "e2m1")])
def test_mx_formats_match_ocp_rule(name, elem):
    x = rand((5, 70))  # 70 = 2 * 32 + 6: a ragged last block
    q = quantize(x, name)
    ref = mx_oracle(x.numpy(), elem)
    assert np.array_equal(q.numpy(), ref)


def test_mx_block_along_axis0_and_other_sizes():
    x = rand((40, 3), seed=1)
    s = QuantSpec("e4m3", scaling=Scaling("block", axis=0, block_size=16, scale_format="e8m0"))
    ref = mx_oracle(x.numpy().T.copy(), "e4m3", block=16).T
    assert np.array_equal(quantize(x, s).numpy(), ref)
    for bs in (16, 32, 128):
        y = rand((3, 300), seed=bs)
        assert np.array_equal(quantize(y, f"e2m1:block{bs}:scale=e8m0").numpy(), mx_oracle(y.numpy(), "e2m1", bs))


def test_nvfp4_matches_te_rule():
    x = rand((4, 50), seed=2)  # 50 = 3 * 16 + 2
    assert np.array_equal(quantize(x, "nvfp4").numpy(), nvfp4_oracle(x.numpy()))
    # a block whose E4M3 scale underflows to zero is zeroed
    y = torch.cat([torch.full((16,), 1e6), torch.full((16,), 1e-6)])
    assert np.array_equal(quantize(y[None], "nvfp4").numpy(), nvfp4_oracle(y[None].numpy()))


def test_tensor_and_channel_fp32_scales():
    x = rand((6, 20), seed=3)
    amax = x.abs().max()
    s = amax / 448.0
    assert torch.equal(quantize(x, "e4m3:tensor"), (x / s).to(torch.float8_e4m3fn).float() * s)
    q, scale = quantize_with_scale(x, "e4m3:tensor")
    assert scale.numel() == 1 and torch.equal(scale.reshape(()), s)
    for axis in (0, 1, -1):
        q, scale = quantize_with_scale(x, f"e4m3:channel:axis={axis}")
        ax = axis % 2
        ch_amax = x.abs().amax(dim=1 - ax, keepdim=True)
        assert torch.equal(scale, ch_amax / 448.0)
        assert torch.equal(q, (x / scale).to(torch.float8_e4m3fn).float() * scale)
        # every channel's amax lands on the format's max (times its scale), up to one fp32 rounding of x/scale
        assert torch.allclose(q.abs().amax(dim=1 - ax, keepdim=True), ch_amax, rtol=1e-6)


def test_quantize_with_scale_block_expands():
    x = rand((3, 45), seed=4)
    q, scale = quantize_with_scale(x, "mxfp4")
    assert scale.shape == x.shape
    assert torch.equal(scale[:, :32], scale[:, :1].expand(3, 32)) and torch.equal(scale[:, 32:], scale[:, 32:33].expand(3, 13))
    el = q / scale
    assert torch.equal(lowprec.quantize(el, "e2m1"), el)  # elements on the E2M1 grid
    assert lowprec.quantize_with_scale(x, "e4m3")[1] is None


@pytest.mark.parametrize("f", ["e4m3:tensor", "e4m3:channel", "mxfp8", "mxfp4", "nvfp4", "int8:block32",
                               "int4:channel:axis=0", "e5m2:tensor:scale=e8m0", "e2m1:block16:scale=e4m3",
                               "nvfp4:stochastic", "mxfp8:stochastic", "e4m3:tensor:stochastic"])
def test_all_zero_never_nan(f):
    for x in (torch.zeros(4, 40), torch.cat([torch.zeros(2, 40), torch.randn(2, 40)])):
        q = quantize(x, f, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(q).all() and (q[:2] == 0).all()


def test_nan_and_inf_do_not_poison_the_scales():
    x = torch.randn(2, 32)
    x[0, 3], x[1, 5] = float("nan"), float("inf")
    q = quantize(x, "mxfp8")
    assert torch.isnan(q[0, 3]) and q[1, 5] == q[1].abs()[torch.isfinite(q[1])].max()  # inf saturates
    fin = torch.ones_like(x, dtype=torch.bool)
    fin[0, 3] = fin[1, 5] = False
    ref = x.clone()
    ref[1, 5] = 0.0
    ref[0, 3] = 0.0
    assert torch.equal(q[fin], quantize(ref, "mxfp8")[fin])
    assert torch.isnan(quantize(x, "mxfp8", saturate=False)[1, 5])  # e4m3 has no inf: NaN


def test_scaled_bf16_input():
    x = rand((4, 64), seed=5).to(torch.bfloat16)
    q = quantize(x, "mxfp8")
    assert q.dtype == torch.bfloat16
    assert torch.equal(q.float(), quantize(x.float(), "mxfp8"))  # power-of-two scales: exact in bf16


def test_delayed_scaler_te_rule():
    # TE's rule in lowprec's convention (q = round(x / d) * d, d the dequantization multiplier), against closed-form
    # math: d_t = max(amax_{t-4..t-1}) * 2**margin / 448 (exact here: the amaxes are powers of two); the first call
    # (init="unit") uses d = 1; the oracle rounding is torch's own saturating float8 cast
    ds = DelayedScaler("e4m3", history_len=4, margin=0)
    amaxes = [1.0, 8.0, 2.0, 0.5, 0.25, 0.25]
    d = 1.0
    for i, a in enumerate(amaxes):
        x = torch.tensor([a, -a / 3, 0.0, 1000.0 * a])  # the last one overflows: saturates to 448 * d
        q = ds(x)
        assert torch.equal(q, (x / d).clamp(-448, 448).to(torch.float8_e4m3fn).float() * d), i
        d = max(amaxes[max(0, i - 3): i + 1]) * 1000.0 / 448.0
        assert torch.equal(ds.scale_inv, torch.tensor(d, dtype=torch.float32))
        assert math.isclose(ds.scale.item(), 1.0 / d, rel_tol=1e-6)  # TE's multiplier, kept for state dicts
    ds2 = DelayedScaler("e4m3", history_len=4, margin=2, algo="most_recent")
    ds2(torch.tensor([2.0]))
    assert torch.equal(ds2.scale_inv, torch.tensor(2.0 * 4.0 / 448.0, dtype=torch.float32)) and math.isclose(ds2.scale.item(), 448.0 / 2.0 / 4.0,
                                                                      rel_tol=1e-6)
    # d = 8 / 448: 1 -> 56 and 2 -> 112 lie on the grid; 3 -> 168, a tie between 160 and 176, goes to even 160
    q = ds2(torch.tensor([1.0, 2.0, 3.0]))
    d2 = torch.tensor(8.0 / 448.0, dtype=torch.float32)
    assert torch.equal(q, torch.stack([56.0 * d2, 112.0 * d2, 160.0 * d2]))
    before = ds2.scale_inv.clone()
    ds2(torch.zeros(5))  # an all-zero tensor keeps the scale
    assert torch.equal(ds2.scale_inv, before)
    sd = ds.state_dict()
    ds3 = DelayedScaler("e4m3", history_len=4)
    ds3.load_state_dict(sd)
    assert torch.equal(ds3.scale_inv, ds.scale_inv) and torch.equal(ds3.amax_history, ds.amax_history)


def test_delayed_scaler_stale_amax_overflows():
    # a spike after a quiet history overflows (saturates) with the stale scale: the known failure mode
    ds = DelayedScaler("e4m3", history_len=16)
    for _ in range(3):
        ds(torch.tensor([0.01]))
    q = ds(torch.tensor([1.0]))
    assert q.item() < 0.02  # saturated at 448 / scale = 0.01
    with pytest.raises(ValueError):
        DelayedScaler("mxfp8")
