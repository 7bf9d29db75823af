"""Sign conversion: StoSignSGD is the conversion of EMA-momentum SGD, the deterministic conversion of SGD is SignSGD
(and of heavy-ball SGD is Signum), and the wrapper works with torch optimizers, schedulers and state_dict."""
import io

import pytest
import torch

from stosign import SignConverted, SignSGD, StoSignSGD


class EMAMomentumSGD(torch.optim.Optimizer):
    """The base whose conversion is StoSignSGD: m = β·m + (1−β)·g (from m = 0, as torch.lerp), θ ← θ − lr·m.

    torch.optim.SGD's momentum is not this EMA on the first step (its buffer starts at g), hence this small class.
    """

    def __init__(self, params, lr, momentum):
        super().__init__(params, dict(lr=lr, momentum=momentum))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                m = self.state[p].setdefault("m", torch.zeros_like(p))
                m.lerp_(p.grad, 1 - group["momentum"])
                p.sub_(m, alpha=group["lr"])


def _dyadic_params(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randint(-16, 16, s, generator=g).float() / 8) for s in [(9, 4), (13,)]]


def _dyadic_grads(params, step):
    g = torch.Generator().manual_seed(500 + step)
    return [torch.randint(-64, 64, p.shape, generator=g).float() / 8 for p in params]


@pytest.mark.parametrize("buffer", ["max", "decayed_max", "tensor_max"])
def test_stosignsgd_is_the_conversion_of_ema_momentum_sgd(buffer):
    """Same generator seed, same gradients: bit-identical trajectories. The data are dyadic (integers/8, lr 2**-4,
    β = 1/2), so θ_before − lr·m is exact in float32 and the direction the wrapper reads back, (θ_before − θ_after)/lr,
    is exactly m: the two optimizers then compute the very same sign(m + G⊙n)."""
    a, b = _dyadic_params(0), _dyadic_params(0)
    lr, beta = 2.0**-4, 0.5
    sto = StoSignSGD(a, lr=lr, momentum=beta, buffer=buffer, buffer_decay=0.5,
                     generator=torch.Generator().manual_seed(3))
    conv = SignConverted(EMAMomentumSGD(b, lr=lr, momentum=beta), buffer=buffer, buffer_decay=0.5,
                         generator=torch.Generator().manual_seed(3))
    moved = 0
    for step in range(10):
        for pa, pb, g in zip(a, b, _dyadic_grads(a, step)):
            pa.grad, pb.grad = g, g.clone()
        before = [p.detach().clone() for p in a]
        sto.step()
        conv.step()
        for pa, pb, p0 in zip(a, b, before):
            assert torch.equal(pa, pb), f"step {step}"
            moved += int((pa != p0).sum())
        for pa, pb in zip(a, b):
            assert torch.equal(sto.state[pa]["bound"], conv.state[pb]["bound"])
    assert moved > 0


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_deterministic_conversion_of_sgd_is_signsgd(momentum):
    """noise=False: SGD → SignSGD; heavy-ball SGD (buf = μ·buf + g, i.e. m/(1−μ) of the EMA) → Signum. Ordinary
    random data: the read-back direction differs from g in rounding only, which never changes its sign here."""
    g = torch.Generator().manual_seed(1)
    init = [torch.randn(20, 7, generator=g), torch.randn(31, generator=g)]
    a = [torch.nn.Parameter(t.clone()) for t in init]
    b = [torch.nn.Parameter(t.clone()) for t in init]
    sign = SignSGD(a, lr=0.01, momentum=momentum)
    conv = SignConverted(torch.optim.SGD(b, lr=0.01, momentum=momentum), noise=False)
    for step in range(8):
        for pa, pb in zip(a, b):
            grad = torch.randn(pa.shape, generator=g)
            pa.grad, pb.grad = grad, grad.clone()
        sign.step()
        conv.step()
        for pa, pb in zip(a, b):
            assert torch.equal(pa, pb), f"step {step}"


def test_adamw_conversion_first_step_and_weight_decay_semantics():
    """AdamW's first direction is g/(|g| + eps) (bias-corrected), so the converted first step is −lr·sign(g)
    exactly; the wrapper's own weight_decay is decoupled (outside the sign); the base's decay is signed with u."""
    g = torch.Generator().manual_seed(2)
    theta = torch.randint(-32, 32, (40,), generator=g).float() / 8
    grad = torch.randn(40, generator=g) + torch.sign(torch.randn(40, generator=g))  # |g| >> eps
    lr, wd = 2.0**-5, 2.0**-1
    p = torch.nn.Parameter(theta.clone())
    p.grad = grad
    SignConverted(torch.optim.AdamW([p], lr=lr, weight_decay=0.0), weight_decay=wd).step()
    assert torch.equal(p.detach().double(), theta.double() - lr * torch.sign(grad.double()) - lr * wd * theta.double())

    # base decoupled decay, zero gradient: u = λ·θ, so every coordinate moves by exactly lr toward 0
    q = torch.nn.Parameter(theta.clone() + 0.0625)
    q.grad = torch.zeros(40)
    SignConverted(torch.optim.AdamW([q], lr=lr, weight_decay=0.1)).step()
    assert torch.equal(q.detach(), theta + 0.0625 - lr * torch.sign(theta + 0.0625))


