"""LowPrecisionOptimizer as a torch Optimizer: shared groups/state, hooks, exact resume, zero-size parameters.

Oracles: torch's own Optimizer machinery (hooks, schedulers), the uninterrupted run (for resume), the same run
without the zero-size parameter, and torch's float8 cast of AdamW's closed-form first-step moments."""
import io

import pytest
import torch
from torch import nn

from lowprec.optim import LowPrecisionOptimizer, wrap

torch.set_num_threads(1)


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 8))


def _train(model, opt, steps, start=0):
    for s in range(start, start + steps):
        g = torch.Generator().manual_seed(1000 + s)
        x = torch.randn(16, 32, generator=g)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def _base(kind, model):
    params = list(model.parameters())
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=1e-2, momentum=0.9)
    stosign = pytest.importorskip("stosign")
    gen = torch.Generator().manual_seed(7)
    if kind == "stosign":
        return stosign.StoSignSGD(params, lr=1e-3, momentum=0.9, generator=gen)  # noise on: its rng must resume
    return stosign.SignConverted(torch.optim.AdamW(params, lr=1e-3), noise=True, generator=gen)


@pytest.mark.parametrize("kind,policy", [
    ("adamw", "fp8-all"),
    ("adamw", "state=mxfp4,master=bf16:stochastic,grad=e5m2:tensor:stochastic"),  # 4-bit packed, SR everywhere
    ("sgd", "state=e4m3:block128:stochastic,master=bf16:stochastic"),
    ("stosign", "fp8-all"),
    ("signconverted", "fp8-all"),
])
def test_resume_mid_run_is_bit_identical(kind, policy):
    model = _model()
    opt = wrap(_base(kind, model), policy, seed=3)
    _train(model, opt, 3)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    mid = [p.detach().clone() for p in model.parameters()]
    _train(model, opt, 4, start=3)                     # the uninterrupted run
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    model2 = _model(seed=99)                           # a fresh model and wrapper, then restore
    opt2 = wrap(_base(kind, model2), policy, seed=12345)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    _train(model2, opt2, 4, start=3)
    moved = False
    for a, b, m in zip(model.parameters(), model2.parameters(), mid):
        assert torch.equal(a, b)
        moved |= not torch.equal(a, m)
    assert moved                                       # the continued steps did something
    s1 = {(n, i): v for i, (_, n, v) in enumerate(opt.decoded_state(nested=True))}
    s2 = {(n, i): v for i, (_, n, v) in enumerate(opt2.decoded_state(nested=True))}
    assert s1.keys() == s2.keys() and s1
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k


def test_is_a_torch_optimizer_sharing_the_base_objects_and_running_hooks():
    model = _model()
    base = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt = wrap(base, "fp8-all")
    assert opt.param_groups is base.param_groups and opt.state is base.state and opt.defaults is base.defaults
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append(("pre", o)))
    opt.register_step_post_hook(lambda o, a, k: calls.append(("post", o)))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "tag": 1})
    opt.register_load_state_dict_pre_hook(lambda o, sd: {k: v for k, v in sd.items() if k != "tag"})
    opt.register_load_state_dict_post_hook(lambda o: calls.append(("loaded", o)))
    _train(model, opt, 2)
    assert calls == [("pre", opt), ("post", opt)] * 2
    sd = opt.state_dict()
    assert sd["tag"] == 1 and "lowprec" in sd
    opt.load_state_dict(sd)
    assert calls[-1] == ("loaded", opt)
    # after load_state_dict the base holds new objects, and the wrapper still shows the base's
    assert opt.param_groups is base.param_groups and opt.state is base.state
    extra = nn.Parameter(torch.full((3,), 1.0 + 2 ** -10))     # not on the bf16 grid
    opt.add_param_group({"params": [extra]})
    assert base.param_groups[-1]["params"] == [extra] and len(opt.param_groups) == 2
    assert torch.equal(extra.detach(), torch.ones(3))          # rounded to master (bf16 nearest: tie to even)


