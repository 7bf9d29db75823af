import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowprec.nn as lnn
from lowprec import quantize
from lowprec.accumulate import matmul as acc_matmul
from lowprec.hardware import probe
from lowprec.nn import QuantEmbedding, QuantLinear, convert
from lowprec.telemetry import Telemetry

torch.set_num_threads(1)


class Block(nn.Module):
    """A pre-norm transformer block with token embedding and LM head (what a small GPT needs)."""

    def __init__(self, vocab=50, d=32, heads=4):
        super().__init__()
        self.heads = heads
        self.emb = nn.Embedding(vocab, d)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.emb(idx)
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=-1)
        q, k, v = (t.view(B, T, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, D)
        x = x + self.proj(a)
        x = x + self.mlp(self.ln2(x))
        return self.head(x)


def _run(model, idx):
    model.zero_grad()
    out = model(idx)
    F.cross_entropy(out.reshape(-1, out.shape[-1]), idx.reshape(-1)).backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def sqnr(ref, x):
    return 20 * math.log10(ref.norm() / (ref - x).norm())


def test_fp32_policy_is_bit_exact_noop_and_keeps_state_dict_keys():
    torch.manual_seed(0)
    model = Block()
    idx = torch.randint(0, 50, (2, 12))
    ref = copy.deepcopy(model)
    params_before = [id(p) for p in model.parameters()]
    convert(model, "fp32")
    assert isinstance(model.qkv, QuantLinear) and isinstance(model.mlp[2], QuantLinear)
    assert isinstance(model.emb, QuantEmbedding)
    assert [id(p) for p in model.parameters()] == params_before
    assert list(model.state_dict()) == list(ref.state_dict())
    out_r, g_r = _run(ref, idx)
    out_c, g_c = _run(model, idx)
    assert torch.equal(out_r, out_c)
    for name in g_r:
        assert torch.equal(g_r[name], g_c[name]), name


def test_quantized_model_state_dict_loads_into_plain_model():
    torch.manual_seed(0)
    model = convert(Block(), "fp8-hybrid")
    plain = Block()
    plain.load_state_dict(model.state_dict())        # same keys, same shapes


def _cast(x, dtype):
    """Independent oracle: torchao-style current scaling with torch's own float8 cast."""
    fmax = torch.finfo(dtype).max
    scale = x.abs().max().float() / fmax
    return (x / scale).clamp(-fmax, fmax).to(dtype).float() * scale


@pytest.mark.parametrize("backend", ["emulated", "native"])
def test_fp8_hybrid_linear_sqnr_and_quantized_backward(backend):
    torch.manual_seed(1)
    lin = nn.Linear(64, 48)
    x = torch.randn(4, 16, 64, requires_grad=True)
    gy = torch.randn(4, 16, 48)
    ref = copy.deepcopy(lin)
    y_ref = ref(x)
    y_ref.backward(gy)
    gx_ref, gw_ref = x.grad.clone(), ref.weight.grad.clone()
    x.grad = None
    q = convert(copy.deepcopy(lin), "fp8-hybrid", backend=backend)
    y = q(x)
    y.backward(gy)
    # torchao's thresholds: linear output >= 18 dB, weight gradient >= 17 dB
    assert sqnr(y_ref.detach(), y.detach()) >= 18
    assert sqnr(gw_ref, q.weight.grad) >= 17 and sqnr(gx_ref, x.grad) >= 17
    # forward and both backward GEMMs use quantized operands: compare with torch's float8 casts
    x2, g2, w = x.detach().reshape(-1, 64), gy.reshape(-1, 48), lin.weight.detach()
    qx, qw = _cast(x2, torch.float8_e4m3fn), _cast(w, torch.float8_e4m3fn)
    qg = _cast(g2, torch.float8_e5m2)
    torch.testing.assert_close(y.detach().reshape(-1, 48), qx @ qw.t() + lin.bias.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.reshape(-1, 64), qg @ qw, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q.weight.grad, qg.t() @ qx, rtol=1e-5, atol=1e-5)
    assert not torch.equal(q.weight.grad, gw_ref) and not torch.equal(x.grad, gx_ref)
    torch.testing.assert_close(q.bias.grad, g2.sum(0))   # bias gradient from the unquantized grad_output


def _mx(t, axis):
    return quantize(t, "mxfp8:axis=%d" % axis)


def test_block_formats_quantize_along_each_gemm_reduction_axis():
    torch.manual_seed(2)
    lin = nn.Linear(40, 24, bias=False)      # 40 and the 24-row batch are not multiples of 32: ragged blocks
    x = torch.randn(24, 40, requires_grad=True)
    gy = torch.randn(24, 24)
    q = convert(copy.deepcopy(lin), "mxfp8")
    y = q(x)
    y.backward(gy)
    w = lin.weight.detach()

    xd = x.detach()
    torch.testing.assert_close(y.detach(), _mx(xd, 1) @ _mx(w, 1).t(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, _mx(gy, 1) @ _mx(w, 0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(q.weight.grad, _mx(gy, 0).t() @ _mx(xd, 0), rtol=1e-6, atol=1e-6)
    # the axis matters: blocks along the wrong axis give a different weight gradient
    assert not torch.allclose(q.weight.grad, _mx(gy, 1).t() @ _mx(xd, 1), rtol=1e-6, atol=1e-6)


def test_native_matches_emulated_and_really_calls_scaled_mm(scaled_mm_calls):
    calls = scaled_mm_calls
    torch.manual_seed(3)
    for policy in ("fp8-hybrid", "weight=e4m3:channel,activation=e4m3:channel,grad=e5m2:channel:stochastic"):
        lin = nn.Linear(96, 80)
        x = torch.randn(50, 96)
        gy = torch.randn(50, 80)
        outs = {}
        for backend in ("emulated", "native", "auto"):
            calls.clear()
            q = convert(copy.deepcopy(lin), policy, **({} if backend == "auto" else {"backend": backend}))
            xi = x.clone().requires_grad_()
            torch.manual_seed(7)                   # same stochastic-rounding draws for both backends
            y = q(xi)
            y.backward(gy)
            outs[backend] = (y.detach(), xi.grad, q.weight.grad)
            # convert's default ("auto") multiplies emulated on the CPU: its _scaled_mm is software, slower
            assert len(calls) == (3 if backend == "native" else 0)
        assert all(torch.equal(a, b) for a, b in zip(outs["emulated"], outs["auto"]))
        # identical quantized operands and fp32 accumulation on both paths: only the summation order may
        # differ, a few fp32 ulps of the sum of |products|
        for a, b in zip(outs["emulated"], outs["native"]):
            torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)
    # an all-zero gradient (scale 0) gives zero gradients, not 0/0
    q = convert(nn.Linear(16, 16), "fp8-hybrid", backend="native")
    xi = torch.randn(4, 16, requires_grad=True)
    q(xi).backward(torch.zeros(4, 16))
    assert torch.equal(xi.grad, torch.zeros(4, 16)) and torch.equal(q.weight.grad, torch.zeros(16, 16))


def test_native_backend_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="block scaling"):
        convert(nn.Linear(8, 8), "mxfp8", backend="native")
    with pytest.raises(ValueError, match="not E4M3/E5M2"):
        convert(nn.Linear(8, 8), "bf16", backend="native")
    with pytest.raises(ValueError, match="valid"):
        convert(nn.Linear(8, 8), "fp8-hybrid", backend="fast")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_native_matches_emulated():
    caps = probe()
    if not caps["scaled_mm_cuda"][0]:
        pytest.skip(caps["scaled_mm_cuda"][1])
    torch.manual_seed(4)
    lin = nn.Linear(256, 128).cuda()
    x = torch.randn(64, 256, device="cuda")
    gy = torch.randn(64, 128, device="cuda")
    outs = {}
    for backend in ("emulated", "native"):
        q = convert(copy.deepcopy(lin), "fp8-hybrid", backend=backend)
        xi = x.clone().requires_grad_()
        y = q(xi)
        y.backward(gy)
        outs[backend] = (y.detach(), xi.grad, q.weight.grad)
    for a, b in zip(outs["emulated"], outs["native"]):
        # tensor cores accumulate FP8 products with ~13 fraction bits in chains before fp32 promotion
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * a.abs().max().item())


def test_accumulator_policy_routes_gemms_through_accumulate():
    torch.manual_seed(5)
    lin = nn.Linear(200, 16, bias=False)
    x = torch.randn(8, 200)
    q = convert(copy.deepcopy(lin), "accumulator=bf16:chunk8")
    y = q(x)
    torch.testing.assert_close(y.detach(), acc_matmul(x, lin.weight.detach().t(), "bf16", chunk=8), rtol=0, atol=0)
    assert not torch.allclose(y, x @ lin.weight.t(), rtol=1e-5, atol=1e-6)


def test_embedding_weight_quantized_with_straight_through_gradient():
    torch.manual_seed(6)
    emb = nn.Embedding(20, 16)
    idx = torch.tensor([[1, 2, 3, 2]])
    ref = copy.deepcopy(emb)
    q = convert(emb, "weight=e4m3")
    out = q(idx)
    expect = ref.weight.detach()[idx].to(torch.float8_e4m3fn).float()   # torch's cast as the oracle
    assert torch.equal(out.detach(), expect)
    out.sum().backward()
    ref(idx).sum().backward()
    assert torch.equal(q.weight.grad, ref.weight.grad)


def test_filter_and_telemetry_sites():
    torch.manual_seed(7)
    model = Block()
    tel = Telemetry()
    convert(model, "fp8-hybrid", filter=lambda name, m: name != "head", telemetry=tel)
    assert type(model.head) is nn.Linear and isinstance(model.qkv, QuantLinear)
    idx = torch.randint(0, 50, (2, 8))
    _run(model, idx)
    sites = list(tel.frame().site)
    assert sites[:3] == ["emb:weight", "qkv:activation", "qkv:weight"]
    assert "mlp.2:grad" in sites and "qkv:grad" in sites and not any(s.startswith("head") for s in sites)
    assert tel.first_nonfinite() is None


def test_nvfp4_and_int4_presets_train():
    torch.manual_seed(8)
    for preset in ("nvfp4", "int4", "bf16"):
        model = convert(Block(), preset)
        idx = torch.randint(0, 50, (2, 16))
        out, grads = _run(model, idx)
        assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads.values())
    w = Block().qkv.weight.detach()
    int4 = convert(nn.Linear(32, 96), "int4")
    int4.weight.data.copy_(w)
    x = torch.eye(32)
    qw = int4(x).detach() - int4.bias.detach()           # the quantized weight, transposed
    assert qw.t().unique().numel() <= 96 * 16             # <= 16 levels per group of 32 (one group per row)
    grid = qw.t().reshape(96, 1, 32)
    scale = grid.abs().amax(-1, keepdim=True) / 7
    assert torch.allclose(grid / scale, (grid / scale).round(), atol=1e-4)


