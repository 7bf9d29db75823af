"""lowprec.fast's native helpers against their references, bit for bit: the random words against
lowprec.rounding.random_bits (torch's own random_) and against a pure-Python mt19937 written from the algorithm's
definition; the fused native stochastic rounding against the eager round_to_format (every code, midpoint and the
values beside it, overflow, ±inf, NaN, subnormals, saturate or not, flushing, random bit counts), the generator
left in the same state, at every chunk and mt19937 block boundary; the huge-page outputs against plain ones."""

import importlib
import math

import pytest
import torch

from lowprec import FORMATS, fast, float_format, quantize
from lowprec.fast import fast_path_settings, fast_round, set_fast_path
from lowprec.rounding import random_bits, round_to_format

from .oracles import fast_path_off
from .test_rounding import gf_grid, gf_info, probe_inputs, same

pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning"),
              pytest.mark.skipif(fast._native_lib() is None, reason="no C compiler: the native helpers are off")]

CPU = torch.device("cpu")
# lengths around the kernel's 4096-value chunks and mt19937's 624-word blocks, odd and even
LENGTHS = [1, 2, 3, 311, 312, 313, 623, 624, 625, 1247, 1248, 1249, 4095, 4096, 4097, 8193, 20001]


@pytest.fixture
def fast_everywhere():
    was, threads = fast_path_settings(), torch.get_num_threads()
    set_fast_path(True, min_numel=2)
    torch.set_num_threads(1)  # the native nearest / toward_zero loop runs where torch runs one thread
    yield
    set_fast_path(*was)
    torch.set_num_threads(threads)


def _advanced(seed: int, k: int) -> torch.Generator:
    """A generator seeded with ``seed`` after ``k`` int64 random_ draws (2k mt19937 words): any block position."""
    g = torch.Generator().manual_seed(seed)
    if k:
        torch.empty(k, dtype=torch.int64).random_(generator=g)
    return g


@pytest.mark.parametrize("k", [0, 1, 311, 312, 313])
def test_native_random_bits_equal_torch_and_leave_the_same_state(k):
    g1, g2 = _advanced(3, k), _advanced(3, k)
    for n in LENGTHS:  # one after another from the same stream: every start position within a block
        ref = random_bits(torch.Size([n]), CPU, g1)
        got = fast._native_random_bits(torch.Size([n]), g2)
        assert got is not None and got.dtype == torch.int32 and got.shape == (n,)
        assert torch.equal(ref, got), n
        assert torch.equal(g1.get_state(), g2.get_state()), n
    # and torch's other draws go on from the same place
    assert torch.equal(torch.rand(5, generator=g1), torch.rand(5, generator=g2))


def test_native_random_bits_shape_and_default_generator():
    torch.manual_seed(12)
    ref = random_bits(torch.Size([7, 33]), CPU, None)
    after = torch.default_generator.get_state()
    torch.manual_seed(12)
    got = fast._native_random_bits(torch.Size([7, 33]), None)
    assert got.shape == (7, 33) and torch.equal(ref, got)
    assert torch.equal(after, torch.default_generator.get_state())


def _mt19937_words(seed: int, count: int) -> list[int]:
    """The first ``count`` outputs of MT19937 (Matsumoto & Nishimura 1998) seeded by init_genrand(seed)."""
    s = [seed & 0xFFFFFFFF]
    for i in range(1, 624):
        s.append((1812433253 * (s[-1] ^ (s[-1] >> 30)) + i) & 0xFFFFFFFF)
    out, idx = [], 624
    for _ in range(count):
        if idx == 624:
            for i in range(624):
                y = (s[i] & 0x80000000) | (s[(i + 1) % 624] & 0x7FFFFFFF)
                s[i] = s[(i + 397) % 624] ^ (y >> 1) ^ (0x9908B0DF if y & 1 else 0)
            idx = 0
        y = s[idx]
        idx += 1
        y ^= y >> 11
        y ^= (y << 7) & 0x9D2C5680
        y ^= (y << 15) & 0xEFC60000
        y ^= y >> 18
        out.append(y)
    return out


