"""Models nobody here wrote: Hugging Face GPT-2 and Llama (tiny configs built locally, no download),
nn.TransformerEncoderLayer / MultiheadAttention. Oracles: the fp32 model (SQNR thresholds of torchao: linear
output >= 18 dB for FP8, weight gradient >= 17 dB) and each GEMM recomputed from torch's float8 casts."""
import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowprec.nn as lnn
from lowprec.telemetry import Telemetry

torch.set_num_threads(1)
E4, E5 = torch.float8_e4m3fn, torch.float8_e5m2


def sqnr(ref, x):
    return 20 * math.log10(ref.norm() / (ref - x).norm())


def _cast(x, dtype):
    """torchao-style current scaling with torch's own float8 cast (the oracle of one quantized operand)."""
    fmax = torch.finfo(dtype).max
    scale = x.abs().max().float() / fmax
    return (x / scale).clamp(-fmax, fmax).to(dtype).float() * scale


def _gpt2(**kw):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                                  eos_token_id=0, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, **kw)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg)


def _grads(model, idx):
    model.zero_grad()
    out = model(idx, labels=idx)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gpt2_every_conv1d_gemm_and_lm_head_is_quantized():
    model = _gpt2()
    ref = copy.deepcopy(model)
    conv1d = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    assert len(conv1d) == 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # nothing holding a weight matrix is left behind
        lnn.convert(model, "fp8-hybrid")
    mods = dict(model.named_modules())
    assert all(isinstance(mods[n], lnn.QuantHFConv1D) for n in conv1d)
    assert isinstance(model.lm_head, lnn.QuantLinear)
    assert model.lm_head.weight is model.transformer.wte.weight          # weight tying survives
    assert list(model.state_dict()) == list(ref.state_dict())

    # each Conv1D GEMM from the outside: its output equals the GEMM of torch-cast operands
    seen = {}
    hooks = [mods[n].register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, (a[0].detach(), o.detach())))
             for n in conv1d]
    idx = torch.randint(0, 64, (2, 16))
    logits, grads = _grads(model, idx)
    for h in hooks:
        h.remove()
    for n in conv1d:
        x, y = seen[n]
        w, b = mods[n].weight.detach(), mods[n].bias.detach()
        x2 = x.reshape(-1, x.shape[-1])
        oracle = _cast(x2, E4) @ _cast(w.t(), E4).t() + b
        torch.testing.assert_close(y.reshape(-1, y.shape[-1]), oracle, rtol=1e-5, atol=1e-5)
        exact = x2 @ w + b
        assert sqnr(exact, oracle) >= 18 and not torch.equal(oracle, exact), n
    ref_logits, ref_grads = _grads(ref, idx)
    assert 18 <= sqnr(ref_logits, logits) < 60
    for n, g in ref_grads.items():
        if g.dim() == 2:
            assert 17 <= sqnr(g, grads[n]) < 60, n    # quantized (not equal) yet close


def test_gpt2_fp32_policy_is_bit_exact():
    model = _gpt2()
    ref = copy.deepcopy(model)
    lnn.convert(model, "fp32")
    assert isinstance(model.transformer.h[0].mlp.c_fc, lnn.QuantHFConv1D)
    idx = torch.randint(0, 64, (2, 12))
    (lo, go), (lr, gr) = _grads(model, idx), _grads(ref, idx)
    assert torch.equal(lo, lr) and all(torch.equal(go[k], gr[k]) for k in gr)


def test_gpt2_rule_keeps_lm_head_and_last_block_in_bf16():
    model = _gpt2()
    lnn.convert(model, "fp8-hybrid@lm_head|transformer.h.1.*=bf16")
    cov = {r.name: r for r in lnn.coverage(model).rows}
    assert cov["lm_head"].weight == "bf16" and cov["lm_head"].rule == "lm_head|transformer.h.1.*"
    assert cov["transformer.h.1.mlp.c_fc"].weight == "bf16"
    assert cov["transformer.h.0.mlp.c_fc"].weight == "e4m3:tensor" and cov["transformer.h.0.mlp.c_fc"].rule == "base"
    x = torch.randn(3, 32)
    lm = model.lm_head
    expect = (x.to(torch.bfloat16).float() @ lm.weight.detach().to(torch.bfloat16).float().t())
    torch.testing.assert_close(lm(x).detach(), expect, rtol=1e-6, atol=1e-6)


