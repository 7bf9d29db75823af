"""The replayed state part of a fused step (``lowprec.optim._StatePlan``): once a fused step has laid out its
batches, the next steps decode into the same buffers and write each state's codes and scales into its existing
tensors. Against the per-tensor reference path (``fused=False``) over many steps: parameters, packed codes and
scales, generator states, telemetry frames and NaN/inf events bit-identical; and through every change between steps
that must end the replay (modified codes or scales, a replaced packed dict, a parameter without a gradient, a
loaded state_dict, the fused switch, another telemetry, a base step that replaces its state tensors)."""
import copy

import pytest
import torch
from torch import nn

import lowprec.optim as lo
from lowprec.optim import PACKED_KEY, wrap
from lowprec.telemetry import Telemetry

from .oracles import assert_same_run

torch.set_num_threads(1)

# batched widths (64, 256, a ragged 100), a 1-D and a 3-D tensor, one above BATCH_MAX_NUMEL (encoded alone), one
# below the policies' state_min_numel where set, and a 0-dim scalar
SHAPES = [(40, 64), (64, 64), (64,), (), (3, 5, 64), (64, 256), (256,), (7, 100), (100,), (300, 256)]
STEPS = 12


class _Replacing(torch.optim.Optimizer):
    """Momentum SGD that updates its state tensors in place, except at the steps in ``replace_at``, where it
    stores new ones (as some third-party optimizers do at every step)."""

    def __init__(self, params, lr=1e-2, replace_at=(6,)):
        super().__init__(params, {"lr": lr})
        self.replace_at, self.k = replace_at, 0

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                buf = st.get("exp_avg")
                if buf is None:
                    st["exp_avg"] = buf = p.grad.clone()
                elif self.k in self.replace_at:
                    st["exp_avg"] = buf = 0.9 * buf + p.grad
                else:
                    buf.mul_(0.9).add_(p.grad)
                p.add_(buf, alpha=-g["lr"])
        self.k += 1


def _run(policy, fused, *, tel_mode="deferred", base="adamw", change=None, steps=STEPS, plan_calls=None):
    g0 = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(s, generator=g0) * 0.1) for s in SHAPES]
    if base == "adamw":
        opt0 = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, foreach=True)
    elif base == "sgd":
        opt0 = torch.optim.SGD(params, lr=1e-2, momentum=0.9)
    else:
        opt0 = _Replacing(params)
    tel = None if tel_mode is None else Telemetry(every=3, check_nonfinite=tel_mode)
    opt = wrap(opt0, policy, telemetry=tel, seed=4, fused=fused)
    g = torch.Generator().manual_seed(9)
    for step in range(steps):
        for i, p in enumerate(params):
            grad = torch.randn(p.shape, generator=g) * 10.0 ** (i % 4 - 3)
            if step == 7 and i == 1:
                grad[..., 0] = float("nan")        # a NaN through the replayed encode (e4m3 keeps NaN)
            p.grad = grad
        if change is not None:
            opt = change(step, opt, params) or opt
        opt.step()
        if plan_calls is not None:
            plan_calls.append(opt._plan is not None)
    return params, opt, tel


POLICIES = ["fp8-all", "state=e4m3", "state=bf16", "state=e4m3:block128,state.exp_avg_sq=e5m2:block32",
            "mxfp8,state=e5m2:block32:scale=e8m0", "fp8-lm-o2", "fp32", "state=e4m3:block128,state_min_numel=4096"]


@pytest.mark.parametrize("tel_mode", [None, "deferred", True])
@pytest.mark.parametrize("policy", POLICIES)
def test_replayed_steps_equal_the_per_tensor_path(policy, tel_mode, monkeypatch):
    replayed = {"n": 0}
    orig = lo.LowPrecisionOptimizer._encode_planned

    def counted(self, *a):
        out = orig(self, *a)
        replayed["n"] += out
        return out
    monkeypatch.setattr(lo.LowPrecisionOptimizer, "_encode_planned", counted)
    ref = _run(policy, False, tel_mode=tel_mode)
    assert replayed["n"] == 0
    got = _run(policy, True, tel_mode=tel_mode)
    # every step after the two that lay the batches out (after the first, without batches)
    assert replayed["n"] == STEPS - (1 if policy == "fp32" else 2)
    assert_same_run(ref, got)


def test_replayed_states_still_own_their_codes():
    params, opt, _ = _run("fp8-all", True)
    assert opt._plan is not None
    for name in ("exp_avg", "exp_avg_sq"):
        ptrs = [opt.state[p][name][PACKED_KEY]["codes"].untyped_storage().data_ptr() for p in params if p.dim()]
        assert len(set(ptrs)) == len(ptrs)      # no state pins a batch buffer


def _at(step, action):
    def change(k, opt, params):
        if k == step:
            return action(opt, params)
    return change


def _poke_codes(opt, params):
    opt.state[params[1]]["exp_avg"][PACKED_KEY]["codes"].view(-1)[:5] = 0x38   # 1.0 in e4m3, in place


def _poke_scale(opt, params):
    opt.state[params[0]]["exp_avg_sq"][PACKED_KEY]["scale"].mul_(2.0)


def _replace_dict(opt, params):
    st = opt.state[params[5]]
    inner = dict(st["exp_avg"][PACKED_KEY])
    inner["codes"] = inner["codes"].clone()
    inner["codes"].view(-1)[0] = 0x40
    st["exp_avg"] = {PACKED_KEY: inner}


def _new_state_dict(opt, params):
    opt.state[params[1]] = copy.deepcopy(opt.state[params[1]])   # the same content in new dicts and tensors


def _no_grad(opt, params):
    params[1].grad = None


def _reload(opt, params):
    sd = copy.deepcopy(opt.state_dict())
    opt.load_state_dict(sd)


def _fused_off(opt, params):
    opt.fused = False


def _new_telemetry(opt, params):
    opt.telemetry = Telemetry(every=2, check_nonfinite="deferred")


def _both(*changes):
    def change(k, opt, params):
        for c in changes:
            c(k, opt, params)
    return change


CHANGES = {
    "modified codes": _at(5, _poke_codes),
    "modified scale": _at(5, _poke_scale),
    "replaced packed dict": _at(5, _replace_dict),
    "a parameter's new state dict": _at(5, _new_state_dict),
    "a step without a gradient": _both(_at(5, _no_grad), _at(6, _no_grad)),
    "load_state_dict": _at(5, _reload),
    "fused off, then on": _both(_at(5, _fused_off), _at(7, lambda opt, params: setattr(opt, "fused", True))),
    "another telemetry": _at(5, _new_telemetry),
}


@pytest.mark.parametrize("name", list(CHANGES))
def test_changes_between_steps_end_the_replay(name):
    change = CHANGES[name]
    ref = _run("fp8-all", False, change=change)
    planned: list[bool] = []
    got = _run("fp8-all", True, change=change, plan_calls=planned)
    assert planned[4] and planned[-1]            # replayed before the change, and again after it
    assert_same_run(ref, got)


def test_a_base_step_that_replaces_its_states():
    ref = _run("state=e4m3:block128", False, base="replacing")
    planned: list[bool] = []
    got = _run("state=e4m3:block128", True, base="replacing", plan_calls=planned)
    assert planned[5] and not planned[6] and planned[-1]   # the step that replaced them ends the replay
    assert_same_run(ref, got)


def test_sgd_momentum_replayed():
    planned: list[bool] = []
    ref = _run("state=e4m3:block128", False, base="sgd")
    got = _run("state=e4m3:block128", True, base="sgd", plan_calls=planned)
    assert all(planned[1:])
    assert_same_run(ref, got)
