"""The compiled StoSignSGD step (stosign.fused): bit-identical to the eager step over trajectories, exact-sign
oracle on values where an unfused multiply-add would round the other way, special values, fallbacks; pickling."""
import copy
import pickle

import pytest
import torch

import stosign.step
from stosign import StoSignSGD
from stosign.fused import FUSED_MIN_NUMEL, fusable, fused_kernel
from stosign.sign import NOISE_SCALE

BIG = FUSED_MIN_NUMEL + 37  # not a multiple of the vector width: the kernel's tail loop runs too


def _params(seed):
    g = torch.Generator().manual_seed(seed)
    shapes = ((BIG,), (300, 250), (7, 5), (11,))  # two fused, two eager
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


@pytest.mark.parametrize("kw", [
    dict(),
    dict(weight_decay=0.1),
    dict(momentum=0.0, weight_decay=0.01),
    dict(buffer="decayed_max", buffer_decay=0.9),
    dict(maximize=True, weight_decay=0.05),
], ids=str)
def test_fused_trajectory_equals_eager_bitwise(kw, monkeypatch):
    """8 steps from the same seed, gradients with zeros and a few huge/tiny values: parameters, momentum and G equal
    bit for bit (torch.equal plus the raw bits, so -0 vs +0 would show). The compiled kernel must really have run
    on both large tensors at every step (a spy records its calls)."""
    ran = []

    def spying(*args, **kwargs):
        k = fused_kernel(*args, **kwargs)
        return lambda *a: ran.append(k(*a)) or ran[-1]

    monkeypatch.setattr(stosign.step, "fused_kernel", spying)
    a, b = _params(0), _params(0)
    assert fusable(a[0], a[0]) and fusable(a[1], a[1]) and not fusable(a[2], a[2])
    oa = StoSignSGD(a, lr=0.01, fused=False, generator=torch.Generator().manual_seed(1), **kw)
    ob = StoSignSGD(b, lr=0.01, fused=True, generator=torch.Generator().manual_seed(1), **kw)
    gen = torch.Generator().manual_seed(2)
    for step in range(8):
        for pa, pb in zip(a, b):
            g = torch.randn(pa.shape, generator=gen)
            g.view(-1)[::97] = 0.0
            g.view(-1)[5::1001] *= 1e20
            g.view(-1)[7::1003] *= 1e-30
            pa.grad, pb.grad = g, g.clone()
        oa.step()
        ob.step()
    assert ran == [True] * 16
    for pa, pb in zip(a, b):
        assert torch.equal(pa.view(torch.int32), pb.view(torch.int32))
        assert list(oa.state[pa]) == list(ob.state[pb])
        for k, v in oa.state[pa].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(ob.state[pb][k])), k


def test_kernel_sign_is_exact_where_a_separate_rounding_would_differ():
    """Oracle: float64, where G·n is exact (24 + 16 bits) and the sign of a float64 sum is exact. G = 1 + 2**-23,
    k = 3: fl32(G·3·2**-15) rounds, so with m = −fl32(G·n) an unfused multiply-add gives m + fl(G·n) = 0 (no move)
    while the exact m + G·n = G·n − fl(G·n) is negative (so the kernel moves by +lr). Also: G = m = 0 →
    sign 0, NaN m → sign 0 (as torch.sign), m = +inf → G = inf and sign(inf + inf·n) per IEEE."""
    kernel = fused_kernel(False, False, required=True)
    n_el = 40
    G = torch.full((n_el,), 1 + 2.0**-23)
    k = torch.full((n_el,), 3.0)
    n = k * NOISE_SCALE
    m = -(G.double() * n.double()).float()
    G[1], m[1] = 0.0, 0.0
    m[2] = float("nan")
    m[3], k[3] = float("inf"), -1.0
    m[4], k[4] = float("inf"), 1.0
    g = m.clone()  # momentum off: the direction is the gradient
    p = torch.zeros(n_el)
    G0 = G.clone()
    assert kernel(p, g, g, G, k, *[torch.tensor(v) for v in (1.0, 1.0, 1.0, -1.0)])
    bound = torch.maximum(G0.double(), g.double().abs())
    exact = torch.sign(g.double() + bound * k.double() * NOISE_SCALE).nan_to_num(0.0)
    assert exact[0] == -1.0 and exact[1] == 0.0  # the oracle's own check of the construction
    assert torch.equal(p.double(), -exact)
    assert torch.equal(G[[0, 1, 3, 4]].double(), bound[[0, 1, 3, 4]]) and torch.isnan(G[2])
    # the eager step (ATen addcmul on this build) agrees
    from stosign.step import sign_step_single
    pe, Ge = torch.zeros(n_el), G0.clone()
    sign_step_single([pe], [g], [Ge], [k.to(torch.int16)], [torch.empty(n_el)], lr=1.0, weight_decay=0.0,
                     buffer="max", buffer_decay=1.0)
    assert torch.equal(pe, p)


