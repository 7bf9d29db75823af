"""The batched state path (wrap(..., fused=True), lowprec.optim_batch) against the per-tensor reference path
(fused=False): parameters, packed codes and scales, generator states and telemetry frames must be bit-identical."""
import sys

import pytest
import torch
from torch import nn

import lowprec.optim_batch as ob
from lowprec.optim import wrap
from lowprec.telemetry import Telemetry

from .oracles import same_tree

torch.set_num_threads(1)

# a tiny-GPT-like mix: 2-D of several widths, 1-D, a 0-dim scalar, a 3-D tensor, ragged widths (block padding),
# and one tensor above BATCH_MAX_NUMEL (kept on the per-tensor path next to batched ones)
SHAPES = [(40, 64), (64, 64), (64,), (), (3, 5, 64), (64, 256), (256,), (7, 100), (100,), (33,), (300, 256)]


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g) * 0.1) for s in SHAPES]


def _run(policy, kind, fused, steps=5, check=True):
    params = _params()
    if kind == "adamw":
        base = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    elif kind == "sgd":
        base = torch.optim.SGD(params, lr=1e-2, momentum=0.9)
    else:
        stosign = pytest.importorskip("stosign")
        base = stosign.StoSignSGD(params, lr=1e-3, generator=torch.Generator().manual_seed(1))
    tel = Telemetry(every=2, check_nonfinite=check)
    opt = wrap(base, policy, telemetry=tel, seed=4, fused=fused)
    g = torch.Generator().manual_seed(9)
    for step in range(steps):
        for i, p in enumerate(params):
            grad = torch.randn(p.shape, generator=g) * 10.0 ** (i % 4 - 3)
            if step == 3 and i == 1:
                grad[..., 0] = 1e30                # overflows e4m3:nosat states at an unsampled step
            p.grad = grad
        opt.step()
    return params, opt, tel


@pytest.mark.parametrize("kind", ["adamw", "sgd", "stosign"])
@pytest.mark.parametrize("policy", [
    "fp8-all", "fp8-states", "mxfp8", "state=e4m3", "state=e5m2:block32:scale=e8m0", "state=bf16",
    "state=e4m3:block128:nosat,master=bf16", "state=e4m3:block128,state.exp_avg_sq=e5m2:block32",
    "state=e4m3:block128:stochastic", "state=mxfp4", "nvfp4,state=nvfp4", "bf16", "grad=e5m2:block32:scale=e8m0",
])
def test_fused_equals_per_tensor_path(policy, kind, count_batched):
    calls = count_batched("encode_rows")
    ref_p, ref_opt, ref_tel = _run(policy, kind, fused=False)
    assert calls["n"] == 0
    got_p, got_opt, got_tel = _run(policy, kind, fused=True)
    for a, b in zip(ref_p, got_p):
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))
    assert same_tree(ref_opt.state_dict(), got_opt.state_dict())
    assert ref_tel.frame().equals(got_tel.frame())
    assert ref_tel.first_nonfinite() == got_tel.first_nonfinite()
    any_batchable = any(ob.batchable(s) for s in [got_opt.policy.state_spec(n) for n in
                                                  ("exp_avg", "exp_avg_sq", "momentum_buffer")] if s is not None)
    assert (calls["n"] > 0) == (any_batchable and not got_opt.policy.state.format.name == "fp32")


def test_fused_deferred_telemetry_matches_exact_first_site():
    _, _, exact = _run("state=e4m3:block128:nosat", "adamw", fused=True)
    _, _, late = _run("state=e4m3:block128:nosat", "adamw", fused=True, check="deferred")
    assert exact.first_nonfinite() == late.first_nonfinite() is not None


def test_batchable_specs():
    from lowprec.quantize import spec
    yes = ["e4m3", "e4m3:block128", "e5m2:block32:scale=e8m0", "bf16", "e4m3:nosat", "mxfp8"]
    no = ["e4m3:stochastic", "e4m3:tensor", "e4m3:channel", "nvfp4", "mxfp4", "e2m1", "int8:block32", "e3m2"]
    assert [ob.batchable(spec(s)) for s in yes] == [True] * len(yes)
    assert [ob.batchable(spec(s)) for s in no] == [False] * len(no)


