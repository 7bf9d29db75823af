"""The registry's torch optimizers run their foreach implementation: the same bits as torch's per-tensor loop."""
from __future__ import annotations

import pytest
import torch

import lowprec.optim
from studies.diagnosis import optimizer_chain
from studies.optimizers import make_optimizer

SHAPES = [(192, 64), (64,), (256, 64), (64, 256), (7,), (1,), (0,)]


def _torch_groups(opt: torch.optim.Optimizer) -> list[dict]:
    return [g for o in optimizer_chain(opt) for g in o.param_groups if "foreach" in g]


def _train(name: str, precision: str | None, foreach: bool, steps: int = 60) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]
    opt = make_optimizer(name, params, 3e-3, generator=torch.Generator().manual_seed(7))
    groups = _torch_groups(opt)
    assert groups and all(gr["foreach"] is True for gr in groups)   # what the registry builds
    for gr in groups:
        gr["foreach"] = foreach
    if precision is not None:
        opt = lowprec.optim.wrap(opt, precision, seed=3)
    for i in range(steps):
        for p in params:   # magnitudes from 1 down to 1e-8: bias correction, eps and subnormal states all matter
            p.grad = torch.randn(p.shape, generator=g) * 10.0 ** (-(i % 9))
        opt.step()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("name", ["adamw", "sgd", "stosign-adamw"])
@pytest.mark.parametrize("precision", [None, "fp8-all", "nvfp4"])
def test_foreach_gives_the_per_tensor_bits(name, precision):
    fast = _train(name, precision, foreach=True)
    ref = _train(name, precision, foreach=False)
    start = [torch.randn(s, generator=torch.Generator().manual_seed(1)) for s in SHAPES[:1]]
    assert not torch.equal(fast[0], start[0])      # it trained
    for a, b in zip(fast, ref):
        assert a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))
