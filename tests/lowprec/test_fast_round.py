"""lowprec.fast (the compiled rounding) against lowprec.rounding.round_to_format, its eager reference (itself
checked against gfloat in test_rounding.py), bit for bit: every code, every midpoint and the float32 values
beside it, overflow, ±inf, NaN, float32 subnormals, both signs; all roundings, saturate or not, flushing, random
bit counts; stochastic rounding from the same generator gives the same values and leaves the generator in the
same state. Also: quantize() takes the fast path for large tensors with unchanged results, and a new length does
not compile again."""

import numpy as np
import pytest
import torch

from lowprec import FORMATS, float_format, quantize, quantize_with_scale
from lowprec.fast import MIN_NUMEL_STOCHASTIC, fast_path_settings, fast_round, fast_round_ok, set_fast_path
from lowprec.rounding import round_to_format
from lowprec.spec import Rounding

from .oracles import fast_path_off
from .test_rounding import gf_grid, gf_info, probe_inputs, same

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")

# e4m3 (NaN, no inf), e5m2 (inf), e2m1 (neither), no mantissa bits; the rest (slow) as well
FAST_FORMATS = [FORMATS["e4m3"], FORMATS["e5m2"], FORMATS["e2m1"], float_format(3, 0, has_inf=False)] + [
    pytest.param(f, marks=pytest.mark.slow) for f in
    (FORMATS["e3m2"], float_format(4, 3, bias=3), float_format(3, 1, has_inf=False, has_nan=False))]


@pytest.fixture
def fast_everywhere():
    was = fast_path_settings()
    set_fast_path(True, min_numel=2)
    yield
    set_fast_path(*was)


def probes(fmt) -> torch.Tensor:
    grid = gf_grid(gf_info(fmt))
    return torch.cat([probe_inputs(grid, fmt.max), torch.randn(2000) * 1e-39,
                      torch.randn(3000) * fmt.max / 3, torch.tensor([-0.0, 0.0, float("-inf"), -float("nan")])])


@pytest.mark.parametrize("fmt", FAST_FORMATS, ids=lambda f: getattr(f, "name", None))
@pytest.mark.parametrize("rounding", ["nearest", "toward_zero", "stochastic"])
def test_fast_round_equals_eager_bit_for_bit(fast_everywhere, fmt, rounding):
    x = probes(fmt)
    for sat in (True, False):
        for flush in (False, True):
            for rb in ((None, 3) if rounding == "stochastic" else (None,)):
                g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
                ref = round_to_format(x, fmt, rounding, saturate=sat, flush_subnormals=flush, rand_bits=rb,
                                      generator=g1)
                got = fast_round(x, fmt, rounding, saturate=sat, flush_subnormals=flush, rand_bits=rb, generator=g2)
                if rounding == "nearest" and not sat and fmt.name == "e4m3":
                    assert got is None   # torch's float8 cast stays the path (its NaNs have no sign)
                    continue
                assert got is not None, (fmt.name, rounding)
                assert same(ref, got), (fmt.name, rounding, sat, flush, rb)
                assert torch.equal(g1.get_state(), g2.get_state())  # the same stream, drawn alike


def test_fast_round_bf16_and_fp16_stochastic_on_every_bf16_value(fast_everywhere):
    x = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    x = torch.cat([x, x * (1 + 2.0**-10), torch.tensor([3.4e38, -3.4e38, float("inf")])])
    for fmt in (FORMATS["bf16"], FORMATS["fp16"]):
        for sat in (True, False):
            ref = round_to_format(x, fmt, "stochastic", saturate=sat, generator=torch.Generator().manual_seed(3))
            got = fast_round(x, fmt, "stochastic", saturate=sat, generator=torch.Generator().manual_seed(3))
            assert got is not None and same(ref, got), (fmt.name, sat)
    fp16 = np.unique(np.arange(2**16, dtype=np.uint16).view(np.float16).astype(np.float32))
    x = torch.from_numpy(np.concatenate([fp16, np.nextafter(fp16, np.float32(np.inf))]))
    for r in ("nearest", "toward_zero"):
        assert same(round_to_format(x, FORMATS["fp16"], r), fast_round(x, FORMATS["fp16"], r))