def test_bad_arguments():
    with pytest.raises(TypeError):
        convert("model", "fp32")
    with pytest.raises(ValueError, match="valid presets"):
        convert(nn.Linear(2, 2), "fp9")
    assert lnn.native_dtype(None) is None


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        return self.fc(F.relu(self.c2(x)).flatten(1))


def _cnn_run(model, x, y):
    model.zero_grad()
    out = model(x)
    F.cross_entropy(out, y).backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_cnn_fp32_noop_and_fp8_conv_matches_torch_casts():
    torch.manual_seed(9)
    model = SmallCNN()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    ref = copy.deepcopy(model)
    convert(model, "fp32")
    assert isinstance(model.c1, lnn.QuantConv2d) and list(model.state_dict()) == list(ref.state_dict())
    out_r, g_r = _cnn_run(ref, x, y)
    out_c, g_c = _cnn_run(model, x, y)
    assert torch.equal(out_r, out_c) and all(torch.equal(g_r[k], g_c[k]) for k in g_r)

    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1)
    xi = torch.randn(4, 8, 10, 10, requires_grad=True)
    gy = torch.randn(4, 16, 5, 5)
    q = convert(copy.deepcopy(conv), "fp8-hybrid")
    out = q(xi)
    out.backward(gy)
    xr = xi.detach().clone().requires_grad_()
    out_ref = conv(xr)
    out_ref.backward(gy)
    assert sqnr(out_ref.detach(), out.detach()) >= 18 and sqnr(conv.weight.grad, q.weight.grad) >= 17
    # oracle: the same convolution on torch-cast operands
    xq = _cast(xi.detach(), torch.float8_e4m3fn).requires_grad_()
    wq = _cast(conv.weight.detach(), torch.float8_e4m3fn).requires_grad_()
    o = F.conv2d(xq, wq, conv.bias.detach(), 2, 1)
    o.backward(_cast(gy, torch.float8_e5m2))
    torch.testing.assert_close(out.detach(), o.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xi.grad, xq.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q.weight.grad, wq.grad, rtol=1e-5, atol=1e-5)