def test_lerp_matches_aten_lerp_both_branches():
    """The kernel's momentum is ATen's lerp bit for bit for weights below and above 0.5 (two formulas)."""
    gen = torch.Generator().manual_seed(4)
    for w in (0.1, 0.75):
        kernel = fused_kernel(True, False, required=True)
        m, g = torch.randn(BIG, generator=gen), torch.randn(BIG, generator=gen)
        want = torch.lerp(m, g, w)
        G, p, n = torch.zeros(BIG), torch.zeros(BIG), torch.ones(BIG)
        assert kernel(p, g, m, G, n, *[torch.tensor(v) for v in (w, 1.0, 1.0, -1.0)])
        assert torch.equal(m, want)


def test_kernel_never_falls_back_silently():
    """A call that would need a recompile (float64 tensors, many calls in other grad modes) returns False and leaves
    its arguments untouched instead of running dynamo's eager fallback (whose prims.fma is not fused)."""
    kernel = fused_kernel(True, True, required=True)
    args = [torch.randn(BIG, dtype=torch.float64) for _ in range(5)]
    before = [a.clone() for a in args]
    scalars = [torch.tensor(v) for v in (0.1, 1.0, 1.0, -1.0)]
    assert not kernel(*args, *scalars)
    assert all(torch.equal(a, b) for a, b in zip(args, before))
    f32 = [a.float() for a in args]
    for grad_mode in (True, False, True):
        with torch.set_grad_enabled(grad_mode):
            assert kernel(*f32, *scalars)


def test_small_and_other_dtypes_take_the_eager_path():
    p16 = torch.nn.Parameter(torch.zeros(BIG, dtype=torch.bfloat16))
    small = torch.nn.Parameter(torch.zeros(FUSED_MIN_NUMEL - 1))
    strided = torch.zeros(2 * BIG)[::2]
    assert not fusable(p16, p16) and not fusable(small, small) and not fusable(strided, strided)


def test_bad_fused_argument():
    with pytest.raises(ValueError, match="fused"):
        StoSignSGD([torch.nn.Parameter(torch.zeros(2))], fused="yes")


@pytest.mark.parametrize("copier", [copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))], ids=["deepcopy", "pickle"])
def test_copied_optimizer_continues_bit_identically(copier):
    """Bug: torch's Optimizer pickles only defaults/state/param_groups, so a copied StoSignSGD lost its generators
    and failed at the next step (AttributeError). Now the copy (with its own copy of the parameters) continues
    exactly as the original."""
    params = [torch.nn.Parameter(torch.randn(50)), torch.nn.Parameter(torch.randn(BIG))]
    opt = StoSignSGD(params, lr=0.01, generator=torch.Generator().manual_seed(3))
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.step()
    twin = copier({"params": params, "opt": opt})
    for _ in range(3):
        for p, q in zip(params, twin["params"]):
            p.grad = torch.randn(p.shape)
            q.grad = p.grad.clone()
        opt.step()
        twin["opt"].step()
    for p, q in zip(params, twin["params"]):
        assert torch.equal(p, q)
