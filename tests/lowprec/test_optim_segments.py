"""The segmented step (lowprec.optim_batch.quantize_segments; the wrapped step's batched gradients, master weights
and state caches) against the per-tensor reference path.

Oracles: ``quantize_with_scale`` called tensor by tensor with an identically seeded generator (values, scales,
the generator's final state), and the wrapped step with ``fused=False`` (parameters, packed codes and scales,
generator states, telemetry frames) over several steps, across a resume from ``state_dict`` and after the state
was changed behind the wrapper's back."""
import copy

import pytest
import torch
from torch import nn

import lowprec.optim_batch as ob
from lowprec.optim import PACKED_KEY, wrap
from lowprec.quantize import quantize_with_scale, spec
from lowprec.telemetry import Telemetry

torch.set_num_threads(1)

# odd sizes (the stochastic draws' padding), a 0-dim and a 3-D tensor, ragged block widths, and a tensor above
# BATCH_MAX_NUMEL in the middle (it ends a stochastic run: the draws must stay in parameter order)
SHAPES = [(7, 5), (64,), (), (33,), (3, 5, 64), (300, 256), (1,), (100, 64), (5,), (64, 256), (9,)]


def _tensors(seed=0, nonfinite=True):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(s, generator=g) * 10.0 ** (i % 5 - 2) for i, s in enumerate(SHAPES)]
    xs = [x.reshape(1) if x.dim() == 0 else x for x in xs]
    if nonfinite:
        xs[1][3] = float("nan")
        xs[3][0] = float("inf")
        xs[7][2, 5] = -float("inf")
    return xs


SEGMENT_SPECS = [
    "e5m2:tensor", "e4m3:tensor:stochastic", "bf16:stochastic", "bf16", "fp16:stochastic", "nvfp4",
    "nvfp4:stochastic", "mxfp8", "mxfp4:stochastic", "e4m3:block128", "e4m3:block32:stochastic:axis=0",
    "e5m2:delayed16:margin=1", "e2m1:stochastic", "int8:stochastic", "int4:tensor:stochastic",
    "e4m3:block16:scale=e4m3:nosat", "e3m2:block32:scale=e8m0:stochastic", "bf16:tensor:stochastic",
    "e4m3:tensor:scale=e8m0", "e5m2:nosat:stochastic", "e4m3:stochastic:randbits=3", "e4m3:tensor:flush",
]