def test_native_random_bits_are_mt19937_words_in_random_bits_layout():
    # independent of torch's code: word 2i of the result is draw 2i+1, word 2i+1 is draw 2i without its top bit
    # (one int64 random_() value = draw 2i << 32 | draw 2i+1, modulo 2**63)
    n = 1500
    got = fast._native_random_bits(torch.Size([n]), torch.Generator().manual_seed(20261202))
    w = _mt19937_words(20261202, n)
    want = [w[i + 1] if i % 2 == 0 else w[i - 1] & 0x7FFFFFFF for i in range(n)]
    assert got.view(-1).tolist() == [v - (1 << 32) if v >= 1 << 31 else v for v in want]


def _probes(fmt) -> torch.Tensor:
    grid = gf_grid(gf_info(fmt))
    return torch.cat([probe_inputs(grid, fmt.max), torch.randn(2000) * 1e-39, torch.randn(5000) * fmt.max / 3,
                      torch.tensor([-0.0, 0.0, float("-inf"), -float("nan")])])


NATIVE_FORMATS = [FORMATS["e4m3"], FORMATS["e5m2"], FORMATS["e2m1"], FORMATS["e3m2"], float_format(3, 0, has_inf=False),
                  float_format(4, 3, bias=3)]


def _counting(monkeypatch, name: str = "_native_stochastic") -> list[bool]:
    """Records, per call of the native kernel ``name``, whether it returned a result."""
    calls, real = [], getattr(fast, name)

    def spy(*a, **k):
        r = real(*a, **k)
        calls.append(r is not None)
        return r
    monkeypatch.setattr(fast, name, spy)
    return calls


@pytest.mark.parametrize("fmt", NATIVE_FORMATS, ids=lambda f: f.name)
def test_native_stochastic_equals_eager_bit_for_bit(fast_everywhere, monkeypatch, fmt):
    calls = _counting(monkeypatch)
    x = _probes(fmt)
    for sat in (True, False):
        for flush in (False, True):
            for rb in (None, 1, 3):
                g1, g2 = _advanced(7, 5), _advanced(7, 5)
                ref = round_to_format(x, fmt, "stochastic", saturate=sat, flush_subnormals=flush, rand_bits=rb,
                                      generator=g1)
                got = fast_round(x, fmt, "stochastic", saturate=sat, flush_subnormals=flush, rand_bits=rb,
                                 generator=g2)
                assert same(ref, got), (fmt.name, sat, flush, rb)
                assert torch.equal(g1.get_state(), g2.get_state())
    assert calls and all(calls)  # the native kernel ran (not the compiled fallback)


@pytest.mark.parametrize("fmt", NATIVE_FORMATS + [FORMATS["e2m3"], float_format(2, 0, has_inf=False)],
                         ids=lambda f: f.name)
def test_native_nearest_and_toward_zero_equal_eager_bit_for_bit(fast_everywhere, monkeypatch, fmt):
    calls = _counting(monkeypatch, "_native_round")
    x = _probes(fmt)
    for rounding in ("nearest", "toward_zero"):
        for sat in (True, False):
            for flush in (False, True):
                ref = round_to_format(x, fmt, rounding, saturate=sat, flush_subnormals=flush)
                got = fast_round(x, fmt, rounding, saturate=sat, flush_subnormals=flush)
                if rounding == "nearest" and not sat and fmt.name == "e4m3":
                    assert got is None   # torch's cast, whose NaNs have no sign, stays the path (next test)
                    continue
                assert same(ref, got), (fmt.name, rounding, sat, flush)
    assert calls and all(calls)


@pytest.mark.parametrize("spec_", ["e4m3:nosat", "e4m3:tensor:nosat", "e4m3:block32:nosat", "e5m2:nosat"])
def test_quantize_gives_the_same_nan_signs_at_every_size(fast_everywhere, spec_):
    """Overflow and ±inf onto a format without inf, not saturating: NaN, with the sign bit the eager path gives
    (torch's float8 cast: none for e4m3), whether the tensor is small or large."""
    from lowprec import quantize, spec

    x = torch.tensor([float("inf"), -float("inf"), float("nan"), -float("nan"), 465.0, -480.0, -1e9, 3.0] * 4)
    big = x.repeat(2048)
    s = spec(spec_)
    small_q, big_q = quantize(x, s), quantize(big, s)
    with fast_path_off():
        ref = quantize(x, s)
    assert torch.equal(small_q.view(torch.int32), ref.view(torch.int32))
    assert torch.equal(big_q.view(torch.int32), ref.repeat(2048).view(torch.int32))