def test_conv_block_axes():
    torch.manual_seed(10)
    conv = nn.Conv2d(40, 8, 3, padding=1, bias=False)
    x = torch.randn(2, 40, 6, 6, requires_grad=True)
    gy = torch.randn(2, 8, 6, 6)
    q = convert(copy.deepcopy(conv), "mxfp8")
    out = q(x)
    out.backward(gy)
    w = conv.weight.detach()

    torch.testing.assert_close(out.detach(), F.conv2d(_mx(x.detach(), 1), _mx(w, 1), None, 1, 1), rtol=1e-6, atol=1e-5)
    gx, _, _ = torch.ops.aten.convolution_backward(_mx(gy, 1), x.detach(), _mx(w, 0), None, [1, 1], [1, 1], [1, 1],
                                                   False, [0, 0], 1, [True, False, False])
    _, gw, _ = torch.ops.aten.convolution_backward(_mx(gy, 3), _mx(x.detach(), 3), w, None, [1, 1], [1, 1], [1, 1],
                                                   False, [0, 0], 1, [False, True, False])
    torch.testing.assert_close(x.grad, gx, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(q.weight.grad, gw, rtol=1e-6, atol=1e-5)
    same = nn.Sequential(nn.Conv2d(3, 3, 3, padding="same"))
    with pytest.warns(UserWarning, match="string padding"):
        assert type(convert(same, "mxfp8")[0]) is nn.Conv2d    # string padding is left unconverted, with a warning


def test_first_nonfinite_names_the_producing_site():
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 4))
    tel = Telemetry(every=10)                # only step 0 is sampled; the NaN check runs on every step
    convert(model, "weight=e4m3:nosat,activation=e4m3:nosat", telemetry=tel)
    for step in range(4):
        if step == 3:
            with torch.no_grad():
                model[2].weight[0, 0] = 1000.0  # beyond E4M3's 448: without saturation it becomes NaN
        out = model(torch.randn(2, 8))
        tel.next_step()
    assert torch.isnan(out).any()
    assert tel.first_nonfinite() == "2:weight"  # layer 3's activation is NaN too, but later in execution order
    df = tel.frame()
    assert list(df[df.step == 3].site) == ["2:weight", "3:activation"]


def test_probe_reports_every_capability_with_a_reason():
    caps = probe()
    for key in ("float8_dtypes", "scaled_mm_cpu", "scaled_mm_rowwise_cpu", "cuda", "cuda_fp8", "scaled_mm_cuda",
                "compile"):
        ok, why = caps[key]
        assert isinstance(ok, bool) and isinstance(why, str) and why
    assert caps["cuda"][0] == torch.cuda.is_available()
    if caps["scaled_mm_cpu"][0]:
        a = torch.ones(4, 16).to(torch.float8_e4m3fn)
        out = torch._scaled_mm(a, a.t(), scale_a=torch.tensor(1.0), scale_b=torch.tensor(1.0),
                               out_dtype=torch.float32)
        assert torch.equal(out, torch.full((4, 4), 16.0))
