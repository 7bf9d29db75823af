"""Delayed (Transformer Engine style) scaling from a spec string, per quantization site of converted layers.

Oracles: hand-computed scales (amax_h * 2**margin / 448 for E4M3, / 57344 for E5M2) and torch's own float8 casts.
"""
import copy
import math

import pytest
import torch
from torch import nn

from lowprec import DelayedScaler, QuantSpec, Scaling, quantize, quantize_with_scale
from lowprec.nn import QuantLinear, convert
from lowprec.policy import PrecisionPolicy
from lowprec.telemetry import Telemetry

E4M3_MAX, E5M2_MAX = 448.0, 57344.0
# one row, |x| in {1, .5, .25, .125, .01, .005, .001, 0}; amax 1
BASE = torch.tensor([[1.0, 0.5, 0.25, 0.125, 0.01, 0.005, 0.001, 0.0],
                     [-1.0, -0.5, -0.25, -0.125, -0.01, -0.005, -0.001, 0.0]])


def f32(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def e4m3_oracle(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Saturating E4M3 with dequantization scale d, by torch's own cast."""
    return (x / d).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() * d


def identity_layer(policy: str, tel: Telemetry, n: int = 8) -> QuantLinear:
    lin = nn.Linear(n, n)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(n))
        lin.bias.zero_()
    return convert(lin, policy, telemetry=tel, backend="emulated")


def rows(tel: Telemetry, role: str):
    df = tel.frame()
    return df[df.role == role].reset_index(drop=True)


# ---------------------------------------------------------------------------------------------- spec text
@pytest.mark.parametrize("text,canonical,hl,margin,algo", [
    ("e4m3:delayed", "e4m3:delayed1024", 1024, 0, "max"),
    ("e4m3:delayed16", "e4m3:delayed16", 16, 0, "max"),
    ("E4M3:Delayed1024:margin=1", "e4m3:delayed1024:margin=1", 1024, 1, "max"),
    ("e4m3:delayed16:margin=0:algo=max", "e4m3:delayed16", 16, 0, "max"),
    ("e5m2:sr:delayed1:algo=most_recent:nosat", "e5m2:stochastic:delayed1:algo=most_recent:nosat", 1, 0,
     "most_recent"),
    ("e4m3:margin=3:delayed8:axis=0", "e4m3:delayed8:margin=3", 8, 3, "max"),
])
def test_parse_str_round_trip(text, canonical, hl, margin, algo):
    s = QuantSpec.parse(text)
    assert (s.scaling.mode, s.scaling.history_len, s.scaling.margin, s.scaling.algo) == ("delayed", hl, margin, algo)
    assert s.scaling.axis == -1 and s.scaling.scale_format == "fp32"
    assert str(s) == canonical and QuantSpec.parse(str(s)) == s
    assert Scaling("delayed", history_len=hl, margin=margin, algo=algo) == s.scaling
    p = PrecisionPolicy.parse(f"weight={text},activation=e4m3:tensor,grad=e5m2:delayed1024:margin=2")
    assert PrecisionPolicy.parse(str(p)) == p and p.weight == s and p.grad.scaling.margin == 2


@pytest.mark.parametrize("bad,match", [
    ("e4m3:delayed0", "history length"),
    ("e4m3:delayed16:margin=-1", "margin"),
    ("e4m3:delayed16:margin=x", "margin= needs an integer"),
    ("e4m3:delayed16:algo=mean", "algo"),
    ("e4m3:delayed16:scale=e8m0", "fp32 scales"),
    ("e4m3:tensor:margin=1", "delayed scaling only"),
    ("e4m3:block32:algo=max", "delayed scaling only"),
    ("e4m3:margin=1", "need a scaling token"),
    ("e4m3:delayedx", "unknown token"),
])
def test_bad_delayed_specs(bad, match):
    with pytest.raises(ValueError, match=match):
        QuantSpec.parse(bad)
    with pytest.raises(ValueError, match="delayed scaling only"):
        Scaling("tensor", margin=1)


def test_plain_quantize_is_a_history_of_one_with_margin():
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)) * 3
    assert torch.equal(quantize(x, "e4m3:delayed16"), quantize(x, "e4m3:tensor"))
    for m in (0, 1, 3):
        d = (x.abs().max() / E4M3_MAX) * 2.0**m
        q, s = quantize_with_scale(x, f"e4m3:delayed1024:margin={m}")
        assert torch.equal(s.reshape(()), d) and torch.equal(q, e4m3_oracle(x, d))
        assert q.abs().max() <= E4M3_MAX / 2**m * d * (1 + 1e-6)  # the amax maps to 448 / 2**m
    # a caller-held scale: values above 448 * scale saturate (or become NaN with nosat)
    q, s = quantize_with_scale(torch.tensor([1.0, 10.0]), "e4m3:delayed16", scale=f32(1.0 / E4M3_MAX))
    assert torch.equal(q, torch.tensor([1.0, 1.0]) * (E4M3_MAX * f32(1.0 / E4M3_MAX)))
    q, _ = quantize_with_scale(torch.tensor([1.0, 10.0]), "e4m3:delayed16:nosat", scale=f32(1.0 / E4M3_MAX))
    assert torch.isnan(q[1]) and q[0] == 1.0
    with pytest.raises(ValueError, match="tensor or delayed"):
        quantize_with_scale(x, "e4m3:block32", scale=1.0)
    with pytest.raises(ValueError, match="one element"):
        quantize_with_scale(x, "e4m3:delayed16", scale=torch.ones(2))