def test_native_nearest_on_every_fp16_value_and_only_on_one_thread(fast_everywhere, monkeypatch):
    calls = _counting(monkeypatch, "_native_round")
    fp16 = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    x = torch.cat([fp16, torch.nextafter(fp16, torch.tensor(float("inf")))])
    for r in ("nearest", "toward_zero"):
        assert same(round_to_format(x, FORMATS["fp16"], r), fast_round(x, FORMATS["fp16"], r))
    assert calls == [True, True]
    torch.set_num_threads(2)  # the compiled kernel is parallel: it takes over, with the same bits
    assert same(round_to_format(x, FORMATS["fp16"], "nearest"), fast_round(x, FORMATS["fp16"], "nearest"))
    assert calls == [True, True, False]


def test_native_stochastic_bf16_fp16_and_every_chunk_boundary(fast_everywhere, monkeypatch):
    calls = _counting(monkeypatch)
    x = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    x = torch.cat([x, x * (1 + 2.0**-10), torch.tensor([3.4e38, -3.4e38, float("inf")])])
    for fmt in (FORMATS["bf16"], FORMATS["fp16"]):
        for sat in (True, False):
            g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
            assert same(round_to_format(x, fmt, "stochastic", saturate=sat, generator=g1),
                        fast_round(x, fmt, "stochastic", saturate=sat, generator=g2)), (fmt.name, sat)
            assert torch.equal(g1.get_state(), g2.get_state())
    g1, g2 = _advanced(5, 100), _advanced(5, 100)
    for n in LENGTHS[1:]:  # consecutive calls: the stream continues across calls exactly as eager draws it
        y = torch.randn(n) * 100
        assert same(round_to_format(y, FORMATS["e4m3"], "stochastic", generator=g1),
                    fast_round(y, FORMATS["e4m3"], "stochastic", generator=g2)), n
        assert torch.equal(g1.get_state(), g2.get_state()), n
    assert all(calls)


def test_without_the_native_helpers_the_compiled_path_gives_the_same_bits(fast_everywhere, monkeypatch):
    x = _probes(FORMATS["e4m3"])
    ref = round_to_format(x, FORMATS["e4m3"], "stochastic", saturate=False, generator=_advanced(1, 3))
    native = fast_round(x, FORMATS["e4m3"], "stochastic", saturate=False, generator=_advanced(1, 3))
    monkeypatch.setitem(fast._native, "lib", None)
    g = _advanced(1, 3)
    compiled = fast_round(x, FORMATS["e4m3"], "stochastic", saturate=False, generator=g)
    assert same(ref, native) and same(ref, compiled)
    assert not torch.equal(g.get_state(), _advanced(1, 3).get_state())  # it drew from g
    assert fast._native_random_bits(torch.Size([4]), None) is None


def test_default_generator_through_quantize(fast_everywhere):
    x = torch.randn(3001) * 10
    torch.manual_seed(99)
    with fast_path_off():
        ref = quantize(x, "e5m2", rounding="stochastic")
    after = torch.default_generator.get_state()
    torch.manual_seed(99)
    got = quantize(x, "e5m2", rounding="stochastic")
    assert same(ref, got) and torch.equal(after, torch.default_generator.get_state())


@pytest.mark.parametrize("n", [(1 << 20) - 1, (1 << 20) + 3, 3 << 20])  # around the huge-page size (4 MiB)
@pytest.mark.parametrize("spec_,rounding", [("e4m3", "nearest"), ("e4m3", "stochastic"), ("mxfp8", "nearest"),
                                             ("nvfp4", "stochastic")])
def test_huge_page_outputs_change_no_bit(n, spec_, rounding):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 4
    with fast_path_off():
        ref = quantize(x, spec_, rounding=rounding, generator=torch.Generator().manual_seed(2))
    got = quantize(x, spec_, rounding=rounding, generator=torch.Generator().manual_seed(2))
    assert same(ref, got) and got.shape == x.shape and got.data_ptr() != x.data_ptr()
    e = fast._empty((n,), torch.float32)
    assert e.shape == (n,) and e.dtype == torch.float32 and e.is_contiguous()


