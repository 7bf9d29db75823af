"""check_nonfinite="deferred": no host read on unsampled steps, the same first non-finite site as the exact mode.

Oracles: hand-written NaN placements, the exact mode (True) on the same run, and a count of host reads
(Tensor.__bool__/item/tolist/__float__) made from lowprec's telemetry and optimizer wrapper."""
import sys

import pytest
import torch
from torch import nn

from lowprec.optim import wrap
from lowprec.telemetry import Telemetry

torch.set_num_threads(1)
NAN = float("nan")


def test_flag_many_makes_the_events_of_one_flag_per_tensor():
    """The batched deferred check: hand-placed NaN/inf in several dtypes (an fp16 sum that overflows to inf
    counts, as the single check's sum does), interleaved with single flags and rows, over unsampled and sampled
    steps: the same events, in the same order, and the same first site as flagging tensor by tensor."""
    INF = float("inf")

    def tensors(step):
        return [("optim:grad", torch.ones(3)), ("optim:grad", torch.tensor([1.0, NAN]) if step == 1 else torch.ones(2)),
                ("optim:exp_avg", torch.tensor([-INF, 0.0], dtype=torch.bfloat16) if step == 2 else torch.zeros(2)),
                ("optim:exp_avg_sq", torch.full((4,), 60000.0, dtype=torch.float16)),   # sum 240000: inf in fp16
                ("optim:exp_avg", torch.tensor([INF]) if step in (1, 4) else torch.ones(1))]

    one, many = (Telemetry(every=3, check_nonfinite="deferred") for _ in range(2))
    for step in range(6):
        for tel in (one, many):
            tel.record("l:activation", "activation", torch.ones(2),
                       torch.tensor([NAN, 0.0]) if step == 4 else torch.ones(2))
            pairs = tensors(step)
            if tel is one:
                for site, t in pairs:
                    tel.flag(site, t)
            else:
                tel.flag_many(pairs[:3])
                tel.flag("optim:exp_avg_sq", pairs[3][1])
                tel.flag_many(pairs[4:])
            tel.next_step()
    assert one.nonfinite_events() == many.nonfinite_events()
    assert (1, "optim:grad") in many.nonfinite_events() and (2, "optim:exp_avg") in many.nonfinite_events()
    # unsampled steps 1, 2, 4, 5 (0 and 3 are sampled): the fp16 overflow each, step 1 NaN and inf, step 2 -inf,
    # step 4 the activation's NaN and an inf
    assert len(many.nonfinite_events()) == 9
    assert one.first_nonfinite() == many.first_nonfinite() == "optim:grad"
    assert many.frame().equals(one.frame())


def test_deferred_events_and_first_nonfinite_hand_placed():
    t = Telemetry(every=3, check_nonfinite="deferred")
    for step in range(8):
        act = torch.tensor([1.0, NAN]) if step in (4, 7) else torch.ones(2)
        w = torch.tensor([NAN, 1.0]) if step == 6 else torch.ones(2)
        t.record("l:weight", "weight", torch.ones(2), w)
        t.record("l:activation", "activation", torch.ones(2), act)
        t.next_step()
    df = t.frame()
    assert sorted(set(df.step)) == [0, 3, 6]                    # no rows on unsampled steps
    assert t.nonfinite_events() == [(4, "l:activation"), (7, "l:activation")]
    assert t.first_nonfinite() == "l:activation"                # step 4 comes before step 6's sampled NaN
    assert df.set_index(["step", "site"]).loc[(6, "l:weight"), "nan_count"] == 1
    exact = Telemetry(every=3)
    late = Telemetry(every=3, check_nonfinite="deferred")
    for step in range(8):                                       # the sampled NaN first, an unsampled one later
        for tel in (exact, late):
            tel.record("a:grad", "grad", torch.ones(2), torch.tensor([NAN, 1.0]) if step == 3 else torch.ones(2))
            tel.record("b:grad", "grad", torch.ones(2), torch.tensor([NAN, 1.0]) if step == 5 else torch.ones(2))
            tel.next_step()
    assert exact.first_nonfinite() == late.first_nonfinite() == "a:grad"
    with pytest.raises(ValueError, match="check_nonfinite"):
        Telemetry(check_nonfinite="lazy")


@pytest.fixture
def host_reads(monkeypatch):
    """Count host reads of tensors made by code in lowprec/telemetry.py and lowprec/optim.py."""
    counts = {"n": 0}
    ours = ("lowprec/telemetry.py", "lowprec/optim.py")
    for name in ("__bool__", "item", "tolist", "__float__"):
        orig = getattr(torch.Tensor, name)

        def patched(self, *a, _orig=orig, **k):
            if sys._getframe(1).f_code.co_filename.replace("\\", "/").endswith(ours):
                counts["n"] += 1
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, patched)
    return counts


@pytest.mark.parametrize("mode,reads", [(True, "some"), ("deferred", 0)])
def test_unsampled_wrapped_steps_read_nothing_on_the_host(host_reads, mode, reads):
    model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 4))
    tel = Telemetry(every=4, check_nonfinite=mode)
    opt = wrap(torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9),
               "grad=e5m2:tensor,state=e4m3:block128:nosat,master=bf16:stochastic", telemetry=tel)
    x = torch.randn(8, 16)
    for step in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        if step == 1:
            host_reads["n"] = 0                 # step 0 is sampled; count steps 1 and 2 (unsampled)
        opt.step()
    if reads == 0:
        assert host_reads["n"] == 0
    else:
        assert host_reads["n"] > 0              # the exact mode reads each check (the counter works)
    assert tel.first_nonfinite() is None and tel.nonfinite_events() == []


def test_deferred_wrapped_nonfinite_state_found_like_exact():
    firsts = []
    for mode in (True, "deferred"):
        p = nn.Parameter(torch.zeros(8))
        tel = Telemetry(every=10, check_nonfinite=mode)
        opt = wrap(torch.optim.AdamW([p], lr=1e-3), "state=e4m3:nosat", telemetry=tel)
        p.grad = torch.ones(8)
        opt.step()
        p.grad = torch.full((8,), 1000.0)       # v > 448: E4M3 without saturation stores NaN at step 1
        opt.step()
        firsts.append(tel.first_nonfinite())
        if mode == "deferred":
            assert tel.nonfinite_events() == [(1, "optim:exp_avg_sq")]
    assert firsts == ["optim:exp_avg_sq"] * 2
