"""The coverage report of lowprec.nn.convert and its warnings (oracle: the model's structure, written here)."""
import warnings

import pytest
import torch
from torch import nn

import lowprec.nn as lnn


class Odd(nn.Module):
    """A module holding a weight matrix that no converter knows (used with a plain matmul)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        return x @ self.w


def _model():
    return nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), Odd(), nn.Conv2d(1, 1, 1, padding="same"),
                         nn.Linear(4, 4), nn.Embedding(3, 4))


def test_coverage_rows_status_specs_and_reasons():
    model = _model()
    with pytest.warns(UserWarning) as record:
        lnn.convert(model, "fp8-hybrid@4=bf16", filter=lambda name, m: name != "5")
    text = str(record[0].message)
    assert "2: no converter for Odd" in text and "3: string padding" in text and "'5'" not in text
    cov = lnn.coverage(model)
    rows = {r.name: r for r in cov.rows}
    assert list(rows) == ["0", "2", "3", "4", "5"]                   # the LayerNorm holds no matrix
    assert rows["0"].quantized and rows["0"].weight == "e4m3:tensor" and rows["0"].grad == "e5m2:tensor"
    assert rows["0"].rule == "base" and rows["4"].rule == "4" and rows["4"].weight == "bf16"
    assert not rows["2"].quantized and rows["2"].reason == "no converter for Odd"
    assert not rows["3"].quantized and "string padding" in rows["3"].reason
    assert not rows["5"].quantized and rows["5"].reason == "excluded by filter"
    assert [r.name for r in cov.unconverted()] == ["2", "3", "5"]
    table = str(cov)
    assert table.startswith("lowprec coverage: 2 of 5 GEMM-like modules quantized")
    assert "fp32: excluded by filter" in table and cov.to_dicts()[0]["name"] == "0"


def test_fp32_policy_rows_say_nothing_is_quantized_and_no_warning_for_clean_models():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lnn.convert(model, "fp32")
    rows = lnn.coverage(model).rows
    assert [r.quantized for r in rows] == [False, False]
    assert rows[0].reason == "its policy quantizes nothing"


def test_coverage_of_an_unconverted_model_lists_gemm_modules():
    rows = lnn.coverage(nn.Sequential(nn.Linear(2, 2), nn.Conv1d(1, 1, 1))).rows
    assert [(r.name, r.quantized) for r in rows] == [("0", False), ("1", False)]


def test_register_adds_a_converter_for_a_custom_module():
    class OddQuant(Odd):
        pass

    def build(mod, policy, *, backend, name, telemetry, rule):
        new = OddQuant()
        new.w = mod.w
        return new

    remove = lnn.register(lambda m: type(m) is Odd, build)
    try:
        model = nn.Sequential(Odd())
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            lnn.convert(model, "fp8-hybrid")
        assert type(model[0]) is OddQuant
    finally:
        remove()
    with pytest.warns(UserWarning, match="no converter for Odd"):
        lnn.convert(nn.Sequential(Odd()), "fp8-hybrid")


class Attn(nn.Module):
    """A projection module plus functional attention and a functional matmul with a raw parameter."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.out = nn.Linear(16, 16)

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, 2, 8).permute(2, 0, 3, 1, 4)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(a.transpose(1, 2).reshape(B, T, 16)) @ torch.eye(16)


class SelfAttention(Attn):
    """The same, under a class name that ``convert(..., attention=True)`` recognises."""


def test_coverage_with_example_input_lists_functional_matmuls():
    from lowprec.telemetry import Telemetry
    model = nn.Sequential(Attn())
    tel = Telemetry()
    lnn.convert(model, "fp8-hybrid", telemetry=tel)
    model.train()
    cov = lnn.coverage(model, torch.randn(2, 5, 16))
    rows = {r.name: r for r in cov.rows}
    assert rows["0:scaled_dot_product_attention"].type == "scaled_dot_product_attention (x1)"
    assert "attention=True" in rows["0:scaled_dot_product_attention"].reason
    assert rows["0:matmul"].type == "matmul (x1)" and not rows["0:matmul"].quantized
    assert not any("linear" in n for n in rows)                 # the quantized layers' own GEMMs are not listed
    assert model.training and len(tel.frame()) == 0             # tracing leaves mode and telemetry untouched

    quant = nn.Sequential(SelfAttention())
    lnn.convert(quant, "fp8-hybrid", attention=True)
    rows = {r.name: r for r in lnn.coverage(quant, torch.randn(2, 5, 16)).rows}
    assert rows["0.sdpa"].quantized and rows["0.sdpa"].activation == "e4m3:tensor"
    assert "0:scaled_dot_product_attention" not in rows and "0:matmul" in rows
