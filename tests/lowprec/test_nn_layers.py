"""Layers built directly, Conv1d/3d, Linear subclasses and empty inputs; oracles: torch's float8 casts and
torch's own layers on pre-cast operands."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowprec import quantize
from lowprec.nn import QuantConv2d, QuantEmbedding, QuantLinear, convert

torch.set_num_threads(1)


def _cast(x, dtype):
    """torchao-style current scaling with torch's own float8 cast."""
    fmax = torch.finfo(dtype).max
    scale = x.abs().max().float() / fmax
    return (x / scale).clamp(-fmax, fmax).to(dtype).float() * scale


E4, E5 = torch.float8_e4m3fn, torch.float8_e5m2


def test_conv2d_and_embedding_built_directly_run_forward():
    """Regression: QuantConv2d / QuantEmbedding built with their constructor had no site (AttributeError)."""
    torch.manual_seed(0)
    conv = QuantConv2d(3, 4, 3, padding=1, policy="fp8-hybrid")
    x = torch.randn(2, 3, 6, 6)
    ref = F.conv2d(_cast(x, E4), _cast(conv.weight.detach(), E4), conv.bias.detach(), 1, 1)
    torch.testing.assert_close(conv(x).detach(), ref, rtol=1e-5, atol=1e-5)
    plain_conv = QuantConv2d(3, 4, 3)                        # default policy fp32: the plain convolution
    assert torch.equal(plain_conv(x), F.conv2d(x, plain_conv.weight, plain_conv.bias))
    emb = QuantEmbedding(10, 8, policy="weight=e4m3")
    idx = torch.tensor([0, 3, 3])
    assert torch.equal(emb(idx).detach(), emb.weight.detach()[idx].to(E4).float())
    plain = QuantEmbedding(10, 8)
    assert torch.equal(plain(idx), plain.weight[idx])
    with pytest.raises(ValueError, match="string padding"):
        QuantConv2d(3, 4, 3, padding="same", policy="fp8-hybrid")


@pytest.mark.parametrize("n", [1, 3])
def test_conv1d_conv3d_three_gemms_match_torch_casts(n):
    torch.manual_seed(n)
    cls = {1: nn.Conv1d, 3: nn.Conv3d}[n]
    conv = cls(4, 6, 3, stride=2, padding=1)
    shape = (2, 4) + (7,) * n
    x = torch.randn(*shape, requires_grad=True)
    q = convert(copy.deepcopy(conv), "fp8-hybrid")
    assert type(q).__name__ == f"QuantConv{n}d"
    out = q(x)
    gy = torch.randn_like(out)
    out.backward(gy)
    fn = {1: F.conv1d, 3: F.conv3d}[n]
    xq = _cast(x.detach(), E4).requires_grad_()
    wq = _cast(conv.weight.detach(), E4).requires_grad_()
    o = fn(xq, wq, conv.bias.detach(), 2, 1)
    o.backward(_cast(gy, E5))
    torch.testing.assert_close(out.detach(), o.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, xq.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q.weight.grad, wq.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q.bias.grad, gy.sum([0, *range(2, n + 2)]))


def test_conv1d_block_axes_follow_each_gemm():
    torch.manual_seed(4)
    conv = nn.Conv1d(40, 8, 3, padding=1, bias=False)
    x = torch.randn(2, 40, 9, requires_grad=True)
    gy = torch.randn(2, 8, 9)
    q = convert(copy.deepcopy(conv), "mxfp8")
    out = q(x)
    out.backward(gy)
    mx = lambda t, a: quantize(t, f"mxfp8:axis={a}")   # noqa: E731
    w, xd = conv.weight.detach(), x.detach()
    torch.testing.assert_close(out.detach(), F.conv1d(mx(xd, 1), mx(w, 1), None, 1, 1), rtol=1e-6, atol=1e-5)
    _, gw, _ = torch.ops.aten.convolution_backward(mx(gy, 2), mx(xd, 2), w, None, [1], [1], [1], False, [0], 1,
                                                   [False, True, False])
    torch.testing.assert_close(q.weight.grad, gw, rtol=1e-6, atol=1e-5)


def test_linear_subclass_converted_and_custom_forward_left_with_warning():
    class Plain(nn.Linear):
        pass

    class Custom(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(nn.modules.linear.NonDynamicallyQuantizableLinear(8, 8), Plain(8, 8), Custom(8, 8))
    with pytest.warns(UserWarning, match="Custom subclasses nn.Linear"):
        convert(model, "fp8-hybrid")
    assert isinstance(model[0], QuantLinear) and isinstance(model[1], QuantLinear) and type(model[2]) is Custom


@pytest.mark.parametrize("policy", ["fp8-hybrid", "mxfp8", "nvfp4", "int4",
                                    "weight=e4m3:delayed4,activation=e4m3:delayed4,grad=e5m2:delayed4",
                                    "weight=e4m3:channel,activation=e4m3:channel,grad=e5m2:channel"])
def test_empty_batch_gives_empty_output_and_zero_grads(policy):
    """Issue 9 bug 4, layer side: an empty batch (an MoE expert with no tokens) must run forward and backward."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Embedding(10, 16), nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))
    convert(model, policy)
    out = model(torch.zeros(0, 5, dtype=torch.long))
    assert out.shape == (0, 5, 4)
    out.sum().backward()
    for p in model.parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p))
    conv = convert(nn.Conv2d(3, 4, 3), policy)
    x = torch.randn(0, 3, 5, 5, requires_grad=True)
    y = conv(x)
    y.sum().backward()
    assert y.shape == (0, 4, 3, 3) and torch.equal(conv.weight.grad, torch.zeros_like(conv.weight))
    # the layer still works (and is finite) on a real batch afterwards
    assert torch.isfinite(model(torch.randint(0, 10, (2, 5)))).all()


def test_empty_batch_native_backend(scaled_mm_calls):
    lin = convert(nn.Linear(16, 16), "fp8-hybrid", backend="native")
    x = torch.randn(0, 16, requires_grad=True)
    lin(x).sum().backward()
    assert torch.equal(lin.weight.grad, torch.zeros(16, 16)) and scaled_mm_calls == []
    lin(torch.randn(4, 16)).sum().backward()
    assert len(scaled_mm_calls) == 2      # forward and grad-weight (the input needs no gradient)


def test_directly_built_layers_need_no_warning_and_reject_bad_backend():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), "fp8-hybrid")
    with pytest.raises(ValueError, match="valid"):
        QuantLinear(4, 4, backend="fast")
    with pytest.raises(ValueError, match="not available for Conv2d"):
        QuantConv2d(3, 3, 1, policy="fp8-hybrid", backend="native")
