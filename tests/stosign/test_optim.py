"""StoSignSGD / SignSGD / Signum: Algorithm 3 against a float64 reference, the first step, the non-smooth stall,
foreach vs single, bit-identical resume, closures, schedulers, param groups."""
import io

import pytest
import torch

from stosign import BUFFERS, NOISE_SCALE, SignSGD, StoSignSGD, random_int16


def _params(seed=0, shapes=((7, 5), (11,), (3, 2, 4))):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def _grads(params, step, scale=1.0):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=g) * scale for p in params]


# ---------------------------------------------------------------------------------------------------------------
# float64 reference of Algorithm 3 (and the ablations), written from the formulas in the paper / issue.
# The noise is the documented stream: per step and group, random_int16(total numel) | 1, times 2**-15.
# ---------------------------------------------------------------------------------------------------------------
class Reference:
    def __init__(self, params, lr, momentum, weight_decay, buffer, noise, decay, seed, maximize=False):
        self.theta = [p.detach().double().clone() for p in params]
        self.m = [torch.zeros_like(t) for t in self.theta]
        self.G = [torch.zeros(()) .double() if buffer == "tensor_max" else torch.zeros_like(t) for t in self.theta]
        self.gen = torch.Generator().manual_seed(seed)
        self.lr, self.beta, self.wd, self.buffer, self.noise, self.decay = lr, momentum, weight_decay, buffer, noise, decay
        self.maximize = maximize

    def step(self, grads):
        total = sum(t.numel() for t in self.theta)
        n_all = (random_int16(total, generator=self.gen) | 1).double() * NOISE_SCALE if self.noise else None
        off, near_ties = 0, []
        for i, (t, g) in enumerate(zip(self.theta, grads)):
            g = -g.double() if self.maximize else g.double()
            self.m[i] = self.beta * self.m[i] + (1 - self.beta) * g if self.beta > 0 else g
            m = self.m[i]
            if self.noise:
                if self.buffer == "max":
                    self.G[i] = torch.maximum(self.G[i], m.abs())
                elif self.buffer == "decayed_max":
                    self.G[i] = torch.maximum(self.decay * self.G[i], m.abs())
                elif self.buffer == "instant":
                    self.G[i] = m.abs()
                else:
                    self.G[i] = torch.maximum(self.G[i], m.abs().max())
                n = n_all[off:off + t.numel()].view(t.shape)
                x = m + self.G[i] * n
                near_ties.append((x.abs() <= 1e-5 * self.G[i] + 1e-30).flatten())
                s = torch.sign(x)
            else:
                s = torch.sign(m)
                near_ties.append(torch.zeros(t.numel(), dtype=torch.bool))
            off += t.numel()
            self.theta[i] = t - self.lr * s - self.lr * self.wd * t
        return torch.cat(near_ties)


VARIANTS = [
    dict(momentum=0.9, buffer="max", noise=True),
    dict(momentum=0.0, buffer="max", noise=True),
    dict(momentum=0.9, buffer="decayed_max", noise=True),
    dict(momentum=0.8, buffer="instant", noise=True),
    dict(momentum=0.9, buffer="tensor_max", noise=True),
    dict(momentum=0.9, buffer="max", noise=False),
    dict(momentum=0.9, buffer="max", noise=True, maximize=True),
]


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}={v[k]}" for k in v))
def test_matches_float64_reference(variant, foreach):
    """Every coordinate's move equals the float64 reference, except where the reference's m + G·n is within
    1e-5·G of 0 (float32 rounding can flip such a sign); those must be under 1% of coordinates."""
    params = _params()
    kw = dict(lr=0.01, weight_decay=0.1, buffer_decay=0.9)
    ref = Reference(params, kw["lr"], variant["momentum"], kw["weight_decay"], variant["buffer"], variant["noise"],
                    kw["buffer_decay"], seed=7, maximize=variant.get("maximize", False))
    opt = StoSignSGD(params, generator=torch.Generator().manual_seed(7), foreach=foreach, **kw, **variant)
    for step in range(8):
        grads = _grads(params, step)
        for p, g in zip(params, grads):
            p.grad = g
        ties = ref.step(grads)
        opt.step()
        got = torch.cat([p.detach().double().flatten() for p in params])
        want = torch.cat([t.flatten() for t in ref.theta])
        close = (got - want).abs() <= 1e-6
        assert torch.all(close | ties), f"step {step}: {(~(close | ties)).sum()} coordinates differ"
        assert ties.double().mean() < 0.01
        ref.theta = [p.detach().double().clone() for p in params]  # resync the 1e-7 float32 drift


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_first_step_is_exactly_minus_lr_sign_g_minus_decay(momentum, foreach):
    """Fresh state: G_1 = |m_1|, so the step is -lr·sign(g) - lr·wd·θ exactly. Dyadic lr, wd, θ make the
    float32 result exact so it can be compared bit for bit; zero gradients give no move (sign 0)."""
    g = torch.Generator().manual_seed(0)
    theta = torch.randint(-64, 64, (50,), generator=g).float() / 8
    grad = torch.randn(50, generator=g)
    grad[::7] = 0.0
    lr, wd = 2.0**-4, 2.0**-2
    expected = theta.double() - lr * torch.sign(grad.double()) - lr * wd * theta.double()
    p = torch.nn.Parameter(theta.clone())
    p.grad = grad
    StoSignSGD([p], lr=lr, momentum=momentum, weight_decay=wd, foreach=foreach,
               generator=torch.Generator().manual_seed(123)).step()
    assert torch.equal(p.detach().double(), expected)


