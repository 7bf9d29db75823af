"""Lion against the published update rule (Chen et al. 2023, Algorithm 2) in exact rational arithmetic, against
the lion-pytorch formulation (multiply-add instead of lerp), foreach vs single, zero-size parameters, sign(0),
resume, hyperparameter errors."""
import io
from fractions import Fraction

import pytest
import torch

from stosign import Lion


def _sign(x):
    return (x > 0) - (x < 0)  # sign(0) = 0, as torch.sign


class ExactLion:
    """Algorithm 2 written out in exact rationals: c = b1·m + (1−b1)·g; θ ← θ − lr·(sign(c) + wd·θ);
    m ← b2·m + (1−b2)·g; m_0 = 0. ``maximize`` negates g."""

    def __init__(self, theta, lr, betas, wd, maximize=False):
        self.theta = [Fraction(float(v)) for v in theta]
        self.m = [Fraction(0)] * len(self.theta)
        self.lr, self.wd = Fraction(lr), Fraction(wd)
        self.b1, self.b2 = Fraction(betas[0]), Fraction(betas[1])
        self.maximize = maximize

    def step(self, grad):
        for i, gv in enumerate(grad):
            g = -Fraction(float(gv)) if self.maximize else Fraction(float(gv))
            c = self.b1 * self.m[i] + (1 - self.b1) * g
            self.theta[i] = self.theta[i] - self.lr * (_sign(c) + self.wd * self.theta[i])
            self.m[i] = self.b2 * self.m[i] + (1 - self.b2) * g


def _dyadic(n, lo, hi, denom, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, (n,), generator=g).float() / denom


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("wd", [0.0, 2.0], ids=["wd0", "wd2"])
@pytest.mark.parametrize("maximize", [False, True])
def test_matches_published_rule_exactly(wd, foreach, maximize):
    """Dyadic θ, g, betas (1/2, 3/4), lr = 1/4 and lr·wd = 1/2: every float32 operation is exact, so the optimizer
    must equal the rational-arithmetic rule bit for bit over 6 steps. The gradients contain zeros, and coordinate 0
    is built so that c = 0 at step 2 with m != 0 (g_1 = 1 → m = 1/4, g_2 = −1/4 → c = (1/4 − 1/4)/2): sign(0) = 0,
    no move but the decay."""
    n, lr, betas = 40, 0.25, (0.5, 0.75)
    theta = _dyadic(n, -32, 32, 8, 0)
    grads = [_dyadic(n, -4, 5, 4, 10 + t) for t in range(6)]
    s = -1.0 if maximize else 1.0
    grads[0][0], grads[1][0] = 1.0 * s, -0.25 * s
    grads[0][1] = grads[1][1] = 0.0  # m = 0 and g = 0: c = 0 at steps 1-2
    p = torch.nn.Parameter(theta.clone())
    opt = Lion([p], lr=lr, betas=betas, weight_decay=wd, foreach=foreach, maximize=maximize)
    ref = ExactLion(theta.tolist(), lr, betas, wd, maximize)
    for t, g in enumerate(grads):
        p.grad = g.clone()
        before = p.detach().clone()
        opt.step()
        ref.step(g.tolist())
        assert [Fraction(float(v)) for v in p.detach()] == ref.theta, f"step {t}"
        assert [Fraction(float(v)) for v in opt.state[p]["exp_avg"]] == ref.m, f"step {t}"
        if t == 1:  # c = 0 at coordinates 0 and 1: only the decay moved them
            assert torch.equal(p.detach()[:2], before[:2] * (1 - lr * wd))
    assert opt.state[p]["step"] == 6


def _lion_pytorch_step(p, grad, exp_avg, lr, wd, beta1, beta2):
    """The update of lucidrains/lion-pytorch (read there, written out here): decay, sign of the multiply-add
    interpolation, then the momentum by multiply-add."""
    p.mul_(1 - lr * wd)
    update = exp_avg.clone().mul_(beta1).add(grad, alpha=1 - beta1).sign_()
    p.add_(update, alpha=-lr)
    exp_avg.mul_(beta2).add_(grad, alpha=1 - beta2)


@pytest.mark.parametrize("foreach", [False, True])
def test_agrees_with_lion_pytorch_formulation(foreach):
    """Default betas, float32, random data, 10 steps, re-synchronised each step: the two formulations compute c
    with different roundings (lerp vs multiply-add), so a sign may differ only where |c| <= 1e-6·(|m| + |g|)
    (under 1% of coordinates here); everywhere else θ and m agree to 1 ulp-level tolerances."""
    lr, wd, betas = 1e-3, 0.1, (0.9, 0.99)
    gen = torch.Generator().manual_seed(3)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((13, 7), (50,), (2, 3, 4))]
    opt = Lion(ps, lr=lr, betas=betas, weight_decay=wd, foreach=foreach)
    flips = total = 0
    for t in range(10):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen)
        refs = []
        for p in ps:
            m = opt.state[p]["exp_avg"].clone() if p in opt.state else torch.zeros_like(p)
            c = betas[0] * m.double() + (1 - betas[0]) * p.grad.double()
            near = c.abs() <= 1e-6 * (m.double().abs() + p.grad.double().abs())
            q = p.detach().clone()
            _lion_pytorch_step(q, p.grad, m, lr, wd, *betas)
            refs.append((q, m, near))
        opt.step()
        for p, (q, m, near) in zip(ps, refs):
            close = (p.detach() - q).abs() <= 1e-6
            assert torch.all(close | near), f"step {t}"
            torch.testing.assert_close(opt.state[p]["exp_avg"], m, atol=1e-6, rtol=1e-6)
            flips += int((~close).sum())
            total += p.numel()
            with torch.no_grad():
                p.copy_(q)
            opt.state[p]["exp_avg"].copy_(m)
    assert flips <= 0.01 * total


