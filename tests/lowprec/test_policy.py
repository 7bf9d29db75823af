import json

import pytest

from lowprec.accumulate import Accumulator
from lowprec.policy import PRESET_DOCS, PRESET_TABLE, PRESETS, PrecisionPolicy
from lowprec.quantize import QuantSpec, Rounding

ISSUE_EXAMPLE = "weight=e4m3,activation=e4m3,grad=e5m2:stochastic,state=e4m3:block128,master=bf16:stochastic"


def test_issue_example_parses_and_prints_back_identically():
    p = PrecisionPolicy.parse(ISSUE_EXAMPLE)
    assert str(p) == ISSUE_EXAMPLE
    assert p.weight.format.name == "e4m3" and p.weight.scaling is None   # plain "e4m3" is an unscaled cast
    assert p.grad.rounding == Rounding.STOCHASTIC and p.grad.format.name == "e5m2"
    assert p.state.scaling.mode == "block" and p.state.scaling.block_size == 128
    assert p.master.format.name == "bf16" and p.master.rounding == Rounding.STOCHASTIC
    assert p.accumulator is None and p.activation == QuantSpec.parse("e4m3")


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_round_trip(name):
    p = PrecisionPolicy.preset(name)
    assert PrecisionPolicy.parse(str(p)) == p
    assert PrecisionPolicy.parse(name) == p
    assert PrecisionPolicy.from_dict(p.to_dict()) == p
    assert PrecisionPolicy.from_json(json.dumps(p.to_dict())) == p
    assert name in p.explain() and PRESET_DOCS[name]


def test_preset_meanings():
    assert PrecisionPolicy.preset("fp32").is_noop and str(PrecisionPolicy()) == "fp32"
    h = PrecisionPolicy.preset("fp8-hybrid")
    assert (h.weight.format.name, h.activation.format.name, h.grad.format.name) == ("e4m3", "e4m3", "e5m2")
    assert h.weight.scaling.mode == "tensor" and h.state is None and h.master is None
    s = PrecisionPolicy.preset("fp8-states")
    assert s.weight is None and s.state.format.name == "e4m3" and s.state.scaling.block_size == 128
    a = PrecisionPolicy.preset("fp8-all")
    assert a.grad == h.grad and a.state == s.state and str(a.master) == "bf16:stochastic"
    mx = PrecisionPolicy.preset("mxfp8")
    assert mx.weight.scaling.scale_format == "e8m0" and mx.weight.scaling.block_size == 32
    nv = PrecisionPolicy.preset("nvfp4")
    assert nv.grad.rounding == Rounding.STOCHASTIC and nv.weight.rounding == Rounding.NEAREST
    assert nv.weight.format.name == "e2m1" and nv.weight.scaling.block_size == 16
    i4 = PrecisionPolicy.preset("int4")
    assert i4.weight.format.name == "int4" and i4.weight.scaling.block_size == 32
    assert i4.activation is None and i4.grad is None and i4.state is None
    b = PrecisionPolicy.preset("bf16")
    assert b.weight.format.name == "bf16" and b.master is None


def test_state_overrides_accumulator_and_preset_base():
    p = PrecisionPolicy.parse("fp8-all,state.exp_avg_sq=e5m2:block128,accumulator=fp16:chunk16")
    assert p.state_spec("exp_avg_sq").format.name == "e5m2"
    assert p.state_spec("exp_avg").format.name == "e4m3"
    assert p.accumulator == Accumulator(QuantSpec.parse("fp16"), chunk=16)
    assert PrecisionPolicy.parse(str(p)) == p
    assert str(PrecisionPolicy.parse(str(p))) == str(p)
    q = PrecisionPolicy.parse("fp8-states,state.exp_avg_sq=none")
    assert q.state_spec("exp_avg_sq") is None and "state.exp_avg_sq=none" in str(q)
    assert PrecisionPolicy.parse("fp8-all,master=none").master is None
    assert PrecisionPolicy(weight="e4m3:tensor") == PrecisionPolicy.parse("weight=e4m3:tensor")
    assert "state.exp_avg_sq" in p.explain() and "chunk 16" in p.explain()


def test_bad_input():
    with pytest.raises(ValueError, match="valid roles"):
        PrecisionPolicy.parse("wieght=e4m3")
    with pytest.raises(ValueError, match="valid names"):
        PrecisionPolicy.parse("weight=e9m9x")
    with pytest.raises(ValueError, match="valid presets"):
        PrecisionPolicy.preset("fp7")
    with pytest.raises(ValueError, match="only the first entry"):
        PrecisionPolicy.parse("weight=e4m3,fp8-all")
    with pytest.raises(ValueError, match="valid"):
        PrecisionPolicy.from_dict({"weights": "e4m3"})
    with pytest.raises(ValueError):
        PrecisionPolicy.parse("")
    with pytest.raises(TypeError):
        PrecisionPolicy(weight=3)
    with pytest.raises(ValueError, match="unscaled"):
        PrecisionPolicy.parse("accumulator=fp16:tensor")


