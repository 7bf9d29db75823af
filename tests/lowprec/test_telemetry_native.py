"""Telemetry.record's one-pass native counts (lowprec.fast.record_counts) against its torch counts (the fast path
off) on the same records: every count equal; sig2 and err2, summed in another order, within 1e-12 relative (float64
sums of at most 1e6 float32 squares: n·2**-53 ≈ 1e-10 is the worst case, observed ≤ 1e-13)."""
import contextlib
import math

import pytest
import torch

from lowprec import quantize_with_scale, spec
from lowprec.fast import _native_lib, record_counts
from lowprec.telemetry import Telemetry

from .oracles import fast_path_off

pytestmark = pytest.mark.skipif(_native_lib() is None, reason="no native helpers here (no C compiler)")


def edge_tensor(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 100
    x[:12] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-42, -1e-30, 448.0,
                           448.0 * (1 + 1e-6), 448.0 * (1 + 2e-6), 1e30, -3e38])
    x[12:40] = 0.0
    return x


def records(x: torch.Tensor, q: torch.Tensor, scale, fmt_max):
    rows = []
    for mode in (contextlib.nullcontext, fast_path_off):  # native, then the torch counts
        t = Telemetry(every=1)
        with mode():
            t.record("s:grad", "grad", x, q, scale=scale, fmt_max=fmt_max, fmt="f")
        acc = next(iter(t._accs.values()))
        rows.append({k: acc.value(k) for k in acc.counts} | {"smin": acc.scale_min, "smax": acc.scale_max})
    return rows


def same_counts(native: dict, ref: dict) -> None:
    assert native.keys() == ref.keys()
    for k in native:
        a, b = native[k], ref[k]
        if k in ("sig2", "err2") and math.isfinite(b) and b != 0:
            assert abs(a - b) <= 1e-12 * abs(b), (k, a, b)
        else:
            assert a == b or (math.isnan(a) and math.isnan(b)), (k, a, b)


@pytest.mark.parametrize("spec_", ["e4m3", "e4m3:tensor", "e5m2:tensor:nosat", "mxfp8", "nvfp4", "mxfp4:axis=0",
                                   "e2m1:tensor:flush", "e4m3:tensor:stochastic"])
