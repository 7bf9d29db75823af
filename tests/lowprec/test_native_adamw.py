"""lowprec.adamw.NativeAdamW against torch.optim.AdamW(foreach=True), the oracle: every bit of parameters, states
and step counts, over LR schedules, weight decay, both lerp branches, edge values and state_dict round trips; and
torch's own step wherever the native one does not apply."""
import copy

import pytest
import torch

import lowprec.fast as fast
from lowprec.adamw import NativeAdamW, native_adamw_status

torch.set_num_threads(1)
pytestmark = pytest.mark.skipif(not fast.native_available(), reason="no native helpers (no C compiler)")

SHAPES = [(192, 64), (64,), (), (0,), (7,), (33, 5), (4099,), (64, 256), (1,)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.int32) if t.dtype == torch.float32 else t.detach().reshape(-1)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))


def _pair(shapes=SHAPES, seed=0, dtype=torch.float32, **kw):
    g = torch.Generator().manual_seed(seed)
    ref = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shapes]
    got = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    a = torch.optim.AdamW(ref, foreach=True, **kw)
    b = NativeAdamW(got, **kw)
    return ref, got, a, b


def _grads(params_a, params_b, g: torch.Generator, step: int, skip: int | None = None, special: bool = False):
    for i, (p, q) in enumerate(zip(params_a, params_b)):
        if i == skip:
            p.grad = q.grad = None
            continue
        grad = torch.randn(p.shape, generator=g, dtype=p.dtype) * 10.0 ** -((step + i) % 10)   # 1 down to 1e-9: eps matters
        if special and grad.numel() > 4:
            grad.view(-1)[:5] = torch.tensor([0.0, -0.0, 1e-40, 3e38, -1e-45])    # zeros, subnormals, huge
        p.grad, q.grad = grad, grad.clone()


def _check(params_a, params_b, a, b):
    assert native_adamw_status() == (True, "")
    for p, q in zip(params_a, params_b):
        assert _same(p, q)
        sa, sb = a.state.get(p, {}), b.state.get(q, {})
        assert sa.keys() == sb.keys()
        for k in sa:
            assert _same(sa[k], sb[k]), k


@pytest.mark.parametrize("kw", [
    dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0),          # the study's registry AdamW
    dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1),
    dict(lr=1e-3, betas=(0.3, 0.5), eps=1e-6, weight_decay=0.01),          # beta1 < 0.5: lerp's other branch
    dict(lr=5e-4, betas=(0.0, 0.99), eps=1e-12, weight_decay=1),           # int weight decay, no momentum
])
def test_native_step_gives_torchs_bits(kw):
    ref, got, a, b = _pair(**kw)
    g = torch.Generator().manual_seed(1)
    assert native_adamw_status() == (True, "")                                # (the check at first use, done)
    calls = {"n": 0}
    orig = fast.adam_step

    def counted(*args, **k):
        calls["n"] += 1
        return orig(*args, **k)
    fast_adam_step, fast.adam_step = fast.adam_step, counted
    try:
        for step in range(25):
            _grads(ref, got, g, step, skip=1 if step % 7 == 3 else None, special=step == 5)
            for opt in (a, b):
                opt.param_groups[0]["lr"] = kw["lr"] * (1 + (step % 5)) / 5        # an LR schedule
            a.step()
            b.step()
    finally:
        fast.adam_step = fast_adam_step
    assert calls["n"] == 25                                                    # the native step ran every time
    _check(ref, got, a, b)


def test_two_groups_and_a_state_dict_round_trip():
    g = torch.Generator().manual_seed(3)
    ref = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]
    got = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    groups = lambda ps: [{"params": ps[:4], "lr": 1e-2, "weight_decay": 0.1},   # noqa: E731
                         {"params": ps[4:], "lr": 2e-3, "betas": (0.8, 0.9)}]
    a = torch.optim.AdamW(groups(ref), foreach=True, weight_decay=0.0)
    b = NativeAdamW(groups(got), weight_decay=0.0)
    for step in range(6):
        _grads(ref, got, g, step)
        a.step()
        b.step()
    _check(ref, got, a, b)
    # torch's state into a fresh NativeAdamW (and back) continues with the same bits
    c_params = [torch.nn.Parameter(p.detach().clone()) for p in got]
    c = NativeAdamW(groups(c_params), weight_decay=0.0)
    c.load_state_dict(copy.deepcopy(a.state_dict()))    # (a copy: load_state_dict keeps same-dtype tensors as they are)
    for step in range(6, 10):
        _grads(ref, c_params, g, step)
        a.step()
        c.step()
    _check(ref, c_params, a, c)


@pytest.mark.parametrize("change", ["amsgrad", "maximize", "two_threads", "float64", "sparse"])
def test_torchs_own_step_where_the_native_one_does_not_apply(change, monkeypatch):
    kw = dict(lr=1e-2, weight_decay=0.1)
    if change in ("amsgrad", "maximize"):
        kw[change] = True
    ref, got, a, b = _pair(SHAPES[:3], dtype=torch.float64 if change == "float64" else torch.float32, **kw)
    called = {"n": 0}
    monkeypatch.setattr(fast, "adam_step", lambda *x, **k: called.__setitem__("n", called["n"] + 1))
    if change == "two_threads":
        monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    g = torch.Generator().manual_seed(5)
    for step in range(4):
        _grads(ref, got, g, step)
        if change == "sparse":
            got[0].grad = got[0].grad.to_sparse()
            with pytest.raises(RuntimeError):     # torch's own message for sparse gradients in AdamW
                b.step()
            return
        a.step()
        b.step()
    assert called["n"] == 0
    for p, q in zip(ref, got):
        assert torch.equal(p, q)


def test_the_step_bumps_autograd_versions_and_keeps_closure_semantics():
    ref, got, a, b = _pair(SHAPES[:2], lr=1e-2)
    _grads(ref, got, torch.Generator().manual_seed(2), 0)
    v = [p._version for p in got]
    loss = b.step(lambda: torch.tensor(3.0))
    assert float(loss) == 3.0
    assert all(p._version > k for p, k in zip(got, v))
    a.step()
    _check(ref, got, a, b)


def test_the_study_registry_builds_it():
    from studies.optimizers import make_optimizer

    p = [torch.nn.Parameter(torch.randn(4, 4))]
    assert isinstance(make_optimizer("adamw", p, 1e-3, generator=torch.Generator()), NativeAdamW)