@pytest.mark.parametrize("kw", [dict(), dict(weight_decay=0.3), dict(betas=(0.0, 0.5)), dict(maximize=True),
                                dict(betas=(0.95, 0.98), weight_decay=0.01)], ids=str)
def test_foreach_and_single_agree_bitwise(kw):
    gen = torch.Generator().manual_seed(5)
    shapes = ((7, 5), (0,), (11,), (3, 0, 2), (3, 2, 4))
    a = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    b = [torch.nn.Parameter(x.detach().clone()) for x in a]
    oa, ob = Lion(a, lr=0.01, foreach=False, **kw), Lion(b, lr=0.01, foreach=True, **kw)
    for _ in range(6):
        for pa, pb in zip(a, b):
            pa.grad = torch.randn(pa.shape, generator=gen)
            pb.grad = pa.grad.clone()
        oa.step()
        ob.step()
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb)
        assert torch.equal(oa.state[pa]["exp_avg"], ob.state[pb]["exp_avg"])


@pytest.mark.parametrize("foreach", [False, True])
def test_zero_size_parameters(foreach):
    """Empty parameters get an empty state and do not disturb the others (first step −lr·sign(g) exactly)."""
    e1, e2 = torch.nn.Parameter(torch.zeros(0)), torch.nn.Parameter(torch.zeros(4, 0))
    w = torch.nn.Parameter(torch.zeros(6))
    opt = Lion([e1, w, e2], lr=2.0**-3, foreach=foreach)
    e1.grad, e2.grad = torch.zeros(0), torch.zeros(4, 0)
    w.grad = torch.tensor([1.0, -2.0, 0.0, 3.0, -1e-30, 0.5])
    opt.step()
    assert torch.equal(w.detach(), torch.tensor([-1.0, 1.0, 0.0, -1.0, 1.0, -1.0]) * 2.0**-3)
    assert opt.state[e1]["exp_avg"].shape == (0,) and opt.state[e2]["exp_avg"].shape == (4, 0)
    assert e1.shape == (0,) and e2.shape == (4, 0)


def test_first_step_and_no_grad():
    """m_0 = 0: step 1 is −lr·sign(g) − lr·wd·θ for any β1 < 1; a parameter without grad keeps no state."""
    theta = _dyadic(30, -16, 16, 4, 1)
    g = torch.randn(30, generator=torch.Generator().manual_seed(2))
    p, q = torch.nn.Parameter(theta.clone()), torch.nn.Parameter(torch.ones(3))
    p.grad = g
    Lion([p, q], lr=2.0**-4, betas=(0.99, 0.9), weight_decay=2.0**-2).step()
    assert torch.equal(p.detach(), theta * (1 - 2.0**-6) - 2.0**-4 * torch.sign(g))
    assert torch.equal(q.detach(), torch.ones(3))


def _mlp(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def _train(model, opt, sched, steps, start=0):
    for s in range(start, start + steps):
        g = torch.Generator().manual_seed(s)
        x = torch.randn(32, 6, generator=g)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True).sin()).backward()
        opt.step()
        sched.step()


@pytest.mark.parametrize("foreach", [False, True])
def test_state_dict_resume_is_bit_identical(foreach):
    make = lambda ps: Lion(ps, lr=3e-3, betas=(0.9, 0.99), weight_decay=0.1, foreach=foreach)  # noqa: E731
    full = _mlp(0)
    opt = make(full.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, 3, 0.5)
    _train(full, opt, sched, 8)
    first = _mlp(0)
    opt1 = make(first.parameters())
    sched1 = torch.optim.lr_scheduler.StepLR(opt1, 3, 0.5)
    _train(first, opt1, sched1, 4)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict(), "sched": sched1.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = _mlp(7)
    resumed.load_state_dict(ckpt["model"])
    opt2 = make(resumed.parameters())
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, 3, 0.5)
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    _train(resumed, opt2, sched2, 4, start=4)
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_param_groups_have_their_own_hyperparameters():
    a, b = torch.nn.Parameter(torch.zeros(5)), torch.nn.Parameter(torch.zeros(5))
    opt = Lion([{"params": [a]}, {"params": [b], "lr": 2.0**-2, "betas": (0.5, 0.5)}], lr=2.0**-5)
    a.grad = b.grad = torch.ones(5)
    opt.step()
    assert torch.equal(a.detach(), torch.full((5,), -2.0**-5)) and torch.equal(b.detach(), torch.full((5,), -0.25))
    assert torch.equal(opt.state[a]["exp_avg"], torch.full((5,), 0.01)) and torch.equal(
        opt.state[b]["exp_avg"], torch.full((5,), 0.5))


def test_bad_hyperparameters():
    p = [torch.nn.Parameter(torch.ones(2))]
    with pytest.raises(ValueError, match="lr"):
        Lion(p, lr=-1e-4)
    with pytest.raises(ValueError, match="beta1"):
        Lion(p, betas=(1.0, 0.99))
    with pytest.raises(ValueError, match="beta2"):
        Lion(p, betas=(0.9, -0.1))
    with pytest.raises(ValueError, match="pair"):
        Lion(p, betas=0.9)
    with pytest.raises(ValueError, match="weight_decay"):
        Lion(p, weight_decay=-1.0)
    opt = Lion(p)
    with pytest.raises(ValueError, match="beta2"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(1))], "betas": (0.9, 1.5)})