def test_scaler_from_spec():
    ds = DelayedScaler.from_spec("e4m3:delayed2:margin=1")
    assert (ds.history_len, ds.margin, ds.algo, ds.init, str(ds.spec)) == (2, 1, "max", "current", "e4m3")
    assert torch.equal(ds.scales_for(f32(4.0))[1], f32(4.0 / E4M3_MAX) * 2)   # empty history: current amax
    for a in (4.0, 1.0, 0.5):
        ds.update(f32(a))
    assert torch.equal(ds.scale_inv, f32(1.0 / E4M3_MAX) * 2)                  # max(1, .5) * 2 / 448
    assert math.isclose(ds.scale.item(), E4M3_MAX / 1.0 / 2, rel_tol=1e-7)
    with pytest.raises(ValueError, match="delayed scaling"):
        DelayedScaler.from_spec("e4m3:tensor")


# ---------------------------------------------------------------------------------------------- layers
def test_scale_at_step_t_is_the_max_of_earlier_amaxes():
    """activation: history 4; grad: history 2 (E5M2). Hand-computed amax_h for every step."""
    tel = Telemetry()
    lin = identity_layer("activation=e4m3:delayed4,grad=e5m2:delayed2", tel)
    x_amax = [1.0, 8.0, 2.0, 0.5, 0.25, 0.25, 3.0]
    g_amax = [4.0, 1.0, 0.5, 16.0, 2.0, 2.0, 2.0]
    # step 0: empty history -> its own amax; then max over the previous (up to) 4 / 2 amaxes
    x_hist = [1.0, 1.0, 8.0, 8.0, 8.0, 8.0, 2.0]
    g_hist = [4.0, 4.0, 4.0, 1.0, 16.0, 16.0, 2.0]
    pattern = torch.linspace(-1, 1, 8).repeat(3, 1)       # amax exactly 1
    for t in range(len(x_amax)):
        x = (pattern * x_amax[t]).requires_grad_()
        y = lin(x)
        d = f32(x_hist[t]) / E4M3_MAX
        assert torch.equal(y.detach(), e4m3_oracle(x.detach(), d)), t   # identity weight: y = Q(x)
        y.backward(pattern * g_amax[t])
        tel.next_step()
    act, grad = rows(tel, "activation"), rows(tel, "grad")
    for t in range(len(x_amax)):
        assert act.scale_max[t] == pytest.approx(x_hist[t] / E4M3_MAX, rel=1e-7)
        assert grad.scale_max[t] == pytest.approx(g_hist[t] / E5M2_MAX, rel=1e-7)
    # steps 2..5: amax <= stale history max: nothing saturates; step 1 (8 after 1) and 3 of grad (16 after 1)
    assert list(act.saturated_frac > 0) == [False, True, False, False, False, False, True]
    assert list(grad.saturated_frac > 0) == [False, False, False, True, False, False, False]
    assert lin._site.scalers["activation"].steps == 7 and lin._site.scalers["grad"].steps == 7


def test_most_recent_algo():
    tel = Telemetry()
    lin = identity_layer("activation=e4m3:delayed4:algo=most_recent", tel)
    amaxes = [1.0, 8.0, 2.0, 0.5]
    for a in amaxes:
        lin(BASE * a)
        tel.next_step()
    expect = [1.0, 1.0, 8.0, 2.0]
    assert list(rows(tel, "activation").scale_max) == pytest.approx([e / E4M3_MAX for e in expect], rel=1e-7)