def test_state_is_two_buffers_plus_step_and_rng_is_saved():
    params = _params()
    opt = StoSignSGD(params)
    for p, g in zip(params, _grads(params, 0)):
        p.grad = g
    opt.step()
    for p in params:
        st = opt.state[p]
        assert set(st) == {"step", "momentum_buffer", "bound"} and st["step"] == 1
        assert st["bound"].shape == p.shape and st["momentum_buffer"].shape == p.shape
    sd = opt.state_dict()
    assert set(sd["rng"]) == {"cpu"} and sd["rng"]["cpu"].dtype == torch.uint8
    signum = SignSGD(params, momentum=0.9)
    signum.step()
    assert all(set(signum.state[p]) == {"step", "momentum_buffer"} for p in params)
    sgd = SignSGD(params)
    sgd.step()
    assert all(set(sgd.state[p]) == {"step"} for p in params)
    assert all(set(StoSignSGD(params, momentum=0.0).state[p]) == set() for p in params)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("foreach", [False, True])
def test_signsgd_and_signum_reference(momentum, foreach):
    params = _params()
    ref = [p.detach().double().clone() for p in params]
    m = [torch.zeros_like(t) for t in ref]
    opt = SignSGD(params, lr=0.01, momentum=momentum, weight_decay=0.1, foreach=foreach)
    for step in range(5):
        grads = _grads(params, step)
        for i, (p, g) in enumerate(zip(params, grads)):
            p.grad = g
            m[i] = momentum * m[i] + (1 - momentum) * g.double() if momentum else g.double()
            ref[i] = ref[i] - 0.01 * torch.sign(m[i]) - 0.01 * 0.1 * ref[i]
        opt.step()
        for p, r in zip(params, ref):
            torch.testing.assert_close(p.detach().double(), r, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kw", VARIANTS + [dict(momentum=0.9, buffer="max", noise=True, weight_decay=0.0)],
                         ids=lambda v: "-".join(f"{k}={v[k]}" for k in v))
def test_foreach_and_single_agree_bitwise(kw):
    a, b = _params(), _params()
    kw = dict(lr=0.01, weight_decay=0.05, buffer_decay=0.95) | kw
    oa = StoSignSGD(a, foreach=False, generator=torch.Generator().manual_seed(1), **kw)
    ob = StoSignSGD(b, foreach=True, generator=torch.Generator().manual_seed(1), **kw)
    for step in range(6):
        for pa, pb, g in zip(a, b, _grads(a, step)):
            pa.grad, pb.grad = g, g.clone()
        oa.step()
        ob.step()
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb)
    for pa, pb in zip(a, b):
        for k in oa.state[pa]:
            assert torch.equal(torch.as_tensor(oa.state[pa][k]), torch.as_tensor(ob.state[pb][k]))


