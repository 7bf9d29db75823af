"""studies.diagnosis's optimizer-state probes. Oracles: the chain of objects as built here, exact zero counts
constructed in the gradient, and the e4m3 bit layout (a code is zero iff its 7 magnitude bits are 0)."""
from __future__ import annotations

import math

import pytest
import torch

import lowprec.optim
from lowprec.optim import PACKED_KEY
from studies.config import Thresholds
from studies.diagnosis import DivergenceDetector, decoded_states, optimizer_chain, state_zero_frac
from studies.optimizers import make_optimizer


def _stepped(name: str, grad: torch.Tensor, policy: str | None = None):
    w = torch.nn.Parameter(torch.ones_like(grad))
    opt = make_optimizer(name, [w], lr=1e-3, seed=0)
    if policy is not None:
        opt = lowprec.optim.wrap(opt, policy)
    w.grad = grad.clone()
    opt.step()
    return opt, w


def test_chain_follows_the_wrapper_and_sign_converted_base():
    opt, _ = _stepped("stosign-adamw", torch.randn(16), "fp32")
    chain = optimizer_chain(opt)
    sign = opt.optimizer
    assert [type(o).__name__ for o in chain] == ["LowPrecisionOptimizer", "SignConverted", "NativeAdamW"]
    assert chain[1] is sign and chain[2] is sign.base


def test_zero_frac_of_plain_states():
    g = torch.cat([torch.zeros(30), torch.ones(70)])
    opt, _ = _stepped("adamw", g)
    assert state_zero_frac(opt) == 0.3                         # exp_avg_sq = 0.05 g^2: zero where g is
    opt, _ = _stepped("sgd", g)
    assert math.isnan(state_zero_frac(opt))                    # momentum is not a second moment


def test_zero_frac_of_packed_states_is_read_from_the_codes():
    # exp_avg_sq = 0.05 g^2: 0.05 for g = 1 (an e4m3 normal), 5e-12 for g = 1e-5 (below e4m3's smallest
    # subnormal 2^-9: encoded as zero)
    g = torch.cat([torch.full((40,), 1e-5), torch.ones(60)])
    opt, w = _stepped("adamw", g, "fp32,state=e4m3")
    packed = opt.state[w]["exp_avg_sq"]
    assert isinstance(packed, dict) and PACKED_KEY in packed  # what the probe must decode
    codes = packed[PACKED_KEY]["codes"]
    oracle = int(((codes & 0x7F) == 0).sum()) / codes.numel()
    assert oracle == 0.4
    assert state_zero_frac(opt) == oracle
    (name, values), = list(decoded_states(opt))
    assert name == "exp_avg_sq" and values.dtype == torch.float32 and int((values == 0).sum()) == 40


def test_detector_checks_its_thresholds_once():
    with pytest.raises(ValueError, match="spike_factor"):
        DivergenceDetector(Thresholds(spike_factor=0.5))      # a spike must be a rise
    with pytest.raises(ValueError, match="warmup_steps"):
        DivergenceDetector(Thresholds(warmup_steps=-1))