def test_where_the_fast_path_does_not_apply_it_says_so(fast_everywhere):
    x = torch.randn(1000)
    assert fast_round(x, FORMATS["bf16"], "nearest") is None  # torch's cast (eager) is the reference there
    assert fast_round(x, FORMATS["int4"], "nearest") is None
    assert fast_round(x, FORMATS["e8m0"], "nearest") is None
    assert fast_round(x.half(), FORMATS["e4m3"], "nearest") is None
    assert fast_round(x[:1], FORMATS["e4m3"], "nearest") is None  # below min_numel
    assert not fast_round_ok(FORMATS["bf16"], Rounding.NEAREST) and fast_round_ok(FORMATS["bf16"], Rounding.STOCHASTIC)
    with pytest.raises(ValueError, match="min_numel"):
        set_fast_path(True, min_numel=1)


@pytest.mark.parametrize("spec_", ["e4m3", "mxfp8", "nvfp4", "e5m2:tensor"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_quantize_takes_the_fast_path_with_unchanged_results(spec_, rounding):
    x = torch.randn(256, 4096) * 3
    x[0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e-30])
    with fast_path_off():
        ref = quantize(x, spec_, rounding=rounding, generator=torch.Generator().manual_seed(5))
    assert x.numel() >= MIN_NUMEL_STOCHASTIC and fast_round(x, FORMATS["e4m3"], rounding) is not None
    got = quantize(x, spec_, rounding=rounding, generator=torch.Generator().manual_seed(5))
    assert same(ref, got)


def test_a_new_length_does_not_compile_again(fast_everywhere, monkeypatch):
    from torch._dynamo.utils import counters

    import lowprec.fast as fast

    monkeypatch.setattr(fast, "_native", {"lib": None})  # the compiled kernels, not the native helpers, run here
    fmt = float_format(4, 2, has_inf=False)  # a spec no other test compiles
    before = counters["stats"]["unique_graphs"]
    for n in (3000, 5001, 70000):
        x = torch.randn(n)
        assert same(fast_round(x, fmt, "toward_zero"), round_to_format(x, fmt, "toward_zero"))
    assert counters["stats"]["unique_graphs"] - before == 1


@pytest.mark.parametrize("spec_", ["mxfp8", "mxfp4", "mxfp6_e3m2", "mxfp8:axis=0", "mxfp4:nosat", "mxfp8:toward_zero",
                                   "e4m3:tensor", "e5m2:tensor:nosat", "e2m1:tensor:flush", "nvfp4",
                                   "nvfp4:stochastic", "mxfp8:stochastic", "e5m2:tensor:stochastic:randbits=4",
                                   "nvfp4:axis=0:toward_zero"])
def test_fused_scaled_quantize_equals_eager_bit_for_bit(spec_):
    from lowprec import spec
    from lowprec.fast import fast_scaled, fast_scaled_ok
    from lowprec.scaling import to_scaling_view

    x = torch.randn(1050, 1000) * 3  # 1000: a ragged last block of 8 (padded); >= MIN_NUMEL_STOCHASTIC
    x[0, :6] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e-30, 1e-41, -0.0])
    x[1], x[2, :32], x[3, :32], x[4, :32] = 0.0, 1e-42, 1e30, 2.0**-127  # zero, subnormal, huge, tiny blocks
    x[5] = torch.logspace(-40, 38, 1000)  # E4M3 block scales from 0 (their blocks zeroed) to the largest
    s = spec(spec_)
    assert fast_scaled_ok(s) and fast_scaled(x, s, to_scaling_view(x, s.scaling)[0]) is not None

    def g() -> torch.Generator:
        return torch.Generator().manual_seed(11)
    g1, g2 = g(), g()
    with fast_path_off():
        ref_q, ref_s = quantize_with_scale(x, s, g1)
        ref = quantize(x, s, generator=g())
    q, sc = quantize_with_scale(x, s, g2)
    assert same(ref_q, q) and same(ref_s, sc) and same(ref, quantize(x, s, generator=g()))
    assert torch.equal(g1.get_state(), g2.get_state())
    assert not fast_scaled_ok(spec("mxfp8:scale_round=ceil")) and not fast_scaled_ok(spec("nvfp4:block16x16"))
