"""Today's recipes, each against its published rule.

- NVFP4's random Hadamard transform on the grad-weight GEMM (Transformer Engine docs, "Random Hadamard Transform":
  16 x 16 Hadamard over 4 times a random sign diagonal, both wgrad operands, blocks along the token axis).
  Oracle: scipy's Hadamard matrix, torch's bf16 casts, fp32 matmul.
- Preset definitions against the numbers their sources give (policy text parsed independently).
"""
import copy

import pytest
import scipy.linalg
import torch
from torch import nn

from lowprec.nn import convert
from lowprec.nn.function import hadamard, random_hadamard_rows
from lowprec.policy import PRESET_DOCS, PrecisionPolicy

torch.set_num_threads(1)


def test_hadamard_is_sylvester_over_sqrt_n_and_orthogonal():
    for n in (2, 4, 16, 64):
        h = hadamard(n)
        assert torch.equal(h, torch.tensor(scipy.linalg.hadamard(n), dtype=torch.float32) / n ** 0.5)
        torch.testing.assert_close(h @ h.t(), torch.eye(n), rtol=0, atol=1e-6)
    assert set(hadamard(16).unique().tolist()) == {-0.25, 0.25}   # TE: entries +-1/sqrt(16)
    with pytest.raises(ValueError, match="power of two"):
        hadamard(12)


def test_random_hadamard_rows_keeps_dot_products_and_pads():
    torch.manual_seed(0)
    s = torch.randint(0, 2, (16,)) * 2.0 - 1
    hs = hadamard(16) * s
    a, b = torch.randn(37, 5, dtype=torch.float64), torch.randn(37, 3, dtype=torch.float64)
    ta, tb = random_hadamard_rows(a, hs.double()), random_hadamard_rows(b, hs.double())
    assert ta.shape == (48, 5)
    torch.testing.assert_close(ta.t() @ tb, a.t() @ b, rtol=1e-12, atol=1e-12)
    # block by block: rows 16..31 of the result are (HS)^T applied to rows 16..31
    torch.testing.assert_close(ta[16:32], hs.double().t() @ a[16:32])


@pytest.mark.parametrize("tokens", [48, 37])
def test_linear_wgrad_rht_matches_the_te_rule_with_bf16_operands(tokens):
    torch.manual_seed(1)
    lin = nn.Linear(24, 8)
    x = torch.randn(tokens, 24)
    x[3] *= 40.0    # an outlier token
    gy = torch.randn(tokens, 8)
    pol = "weight=bf16,activation=bf16,grad=bf16"
    outs = {}
    for rht in (0, 16):
        q = convert(copy.deepcopy(lin), f"{pol},wgrad_rht={rht}")
        xi = x.clone().requires_grad_()
        y = q(xi)
        torch.manual_seed(123)           # the backward's sign draw
        y.backward(gy)
        outs[rht] = (y.detach(), xi.grad, q.weight.grad, q.bias.grad)
    # the oracle: S from the same draw, scipy's H / 4, bf16 casts of the transformed operands, fp32 GEMM
    torch.manual_seed(123)
    s = (torch.randint(0, 2, (16,)) * 2 - 1).float()
    hs = torch.tensor(scipy.linalg.hadamard(16), dtype=torch.float32) / 4 * s
    pad = (-tokens) % 16

    def t(m):
        m = torch.cat([m, torch.zeros(pad, m.shape[1])]) if pad else m
        return (hs.t() @ m.reshape(-1, 16, m.shape[1])).reshape(-1, m.shape[1])

    bf = lambda m: m.to(torch.bfloat16).float()   # noqa: E731
    want = bf(t(gy)).t() @ bf(t(x))
    torch.testing.assert_close(outs[16][2], want, rtol=1e-6, atol=1e-5)
    assert not torch.equal(outs[16][2], outs[0][2])                 # the transform ran
    for i in (0, 1, 3):                                            # forward, dgrad and bias: untouched
        assert torch.equal(outs[16][i], outs[0][i])
    exact = gy.t() @ x
    err = lambda g: ((g - exact).norm() / exact.norm()).item()     # noqa: E731
    assert err(outs[16][2]) < 2 ** -7 and err(outs[0][2]) < 2 ** -7   # bf16 operands: ~2^-9 relative