def test_llama_all_15_linears_and_attention_site():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(cfg)
    ref = copy.deepcopy(model)
    tel = Telemetry()
    lnn.convert(model, "fp8-hybrid", attention=True, telemetry=tel)
    assert sum(isinstance(m, lnn.QuantLinear) for m in model.modules()) == 15
    idx = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        out, exact = model(idx).logits, ref(idx).logits
    assert 18 <= sqnr(exact, out) < 60
    sites = set(tel.frame().site)
    assert "model.layers.0.self_attn.qk:activation" in sites and "model.layers.1.self_attn.pv:activation" in sites


def test_attention_site_sdpa_matches_torch_casts():
    torch.manual_seed(2)
    site = lnn.AttentionSite("fp8-hybrid", "att")
    q, k, v = (torch.randn(2, 3, 8, 16, requires_grad=True) for _ in range(3))
    out = site.sdpa(q, k, v, is_causal=True)
    # oracle: S = Q K^T on E4M3-cast operands, fp32 softmax, O = P V on E4M3-cast operands
    s = _cast(q.detach(), E4) @ _cast(k.detach(), E4).transpose(-1, -2) / 4.0
    s = s.masked_fill(~torch.ones(8, 8, dtype=torch.bool).tril(), float("-inf"))
    p = torch.softmax(s, -1)
    torch.testing.assert_close(out.detach(), _cast(p, E4) @ _cast(v.detach(), E4), rtol=1e-5, atol=1e-5)
    exact = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert 18 <= sqnr(exact.detach(), out.detach()) < 60
    go = torch.randn_like(out)
    out.backward(go)
    gq = q.grad.clone()
    q.grad = None
    exact.backward(go)
    assert 15 <= sqnr(q.grad, gq) < 60     # dQ passes two quantized backward GEMMs
    with pytest.raises(ValueError, match="accumulator"):
        lnn.AttentionSite("fp8-hybrid,accumulator=fp16")