def test_wrap_rejects_bad_arguments_once():
    p = nn.Parameter(torch.zeros(3))
    with pytest.raises(TypeError, match="seed"):
        wrap(torch.optim.SGD([p], lr=0.1), "fp32", seed=1.5)
    with pytest.raises(TypeError, match="Telemetry"):
        wrap(torch.optim.SGD([p], lr=0.1), "fp32", telemetry=object())
    assert isinstance(wrap(torch.optim.SGD([p], lr=0.1), "fp32"), LowPrecisionOptimizer)


@pytest.mark.parametrize("policy", ["fp8-all", "state=e4m3:tensor,grad=e5m2:tensor:stochastic,master=bf16:stochastic",
                                    "state=nvfp4,grad=mxfp8"])
def test_zero_size_parameters(policy):
    torch.manual_seed(0)
    w = torch.randn(4, 32)
    g = torch.randn(4, 32) * 1e-2

    def run(with_empty):
        p = nn.Parameter(w.clone())
        params = [nn.Parameter(torch.empty(0)), p, nn.Parameter(torch.empty(0, 32))] if with_empty else [p]
        opt = wrap(torch.optim.AdamW(params, lr=1e-2), policy, seed=1)
        for _ in range(3):
            for q in params:
                q.grad = g.clone() if q is p else torch.zeros_like(q)
            opt.step()
        return p.detach(), opt, params

    ref, _, _ = run(False)
    got, opt, params = run(True)
    assert torch.equal(got, ref) and not torch.equal(got, w)   # the empty parameters change nothing
    assert opt.state[params[0]]["exp_avg"].shape == (0,)        # kept as (empty) fp32 tensors
    sd = opt.state_dict()
    opt.load_state_dict(sd)


def test_decoded_state_values_and_names():
    g = torch.tensor([0.3, -1.7, 2e-3, 40.0])
    p = nn.Parameter(torch.zeros(4))
    opt = wrap(torch.optim.AdamW([p], lr=1e-3, betas=(0.9, 0.99)), "state=e4m3")
    p.grad = g.clone()
    opt.step()
    got = {name: v for q, name, v in opt.decoded_state() if q is p}
    assert set(got) == {"exp_avg", "exp_avg_sq"}                # never the step counter
    # AdamW's first step from zero: m = 0.1 g, v = 0.01 g^2 (in fp32), then cast to E4M3 (torch's cast = oracle)
    m = torch.tensor(0.1) * g
    v = torch.tensor(0.01) * g * g
    assert torch.equal(got["exp_avg"], m.to(torch.float8_e4m3fn).float())
    assert torch.equal(got["exp_avg_sq"], v.to(torch.float8_e4m3fn).float())


def test_decoded_state_nested_shows_signconverted_base():
    stosign = pytest.importorskip("stosign")
    model = _model()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt = wrap(stosign.SignConverted(inner, noise=True, generator=torch.Generator().manual_seed(0)), "fp8-all")
    _train(model, opt, 2)
    assert {n for _, n, _ in opt.decoded_state()} == {"bound"}
    names = [n for _, n, _ in opt.decoded_state(nested=True)]
    assert {"bound", "exp_avg", "exp_avg_sq"} == set(names)
    p0 = next(model.parameters())
    assert "lowprec_packed" in opt.state[p0]["bound"]            # the wrapped optimizer's state is packed
    assert isinstance(inner.state[p0]["exp_avg"], torch.Tensor)  # the nested base's stays fp32


def test_deepcopy_continues_identically():
    import copy
    model = _model()
    opt = wrap(torch.optim.AdamW(model.parameters(), lr=1e-2), "fp8-all", seed=2)
    _train(model, opt, 2)
    model2, opt2 = copy.deepcopy((model, opt))             # one memo: opt2 steps model2's parameters
    assert opt2.param_groups is opt2.optimizer.param_groups
    assert opt2.param_groups[0]["params"][0] is next(model2.parameters())
    _train(model, opt, 2, start=2)
    _train(model2, opt2, 2, start=2)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