def test_wgrad_rht_option_in_the_policy_language():
    p = PrecisionPolicy.parse("nvfp4,wgrad_rht=16@lm_head=bf16")
    assert p.wgrad_rht == 16 and p.for_module("lm_head").wgrad_rht == 0
    assert PrecisionPolicy.parse(str(p)) == p and PrecisionPolicy.from_dict(p.to_dict()) == p
    assert "Hadamard 16" in p.explain()
    for bad in ("wgrad_rht=12", "wgrad_rht=-1", "wgrad_rht=x"):
        with pytest.raises(ValueError, match="wgrad_rht"):
            PrecisionPolicy.parse(f"nvfp4,{bad}")
    conv = convert(nn.Conv1d(4, 4, 3), "weight=bf16,activation=bf16,grad=bf16,wgrad_rht=16")
    conv(torch.randn(2, 4, 8)).sum().backward()    # convolutions: the option does not apply (no error)
    assert conv.weight.grad is not None


def test_state_min_numel_keeps_small_tensors_fp32():
    p = PrecisionPolicy.parse("state=e4m3:block256,state_min_numel=4096")
    assert p.state_spec("exp_avg", 4095) is None
    assert str(p.state_spec("exp_avg", 4096)) == "e4m3:block256"
    assert str(p.state_spec("exp_avg")) == "e4m3:block256"
    assert PrecisionPolicy.parse(str(p)) == p


def test_fp8_states_description_says_what_it_does():
    doc = PRESET_DOCS["fp8-states"]
    assert "128" in doc and "torchao" not in doc.split("(")[0]


# ------------------------------------------------------------------------------------ MX scale rounding modes
import math  # noqa: E402

import numpy as np  # noqa: E402

from lowprec.codecs import Encoded, decode, encode  # noqa: E402
from lowprec.quantize import QuantSpec, quantize, quantize_with_scale  # noqa: E402

# torchao's constants (torchao/prototype/mx_formats/constants.py): largest power of two, max, mantissa bits
ELEM = {"mxfp8": (8, 448.0, 3), "mxfp4": (2, 6.0, 1)}


def _floor_log2(a: float) -> int:
    m, e = math.frexp(a)        # a = m * 2**e, 0.5 <= m < 1 (exact on floats)
    return e - 1


def _ceil_log2(a: float) -> int:
    m, e = math.frexp(a)
    return e - 1 if m == 0.5 else e


def _oracle_exponent(amax: float, mode: str, name: str) -> int:
    """torchao's ScaleCalculationMode rules (torchao/prototype/mx_formats/mx_tensor.py), in exact float math."""
    pow2, fmax, mbits = ELEM[name]
    if mode == "floor":
        e = _floor_log2(amax) - pow2
    elif mode == "ceil":
        e = _ceil_log2(amax) - pow2
    elif mode == "even":          # amax rounded half up to mbits mantissa bits, then floor
        m, ex = math.frexp(amax)
        r = math.floor(m * 2 ** (mbits + 1) + 0.5) * 2.0 ** (ex - mbits - 1)
        e = _floor_log2(r) - pow2
    else:                         # rceil: the float32 quotient amax / max, rounded up to a power of two
        e = _ceil_log2(float(np.float32(amax) / np.float32(fmax)))
    return max(-127, min(127, e))