def test_scheduler_groups_lr_zero_and_missing_grads():
    a, b, c = (torch.nn.Parameter(torch.zeros(50)) for _ in range(3))
    base = torch.optim.Adam([{"params": [a]}, {"params": [b], "lr": 0.0}, {"params": [c]}], lr=2.0**-4)
    conv = SignConverted(base, generator=torch.Generator().manual_seed(0))
    assert conv.param_groups is base.param_groups
    sched = torch.optim.lr_scheduler.StepLR(conv, step_size=1, gamma=0.5)
    g = torch.Generator().manual_seed(1)
    for k in range(3):
        a.grad, b.grad = torch.randn(50, generator=g), torch.randn(50, generator=g)
        a0 = a.detach().clone()
        conv.step()
        sched.step()
        assert torch.equal((a - a0).abs(), torch.full((50,), 2.0**-4 / 2**k))  # |G| > 0: every coordinate ±lr
        assert base.param_groups[0]["lr"] == 2.0**-4 / 2 ** (k + 1)
    assert torch.equal(b, torch.zeros(50)) and torch.equal(c, torch.zeros(50))


def test_resume_is_bit_identical_and_closure_works():
    def make(model):
        return SignConverted(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0), weight_decay=0.01,
                             generator=torch.Generator().manual_seed(4))

    def model_(seed):
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

    def train(model, opt, start, steps):
        for s in range(start, start + steps):
            x = torch.randn(16, 5, generator=torch.Generator().manual_seed(s))

            def closure():
                opt.zero_grad()
                loss = (model(x) - x[:, :1]).pow(2).mean()
                loss.backward()
                return loss

            loss = opt.step(closure)
            assert loss.grad_fn is not None

    full = model_(0)
    train(full, make(full), 0, 6)
    part = model_(0)
    opt = make(part)
    train(part, opt, 0, 3)
    buf = io.BytesIO()
    torch.save({"m": part.state_dict(), "o": opt.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    resumed = model_(7)
    resumed.load_state_dict(ck["m"])
    opt2 = SignConverted(torch.optim.AdamW(resumed.parameters(), lr=1e-2, weight_decay=0.0), weight_decay=0.01,
                         generator=torch.Generator().manual_seed(999))
    opt2.load_state_dict(ck["o"])
    assert opt2.param_groups is opt2.base.param_groups
    train(resumed, opt2, 3, 3)
    for x, y in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(x, y)


def test_bad_input():
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        SignConverted([torch.nn.Parameter(torch.ones(2))])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    with pytest.raises(ValueError, match="buffer must be one of"):
        SignConverted(opt, buffer="nope")


@pytest.mark.parametrize("make", [
    lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9, nesterov=True),
    lambda ps, lr: torch.optim.Adam(ps, lr=lr),
    lambda ps, lr: torch.optim.RMSprop(ps, lr=lr),
    lambda ps, lr: torch.optim.Adagrad(ps, lr=lr),
    lambda ps, lr: torch.optim.Adamax(ps, lr=lr),
    lambda ps, lr: torch.optim.NAdam(ps, lr=lr),
    lambda ps, lr: torch.optim.RAdam(ps, lr=lr),
], ids=["sgd-nesterov", "adam", "rmsprop", "adagrad", "adamax", "nadam", "radam"])
def test_any_torch_optimizer_becomes_a_one_bit_step(make):
    """Whatever the base, every coordinate with a nonzero direction moves by exactly ±lr (dyadic θ and lr make the
    move exact), the base's state advances, and the wrapper keeps one G per parameter."""
    lr = 2.0**-6
    g = torch.Generator().manual_seed(3)
    p = torch.nn.Parameter(torch.randint(-8, 8, (64,), generator=g).float() / 4)
    conv = SignConverted(make([p], lr), generator=torch.Generator().manual_seed(0))
    for _ in range(4):
        p.grad = torch.randn(64, generator=g)
        before = p.detach().clone()
        conv.step()
        moves = (p.detach() - before).abs()
        assert torch.all((moves == lr) | (moves == 0)) and (moves == lr).float().mean() > 0.9
    assert conv.state[p]["bound"].shape == p.shape and conv.state[p]["step"] == 4
    assert len(conv.base.state[p]) > 0