def _edge_rows() -> torch.Tensor:
    """1050 x 1000 values (1000: a ragged last block of 16, 32 or 64, padded) with NaN, ±inf and tiny values, a zero
    row, subnormal, huge and tiny blocks, and a row whose block scales run from 0 (blocks zeroed) to the largest."""
    x = torch.randn(1050, 1000) * 3
    x[0, :6] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e-30, 1e-41, -0.0])
    x[1], x[2, :32], x[3, :32], x[4, :32] = 0.0, 1e-42, 1e30, 2.0**-127
    x[5] = torch.logspace(-40, 38, 1000)
    return x


@pytest.mark.parametrize("spec_", ["mxfp8", "mxfp4", "mxfp6_e3m2", "mxfp8:axis=0", "mxfp4:nosat", "mxfp8:toward_zero",
                                   "mxfp8_e5m2:nosat", "mxfp4:flush", "mxfp8:block64", "mxfp8:block2000"])
def test_native_mx_equals_eager_bit_for_bit(fast_everywhere, monkeypatch, spec_):
    from lowprec import quantize_with_scale, spec

    calls = _counting(monkeypatch, "_native_mx")
    x = _edge_rows()
    s = spec(spec_)
    with fast_path_off():
        ref_q, ref_s = quantize_with_scale(x, s)
    q, sc = quantize_with_scale(x, s)
    assert same(ref_q, q) and same(ref_s, sc)
    # blocks over the native loop's cap go to the compiled kernel (same bits)
    assert calls and all(calls) == (s.scaling.block_size <= fast._MX_MAX_BLOCK)


