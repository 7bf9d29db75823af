"""AdamW moments that a NativeAdamW base step decodes, updates and encodes itself (``lowprec.fast.adam_step``'s
``packed``, ``LowPrecisionOptimizer._defer_moments``). Oracles: the separate passes (decode, torch's foreach AdamW
step, ``lowprec.codecs.encode``), and the wrapper's per-tensor reference path (``fused=False``) around
``torch.optim.AdamW``: parameters, codes, scales, generator states, telemetry frames and NaN/inf events
bit-identical; and the fallback when the base step cannot be native."""
import pytest
import torch
from torch import nn

import lowprec.adamw as la
from lowprec import fast
from lowprec.adamw import NativeAdamW, native_adamw_status
from lowprec.codecs import _table, decode, encode
from lowprec.optim import PACKED_KEY, wrap
from lowprec.quantize import QuantSpec
from lowprec.telemetry import Telemetry

from .oracles import assert_same_run

torch.set_num_threads(1)

pytestmark = pytest.mark.skipif(not native_adamw_status()[0], reason="NativeAdamW's native step is off here")

# two tensors above BATCH_MAX_NUMEL (encoded alone): 256 columns (whole blocks) and 300 (a ragged last block of
# each row); a 1-D one above it (stays on the separate passes); batched small ones and a scalar
SHAPES = [(300, 256), (257, 300), (70_000,), (64, 64), (64,), ()]
STEPS = 9


def _values(shape, gen, step):
    x = torch.randn(shape, generator=gen) * 10.0 ** (step % 3 - 3)
    if x.dim() == 2:
        x[3, :128] = 0.0            # a block of zeros (scale 1)
        x[4, 5] = 1e-42             # a subnormal
        x[5, :7] *= 1e6             # a block with an outlier
    return x


@pytest.mark.parametrize("beta1,wd", [(0.9, 0.1), (0.3, 0.0)])   # both branches of lerp, weight decay on / off
@pytest.mark.parametrize("block", [128, 32])
def test_packed_first_pass_equals_decode_step_encode(beta1, wd, block):
    spec = QuantSpec.parse(f"e4m3:block{block}")
    gen = torch.Generator().manual_seed(1)
    shapes = [(300, 256), (7, 300), (33, 64)]
    ps = [torch.randn(s, generator=gen) for s in shapes]
    gs = [_values(s, gen, 1) for s in shapes]
    gs[0][0, :3] = float("nan")                      # a NaN gradient: NaN moments, code 0x7f
    encs = [(encode(_values(s, gen, 2), spec), encode(_values(s, gen, 0).abs(), spec)) for s in shapes]
    encs[2][0].codes[2, :4] = 0x7F                   # NaN codes in a stored moment
    table = _table(spec.format, torch.device("cpu"))
    kw = dict(lr=3e-3, beta1=beta1, beta2=0.95, eps=1e-8, weight_decay=wd)
    # reference: decode, torch's AdamW (foreach), encode
    ref_p = [p.clone() for p in ps]
    ref = torch.optim.AdamW(ref_p, betas=(beta1, 0.95), lr=3e-3, eps=1e-8, weight_decay=wd, foreach=True)
    for p, g, (em, ev) in zip(ref_p, gs, encs):
        p.grad = g
        ref.state[p] = {"step": torch.tensor(4.0), "exp_avg": decode(em), "exp_avg_sq": decode(ev)}
    ref.step()
    # the packed pass: the middle tensor stays on the separate passes
    got_p = [p.clone() for p in ps]
    ms = [torch.empty(s) for s in shapes]
    vs = [torch.empty(s) for s in shapes]
    ms[1], vs[1] = decode(encs[1][0]), decode(encs[1][1])
    packed = [fast.PackedMoments((em.codes, ev.codes), (em.scale, ev.scale), spec, table) if i != 1 else None
              for i, (em, ev) in enumerate(encs)]
    assert all(fast.packed_moments_ok(em.codes, em.scale, spec, torch.Size(s)) for (em, _), s in zip(encs, shapes))
    assert fast.adam_step(got_p, gs, ms, vs, [5.0] * 3, packed=packed, **kw)
    for i, p in enumerate(ref_p):
        st = ref.state[p]
        assert torch.equal(got_p[i].view(torch.int32), p.view(torch.int32))
        assert torch.equal(ms[i].view(torch.int32), st["exp_avg"].view(torch.int32))
        assert torch.equal(vs[i].view(torch.int32), st["exp_avg_sq"].view(torch.int32))
        if packed[i] is None:
            continue
        assert packed[i].done
        for j, name in enumerate(("exp_avg", "exp_avg_sq")):
            want = encode(st[name], spec)
            assert torch.equal(packed[i].codes_out[j], want.codes)
            assert torch.equal(packed[i].scales_out[j].view(torch.int32), want.scale.view(torch.int32))