@pytest.mark.parametrize("name", ["mxfp8", "mxfp4"])
@pytest.mark.parametrize("mode", ["floor", "ceil", "even", "rceil"])
def test_mx_scale_rounding_modes_match_torchao_rules(name, mode):
    pow2, fmax, _ = ELEM[name]
    # block maxima on and around every boundary: powers of two, the element max, EVEN's half-way points
    amaxes = [2.0 ** k * f for k in (-20, -3, 0, 5, 40) for f in (1.0, 1.5, 1.75, 1.875, 1.9375, 6 / 4, 7 / 4, 448 / 256)]
    amaxes += [float(np.nextafter(np.float32(a), np.float32(np.inf))) for a in amaxes[:12]]
    amaxes += [float(np.nextafter(np.float32(a), np.float32(0))) for a in amaxes[:12]]
    amaxes = [float(np.float32(a)) for a in amaxes]
    x = torch.zeros(len(amaxes), 32)
    g = torch.Generator().manual_seed(0)
    for i, a in enumerate(amaxes):
        x[i] = (torch.rand(32, generator=g) * 2 - 1) * a * 0.99
        x[i, i % 32] = -a if i % 2 else a
    sp = QuantSpec.parse(f"{name}:scale_round={mode}")
    q, scale = quantize_with_scale(x, sp)
    want = torch.tensor([2.0 ** _oracle_exponent(a, mode, name) for a in amaxes])
    assert torch.equal(scale[:, 0], want), mode
    assert torch.equal(scale, want[:, None].expand(-1, 32))
    assert (q.abs() / scale).max() <= fmax
    if mode in ("ceil", "rceil"):     # the scale covers the block: nothing saturates
        assert torch.equal((x.abs() / scale).amax(1) <= fmax, torch.ones(len(amaxes), dtype=torch.bool))
    if mode == "floor":               # today's default, OCP MX v1.0
        assert torch.equal(q, quantize(x, name))
    assert torch.equal(decode(encode(x, sp)), q)      # the codecs store the same scales


def test_scale_round_text_and_errors():
    assert str(QuantSpec.parse("e4m3:block32:scale=e8m0:scale_round=rceil")) == "mxfp8:scale_round=rceil"
    assert QuantSpec.parse("mxfp8:scale_round=floor") == QuantSpec.parse("mxfp8")
    for bad, match in (("nvfp4:scale_round=ceil", "E8M0"), ("e4m3:block32:scale_round=ceil", "E8M0"),
                       ("mxfp8:scale_round=up", "scale rounding"), ("e4m3:scale_round=ceil", "block scaling")):
        with pytest.raises(ValueError, match=match):
            QuantSpec.parse(bad)


# ------------------------------------------------------------------------------------------------ 2-D blocks
def _e4m3_tiles(w: torch.Tensor, r: int, c: int) -> torch.Tensor:
    """Oracle: every r x c tile scaled by its own amax / 448 and cast with torch's float8_e4m3fn."""
    out = torch.empty_like(w)
    for i in range(0, w.shape[0], r):
        for j in range(0, w.shape[1], c):
            t = w[i:i + r, j:j + c]
            s = t.abs().max() / 448.0
            out[i:i + r, j:j + c] = (t / s).to(torch.float8_e4m3fn).float() * s
    return out


def test_2d_blocks_match_tile_oracle_and_transpose():
    torch.manual_seed(0)
    w = torch.randn(300, 200) * torch.logspace(-3, 2, 200)      # ragged tiles on both axes
    q = quantize(w, "e4m3:block128x128")
    torch.testing.assert_close(q, _e4m3_tiles(w, 128, 128), rtol=0, atol=0)
    assert torch.equal(quantize(w, "e4m3:block128x128:axis=0"), q)          # a square tile ignores the axis
    assert torch.equal(quantize(w.t().contiguous(), "e4m3:block128x128").t(), q)
    assert torch.equal(quantize(w, "e4m3:block1x128"), quantize(w, "e4m3:block128"))
    # NVFP4 16x16: one E4M3 block scale per tile, the same for the matrix and its transpose
    qn, sn = quantize_with_scale(w, "nvfp4:block16x16")
    tiles = sn[:288, :192].reshape(18, 16, 12, 16)
    assert torch.equal(tiles, tiles[:, :1, :, :1].expand_as(tiles))
    assert torch.equal(quantize(w.t().contiguous(), "nvfp4:block16x16").t(), qn)
    enc = encode(w, "nvfp4:block16x16")
    assert enc.scale.shape == (19, 13) and torch.equal(decode(enc), qn)


def test_fp8_blockwise_linear_matches_deepseek_rule():
    """DeepSeek-V3: y = Q_1x128(x) Q_128x128(W)^T with E4M3 and fp32 scales amax/448 (oracle: torch casts)."""
    torch.manual_seed(1)
    lin = nn.Linear(256, 160)
    x = torch.randn(40, 256) * 3
    q = convert(copy.deepcopy(lin), "fp8-blockwise")
    y = q(x)
    xq = _e4m3_tiles(x, 1, 128)
    wq = _e4m3_tiles(lin.weight.detach(), 128, 128)
    torch.testing.assert_close(y, xq @ wq.t() + lin.bias.detach(), rtol=1e-5, atol=1e-5)