def test_fused_codes_do_not_share_storage():
    params, opt, _ = _run("fp8-all", "adamw", fused=True, steps=1)
    ptrs = [opt.state[p]["exp_avg"]["lowprec_packed"]["codes"].untyped_storage().data_ptr() for p in params]
    assert len(set(ptrs)) == len(ptrs)             # each state owns its codes (no pinned batch buffer)


@pytest.mark.parametrize("policy", ["mxfp8", "bf16"])
def test_batchable_grads_take_the_batched_path(policy, monkeypatch, count_batched):
    calls = count_batched("quantize_segments")
    monkeypatch.setattr(sys.modules[__name__], "SHAPES", SHAPES[:-1])  # all small: every grad batched
    ref, ref_opt, ref_tel = _run(policy, "adamw", fused=False)
    got, got_opt, got_tel = _run(policy, "adamw", fused=True)
    assert calls["n"] > 0
    assert all(torch.equal(a, b) for a, b in zip(ref, got)) and ref_tel.frame().equals(got_tel.frame())
    assert same_tree(ref_opt.state_dict(), got_opt.state_dict())


def _run_quiet(policy, fused, tel_mode, steps=6):
    """_run's problem with telemetry off, or deferred checks, plus a NaN and an inf in two gradients: the steps
    where nothing reads the unquantized gradients (or, unsampled, the unrounded master weights)."""
    params = _params()
    opt = wrap(torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1), policy, seed=4, fused=fused,
               telemetry=None if tel_mode is None else Telemetry(every=3, check_nonfinite=tel_mode))
    g = torch.Generator().manual_seed(9)
    for step in range(steps):
        for i, p in enumerate(params):
            grad = torch.randn(p.shape, generator=g) * 10.0 ** (i % 4 - 3)
            if step == 4 and i in (1, 5):
                grad.view(-1)[3] = float("nan") if i == 1 else float("inf")
            p.grad = grad
        opt.step()
    return params, opt


@pytest.mark.parametrize("tel_mode", [None, "deferred"])
@pytest.mark.parametrize("policy", ["fp8-all", "fp8-lm-o2", "grad=e5m2:tensor,master=bf16:stochastic",
                                    "grad=e4m3:tensor:toward_zero,master=fp16:stochastic", "master=e5m2:stochastic",
                                    "grad=mxfp8", "grad=nvfp4:stochastic", "grad=nvfp4", "grad=mxfp4",
                                    "grad=e3m2:block32:scale=e4m3:stochastic"])
def test_in_place_grads_and_master_equal_the_per_tensor_path(policy, tel_mode, monkeypatch):
    import lowprec.optim as lo

    taken = {"n": 0}
    if "block" in policy or "mx" in policy or "nvfp4" in policy:   # blocks that tile every last axis
        monkeypatch.setattr(sys.modules[__name__], "SHAPES", [(40, 64), (64, 64), (64,), (3, 5, 64), (64, 256),
                                                              (256,), (300, 256)])
    for name in ("tensor_scaled_in_place", "stochastic_in_place", "block_scaled_in_place"):
        orig = getattr(lo, name)

        def counted(*a, _orig=orig, **k):
            out = _orig(*a, **k)
            taken["n"] += out is not None and out is not False
            return out
        monkeypatch.setattr(lo, name, counted)
    ref_p, ref_opt = _run_quiet(policy, False, tel_mode)
    assert taken["n"] == 0
    got_p, got_opt = _run_quiet(policy, True, tel_mode)
    import lowprec.fast
    assert (taken["n"] > 0) == lowprec.fast.native_available()   # the in-place path ran (it is native)
    for a, b in zip(ref_p, got_p):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))
    assert same_tree(ref_opt.state_dict(), got_opt.state_dict())    # generator states included
    if tel_mode is not None:
        assert ref_opt.telemetry.nonfinite_events() == got_opt.telemetry.nonfinite_events() != []


def test_in_place_bumps_the_autograd_version():
    import lowprec.fast as fast
    from lowprec.quantize import spec

    if not fast.native_available():
        pytest.skip("no native helpers (no C compiler)")

    a, b = torch.randn(5000), torch.randn(7)
    va, vb = a._version, b._version
    assert fast.tensor_scaled_in_place([a, b], spec("e5m2:tensor")) is not None
    assert a._version > va and b._version > vb