def _special_tensors(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * 3
    mixed = x.clone()
    mixed[:6] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e-30, 1e-41, -0.0])[:n]
    return [x, mixed, torch.zeros(n), torch.full((n,), float("nan")), torch.full((n,), -float("inf")),
            torch.full((n,), 1e-42), torch.where(torch.arange(n) == n // 2, 3e38, 0.0), x * 1e-39, x * 1e37]


@pytest.mark.parametrize("spec_", ["e4m3:tensor", "e5m2:tensor:nosat", "e2m1:tensor:flush", "e4m3:tensor:toward_zero",
                                   "e3m2:tensor", "int8:tensor"])
@pytest.mark.parametrize("n", [2, 7, 4095, 4096, 4097, 8193, 20001])
def test_native_tensor_scaled_equals_eager_bit_for_bit(fast_everywhere, monkeypatch, spec_, n):
    from lowprec import quantize_with_scale, spec

    s = spec(spec_)
    calls = _counting(monkeypatch, "_native_tensor_scaled")
    for x in _special_tensors(n):
        with fast_path_off():
            ref_q, ref_s = quantize_with_scale(x.reshape(-1, 1) if n % 2 else x, s)
        q, sc = quantize_with_scale(x.reshape(-1, 1) if n % 2 else x, s)
        assert same(ref_q, q) and same(ref_s, sc)
    if fast.fast_scaled_ok(s):  # (int8 is not a float format: the eager path, nothing native)
        assert calls and all(calls)


@pytest.mark.parametrize("spec_", ["e4m3:tensor", "e5m2:tensor", "e5m2:tensor:nosat", "e2m1:tensor:flush",
                                   "e4m3:tensor:toward_zero", "e3m2:tensor"])
def test_native_tensor_scaled_segments_equal_eager_tensor_by_tensor(fast_everywhere, monkeypatch, spec_):
    """lowprec.optim_batch's batch of per-tensor scaled tensors (the wrapped optimizer's gradients): each segment
    of the native pass equals the eager quantize_with_scale of that tensor alone (values and scale)."""
    from lowprec import quantize_with_scale, spec
    from lowprec.optim_batch import quantize_segments

    s = spec(spec_)
    calls = _counting(monkeypatch, "tensor_scaled_segments")
    monkeypatch.setattr("lowprec.optim_batch.tensor_scaled_segments", fast.tensor_scaled_segments)
    xs = [t.reshape(-1, 1) if i % 3 == 0 else t for n in (1, 2, 7, 64, 4097)
          for i, t in enumerate(_special_tensors(n))]
    seg = quantize_segments(xs, s)
    for j, x in enumerate(xs):
        with fast_path_off():
            ref_q, ref_s = quantize_with_scale(x, s)
        assert same(ref_q, seg.q[j]) and same(ref_s, seg.scale(j)), (j, x.shape)
    assert calls == [True]
    with fast_path_off():
        assert fast.tensor_scaled_segments(torch.ones(4), [4], s) is None    # the fast path off: not taken
    assert fast.tensor_scaled_segments(torch.ones(4), [4], spec("e4m3:tensor:stochastic")) is None


@pytest.mark.parametrize("spec_", ["e4m3:tensor", "mxfp8", "e5m2:tensor:nosat"])
def test_without_the_native_helpers_the_compiled_scaled_kernel_gives_the_same_bits(fast_everywhere, monkeypatch,
                                                                                     spec_):
    from lowprec import quantize_with_scale, spec

    monkeypatch.setattr(fast, "_native", {"lib": None})
    s = spec(spec_)
    for x in _special_tensors(8193):
        with fast_path_off():
            ref_q, ref_s = quantize_with_scale(x, s)
        q, sc = quantize_with_scale(x, s)
        assert same(ref_q, q) and same(ref_s, sc)


@pytest.mark.parametrize("spec_", ["nvfp4", "nvfp4:axis=0", "nvfp4:toward_zero", "nvfp4:nosat", "nvfp4:flush",
                                   "e3m2:block16:scale=e4m3:nosat", "e3m2:block32:scale=e4m3",
                                   "e2m1:block5000:scale=e4m3"])
def test_native_nvfp4_equals_eager_bit_for_bit(fast_everywhere, monkeypatch, spec_):
    from lowprec import quantize_with_scale, spec

    calls = _counting(monkeypatch, "_native_nv")
    x = _edge_rows()  # with block5000: rows over one chunk
    s = spec(spec_)
    for t in (x, x[:7, :33], torch.zeros(64, 64), torch.full((64, 64), float("nan"))):
        with fast_path_off():
            ref_q, ref_s = quantize_with_scale(t, s)
        q, sc = quantize_with_scale(t, s)
        assert same(ref_q, q) and same(ref_s, sc)
    assert calls and all(calls)


@pytest.mark.parametrize("spec_", ["nvfp4:stochastic", "nvfp4:axis=0:stochastic", "nvfp4:stochastic:randbits=4",
                                   "e2m1:block5000:scale=e4m3:stochastic", "e4m3:block16:scale=e4m3:stochastic:nosat",
                                   "e2m1:block15:scale=e4m3:stochastic"])
def test_native_nvfp4_stochastic_draws_the_eager_words(fast_everywhere, monkeypatch, spec_):
    from lowprec import quantize_with_scale, spec

    calls = _counting(monkeypatch, "_native_nv")
    x = _edge_rows()
    s = spec(spec_)
    for k, t in enumerate((x, x[:7, :33], torch.zeros(64, 64))):
        g_ref, g_got = _advanced(k, 311 * k), _advanced(k, 311 * k)  # any mt19937 block position
        with fast_path_off():
            ref_q, ref_s = quantize_with_scale(t, s, g_ref)
        q, sc = quantize_with_scale(t, s, g_got)
        assert same(ref_q, q) and same(ref_s, sc)
        assert torch.equal(g_ref.get_state(), g_got.get_state())
    # odd block lengths are left to the compiled / eager path (their passes would round an odd count)
    assert calls and all(calls) == (s.scaling.block_size % 2 == 0)


@pytest.mark.parametrize("spec_,n", [("e4m3:block128", 64), ("e4m3:block128", 192), ("e4m3", 96),
                                     ("e4m3:block32:scale=e8m0", 96), ("e4m3:block16:scale=e4m3", 48),
                                     ("e4m3:block7", 30)])
def test_native_row_decode_equals_the_eager_decode(fast_everywhere, monkeypatch, spec_, n):
    """The wrapped optimizer's batched state decode (e4m3 codes, a float32 scale per block along the rows): the
    native table lookup and multiply equals lowprec.codecs.decode of the same codes, every bit."""
    from lowprec import spec
    from lowprec.codecs import decode, encode
    from lowprec.optim_batch import _decode_e4m3_native, _row_spec

    calls = _counting(monkeypatch, "decode_table_rows")
    monkeypatch.setattr("lowprec.optim_batch.decode_table_rows", fast.decode_table_rows)
    s = _row_spec(spec(spec_), n)
    for x in _special_tensors(40 * n):
        enc = encode(x.reshape(40, n), s)
        with fast_path_off():
            ref = decode(enc)
        assert same(_decode_e4m3_native(enc), ref)
    assert calls and all(calls)


@pytest.mark.parametrize("spec_", ["mxfp8", "mxfp4:flush", "mxfp8:toward_zero", "nvfp4", "nvfp4:stochastic",
                                   "e4m3:block16:scale=e4m3:stochastic", "e4m3:tensor", "e5m2:tensor:nosat",
                                   "mxfp8:axis=0", "e4m3:block128", "e2m1:block15:scale=e4m3:stochastic"])
@pytest.mark.parametrize("shape", [(512, 64), (3, 40, 96), (1050, 1000), (64, 30)])
@pytest.mark.parametrize("contiguous", [True, False])
def test_planned_quantize_equals_the_unplanned_path(fast_everywhere, monkeypatch, spec_, shape, contiguous):
    """lowprec.quantize's plans (a native loop run straight on the rows of a contiguous tensor whose scaling view
    is a reshape) give the values, scales and generator state of the path that derives the view per call; layouts
    without a plan (blocks along another axis, ragged blocks, no native loop) take that path."""
    from lowprec import spec
    from lowprec.quantize import quantize_with_scale_fn

    lq = importlib.import_module("lowprec.quantize")   # (the package's ``quantize`` is the function)
    s = spec(spec_)
    x = _edge_rows().reshape(-1)[:math.prod(shape)].reshape(shape)
    g_ref, g_got = _advanced(5, 7), _advanced(5, 7)
    with monkeypatch.context() as m:
        m.setattr(lq, "_planned", lambda *a: None)
        ref_q, ref_fn = quantize_with_scale_fn(x, s, g_ref, contiguous=contiguous)
        ref_plain = quantize(x, s, generator=g_ref)
        ref_s = ref_fn()
    lq._PLANS.clear()
    got_q, got_fn = quantize_with_scale_fn(x, s, g_got, contiguous=contiguous)
    got_plain = quantize(x, s, generator=g_got)
    got_s = got_fn()
    assert same(ref_q, got_q) and same(ref_s, got_s) and same(ref_plain, got_plain)
    assert ref_s.shape == got_s.shape and got_q.shape == x.shape
    assert ref_q.stride() == got_q.stride() and ref_s.stride() == got_s.stride()  # the same layouts too
    assert torch.equal(g_ref.get_state(), g_got.get_state())
    sc = s.scaling
    planned = fast.fast_scaled_ok(s) and (sc.mode == "tensor" or (sc.axis == -1 and shape[-1] % sc.block_size == 0)
                                          or (sc.axis == 0 and len(shape) == 2 and shape[0] % sc.block_size == 0))
    assert any(p is not None for p in lq._PLANS.values()) == planned


def _spy_encode(monkeypatch) -> list[bool]:
    calls = _counting(monkeypatch, "encode_e4m3")
    monkeypatch.setattr("lowprec.codecs.encode_e4m3", fast.encode_e4m3)
    return calls


@pytest.mark.parametrize("spec_,shape", [("e4m3:block128", (1050, 1000)), ("e4m3:block32", (1050, 1000)),
                                         ("e4m3:block7", (1050, 1000)), ("e4m3:tensor", (1050, 1000)),
                                         ("e4m3:block128", (35, 30, 1000)), ("e4m3:block5000", (50, 21000)),
                                         ("e4m3:block128:nosat", (1050, 1000)), ("e4m3:block128:axis=0", (1050, 1000)),
                                         ("e5m2:block128", (1050, 1000)), ("e4m3:block32:scale=e8m0", (1050, 1000))])
def test_native_e4m3_encode_equals_the_eager_encode(fast_everywhere, monkeypatch, spec_, shape):
    """lowprec.codecs.encode onto e4m3 with fp32 scales (the optimizer states' encoding) by the native loop: the
    codes and scales of the eager path (torch's float8 cast of x / scale), every bit, with NaN, ±inf, zeros,
    subnormal and huge blocks, ragged last blocks and blocks over the loop's 4096-value buffer; other specs
    (not saturating, other axes, formats or scale formats) are left to the eager path."""
    from lowprec import spec
    from lowprec.codecs import encode

    calls = _spy_encode(monkeypatch)
    x = _edge_rows().reshape(-1)[:math.prod(shape)].reshape(shape) if math.prod(shape) <= 1050000 else (
        torch.randn(shape) * torch.logspace(-30, 30, shape[-1]))
    s = spec(spec_)
    with fast_path_off():
        ref = encode(x, s)
    calls.clear()
    got = encode(x, s)
    assert torch.equal(ref.codes, got.codes) and ref.codes.shape == got.codes.shape
    assert same(ref.scale, got.scale) and ref.scale.shape == got.scale.shape and got.scale.dtype == ref.scale.dtype
    native = (spec_.startswith("e4m3:") and "nosat" not in spec_ and "axis=0" not in spec_ and "e8m0" not in spec_)
    assert calls and all(calls) == native and any(calls) == native


def test_native_e4m3_encode_gives_every_code_as_torchs_cast():
    """Every e4m3 value, midpoint and the values beside each, overflow, ±inf and NaN, each in a block of 2 with
    448 (a scale of 1 where |v| <= 448): the codes of torch's float8_e4m3fn cast of x / scale."""
    from lowprec import spec
    from lowprec.formats import get_format

    e4m3 = get_format("e4m3")
    v = probe_inputs(gf_grid(gf_info(e4m3)), e4m3.max)
    x = torch.stack([torch.full_like(v, 448.0), v], dim=1)
    was, threads = fast_path_settings(), torch.get_num_threads()
    set_fast_path(True, min_numel=2)
    torch.set_num_threads(1)
    try:
        got = fast.encode_e4m3(x, spec("e4m3:block2"))
    finally:
        set_fast_path(*was)
        torch.set_num_threads(threads)
    assert got is not None
    amax = torch.where(torch.isfinite(x), x.abs(), 0.0).amax(dim=1, keepdim=True)
    scale = torch.where((amax / 448.0 > 0) & torch.isfinite(amax / 448.0), amax / 448.0, 1.0)
    assert same(got[1], scale)
    assert torch.equal(got[0], (x / scale).to(torch.float8_e4m3fn).view(torch.uint8))


@pytest.mark.parametrize("spec_", ["nvfp4:axis=0", "mxfp8:axis=0", "nvfp4:stochastic:axis=0", "e3m2:block16:scale=e4m3:axis=0"])
@pytest.mark.parametrize("shape", [(512, 64), (96, 200), (48, 7)])
def test_blocks_along_axis_0_through_the_native_transpose(fast_everywhere, monkeypatch, spec_, shape):
    """Blocks along the rows' axis of a 2-D tensor: the scaling view (its transpose) made by the native tiled
    transpose, then the native loops; values and scales as the eager path gives them, the generator as it
    leaves it."""
    from lowprec import quantize_with_scale, spec

    calls = _counting(monkeypatch, "transposed")
    s = spec(spec_)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 4
    x[1, 2], x[5, 0] = float("nan"), -float("inf")
    g_ref, g = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    with fast_path_off():
        ref_q, ref_s = quantize_with_scale(x, s, generator=g_ref)
    q, sc = quantize_with_scale(x, s, generator=g)
    assert same(ref_q, q) and same(ref_s, sc)
    assert torch.equal(g_ref.get_state(), g.get_state())
    # (rows padded to whole blocks make a fresh tensor in the view's layout: nothing to transpose; MX nearest reads
    # x in place, lp_mx_e8m0_t: no transpose either)
    in_place = s.rounding.value != "stochastic"   # MX and NVFP4 nearest read x in place (lp_mx_e8m0_t, lp_nv_t)
    assert all(calls) and bool(calls) == (shape[0] % s.scaling.block_size == 0 and not in_place)


@pytest.mark.parametrize("spec_", ["mxfp8:axis=0", "mxfp6:axis=0", "mxfp4:axis=0", "mxfp8:axis=0:toward_zero",
                                   "mxfp8:axis=0:nosat", "e3m2:block16:scale=e8m0:axis=0", "nvfp4:axis=0",
                                   "nvfp4:axis=0:toward_zero", "nvfp4:axis=0:nosat", "nvfp4:axis=0:flush",
                                   "e3m2:block32:scale=e4m3:axis=0"])
@pytest.mark.parametrize("shape", [(512, 64), (64, 1000), (96, 7), (32, 1)])
def test_blocks_along_axis_0_without_a_transpose(fast_everywhere, spec_, shape):
    """lp_mx_e8m0_t and lp_nv_t (the MX and NVFP4 loops reading x in place, tiles of B rows by up to 1,024 / B
    columns): the values, scales and their layouts of the row loops on x.t().contiguous(), and of the eager path,
    with NaN, ±inf, zeros, subnormals and huge values."""
    from lowprec import quantize_with_scale, spec

    s = spec(spec_)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g) * torch.logspace(-40, 38, shape[1]).clamp(max=3e38)
    x.view(-1)[:6] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-42])[:x.numel()]
    got = fast.native_scaled_t(x, s)
    ref = fast.native_scaled(x.t().contiguous().view(-1, s.scaling.block_size), s)
    assert torch.equal(got[0].view(torch.int32), ref[0].view(torch.int32)) and torch.equal(got[1], ref[1])
    assert got[0].shape == ref[0].shape and got[1].shape == ref[1].shape
    with fast_path_off():
        eager_q, eager_s = quantize_with_scale(x, s)
    q, sc = quantize_with_scale(x, s)
    assert same(eager_q, q) and same(eager_s, sc) and q.stride() == eager_q.stride()