def _mlp(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def _batch(step):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(32, 6, generator=g)
    return x, x.sum(1, keepdim=True).sin()


def _train(model, opt, steps, start=0, sched=None):
    for s in range(start, start + steps):
        x, y = _batch(s)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if sched is not None:
            sched.step()


@pytest.mark.parametrize("make", [
    lambda ps: StoSignSGD(ps, lr=0.01, weight_decay=0.01, generator=torch.Generator().manual_seed(11)),
    lambda ps: StoSignSGD(ps, lr=0.01, buffer="tensor_max", foreach=True),
    lambda ps: SignSGD(ps, lr=0.01, momentum=0.9),
], ids=["paper", "tensor_max-foreach-defaultgen", "signum"])
def test_state_dict_resume_is_bit_identical(make):
    """Train 4 steps, save model+optimizer(+scheduler), load into fresh objects (different init and a different
    generator seed), continue 4 steps: equal bit for bit to 8 uninterrupted steps."""
    torch.manual_seed(0)
    full = _mlp(0)
    opt = make(full.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, 3, 0.5)
    _train(full, opt, 8, sched=sched)

    torch.manual_seed(0)
    first = _mlp(0)
    opt1 = make(first.parameters())
    sched1 = torch.optim.lr_scheduler.StepLR(opt1, 3, 0.5)
    _train(first, opt1, 4, sched=sched1)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict(), "sched": sched1.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    torch.manual_seed(99)  # a different default seed for a default-constructed generator
    resumed = _mlp(5)
    resumed.load_state_dict(ckpt["model"])
    opt2 = make(resumed.parameters())
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, 3, 0.5)
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    _train(resumed, opt2, 4, start=4, sched=sched2)
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_nonsmooth_problem_signsgd_stalls_stosignsgd_converges():
    """f(x) = sum over P pairs of  eps·|x1 + x2| + |x1 − x2|,  0 < eps < 1, minimum 0 at x = 0.

    Proof that SignSGD stalls: the (sub)gradient autograd returns for one pair is
        g = (eps·s + d, eps·s − d),   s = sign(x1 + x2),  d = sign(x1 − x2).
    While d != 0, |d| = 1 > eps, so sign(g) = (d, −d) and the step −lr·(d, −d) leaves x1 + x2 unchanged. The
    difference x1 − x2 moves by ∓2·lr; we start it at 2**-20 and every lr_t used is 2**-5 · 2**-k with
    2·lr_t >= 2**-19, so x1 − x2 stays an odd multiple of 2**-20 and is never 0: d != 0 forever. Hence
    x1 + x2 = 2 for every pair at every step and f >= P·eps·2 forever: SignSGD cannot reduce the objective below
    that value (all values are multiples of 2**-20 near 1, exact in float32, so this holds bit for bit).
    StoSignSGD's step is unbiased for −lr·m/G, which has the component −lr·eps·s/G along (1, 1): x1 + x2 drifts
    to 0 and f goes to ~0 as the learning rate decays.
    """
    eps, lr, pairs, steps = 0.25, 2.0**-5, 32, 1050

    def f(x):
        return (eps * (x[:, 0] + x[:, 1]).abs() + (x[:, 0] - x[:, 1]).abs()).sum()

    def run(make):
        x = torch.nn.Parameter(torch.tensor([[1 + 2.0**-21, 1 - 2.0**-21]]).repeat(pairs, 1))
        opt = make([x])
        sched = torch.optim.lr_scheduler.StepLR(opt, 150, 0.5)  # lr halves: 2**-5 ... 2**-11
        values, sums_invariant = [], True
        for _ in range(steps):
            opt.zero_grad()
            f(x).backward()
            opt.step()
            sched.step()
            values.append(f(x).item())
            sums_invariant &= torch.equal(x.detach().sum(1), torch.full((pairs,), 2.0))
        return values, sums_invariant

    f0 = pairs * (2 * eps + 2.0**-20)
    sign_values, invariant = run(lambda p: SignSGD(p, lr=lr))
    assert invariant  # x1 + x2 never moved: the stall, as proven
    assert min(sign_values) >= pairs * eps * 2  # = 16, while f0 = 16.00003 and the minimum is 0
    for momentum in (0.0, 0.9):
        sto_values, _ = run(lambda p: StoSignSGD(p, lr=lr, momentum=momentum,
                                                 generator=torch.Generator().manual_seed(0)))
        assert sto_values[-1] <= 0.01 * f0, (momentum, sto_values[-1])