def _spike_run(policy: str, pattern, tel=None):
    tel = tel or Telemetry()
    lin = identity_layer(policy, tel)
    outs = []
    for mult in pattern:
        outs.append(lin(BASE * mult).detach())
        tel.next_step()
    return lin, tel, outs


def test_stale_amax_after_a_spike_saturates_where_current_scaling_does_not():
    pattern = [1, 1, 1, 1, 1, 100]
    _, tel, outs = _spike_run("activation=e4m3:delayed1024", pattern)
    act = rows(tel, "activation")
    # stale scale 1/448: |x| > 1 saturates: 100, 50, 25, 12.5 of each row -> 4 of 8
    assert act.saturated_frac.tolist() == [0, 0, 0, 0, 0, 0.5]
    d = f32(1.0) / E4M3_MAX
    expected = torch.tensor([448.0, 448.0, 448.0, 448.0, 448.0, 224.0, 44.0, 0.0]) * d  # 0.1*448 = 44.8 -> 44
    assert torch.equal(outs[-1][0], expected) and torch.equal(outs[-1][1], -expected + 0.0)
    # current scaling: the spike sets its own scale; nothing saturates, the spike passes
    _, tel_c, outs_c = _spike_run("activation=e4m3:tensor", pattern)
    assert rows(tel_c, "activation").saturated_frac.tolist() == [0] * 6
    assert outs_c[-1][0, 0] == 100.0
    # margin 7 (2**7 = 128 > 100) absorbs the spike: the scale is 128x larger, nothing saturates
    _, tel_m, outs_m = _spike_run("activation=e4m3:delayed1024:margin=7", pattern)
    act_m = rows(tel_m, "activation")
    assert act_m.saturated_frac.tolist() == [0] * 6
    assert act_m.scale_max.iloc[-1] == pytest.approx(128.0 / E4M3_MAX, rel=1e-7)
    # 100 / (128/448) = 350 -> E4M3 352 (spacing 32 in [256, 512)): 352 * 128 / 448 = 100.571...
    assert torch.equal(outs_m[-1], e4m3_oracle(BASE * 100, f32(1.0) / E4M3_MAX * 128))
    assert outs_m[-1][0, 0] == pytest.approx(352 * 128 / 448, rel=1e-6)


def test_margin_scales_by_power_of_two():
    for m in (0, 1, 3, 5):
        _, tel, outs = _spike_run(f"activation=e4m3:delayed16:margin={m}", [1, 1])
        act = rows(tel, "activation")
        d = (f32(1.0) / E4M3_MAX) * 2.0**m
        assert torch.equal(torch.tensor(act.scale_max.tolist(), dtype=torch.float32), torch.stack([d, d]))
        assert torch.equal(outs[1], e4m3_oracle(BASE, d))
        # the amax lands on the grid point 448 / 2**m
        assert outs[1].abs().max() == (E4M3_MAX / 2**m) * d


def test_history_length_one_versus_1024():
    # a transient dip: history 1 forgets the normal range and the next normal step overflows; 1024 does not
    dip = [1, 1, 1, 0.01, 1]
    _, tel1, _ = _spike_run("activation=e4m3:delayed1", dip)
    _, tel2, _ = _spike_run("activation=e4m3:delayed1024", dip)
    assert rows(tel1, "activation").saturated_frac.tolist() == [0, 0, 0, 0, 0.5]   # 1, .5, .25, .125 > .01
    assert rows(tel2, "activation").saturated_frac.tolist() == [0] * 5
    # after a spike a short history recovers its scale; a long one keeps the spike's amax (coarse grid)
    spike = [1, 1, 100, 1, 1, 1]
    _, tel3, _ = _spike_run("activation=e4m3:delayed2", spike)
    _, tel4, _ = _spike_run("activation=e4m3:delayed1024", spike)
    h = [1, 1, 1, 100, 100, 1]
    assert rows(tel3, "activation").scale_max.tolist() == pytest.approx([v / E4M3_MAX for v in h], rel=1e-7)
    assert rows(tel4, "activation").scale_max.iloc[-1] == pytest.approx(100 / E4M3_MAX, rel=1e-7)


