"""The stochastic sign operator: values, saturation, unbiasedness (statistics), noise uniformity (chi-square)."""
import math

import pytest
import torch

from stosign import NOISE_SCALE, random_int16, stochastic_sign


def test_values_are_plus_minus_one_and_zero_only_where_bound_and_x_are_zero():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10_000, generator=g)
    bound = x.abs() * torch.rand(10_000, generator=g) * 3  # mixes |x| < bound and |x| > bound
    x[:100] = 0.0
    bound[:50] = 0.0  # x == 0 and bound == 0 -> 0
    bound[200:300] = 0.0  # x != 0 and bound == 0 -> sign(x)
    out = stochastic_sign(x, bound, generator=g)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert torch.equal(out[:50], torch.zeros(50))
    assert set(out[50:].unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(out[200:300], torch.sign(x[200:300]))


def test_saturates_to_sign_of_x_when_x_exceeds_bound():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5000, generator=g)
    x = x + torch.sign(x) * 1e-3
    for _ in range(5):
        assert torch.equal(stochastic_sign(x, x.abs() * 0.999, generator=g), torch.sign(x))
    # |x| == bound: probability 1 (n > -1 always)
    assert torch.equal(stochastic_sign(x, x.abs(), generator=g), torch.sign(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_unbiased(dtype):
    """E[out] = x/bound. N samples per ratio t: the sample mean must lie within 5 standard errors
    sqrt((1 - t^2)/N) of t, plus the documented 2**-15 resolution (multiples of 2**-15 are exact)."""
    n = 100_000
    ts = torch.tensor([-1.0, -0.7, -0.3125, -0.01, 0.0, 0.003, 0.25, 0.5, 0.9, 1.0])
    bound = torch.tensor(3.0)
    x = (ts * bound).to(dtype)[:, None].expand(-1, n).contiguous()
    out = stochastic_sign(x, bound.to(dtype), generator=torch.Generator().manual_seed(2)).double()
    t_eff = x.double()[:, 0] / 3.0  # the ratio actually represented in dtype
    mean = out.mean(dim=1)
    se = torch.sqrt((1 - t_eff**2).clamp_min(0) / n)
    err = (mean - t_eff).abs()
    assert torch.all(err <= 5 * se + 2**-15), (mean, t_eff, se)
    # and it is not trivially "always the sign": the interior ratios give mixed signs
    assert torch.all((out[1:-1] == 1).any(dim=1) & (out[1:-1] == -1).any(dim=1))


def test_unbiased_per_coordinate_with_tensor_bound():
    """Many different (x, bound) pairs, each drawn 400 times: the z-scores of the per-coordinate means must look
    standard normal (|mean z| <= 5/sqrt(K), max |z| <= 6)."""
    g = torch.Generator().manual_seed(3)
    k, reps = 2000, 400
    bound = torch.rand(k, generator=g) * 5 + 0.1
    x = (torch.rand(k, generator=g) * 2 - 1) * bound
    outs = torch.stack([stochastic_sign(x, bound, generator=g) for _ in range(reps)]).double()
    t = (x / bound).double()
    z = (outs.mean(0) - t) / torch.sqrt((1 - t**2) / reps)
    assert abs(z.mean().item()) <= 5 / math.sqrt(k)
    assert z.abs().max().item() <= 6


def test_random_int16_is_uniform_chi_square():
    """4M draws into 65536 bins: chi-square (65535 dof, sd ~362) within 6 sd of its mean."""
    r = random_int16(1 << 22, generator=torch.Generator().manual_seed(4))
    counts = torch.bincount(r.to(torch.int64) + 32768, minlength=65536).double()
    expected = r.numel() / 65536
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert abs(chi2 - 65535) <= 6 * math.sqrt(2 * 65535)
    noise = (r | 1).double() * NOISE_SCALE
    assert noise.abs().max() < 1 and (r | 1).min() == -32767 and (r | 1).max() == 32767


def test_random_int16_stream_depends_only_on_count():
    a = random_int16(1000, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    b = torch.cat([random_int16(400, generator=g), random_int16(600, generator=g)])
    assert torch.equal(a, b)


def test_reproducible_with_generator_and_broadcast_scalar_bound():
    x = torch.linspace(-1, 1, 101)
    a = stochastic_sign(x, 2.0, generator=torch.Generator().manual_seed(6))
    b = stochastic_sign(x, torch.tensor(2.0), generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b)


def test_bad_input():
    with pytest.raises(ValueError, match="bound must be >= 0"):
        stochastic_sign(torch.ones(3), torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(TypeError, match="floating-point"):
        stochastic_sign(torch.ones(3, dtype=torch.int32), 1.0)
    with pytest.raises(TypeError, match="torch.Tensor"):
        stochastic_sign([1.0, 2.0], 1.0)
    with pytest.raises(ValueError, match="does not broadcast"):
        stochastic_sign(torch.ones(3), torch.ones(4))