def test_closure_is_called_once_and_loss_returned():
    model = _mlp(0)
    opt = StoSignSGD(model.parameters(), lr=0.01)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        x, y = _batch(0)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    loss = opt.step(closure)
    assert len(calls) == 1
    assert isinstance(loss, torch.Tensor) and loss.grad_fn is not None
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_lr_scheduler_and_param_groups_set_the_step_size():
    """Each coordinate moves by exactly its group's current lr (no decay, nonzero G)."""
    a = torch.nn.Parameter(torch.zeros(100))
    b = torch.nn.Parameter(torch.zeros(100))
    opt = StoSignSGD([{"params": [a]}, {"params": [b], "lr": 2.0**-3, "noise": False}], lr=2.0**-5,
                     generator=torch.Generator().manual_seed(0))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    g = torch.Generator().manual_seed(1)
    for k in range(3):
        a.grad = torch.randn(100, generator=g)
        b.grad = torch.randn(100, generator=g)
        a0, b0 = a.detach().clone(), b.detach().clone()
        opt.step()
        sched.step()
        assert torch.equal((a - a0).abs(), torch.full((100,), 2.0**-5 / 2**k))
        assert torch.equal(b - b0, -torch.sign(opt.state[b]["momentum_buffer"]) * 2.0**-3 / 2**k)
    assert "bound" not in opt.state[b]  # the deterministic group keeps no G


def test_zero_gradient_and_missing_grad_do_not_move():
    a, b = torch.nn.Parameter(torch.ones(10)), torch.nn.Parameter(torch.ones(10))
    a.grad = torch.zeros(10)
    opt = StoSignSGD([a, b], lr=0.1)
    for _ in range(3):
        opt.step()
    assert torch.equal(a, torch.ones(10)) and torch.equal(b, torch.ones(10)) and not opt.state[b]


def test_bad_hyperparameters():
    p = [torch.nn.Parameter(torch.ones(2))]
    with pytest.raises(ValueError, match="lr"):
        StoSignSGD(p, lr=-1.0)
    with pytest.raises(ValueError, match="momentum"):
        StoSignSGD(p, momentum=1.0)
    with pytest.raises(ValueError, match="weight_decay"):
        SignSGD(p, weight_decay=-0.1)
    with pytest.raises(ValueError, match=r"buffer must be one of .*'max'"):
        StoSignSGD(p, buffer="mean")
    with pytest.raises(ValueError, match="buffer_decay"):
        StoSignSGD(p, buffer="decayed_max", buffer_decay=0.0)
    with pytest.raises(TypeError, match="generator"):
        StoSignSGD(p, generator=3)
    assert set(BUFFERS) == {"max", "decayed_max", "instant", "tensor_max"}


def test_step_is_unbiased_for_minus_lr_m_over_G():
    """Closed-form oracle, statistics: momentum 0, gradients g1 then g2 from fresh state. Step 2 has
    G = max(|g1|, |g2|), so E[Δθ_2] = −lr·g2/G. 600 independent runs (different generator seeds): every
    coordinate's mean step within 5 standard errors lr·sqrt((1 − (g2/G)²)/runs) (+ the 2**-15 resolution)."""
    g = torch.Generator().manual_seed(8)
    g1, g2 = torch.randn(300, generator=g), torch.randn(300, generator=g)
    lr, runs = 2.0**-6, 600
    steps = torch.zeros(runs, 300, dtype=torch.float64)
    for r in range(runs):
        p = torch.nn.Parameter(torch.zeros(300))
        opt = StoSignSGD([p], lr=lr, momentum=0.0, generator=torch.Generator().manual_seed(10_000 + r))
        p.grad = g1
        opt.step()
        before = p.detach().clone()
        p.grad = g2
        opt.step()
        steps[r] = (p.detach() - before).double()
    t = (g2 / torch.maximum(g1.abs(), g2.abs())).double()
    se = lr * torch.sqrt((1 - t**2) / runs)
    assert torch.all((steps.mean(0) + lr * t).abs() <= 5 * se + lr * 2**-15)
    assert set(steps.abs().unique().tolist()) == {lr}  # every coordinate moved by exactly ±lr


def test_named_ablations_construct_and_step():
    from stosign import ABLATIONS

    assert {"paper", "no-noise", "no-momentum", "decayed-max", "instant", "tensor-max"} <= set(ABLATIONS)
    for name, kw in ABLATIONS.items():
        p = torch.nn.Parameter(torch.zeros(20))
        opt = StoSignSGD([p], lr=2.0**-4, **kw)
        p.grad = torch.linspace(-1, 1, 21)[torch.arange(21) != 10]  # no zero entry
        opt.step()
        assert torch.equal(p.detach().abs(), torch.full((20,), 2.0**-4)), name  # first step: −lr·sign(g)