def test_nosat_overflow_gives_nan_for_e4m3_and_inf_for_e5m2():
    _, tel, outs = _spike_run("activation=e4m3:delayed16:nosat", [1, 1, 100])
    act = rows(tel, "activation")
    assert act.nan_count.tolist() == [0, 0, 8] and act.saturated_frac.iloc[-1] == 0.5
    assert tel.first_nonfinite() == "linear:activation"
    assert torch.isnan(outs[-1]).all()   # a NaN operand contaminates every output of the GEMM (NaN * 0 = NaN)
    _, tel, outs = _spike_run("activation=e5m2:delayed16:nosat", [1, 1, 1e5])
    act = rows(tel, "activation")
    # stale scale 1/57344: |x| * 57344 beyond E5M2's range (57344, ties to inf at 61440) -> inf
    # (x / d >= 61440, i.e. |x| >= 61440/57344 = 1.07): 1e5, 5e4, 2.5e4, 1.25e4, 1e3, 500, 100 in both rows
    n_over = int(((BASE.abs() * 1e5) >= 61440 / 57344).sum())
    assert act.inf_count.iloc[-1] == n_over == 14 and act.saturated_frac.iloc[-1] == 14 / 16
    assert not torch.isfinite(outs[-1]).any()


def test_eval_mode_freezes_history_and_parameter_keys_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    keys = list(model.state_dict())
    convert(model, "weight=e4m3:delayed16,activation=e4m3:delayed16,grad=e5m2:delayed16")
    # the parameters keep their keys; the histories are added (tests/lowprec/test_nn_state.py)
    assert [k for k in model.state_dict() if "lowprec_delayed" not in k] == keys
    plain = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "lowprec_delayed" not in k})
    model(torch.randn(4, 8)).sum().backward()
    sc = model[0]._site.scalers
    assert {r: s.steps for r, s in sc.items()} == {"weight": 1, "activation": 1, "grad": 1}
    model.eval()
    hist = sc["activation"].amax_history.clone()
    with torch.no_grad():
        model(torch.randn(4, 8) * 50)
    assert sc["activation"].steps == 1 and torch.equal(sc["activation"].amax_history, hist)
    copy.deepcopy(model)(torch.randn(2, 8))   # a copy has its own histories
    assert sc["activation"].steps == 1


def test_converted_model_with_delayed_specs_trains():
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    target = x @ torch.randn(8, 1) + 0.1 * torch.randn(64, 1)
    for policy in ("weight=e4m3:delayed16,activation=e4m3:delayed16:margin=1,grad=e5m2:delayed16",
                   "weight=e4m3:delayed1024,activation=e4m3:delayed1024,grad=e5m2:stochastic:delayed4"):
        torch.manual_seed(1)
        model = convert(nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 1)), policy)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses = []
        for _ in range(30):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), target)
            loss.backward()
            assert all(torch.isfinite(p.grad).all() for p in model.parameters())
            opt.step()
            losses.append(loss.item())
        assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.5 * losses[0], (policy, losses)
        # one amax per step and site, although the stochastic grad is quantized twice per backward
        for lin in (model[0], model[2]):
            assert all(s.steps == 30 for s in lin._site.scalers.values())


def test_conv_and_embedding_sites_keep_histories():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    convert(model, "weight=e4m3:delayed8,activation=e4m3:stochastic:delayed8,grad=e5m2:delayed8")
    for _ in range(3):
        model(torch.randn(2, 3, 6, 6)).sum().backward()
    assert all(s.steps == 3 for s in model[0]._site.scalers.values())
    emb = convert(nn.Embedding(10, 4), "weight=e4m3:delayed8")
    emb(torch.tensor([1, 2])).sum().backward()
    assert emb._site.scalers["weight"].steps == 1 and emb.weight.grad is not None


def test_native_backend_takes_delayed_tensor_scales(scaled_mm_calls):
    calls = scaled_mm_calls
    torch.manual_seed(3)
    lin = nn.Linear(48, 32)
    policy = "weight=e4m3:delayed4,activation=e4m3:delayed4:margin=1,grad=e5m2:delayed4"
    outs = {}
    for backend in ("emulated", "native"):
        q = convert(copy.deepcopy(lin), policy, backend=backend)
        calls.clear()
        res = []
        for t in range(3):
            torch.manual_seed(10 + t)
            xi = (torch.randn(16, 48) * (1 + 5 * t)).requires_grad_()
            y = q(xi)
            y.backward(torch.randn(16, 32) * (1 + t))
            res += [y.detach(), xi.grad]
        outs[backend] = res
        assert len(calls) == (9 if backend == "native" else 0)
    for a, b in zip(outs["emulated"], outs["native"]):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)