def _mha_oracle(mha, x):
    """MultiheadAttention (self-attention, batch_first) with each projection on torch-cast operands."""
    B, T, E = x.shape
    h = mha.num_heads
    w, b = mha.in_proj_weight.detach(), mha.in_proj_bias.detach()
    qkv = _cast(x.reshape(-1, E), E4) @ _cast(w, E4).t() + b
    q, k, v = (t.reshape(B, T, h, E // h).transpose(1, 2) for t in qkv.reshape(B, T, 3 * E).split(E, -1))
    a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(-1, E)
    o = mha.out_proj
    return (_cast(a, E4) @ _cast(o.weight.detach(), E4).t() + o.bias.detach()).reshape(B, T, E)


def test_multihead_attention_in_and_out_projections_quantized():
    torch.manual_seed(3)
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    x = torch.randn(2, 5, 16)
    exact = mha(x, x, x, need_weights=False)[0].detach()
    tel = Telemetry()
    q = lnn.convert(copy.deepcopy(mha), "fp8-hybrid", telemetry=tel)
    assert isinstance(q, lnn.QuantMultiheadAttention) and isinstance(q.out_proj, lnn.QuantLinear)
    out = q(x, x, x, need_weights=False)[0]
    torch.testing.assert_close(out.detach(), _mha_oracle(q, x), rtol=1e-5, atol=1e-5)
    assert 18 <= sqnr(exact, out.detach()) < 60
    out.sum().backward()
    assert q.in_proj_weight.grad is not None and q.out_proj.weight.grad is not None
    sites = set(tel.frame().site)
    assert {"in_proj:weight", "in_proj:grad", "out_proj:weight"} <= {s.split(".", 1)[-1] for s in sites}


def test_transformer_encoder_layer_quantized_in_train_and_eval_fast_path():
    torch.manual_seed(4)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
    ref = copy.deepcopy(layer)
    lnn.convert(layer, "fp8-hybrid")
    assert isinstance(layer.self_attn, lnn.QuantMultiheadAttention)
    assert isinstance(layer.self_attn.out_proj, lnn.QuantLinear) and isinstance(layer.linear1, lnn.QuantLinear)
    assert all(r.quantized for r in lnn.coverage(layer).rows)
    x = torch.randn(2, 6, 16)
    train_out = layer(x)
    train_out.sum().backward()
    assert sqnr(ref(x).detach(), train_out.detach()) >= 18
    layer.eval()
    ref.eval()
    with torch.no_grad():        # torch's fused fast path would skip the quantized GEMMs
        eval_out, exact = layer(x), ref(x)
    torch.testing.assert_close(eval_out, train_out.detach(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(eval_out, exact, rtol=1e-4, atol=1e-4)
    # fp32 policy: the unconverted layer, fast path included, bit for bit
    plain = copy.deepcopy(ref)
    lnn.convert(plain, "fp32")
    with torch.no_grad():
        assert torch.equal(plain(x), exact)


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_math_matches_torch(batch_first):
    """The quantized MHA's own forward (masks, need_weights, cross-attention, unbatched) against torch's, under a
    policy whose only change is an fp32 accumulator (exact up to summation order)."""
    torch.manual_seed(5)
    pol = "accumulator=fp32:chunk1024"
    for kw in ({}, {"kdim": 12, "vdim": 10}):
        mha = nn.MultiheadAttention(16, 4, batch_first=batch_first, **kw)
        q = lnn.convert(copy.deepcopy(mha), pol)
        assert isinstance(q, lnn.QuantMultiheadAttention) and not q.site.noop
        B, L, S = 2, 5, 7
        shape = (lambda n, d: (B, n, d)) if batch_first else (lambda n, d: (n, B, d))
        x = torch.randn(*shape(L, 16))
        k = torch.randn(*shape(S, kw.get("kdim", 16)))
        v = torch.randn(*shape(S, kw.get("vdim", 16)))
        kpm = torch.zeros(B, S, dtype=torch.bool)
        kpm[0, -2:] = True
        cases = [dict(need_weights=False), dict(key_padding_mask=kpm),
                 dict(attn_mask=torch.randn(L, S), average_attn_weights=False),
                 dict(attn_mask=torch.ones(L, S, dtype=torch.bool).triu(1), key_padding_mask=kpm,
                      need_weights=False)]
        for case in cases:
            args = (x, k, v)
            if not kw and "attn_mask" not in case:
                args = (x, x, x)   # self-attention: the packed in-projection
                case = {**case, "key_padding_mask": kpm[:, :L]} if "key_padding_mask" in case else case
            want, want_w = mha(*args, **case)
            got, got_w = q(*args, **case)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            assert (got_w is None) == (want_w is None)
            if want_w is not None:
                torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)
    # unbatched input
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first)
    q = lnn.convert(copy.deepcopy(mha), pol)
    x = torch.randn(3, 8)
    torch.testing.assert_close(q(x, x, x)[0], mha(x, x, x)[0], rtol=1e-5, atol=1e-5)


def test_multihead_attention_with_bias_kv_left_unconverted_with_warning():
    model = nn.Sequential(nn.MultiheadAttention(8, 2, add_bias_kv=True))
    with pytest.warns(UserWarning, match="add_bias_kv"):
        lnn.convert(model, "fp8-hybrid")
    assert type(model[0]) is nn.MultiheadAttention and type(model[0].out_proj) is not lnn.QuantLinear
    rows = {r.name: r for r in lnn.coverage(model).rows}
    assert not rows["0"].quantized and rows["0.out_proj"].reason == "inside an unconverted MultiheadAttention"


def test_encoder_layer_attention_site_quantizes_the_attention_matmuls():
    torch.manual_seed(6)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
    x = torch.randn(2, 6, 16)
    exact = layer(x).detach()
    plain = lnn.convert(copy.deepcopy(layer), "fp8-hybrid")
    full = lnn.convert(copy.deepcopy(layer), "fp8-hybrid", attention=True)
    rows = {r.name: r for r in lnn.coverage(full).rows}
    assert rows["self_attn.sdpa"].quantized and rows["self_attn.sdpa"].grad == "e5m2:tensor"
    out_plain, out_full = plain(x), full(x)
    assert not torch.allclose(out_plain, out_full, rtol=1e-4, atol=1e-4)   # the attention matmuls changed too
    assert 18 <= sqnr(exact, out_full.detach()) < 60
    out_full.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in full.parameters())


def test_gpt2_native_backend_matches_emulated(scaled_mm_calls):
    """The transposed Conv1D weight through torch._scaled_mm: same operands, fp32 accumulation on both paths."""
    idx = torch.randint(0, 64, (2, 16))
    outs = {}
    for backend in ("emulated", "native"):
        model = lnn.convert(_gpt2(), "fp8-hybrid", backend=backend)
        scaled_mm_calls.clear()
        outs[backend] = _grads(model, idx)
        # 8 Conv1D + lm_head, 3 GEMMs each (every input needs a gradient)
        assert len(scaled_mm_calls) == (27 if backend == "native" else 0)
    torch.testing.assert_close(outs["native"][0], outs["emulated"][0], rtol=1e-5, atol=1e-5)
    for k, g in outs["emulated"][1].items():
        torch.testing.assert_close(outs["native"][1][k], g, rtol=1e-4, atol=1e-6)