def test_nvfp4_recipe_preset_is_the_te_recipe():
    p = PrecisionPolicy.preset("nvfp4-recipe")
    w, a, g = p.weight, p.activation, p.grad
    assert (w.format.name, a.format.name, g.format.name) == ("e2m1",) * 3
    assert all(s.scaling.scale_format == "e4m3" for s in (w, a, g))
    assert (w.scaling.block_rows, w.scaling.block_size) == (16, 16)        # 2-D weights
    assert (a.scaling.block_rows, a.scaling.block_size) == (1, 16)         # 1-D activations and gradients
    assert (g.scaling.block_rows, g.scaling.block_size) == (1, 16)
    assert [str(s.rounding) for s in (w, a, g)] == ["nearest", "nearest", "stochastic"]   # SR on grads only
    assert p.wgrad_rht == 16
    assert "2509.25149" in PRESET_DOCS["nvfp4-recipe"]


def test_2d_weight_tiles_are_reused_in_the_backward():
    """TE's reason for 16x16 weight tiles: grad-input uses the very weight values of the forward."""
    torch.manual_seed(2)
    lin = nn.Linear(48, 32)
    pol = "weight=nvfp4:block16x16,activation=nvfp4,grad=nvfp4"
    q = convert(copy.deepcopy(lin), pol)
    x = torch.randn(20, 48, requires_grad=True)
    gy = torch.randn(20, 32)
    q(x).backward(gy)
    wq = quantize(lin.weight.detach(), "nvfp4:block16x16")
    gq = quantize(gy, "nvfp4")                      # blocks along the grad-input GEMM's reduction (out features)
    torch.testing.assert_close(x.grad, gq @ wq, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(q(x).detach(), quantize(x.detach(), "nvfp4") @ wq.t() + lin.bias.detach(),
                               rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------- COAT dynamic range expansion
def _coat_oracle(x: torch.Tensor, group: int = 128, expand_min: int = 16) -> torch.Tensor:
    """torchao's quantize_fp8 with dynamic range expansion (from COAT, arXiv 2410.19313), then its dequantize:
    flat groups, Rdtype = 448 * 448 / 2, k = floor(log2(Rdtype) / log2(Rx) * 16) / 16, scale = (Max / c)^k / 448,
    torch's float8_e4m3fn cast (float64 arithmetic here)."""
    g = x.double().reshape(-1, group)
    mx = g.abs().amax(-1, keepdim=True) + 1e-20
    mn = g.abs().amin(-1, keepdim=True) + 1e-20
    c = torch.sqrt(mx * mn)
    k = torch.floor(math.log2(448.0 * 448.0 / 2) / torch.log2(mx / mn) * expand_min) / expand_min
    scale = (mx / c) ** k / 448.0
    codes = ((g.sign() * (g.abs() / c) ** k) / scale).float().to(torch.float8_e4m3fn)
    v = codes.double() * scale
    return (v.sign() * v.abs() ** (1 / k) * c).reshape(x.shape).float()


def test_coat_expansion_matches_the_published_rule():
    torch.manual_seed(3)
    # second-moment-like states: a wide range inside each group of 128
    v = torch.randn(16, 256).pow(2) * torch.logspace(-14, -6, 256)
    m = torch.randn(16, 256) * torch.logspace(-6, -2, 256)
    for x in (v, m):
        enc = encode(x, "e4m3:block128", expand=16)
        assert enc.expand_k.shape == enc.expand_center.shape == (16, 2)
        got, want = decode(enc), _coat_oracle(x)
        rel = ((got - want).abs() / want.abs().clamp_min(1e-30))
        assert (rel > 1e-4).float().mean() < 0.01       # float32 vs float64 arithmetic: rare code flips
        assert rel.max() < 0.2                          # at most one E4M3 step (2^-3) apart
    # the point of the expansion: small second moments are no longer flushed to zero
    assert (decode(encode(v, "e4m3:block128")) == 0).any()
    assert not (decode(encode(v, "e4m3:block128", expand=16)) == 0).any()
    enc = encode(v, "e4m3:block128", expand=16)
    assert torch.equal(decode(Encoded.from_dict(enc.to_dict())), decode(enc))   # k and c travel in the dict


def test_coat_expansion_constant_group_and_errors():
    x = torch.full((2, 128), 0.5)
    assert torch.equal(decode(encode(x, "e4m3:block128", expand=16)), x)     # k = 1 for equal magnitudes
    for bad in ("e4m3", "e4m3:tensor", "mxfp8", "nvfp4"):
        with pytest.raises(ValueError, match="block scaling with fp32 scales"):
            encode(x, bad, expand=16)
    with pytest.raises(ValueError, match="state_expand"):
        PrecisionPolicy.parse("state=e4m3:tensor,state_expand=16")
    assert str(PrecisionPolicy.preset("coat-states")) == "state=e4m3:block128,state_expand=16"


# ------------------------------------------------------------------- presets in use, seen from the outside
def _sqnr(ref: torch.Tensor, x: torch.Tensor) -> float:
    return 20 * math.log10(ref.norm() / (ref - x).norm())


@pytest.mark.parametrize("preset,out_db,grad_db", [("fp8-blockwise", (22, 40), (20, 40)),
                                                   ("nvfp4-recipe", (10, 20), (8, 18))])
def test_gemm_presets_quantize_every_gemm_within_their_sqnr(preset, out_db, grad_db):
    """Outputs and weight gradients differ from fp32 and sit in the format's SQNR range (E4M3 with fine scales:
    ~25 dB; E2M1: ~13 dB, below any 8-bit format)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 128))
    x = torch.randn(64, 256)
    ref = copy.deepcopy(m)
    y = ref(x)
    y.square().mean().backward()
    q = convert(copy.deepcopy(m), preset)
    yq = q(x)
    yq.square().mean().backward()
    assert out_db[0] <= _sqnr(y.detach(), yq.detach()) <= out_db[1]
    for a, b in zip(ref.parameters(), q.parameters()):
        if a.dim() == 2:
            assert grad_db[0] <= _sqnr(a.grad, b.grad) <= grad_db[1]


def _packed(opt, p, name):
    return opt.state[p][name]["lowprec_packed"]


@pytest.mark.parametrize("preset,m_spec,v_spec", [("fp8-lm-o2", "e4m3:tensor", "fp16"),
                                                  ("fp8-states-e4m3-e5m2", "e4m3:tensor", "e5m2:tensor"),
                                                  ("coat-states", "e4m3:block128", "e4m3:block128")])
def test_state_presets_store_the_published_formats(preset, m_spec, v_spec):
    from lowprec.optim import wrap
    torch.manual_seed(0)
    lin = nn.Linear(128, 64)
    opt = wrap(torch.optim.AdamW(lin.parameters(), lr=1e-3), preset)
    for _ in range(2):
        opt.zero_grad()
        lin(torch.randn(8, 128)).square().mean().backward()
        opt.step()
    assert _packed(opt, lin.weight, "exp_avg")["spec"] == m_spec
    assert _packed(opt, lin.weight, "exp_avg_sq")["spec"] == v_spec
    if preset == "fp8-lm-o2":      # fp16 master weights with a per-tensor scale
        assert str(PrecisionPolicy.preset(preset).master) == "fp16:tensor"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_recipe_specs_on_cuda_match_cpu():
    torch.manual_seed(5)
    x = torch.randn(300, 200) * torch.logspace(-2, 2, 200)
    for sp in ("nvfp4:block16x16", "e4m3:block128x128", "mxfp8:scale_round=rceil", "mxfp4:scale_round=even",
               "mxfp8:scale_round=ceil"):
        assert torch.equal(quantize(x.cuda(), sp).cpu(), quantize(x, sp)), sp
    lin = nn.Linear(64, 32)
    outs = []
    for dev in ("cpu", "cuda"):
        q = convert(copy.deepcopy(lin).to(dev), "weight=bf16,activation=bf16,grad=bf16,wgrad_rht=16")
        xi = torch.randn(48, 64, generator=torch.Generator().manual_seed(0)).to(dev)
        y = q(xi)
        torch.manual_seed(7)
        y.backward(torch.ones_like(y))
        outs.append(q.weight.grad.cpu())
    # the sign draw differs between devices' generators: compare with the exact fp32 product instead
    for g in outs:
        assert ((g - outs[0]).norm() / outs[0].norm()) < 2 ** -6


def test_fp8_states_torchao_keeps_small_tensors_fp32_and_blocks_of_256():
    """torchao.optim.AdamWFp8 (torchao/optim/adam.py): only tensors with >= 4096 elements get FP8 states, in
    blocks of 256 with scale amax / 448 (oracle: torch's float8_e4m3fn cast of each block)."""
    from lowprec.optim import wrap
    torch.manual_seed(0)
    big = nn.Parameter(torch.randn(16, 256))            # 4096 elements: quantized
    small = nn.Parameter(torch.randn(4095))             # one short of the rule: fp32
    opt = wrap(torch.optim.AdamW([big, small], lr=1e-3), "fp8-states-torchao")
    ref = torch.optim.AdamW([nn.Parameter(big.detach().clone()), nn.Parameter(small.detach().clone())], lr=1e-3)
    for p, q in zip((big, small), ref.param_groups[0]["params"]):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    opt.step()
    ref.step()
    assert torch.is_tensor(opt.state[small]["exp_avg"]) and torch.is_tensor(opt.state[small]["exp_avg_sq"])
    packed = opt.state[big]["exp_avg"]["lowprec_packed"]
    assert packed["spec"] == "e4m3:block256" and tuple(packed["scale"].shape) == (16, 1)
    got = decode(Encoded.from_dict(packed))
    m = ref.state[ref.param_groups[0]["params"][0]]["exp_avg"]       # the fp32 first moment after one step
    s = m.abs().amax(-1, keepdim=True).clip(1e-12) / 448.0
    torch.testing.assert_close(got, (m / s).to(torch.float8_e4m3fn).float() * s, rtol=1e-6, atol=0)


def test_coat_states_are_stored_expanded_and_train():
    from lowprec.optim import wrap
    torch.manual_seed(0)
    x = torch.randn(256, 32)
    y = x @ torch.randn(32, 1)
    losses = {}
    for preset in ("fp32", "coat-states"):
        torch.manual_seed(1)
        lin = nn.Linear(32, 1)
        opt = wrap(torch.optim.AdamW(lin.parameters(), lr=5e-2), preset)
        for _ in range(100):
            opt.zero_grad()
            loss = nn.functional.mse_loss(lin(x), y)
            loss.backward()
            opt.step()
        losses[preset] = loss.item()
        if preset == "coat-states":
            packed = opt.state[lin.weight]["exp_avg_sq"]["lowprec_packed"]
            assert packed["expand_k"] is not None and packed["expand_center"] is not None
            # the stored codes decode through the inverse expansion, as the state_dict round trip shows
            sd = opt.state_dict()
            opt2 = wrap(torch.optim.AdamW(lin.parameters(), lr=1e-2), preset)
            opt2.load_state_dict(sd)
            a = {(id(p), n): v for p, n, v in opt.decoded_state()}
            b = {(id(p), n): v for p, n, v in opt2.decoded_state()}
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # fp32 reaches ~7e-4 from ~28; the expanded FP8 moments train as well (within 2x of fp32's final loss)
    assert losses["coat-states"] < 1e-4 * nn.functional.mse_loss(torch.zeros_like(y), y).item()
    assert losses["coat-states"] < 2 * losses["fp32"]


def test_2d_block_states_are_not_batched_across_tensors():
    """Rows of different tensors would share a 2-D tile if batched: the fused path must encode and decode them
    one by one (oracle: the per-tensor reference path, fused=False)."""
    from lowprec.optim import wrap
    outs = []
    for fused in (False, True):
        torch.manual_seed(0)
        ps = [nn.Parameter(torch.randn(3, 32)), nn.Parameter(torch.randn(5, 32) * 100)]
        opt = wrap(torch.optim.AdamW(ps, lr=1e-2), "state=e4m3:block16x16", fused=fused)
        for _ in range(2):      # the second step decodes the first step's codes
            for p in ps:
                p.grad = torch.randn_like(p) * (1 + 99 * (p.shape[0] == 5))
            opt.step()
        outs.append([v for _, _, v in opt.decoded_state()])
    for a, b in zip(*outs):
        assert torch.equal(a, b)
