"""Bug 9: NaN/inf reaching a state stored in a format without NaN (e2m1, FP6, int, MX/NV FP4).

The step must complete, the values must stay NaN/inf (never silently a number), telemetry must flag the state on
every step (sampled or not), and the state is packed again once finite. Oracle: IEEE arithmetic of SGD's momentum
(buf = m * buf + g) written out here, and the format properties (no NaN code)."""
import math

import pytest
import torch
from torch import nn

from lowprec.optim import wrap
from lowprec.telemetry import Telemetry

torch.set_num_threads(1)

POLICIES = ["state=e2m1", "state=mxfp4", "state=nvfp4", "state=int4:block32", "state=int8:channel", "state=e3m2"]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_state_stays_unpacked_visible_and_repacks(policy, bad):
    a, b = nn.Parameter(torch.zeros(64)), nn.Parameter(torch.zeros(64))
    tel = Telemetry(every=100)          # only step 0 is sampled: the flag must not depend on sampling
    opt = wrap(torch.optim.SGD([a, b], lr=0.1, momentum=0.5), policy, telemetry=tel)
    a.grad, b.grad = torch.ones(64), torch.ones(64)
    opt.step()                                                    # step 0: both finite, packed
    assert "lowprec_packed" in opt.state[a]["momentum_buffer"]
    g = torch.ones(64)
    g[5] = bad
    a.grad, b.grad = g, torch.ones(64)
    opt.step()                                                    # step 1: completes, no exception
    buf = opt.state[a]["momentum_buffer"]
    assert isinstance(buf, torch.Tensor) and buf.dtype == torch.float32       # unpacked fp32
    # SGD momentum in fp32: buf = 0.5 * q(1) + g; q(1) = 1 in every format above, so buf = 1.5 except at 5
    assert (buf[5].item() == bad) or (math.isnan(bad) and math.isnan(buf[5].item()))
    assert torch.equal(torch.cat([buf[:5], buf[6:]]), torch.full((63,), 1.5))
    assert "lowprec_packed" in opt.state[b]["momentum_buffer"]    # the healthy parameter stays packed
    assert [(p is a, n) for p, n in opt.unpacked_states()] == [(True, "momentum_buffer")]
    row = tel.frame().query("step == 1 and site == 'optim:momentum_buffer'").iloc[0]
    assert row["unpacked"] == 64 and not row["sampled"]
    assert (row["nan_count"], row["inf_count"]) == ((1, 0) if math.isnan(bad) else (0, 1))
    assert tel.unpacked_sites() == ["optim:momentum_buffer"]
    assert tel.first_nonfinite() == "optim:momentum_buffer"
    vals = {n: v for p, n, v in opt.decoded_state() if p is a}
    assert not math.isfinite(vals["momentum_buffer"][5].item())   # never silently a number

    a.grad, b.grad = torch.ones(64), torch.ones(64)
    opt.step()                                                    # step 2: still non-finite: still unpacked
    assert isinstance(opt.state[a]["momentum_buffer"], torch.Tensor)
    assert tel.frame().query("step == 2 and site == 'optim:momentum_buffer'")["unpacked"].sum() == 64
    opt.state[a]["momentum_buffer"].nan_to_num_(0.0, 0.0, 0.0)    # a run loop repairs it ...
    opt.step()                                                    # ... and the next step packs it again
    assert "lowprec_packed" in opt.state[a]["momentum_buffer"]
    assert opt.unpacked_states() == [] and tel.unpacked_sites() == []
    sd = opt.state_dict()
    assert all("lowprec_packed" in sd["state"][i]["momentum_buffer"] for i in (0, 1))


def test_adamw_nan_in_fp4_states_every_later_step_completes():
    p = nn.Parameter(torch.zeros(32))
    opt = wrap(torch.optim.AdamW([p], lr=1e-3), "state=mxfp4")
    p.grad = torch.full((32,), float("nan"))
    for _ in range(3):                                            # the step after a NaN used to raise again
        opt.step()
        p.grad = torch.ones(32)
    assert torch.isnan(opt.state[p]["exp_avg"]).all() and torch.isnan(opt.state[p]["exp_avg_sq"]).all()
    assert torch.isnan(p.detach()).all()
    # a state_dict with unpacked states loads back and resumes (plain fp32 entries)
    opt2 = wrap(torch.optim.AdamW([nn.Parameter(torch.zeros(32))], lr=1e-3), "state=mxfp4")
    opt2.load_state_dict(opt.state_dict())


def test_formats_with_nan_keep_storing_nan_codes():
    p = nn.Parameter(torch.zeros(16))
    opt = wrap(torch.optim.SGD([p], lr=0.1, momentum=0.9), "state=e4m3:block128")
    g = torch.ones(16)
    g[0] = float("nan")
    p.grad = g
    opt.step()
    packed = opt.state[p]["momentum_buffer"]["lowprec_packed"]
    codes = packed["codes"].view(torch.float8_e4m3fn).float()
    assert math.isnan(codes[0].item()) and torch.isfinite(codes[1:]).all()
    assert opt.unpacked_states() == []