def _bits(t):
    """Bit patterns (signed zeros included; every NaN as one pattern: the native kernels, which a batch reaches at
    sizes its tensors alone do not, and the eager path may give NaNs different payloads, as tests/lowprec's
    ``same`` allows)."""
    t = t.contiguous()
    b = t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)
    return torch.where(torch.isnan(t), -1, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("text", SEGMENT_SPECS)
def test_segments_equal_per_tensor_calls(text, dtype):
    s = spec(text)
    assert ob.segments_ok(s)
    xs = [x.to(dtype) for x in _tensors() if x.numel() <= ob.BATCH_MAX_NUMEL]
    g_ref, g_got = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    ref = [quantize_with_scale(x, s, g_ref) for x in xs]
    got = ob.quantize_segments(xs, s, g_got)
    assert got is not None
    assert torch.equal(g_ref.get_state(), g_got.get_state())      # the same random words, no more, no fewer
    for i, (q, sc) in enumerate(ref):
        assert got.q[i].dtype == q.dtype and got.q[i].shape == q.shape
        assert torch.equal(_bits(got.q[i]), _bits(q)), (text, i)
        s2 = got.scale(i)
        assert (sc is None) == (s2 is None)
        if sc is not None:
            assert torch.equal(s2.expand_as(q), sc.expand_as(q))


def test_segments_decline_what_they_cannot_reproduce():
    assert not ob.segments_ok(spec("e4m3:channel"))
    assert not ob.segments_ok(spec("e4m3:block16x16"))
    # blocks of odd length (an odd-sized view before the last tensor) under stochastic rounding: None, and no
    # random bits drawn
    g = torch.Generator().manual_seed(3)
    before = g.get_state()
    xs = [torch.randn(3, 5), torch.randn(4, 5)]
    assert ob.quantize_segments(xs, spec("e4m3:block5:stochastic"), g) is None
    assert torch.equal(g.get_state(), before)
    # nearest rounding does not care
    ref = [quantize_with_scale(x, spec("e4m3:block5"))[0] for x in xs]
    got = ob.quantize_segments(xs, spec("e4m3:block5"))
    assert all(torch.equal(a, b) for a, b in zip(ref, got.q))


# --------------------------------------------------------------------------------------------- the wrapped step
def _params(dtype_mix=False):
    g = torch.Generator().manual_seed(0)
    ps = [nn.Parameter(torch.randn(s, generator=g) * 0.1) for s in SHAPES]
    if dtype_mix:   # bf16 parameters between fp32 ones: separate batches, stochastic runs broken there
        ps[1] = nn.Parameter(ps[1].detach().bfloat16())
        ps[8] = nn.Parameter(ps[8].detach().bfloat16())
    return ps


def _grads(params, step, g):
    for i, p in enumerate(params):
        gr = (torch.randn(p.shape, generator=g) * 10.0 ** (i % 4 - 4)).to(p.dtype)
        if step == 2 and i == 3:
            gr.view(-1)[0] = float("nan")          # an unsampled step with a non-finite gradient
        p.grad = None if (step == 3 and i == 4) else gr   # a parameter without gradient for one step


def _run(policy, fused, steps=6, kind="adamw", check=True, dtype_mix=False, every=3, resume_at=None,
         tamper=None):
    params = _params(dtype_mix)

    def make():
        if kind == "adamw":
            base = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
        else:
            base = torch.optim.SGD(params, lr=1e-2, momentum=0.9)
        return wrap(base, policy, telemetry=tel, seed=11, fused=fused)
    tel = Telemetry(every=every, check_nonfinite=check)
    opt = make()
    g = torch.Generator().manual_seed(9)
    for step in range(steps):
        if resume_at == step:
            sd = copy.deepcopy(opt.state_dict())
            opt = make()
            opt.load_state_dict(sd)
        if tamper is not None:
            tamper(opt, params, step)
        _grads(params, step, g)
        opt.step()
    return params, opt, tel


def _bits_equal(a, b):
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        return torch.equal(_bits(a.float()), _bits(b.float()))
    return torch.equal(a, b)


def _same_tree(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and _bits_equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_tree(x, y) for x, y in zip(a, b))
    return a == b


def _assert_same(ref, got):
    (rp, ropt, rtel), (gp, gopt, gtel) = ref, got
    for a, b in zip(rp, gp):
        assert _bits_equal(a.detach(), b.detach())
    assert _same_tree(ropt.state_dict(), gopt.state_dict())
    assert rtel.frame().equals(gtel.frame())
    assert rtel.nonfinite_events() == gtel.nonfinite_events()


POLICIES = [
    "fp8-all", "nvfp4", "mxfp8", "fp8-states", "master=bf16", "master=bf16:stochastic",
    "grad=e4m3:tensor:stochastic,master=bf16:stochastic", "grad=e5m2:delayed16,state=e4m3:block32",
    "grad=int8:tensor:stochastic,master=fp16:stochastic", "grad=mxfp4:stochastic,state=mxfp8,master=bf16",
    "state=e4m3:block128:nosat,master=e4m3:block32", "state=e4m3,state.exp_avg_sq=e5m2:block32",
]


@pytest.mark.parametrize("policy", POLICIES)
def test_wrapped_step_equals_per_tensor_path(policy, count_batched):
    calls = count_batched("quantize_segments")
    ref = _run(policy, fused=False)
    assert calls["n"] == 0                          # the off switch: nothing batched
    got = _run(policy, fused=True)
    _assert_same(ref, got)


@pytest.mark.parametrize("policy", ["fp8-all", "nvfp4", "grad=e4m3:tensor:stochastic,master=bf16:stochastic"])
@pytest.mark.parametrize("variant", ["deferred", "sgd", "dtype_mix", "every1"])
def test_wrapped_step_variants(policy, variant):
    kw = {"deferred": {"check": "deferred"}, "sgd": {"kind": "sgd"}, "dtype_mix": {"dtype_mix": True},
          "every1": {"every": 1}}[variant]
    _assert_same(_run(policy, fused=False, **kw), _run(policy, fused=True, **kw))


@pytest.mark.parametrize("policy", ["fp8-all", "nvfp4", "fp8-states", "mxfp8"])
def test_resume_from_state_dict_is_exact(policy):
    ref = _run(policy, fused=False)
    through = _run(policy, fused=True, resume_at=3)   # the caches start empty after load_state_dict
    _assert_same(ref, through)


def _tamper_codes(opt, params, step):
    if step == 3:      # a packed state changed in place between steps: the batch caches must not be used
        opt.state[params[0]]["exp_avg"][PACKED_KEY]["codes"].zero_()
        opt.state[params[7]]["exp_avg_sq"][PACKED_KEY]["scale"].mul_(2.0)


def _tamper_replace(opt, params, step):
    if step == 2:      # a packed entry replaced by another (a re-encoded copy of another parameter's state)
        st = opt.state[params[3]]
        st["exp_avg"] = {PACKED_KEY: dict(st["exp_avg"][PACKED_KEY])}
    if step == 4:      # an entry replaced by a plain fp32 tensor
        st = opt.state[params[1]]
        st["exp_avg"] = torch.full_like(params[1].detach(), 1e-3)


@pytest.mark.parametrize("tamper", [_tamper_codes, _tamper_replace])
def test_state_changed_between_steps(tamper):
    _assert_same(_run("fp8-all", fused=False, tamper=tamper), _run("fp8-all", fused=True, tamper=tamper))


def test_switching_fused_off_mid_run():
    def switch(opt, params, step):
        opt.fused = step % 2 == 0
    _assert_same(_run("fp8-all", fused=False), _run("fp8-all", fused=True, tamper=switch))


def test_copies_continue_identically():
    _, opt, _ = _run("fp8-all", fused=True, steps=3)
    twin = copy.deepcopy(opt)
    assert twin._encoded == {} and twin._plan is None and opt._plan is not None   # (caches not copied)
    for o in (opt, twin):
        g = torch.Generator().manual_seed(4)
        ps = [p for grp in o.param_groups for p in grp["params"]]
        _grads(ps, 5, g)
        o.step()
    assert _same_tree(opt.state_dict(), twin.state_dict())


def test_odd_views_of_even_tensors_are_declined():
    # shape (2,) in blocks of 3: an even tensor whose padded scaling view (1, 3) is odd
    g = torch.Generator().manual_seed(3)
    before = g.get_state()
    assert ob.quantize_segments([torch.randn(2), torch.randn(6)], spec("e4m3:block3:stochastic"), g) is None
    assert torch.equal(g.get_state(), before)
    xs = [torch.randn(6), torch.randn(4, 3), torch.randn(5)]     # even views: batched, same draws
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    ref = [quantize_with_scale(x, spec("e4m3:block3:stochastic"), g1)[0] for x in xs]
    got = ob.quantize_segments(xs, spec("e4m3:block3:stochastic"), g2)
    assert all(torch.equal(a, b) for a, b in zip(ref, got.q)) and torch.equal(g1.get_state(), g2.get_state())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("policy", ["fp8-all", "nvfp4", "mxfp8", "grad=e5m2:tensor,master=bf16"])
def test_cuda_fused_equals_per_tensor_path(policy):
    # stochastic batches are CPU only (a CUDA generator's offsets follow launch geometry): on CUDA the stochastic
    # parts stay per tensor, the nearest ones are batched
    def run(fused):
        g = torch.Generator().manual_seed(0)
        params = [nn.Parameter((torch.randn(s, generator=g) * 0.1).cuda()) for s in SHAPES]
        opt = wrap(torch.optim.AdamW(params, lr=1e-2), policy, seed=3, fused=fused)
        gg = torch.Generator().manual_seed(9)
        for _ in range(4):
            for i, p in enumerate(params):
                p.grad = (torch.randn(p.shape, generator=gg) * 10.0 ** (i % 4 - 4)).cuda()
            opt.step()
        return [p.detach().cpu() for p in params], opt
    (rp, ro), (gp, go) = run(False), run(True)
    assert all(_bits_equal(a, b) for a, b in zip(rp, gp))
    to_cpu = lambda t: t.cpu() if isinstance(t, torch.Tensor) else t
    assert _same_tree(torch.utils._pytree.tree_map(to_cpu, ro.state_dict()),
                      torch.utils._pytree.tree_map(to_cpu, go.state_dict()))