def test_the_e4m3_table_is_the_arithmetic_decode_bit_for_bit():
    """The native row decode takes its values from lowprec.codecs' 256-entry table at every size, where decode()
    of a large tensor uses lowprec.rounding.e4m3_to_float32: the two agree on every code, NaN bits included."""
    from lowprec import codecs
    from lowprec.formats import get_format
    from lowprec.rounding import e4m3_to_float32

    codes = torch.arange(256, dtype=torch.uint8)
    arith = e4m3_to_float32(codes.view(torch.float8_e4m3fn))
    table = codecs._table(get_format("e4m3"), CPU)
    assert torch.equal(arith.view(torch.int32), table.view(torch.int32))


def test_large_states_decode_natively_as_decode_does(fast_everywhere, monkeypatch):
    """States of more than lowprec.codecs._SMALL codes (decode() takes the arithmetic there) through the wrapped
    optimizer's batched decode: the same values as decode() of each, every bit."""
    from lowprec import codecs, spec
    from lowprec.codecs import decode, encode
    from lowprec.optim_batch import _row_spec, decode_rows

    s = _row_spec(spec("e4m3:block128"), 256)
    xs = [torch.randn(300, 256, generator=torch.Generator().manual_seed(i)) * 10 ** (i - 2) for i in range(3)]
    xs[1][3, :5] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e-30, -0.0])
    encs = [encode(x, s) for x in xs]
    assert max(e.codes.numel() for e in encs) >= codecs._SMALL
    calls = _counting(monkeypatch, "decode_table_rows")
    monkeypatch.setattr("lowprec.optim_batch.decode_table_rows", fast.decode_table_rows)
    for v, e in zip(decode_rows(encs), encs):
        with fast_path_off():
            assert same(v, decode(e))
    assert calls == [True]