# ---------------------------------------------------------------- per-module rules
RULED = "fp8-all@lm_head|transformer.h.11.*=bf16@re:.*\\.attn\\.c_(attn|proj)=weight=e4m3:block32"


def test_rules_parse_print_and_match_in_order():
    p = PrecisionPolicy.parse(RULED)
    assert p.base == PrecisionPolicy.preset("fp8-all") and len(p.rules) == 2
    assert PrecisionPolicy.parse(str(p)) == p and str(PrecisionPolicy.parse(str(p))) == str(p)
    bf16 = PrecisionPolicy.preset("bf16")
    assert p.for_module("lm_head") == bf16
    assert p.for_module("transformer.h.11.attn.c_attn") == bf16          # first match wins over the regex
    assert p.for_module("transformer.h.1.attn.c_attn") == PrecisionPolicy.parse("weight=e4m3:block32")
    assert p.for_module("transformer.h.1.mlp.c_fc") == p.base            # no rule: the base policy
    assert p.for_module("transformer.h.110") == p.base                   # glob needs the dot after 11
    assert p.rule_for("lm_head").pattern == "lm_head|transformer.h.11.*" and p.rule_for("wte") is None
    assert p != p.base and hash(p) != hash(p.base) and not PrecisionPolicy.parse("fp32@x=bf16").is_noop


def test_rules_in_python_dict_json_and_toml_agree():
    p = PrecisionPolicy.parse(RULED)
    q = PrecisionPolicy.preset("fp8-all").with_rules(("lm_head|transformer.h.11.*", "bf16"),
                                                     r"re:.*\.attn\.c_(attn|proj)=weight=e4m3:block32")
    assert q == p
    direct = PrecisionPolicy(weight="e4m3:tensor", rules=[("lm_head|transformer.h.11.*", "bf16")])
    assert direct.rules == p.rules[:1] and str(direct) == "weight=e4m3:tensor@" + str(p.rules[0])
    assert PrecisionPolicy.from_dict(p.to_dict()) == p and PrecisionPolicy.from_json(p.to_json()) == p
    toml = '''
base = "fp8-all"
[[rules]]
pattern = "lm_head|transformer.h.11.*"
policy = "bf16"
[[rules]]
pattern = 're:.*\\.attn\\.c_(attn|proj)'
policy = "weight=e4m3:block32"
'''
    assert PrecisionPolicy.from_toml(toml) == p
    assert "rules" not in PrecisionPolicy.preset("fp8-all").to_dict()      # unchanged without rules


def test_explain_shows_rules_and_which_rule_each_module_gets():
    p = PrecisionPolicy.parse(RULED)
    text = p.explain(["lm_head", "transformer.h.0.mlp.c_fc", "transformer.h.0.attn.c_attn"])
    assert "(preset fp8-all:" in text and "1. lm_head|transformer.h.11.* -> weight=bf16" in text
    lines = {ln.split()[0]: ln for ln in text.splitlines() if ln.startswith(("lm_head", "transformer"))}
    assert "lm_head|transformer.h.11.*" in lines["lm_head"] and " base " in lines["transformer.h.0.mlp.c_fc"]
    assert "re:" in lines["transformer.h.0.attn.c_attn"]


def test_bad_rules():
    with pytest.raises(ValueError, match="pattern=policy"):
        PrecisionPolicy.parse("fp8-all@lm_head")
    with pytest.raises(ValueError, match="regular expression"):
        PrecisionPolicy.parse("fp8-all@re:(=bf16")
    with pytest.raises(ValueError, match="valid presets"):
        PrecisionPolicy.parse("fp8-all@lm_head=bf17")
    with pytest.raises(ValueError, match="empty"):
        PrecisionPolicy.parse("@lm_head=bf16")
    with pytest.raises(TypeError):
        PrecisionPolicy(rules="lm_head=bf16")
    with pytest.raises(ValueError, match="keys"):
        PrecisionPolicy.from_dict({"rules": [{"pattern": "x"}]})


def test_presets_come_from_one_table():
    assert [name for name, _, _ in PRESET_TABLE] == list(PRESETS) == list(PRESET_DOCS)
    for name, text, doc in PRESET_TABLE:
        assert PRESETS[name] == PrecisionPolicy.parse(text) and PRESET_DOCS[name] == doc