def _run(policy, fused, base, tel_mode, *, fail_native_at=()):
    g0 = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(s, generator=g0) * 0.1) for s in SHAPES]
    cls = NativeAdamW if base == "native" else torch.optim.AdamW
    opt0 = cls(params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
    tel = None if tel_mode is None else Telemetry(every=3, check_nonfinite=tel_mode)
    opt = wrap(opt0, policy, telemetry=tel, seed=4, fused=fused)
    g = torch.Generator().manual_seed(9)
    for step in range(STEPS):
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=g) * 10.0 ** (i % 4 - 3)
        if step == 6:
            params[1].grad[2, :5] = float("nan")       # NaN moments through the packed pass (e4m3 keeps NaN)
        opt.param_groups[0]["lr"] = 1e-2 * (step + 1) / STEPS   # a schedule
        native = la.NativeAdamW._native_step
        if step in fail_native_at:
            la.NativeAdamW._native_step = lambda self, *a, **k: False
        try:
            opt.step()
        finally:
            la.NativeAdamW._native_step = native
    return params, opt, tel


def _count_packed(monkeypatch):
    seen = {"n": 0}
    orig = fast.adam_step

    def counted(*a, packed=None, **k):
        out = orig(*a, packed=packed, **k)
        seen["n"] += sum(q is not None and q.done for q in packed or ())
        return out
    monkeypatch.setattr(la.fast, "adam_step", counted)
    return seen


# (policy, tensors whose moments the base step decodes and encodes itself on each replayed step)
POLICIES = [("fp8-all", 2), ("fp8-states", 2), ("state=e4m3:block32", 2), ("fp8-states-torchao", 2),
            ("state=e4m3:block128,state.exp_avg_sq=e5m2:block32", 0),   # v is not e4m3: the separate passes
            ("state=e4m3:channel", 0)]                                 # not block scales


@pytest.mark.parametrize("tel_mode", [None, "deferred", True])
@pytest.mark.parametrize("policy,deferred", POLICIES)
def test_native_base_steps_equal_the_per_tensor_path(policy, deferred, tel_mode, monkeypatch):
    ref = _run(policy, False, "torch", tel_mode)
    seen = _count_packed(monkeypatch)
    got = _run(policy, True, "native", tel_mode)
    # every replayed step (the first two lay the batches out)
    assert seen["n"] == deferred * (STEPS - 2)
    assert_same_run(ref, got)
    # the packed states still own their codes (a later step writes new tensors)
    p = got[0][0]
    assert got[1].state[p]["exp_avg"][PACKED_KEY]["codes"].dtype == torch.uint8


def test_a_base_step_that_cannot_be_native_decodes_first(monkeypatch):
    ref = _run("fp8-all", False, "torch", "deferred")
    seen = _count_packed(monkeypatch)
    got = _run("fp8-all", True, "native", "deferred", fail_native_at=(4, 5))
    assert seen["n"] == 2 * (STEPS - 2 - 2)      # those two steps took torch's step on decoded states
    assert_same_run(ref, got)