@pytest.mark.parametrize("spec_,shape", [("e4m3:block128", (1024, 256)), ("e4m3:block128", (300, 64)),
                                         ("e4m3:block128", (64, 200)), ("e4m3", (512, 160)),
                                         ("e4m3:block32:scale=e8m0", (256, 96)), ("e4m3:block128", (4096,)),
                                         ("e5m2:block128", (256, 256)), ("e4m3:block128:axis=0", (256, 256))])
def test_a_state_decoded_alone_as_decode_does(fast_everywhere, monkeypatch, spec_, shape):
    """A state too large to batch is decoded by itself (lowprec.optim_batch.decode_state): natively for e4m3
    rows, by decode() otherwise; decode()'s values, every bit (NaN, ±inf, subnormal, huge)."""
    from lowprec import spec
    from lowprec.codecs import decode, encode
    from lowprec.optim_batch import decode_state

    calls = _counting(monkeypatch, "decode_table_rows")
    monkeypatch.setattr("lowprec.optim_batch.decode_table_rows", fast.decode_table_rows)
    s = spec(spec_)
    n = 1
    for d in shape:
        n *= d
    for x in _special_tensors(n)[:3] + _special_tensors(n)[-2:]:
        enc = encode(x.reshape(shape), s)
        with fast_path_off():
            ref = decode(enc)
        assert same(decode_state(enc), ref)
    native = len(shape) == 2 and s.format.name == "e4m3" and (s.scaling is None or s.scaling.axis in (-1, 1))
    assert bool(calls) == native and all(calls)