@pytest.mark.parametrize("finite", [True, False])
def test_native_counts_equal_the_torch_counts_on_quantized_tensors(spec_, finite):
    x = edge_tensor(64 * 96, 3).reshape(64, 96)
    if finite:
        x = torch.nan_to_num(x, nan=1.0, posinf=2.0, neginf=-2.0)
    s = spec(spec_)
    q, scale = quantize_with_scale(x, s, torch.Generator().manual_seed(1))
    es = scale  # None, one value, or block scales (rows of 32 / 16 along the last axis): per element, as sites pass
    if es is not None and es.numel() not in (1, x.numel()):
        es = es.reshape(x.shape[0], -1).repeat_interleave(x.shape[1] // es.reshape(x.shape[0], -1).shape[1], dim=1) \
            if s.scaling.axis in (-1, 1) else None
    native, ref = records(x, q, es, s.format.max)
    same_counts(native, ref)


@pytest.mark.parametrize("scale_kind", ["none", "scalar", "rows", "elements"])
@pytest.mark.parametrize("fmt_max", [None, 448.0, 6.0])
def test_native_counts_equal_the_torch_counts_on_handmade_pairs(scale_kind, fmt_max):
    x = edge_tensor(3000, 7).reshape(30, 100)
    q = x.clone()
    q[:, ::3] = 0.0                                   # flushes
    q[0, 50:60] = float("inf")                        # overflows of finite x
    q[1, 50:60] = float("nan")
    q[2, 50:60] = -float("inf")
    q[3, 50:] = x[3, 50:] * (1 + 2**-10)              # small errors
    scale = {"none": None, "scalar": torch.tensor(0.75), "rows": torch.rand(30, 1) * 4,
             "elements": torch.rand(30, 100) * 4}[scale_kind]
    native, ref = records(x, q, scale, fmt_max)
    same_counts(native, ref)


@pytest.mark.parametrize("n", [1, 7, 9, 1001])
def test_native_counts_cover_a_ragged_end(n):
    x = edge_tensor(max(n, 40), 9)[-n:]
    q = torch.where(x.abs() > 30, torch.full((), float("inf")), torch.where(x.abs() < 5, torch.zeros(()), x))
    for scale in (None, torch.rand(n) + 0.5):
        native, ref = records(x, q, scale, 40.0)
        same_counts(native, ref)


@pytest.mark.parametrize("case", ["plain", "nan", "zeros", "negative zero", "signed zero tie", "inf", "one nan",
                                  "one negative zero", "float64", "ragged"])
def test_the_scale_range_from_the_native_pass_is_torchs_min_and_max(case):
    """scale_min / scale_max of a record: from lp_stats' own pass where it is certain, else torch's reductions; the
    same floats as torch's min() and max() either way (NaN scales, ±0 ties, inf, other dtypes, a ragged end)."""
    g = torch.Generator().manual_seed(11)
    n = {"ragged": 1003, "signed zero tie": 16}.get(case, 4096)
    x = torch.randn(n, generator=g)
    q = x.clone()
    q[::5] = 0.0
    scale = torch.rand(n, generator=g) * 3 + 1e-3
    if case == "nan":
        scale[777] = float("nan")
    elif case == "zeros":
        scale[100:140] = 0.0
    elif case == "negative zero":
        scale[5], scale[900] = -0.0, 0.0
        scale[1000:1010] = -0.0
    elif case == "signed zero tie":   # torch's min is -0.0 here; lanes keeping the first of a tie would say +0.0
        scale = torch.tensor([0.0, -0.0, 0.0, 1.13, 0.0, 1.89, 1.54, -0.0, 1.23, -0.0, 1.45, 1.99, 1.79, 0.0, -0.0,
                              1.24])
    elif case == "inf":
        scale[3] = float("inf")
    elif case == "one nan":
        scale = torch.tensor([float("nan")])
    elif case == "one negative zero":
        scale = torch.tensor([-0.0])
    elif case == "float64":
        scale = scale.double() * (1 + 1e-12)
    elif case == "ragged":
        scale[-1] = 1e-6      # the minimum sits in the tail that the lanes do not cover
        scale[-2] = 1e6
    native, ref = records(x, q, scale, 448.0)
    same_counts(native, ref)
    for k, want in (("smin", float(scale.min())), ("smax", float(scale.max()))):
        got = native[k]
        assert (math.isnan(got) and math.isnan(want)) or (got == want and math.copysign(1, got) ==
                                                          math.copysign(1, want)), (k, got, want)
    if case == "plain":   # (taken from the pass itself)
        c = record_counts(x, q, scale, 448.0)
        assert c["scale_min"] == float(scale.min()) and c["scale_max"] == float(scale.max())


def test_native_counts_take_non_contiguous_views():
    x = edge_tensor(4096, 5).reshape(64, 64)
    q = torch.where(x.abs() > 50, torch.zeros(()), x)
    native, ref = records(x.t(), q.t(), None, 60.0)
    same_counts(native, ref)


def test_record_counts_declines_what_it_does_not_cover():
    x = torch.randn(10)
    assert record_counts(x.double(), x.double(), None, None) is None
    assert record_counts(x, x.reshape(2, 5), None, None) is None
    with fast_path_off():
        assert record_counts(x, x, None, None) is None
    assert record_counts(x, x, None, None) is not None


def test_native_lost_update_counts_equal_torchs():
    """record_update's (intended, lost) by the native pass against the torch counts, with NaN, ±0 and ties."""
    import lowprec.fast as fast

    g = torch.Generator().manual_seed(0)
    old = torch.randn(10000, generator=g)
    unrounded = old + torch.randn(10000, generator=g) * 1e-3 * (torch.rand(10000, generator=g) < 0.7)
    new = torch.where(torch.rand(10000, generator=g) < 0.4, old, unrounded)
    old[:6] = torch.tensor([0.0, -0.0, float("nan"), 1.0, float("nan"), float("inf")])
    unrounded[:6] = torch.tensor([-0.0, 0.0, 1.0, float("nan"), float("nan"), float("inf")])
    new[:6] = torch.tensor([0.0, 0.0, float("nan"), 1.0, float("nan"), 1.0])
    intended = unrounded != old
    ref = (int(intended.sum()), int((intended & (new == old)).sum()))
    assert fast.lost_updates(old, unrounded, new) == ref
    assert ref[0] > 100 and ref[1] > 50


def _sum_cases():
    g = torch.Generator().manual_seed(5)
    big = 3.4028234663852886e38
    cases = [torch.randn(n, generator=g) * 10.0 ** e for n in (0, 1, 7, 64, 1000, 4099) for e in (-40, 0, 30)]
    for n in (1, 2, 17, 1000):
        for v in (float("nan"), float("inf"), -float("inf")):
            x = torch.randn(n, generator=g)
            x[n // 2] = v
            cases.append(x)
        cases.append(torch.full((n,), big / (4 * n)))                # at the bound: decided finite
        cases.append(torch.full((n,), big / (4 * n) * (1 + 2**-20)))  # just past it: torch sums
        cases.append(torch.full((n,), big / n * 0.99))               # finite values, a finite sum, undecided
        cases.append(torch.full((n,), min(big / n * 1.01, big)))     # finite values whose sum overflows
    nan_bits = torch.tensor([0x7FC00001, -0x400000, 0x7F800001], dtype=torch.int32).view(torch.float32)
    cases.append(nan_bits)                                           # NaN payloads, a negative NaN
    cases.append(torch.tensor([-0.0, 1e-45, -1e-45]))                # signed zero, subnormals
    return cases


def test_sum_finite_agrees_with_torchs_sum():
    from lowprec.fast import SUM_FINITE, SUM_NONFINITE, SUM_UNDECIDED, sum_finite, sums_finite
    cases = _sum_cases()
    kinds = [sum_finite(x) for x in cases]
    assert sums_finite(cases) == kinds
    for x, kind in zip(cases, kinds):
        finite_sum = bool(torch.isfinite(x.sum()))
        if kind == SUM_FINITE:
            assert finite_sum
        elif kind == SUM_NONFINITE:
            assert not finite_sum and not bool(torch.isfinite(x).all())
        else:
            assert kind == SUM_UNDECIDED and bool(torch.isfinite(x).all())
            assert 4 * x.numel() * float(x.abs().max()) > 3.4028234663852886e38
    assert kinds.count(SUM_FINITE) > 20 and kinds.count(SUM_NONFINITE) == 13 and kinds.count(SUM_UNDECIDED) == 12
    # what the native pass does not read is left to torch's sum
    x = torch.randn(8, 8)
    assert sum_finite(x.t()) == SUM_UNDECIDED and sum_finite(x.double()) == SUM_UNDECIDED
    assert sums_finite([x, x.t(), x[:, :3]]) == [SUM_FINITE, SUM_UNDECIDED, SUM_UNDECIDED]
    with fast_path_off():
        assert sum_finite(x) == SUM_UNDECIDED and sums_finite([x]) == [SUM_UNDECIDED]


@pytest.mark.parametrize("mode", ["deferred", True])
def test_nonfinite_checks_with_the_pre_check_equal_the_sums(mode):
    cases = _sum_cases()

    def events(ctx):
        t = Telemetry(every=1000, check_nonfinite=mode)
        out = []
        with ctx():
            for step in range(1, 4):
                t.set_step(step)
                for i, x in enumerate(cases):
                    if mode == "deferred":
                        t.flag(f"one:{i}", x)
                    else:
                        out.append(t.skip(f"one:{i}", x))
                t.flag_many([(f"many:{i}", x) for i, x in enumerate(cases[step::2])])
                t.flag_many([(f"big:{i}", x) for i, x in enumerate(cases[-20:])] + [("t", torch.randn(3, 3).t())])
                t.next_step()
        return out, t.nonfinite_events()

    native, ref = events(contextlib.nullcontext), events(fast_path_off)
    assert native == ref
    if mode == "deferred":
        assert len(native[1]) > 30         # the NaN/inf values and the overflowing sums
