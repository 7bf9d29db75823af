"""Scales computed only when read: ``quantize_with_scale_fn``, ``Operand(scale_fn=...)``, ``Telemetry.record``
with a scale function, and the quantized layers, which expand a block spec's scale only for telemetry's rows.

Oracle: ``quantize_with_scale`` (values and scale, bit for bit) and telemetry rows recorded with the scale
tensor itself."""
from __future__ import annotations

import pytest
import torch

import lowprec.nn
from lowprec.gemm import Operand
from lowprec.nn.site import axis_spec
from lowprec.quantize import quantize_with_scale, quantize_with_scale_fn, spec
from lowprec.telemetry import Telemetry

from .test_rounding import same

SPECS = ["nvfp4", "mxfp8", "e4m3:tensor", "e5m2", "e4m3:channel", "e4m3:block16x16", "nvfp4:stochastic",
         "e2m1:block7:scale=e4m3"]


@pytest.mark.parametrize("text", SPECS)
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("shape", [(64, 48), (70, 33)])
def test_scale_fn_gives_quantize_with_scale(text, axis, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(axis)) * 5
    x[3, 4] = float("nan")
    s = axis_spec(spec(text), axis)
    q_ref, s_ref = quantize_with_scale(x, s, generator=torch.Generator().manual_seed(1))
    q, fn = quantize_with_scale_fn(x, s, generator=torch.Generator().manual_seed(1))
    sc = fn()
    assert same(q, q_ref)
    assert (sc is None) == (s_ref is None) and (sc is None or same(sc, s_ref))


def test_operand_computes_its_scale_once_and_transposes_it():
    calls = []
    scale = torch.arange(6.0).reshape(2, 3)

    def fn():
        calls.append(1)
        return scale
    op = Operand(torch.zeros(2, 3), None, spec("e4m3:channel"), scale_fn=fn)
    t = op.t()
    assert not calls                               # nothing computed yet
    assert torch.equal(t.scale, scale.t()) and torch.equal(op.scale, scale) and torch.equal(op.scale, scale)
    assert len(calls) == 2                         # once for op, once for its transposed copy
    assert Operand(torch.zeros(1), None, None).scale is None


def test_telemetry_row_with_a_scale_fn_equals_the_row_with_the_scale():
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(0)) * 100
    s = axis_spec(spec("nvfp4"), 0)
    q, fn = quantize_with_scale_fn(x, s)
    frames = []
    for scale in (fn(), fn):
        tel = Telemetry(every=1)
        tel.record("l:grad", "grad", x, q, scale=scale, fmt_max=s.format.max, fmt=str(s))
        frames.append(tel.frame())
    assert frames[0].equals(frames[1]) and frames[0]["saturated_frac"].iloc[0] > 0


@pytest.mark.parametrize("policy", ["nvfp4", "mxfp8"])
def test_a_layer_expands_block_scales_only_on_sampled_steps(policy, monkeypatch):
    import lowprec.nn.site as site_mod

    made = []
    real = site_mod.Operand

    class Spy(real):
        __slots__ = ()

        @property
        def scale(self):
            if self._scale_fn is not None:
                made.append(self.spec.scaling.mode)
            return real.scale.fget(self)
    monkeypatch.setattr(site_mod, "Operand", Spy)
    tel = Telemetry(every=2, check_nonfinite="deferred")
    lin = lowprec.nn.QuantLinear(64, 48, policy=policy, backend="emulated", telemetry=tel)
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    for step in (1, 2):        # unsampled, then sampled
        tel.set_step(step)
        made.clear()
        lin(x).square().sum().backward()
        if step == 1:
            assert made == []                        # an emulated GEMM reads no block scale
        else:
            assert made and set(made) == {"block"}   # the sampled step's rows read them
    assert set(tel.frame()["step"]) == {2}


@pytest.fixture
def one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)   # the native loops (whose outputs the strided views are) run on one thread
    yield
    torch.set_num_threads(prev)


@pytest.mark.parametrize("policy", ["nvfp4", "mxfp8", "nvfp4-recipe", "fp8-blockwise",
                                    "weight=e4m3:block16x16,grad=e5m2:block32"])
@pytest.mark.parametrize("tokens", [256, 201])
def test_strided_operands_give_the_contiguous_bits(policy, tokens, monkeypatch, one_thread):
    """The linear layers hand operands blocked along a leading axis to the GEMM as strided views (no transposing
    copy): the output and gradients equal those of contiguous operands bit for bit (the BLAS packs either
    layout into the same panels; this test is what would notice one that does not)."""
    import dataclasses

    import lowprec.nn.function as fn_mod

    import lowprec.nn.site as site_mod

    layouts = []
    real = site_mod.quantize_with_scale_fn

    def spy(*a, **k):
        q, fn = real(*a, **k)
        layouts.append(q.is_contiguous())
        return q, fn
    monkeypatch.setattr(site_mod, "quantize_with_scale_fn", spy)
    results = []
    for strided in (True, False):
        layouts.clear()
        monkeypatch.setattr(fn_mod, "LINEAR", dataclasses.replace(fn_mod.LINEAR, strided=strided))
        monkeypatch.setattr("lowprec.nn.linear.LINEAR", fn_mod.LINEAR, raising=False)
        torch.manual_seed(3)   # nvfp4's stochastic gradients and the Hadamard signs
        lin = lowprec.nn.QuantLinear(96, 80, policy=policy, backend="emulated")
        x = torch.randn(tokens, 96, generator=torch.Generator().manual_seed(0), requires_grad=True)
        y = lin(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results.append((y.detach(), x.grad, lin.weight.grad, lin.bias.grad))
        if lowprec.fast.native_available():   # (the eager path, without native helpers, hands over copies)
            assert all(layouts) != strided     # the strided run did hand over strided operands
    for a, b in zip(*results):
        assert same(a, b)
