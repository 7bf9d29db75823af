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
