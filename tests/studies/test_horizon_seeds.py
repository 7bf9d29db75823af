"""Seeded rounding streams: a run's optimizer-state / master-weight stochastic rounding derives from its seed
(not seed 0 for every run), distinct from the default generator that the layers and gradients draw from."""
import torch

from lowprec.optim import wrap
from lowprec.policy import PrecisionPolicy
from studies.config import RunSpec
from studies.tasks.base import rounding_seed
from studies.training import Parallel, setup


def _spec(seed: int) -> RunSpec:
    return RunSpec(task="gpt", optimizer="adamw", precision="fp8-all", lr=1e-3, seed=seed, size="quick", steps=2)


def test_each_run_wraps_its_optimizer_with_a_seed_derived_rounding_stream():
    a, b, a2 = (setup(_spec(s), Parallel()) for s in (0, 1, 0))
    assert a.opt.seed == a2.opt.seed == rounding_seed(0)
    assert b.opt.seed == rounding_seed(1) != a.opt.seed
    assert a.opt.seed not in (0, 1)  # not torch.manual_seed(seed)'s stream (the layers') nor the old fixed 0
    assert len({rounding_seed(s) for s in range(1000)}) == 1000


def _one_step(seed: int) -> torch.Tensor:
    """One SGD step from identical parameters and gradients; only the rounding stream's seed differs."""
    p = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 4096))
    opt = wrap(torch.optim.SGD([p], lr=1e-3), PrecisionPolicy.parse("master=bf16:stochastic"), seed=seed)
    p.grad = torch.cos(torch.arange(4096.0))
    opt.step()
    return p.detach().clone()


def test_two_seeds_draw_different_streams_and_one_seed_reproduces():
    x0, x0b, x1 = _one_step(rounding_seed(0)), _one_step(rounding_seed(0)), _one_step(rounding_seed(1))
    assert torch.equal(x0, x0b)                      # same seed: bit-identical
    differ = (x0 != x1).float().mean().item()
    assert differ > 0.1                              # different seeds: many elements round the other way
    for x in (x0, x1):                               # both are bf16 master weights
        assert torch.equal(x.to(torch.bfloat16).float(), x)
