import dataclasses
import subprocess
import sys

import ml_dtypes
import pytest
import torch

import lowprec
from tests.lowprec.oracles import ML_DTYPES
from lowprec import FORMATS, Format, float_format, get_format, int_format

ML = ML_DTYPES


@pytest.mark.parametrize("name", sorted(ML))
def test_properties_match_ml_dtypes_finfo(name):
    f, fi = FORMATS[name], ml_dtypes.finfo(ML[name])
    assert f.max == float(fi.max)
    assert f.min_normal == float(fi.smallest_normal)
    assert f.min_subnormal == float(fi.smallest_subnormal)
    assert f.eps == float(fi.eps)
    assert f.bits == fi.bits


@pytest.mark.parametrize("name,dt", [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)])
def test_properties_match_torch_finfo(name, dt):
    f, fi = FORMATS[name], torch.finfo(dt)
    assert f.max == fi.max and f.min_normal == fi.smallest_normal and f.eps == fi.eps and f.bits == fi.bits
    assert f.min_subnormal == float(torch.tensor(1, dtype=torch.int16 if f.bits == 16 else torch.int32).view(dt))


def test_ocp_facts():
    e4m3, e5m2 = FORMATS["e4m3"], FORMATS["e5m2"]
    assert (e4m3.max, e4m3.has_inf, e4m3.has_nan) == (448.0, False, True)
    assert (e5m2.max, e5m2.has_inf, e5m2.has_nan) == (57344.0, True, True)
    for n, mx in (("e3m2", 28.0), ("e2m3", 7.5), ("e2m1", 6.0)):
        assert FORMATS[n].max == mx and not FORMATS[n].has_inf and not FORMATS[n].has_nan
    assert FORMATS["e8m0"].kind == "scale" and not FORMATS["e8m0"].has_zero
    assert (FORMATS["int8"].min, FORMATS["int8"].max) == (-128.0, 127.0)
    assert (FORMATS["int4"].min, FORMATS["int4"].max) == (-8.0, 7.0)
    assert FORMATS["e4m3"].has_negative_zero and not FORMATS["int8"].has_negative_zero


@pytest.mark.parametrize("alias,name", [("fp8_e4m3", "e4m3"), ("FP8_E5M2", "e5m2"), ("fp4", "e2m1"),
                                        ("float6_e3m2fn", "e3m2"), ("fp6_e2m3", "e2m3"), ("bfloat16", "bf16"),
                                        ("half", "fp16"), ("float8_e4m3fn", "e4m3")])
def test_aliases(alias, name):
    assert get_format(alias) is FORMATS[name]


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="e4m3.*e5m2|valid names"):
        get_format("fp7")
    with pytest.raises(ValueError) as ei:
        get_format("nope")
    for n in ("e4m3", "e2m1", "int8", "fp8_e4m3"):
        assert n in str(ei.value)
    with pytest.raises(TypeError):
        get_format(3.5)
    with pytest.raises(ValueError, match="scaled format"):
        get_format("mxfp8")


def test_custom_constructors():
    assert float_format(4, 3, has_inf=False) is FORMATS["e4m3"]
    assert float_format(5, 2) is FORMATS["e5m2"]
    assert float_format(2, 1, has_inf=False, has_nan=False) is FORMATS["e2m1"]
    assert int_format(8) is not None and int_format(8) == FORMATS["int8"]
    sym = int_format(4, symmetric=True)
    assert (sym.min, sym.max) == (-7.0, 7.0)
    # IEEE-like custom formats against ml_dtypes
    for (e, m), dt in (((3, 4), ml_dtypes.float8_e3m4), ((4, 3), ml_dtypes.float8_e4m3)):
        f, fi = float_format(e, m), ml_dtypes.finfo(dt)
        assert (f.max, f.min_normal, f.min_subnormal) == (float(fi.max), float(fi.smallest_normal),
                                                          float(fi.smallest_subnormal))
    # names round-trip through get_format
    for f in (float_format(3, 4), float_format(4, 2, has_inf=False), float_format(3, 3, has_inf=False, has_nan=False),
              float_format(5, 2, bias=16), int_format(6), int_format(8, symmetric=True)):
        assert get_format(f.name) == f
    with pytest.raises(ValueError):
        float_format(9, 3)
    with pytest.raises(ValueError):
        float_format(4, 24)
    with pytest.raises(ValueError):
        int_format(1)
    with pytest.raises(TypeError):
        float_format(4.0, 3)


def test_format_is_frozen_data():
    with pytest.raises(dataclasses.FrozenInstanceError):
        FORMATS["e4m3"].bits = 9
    d = FORMATS["e4m3"].describe()
    assert d["max"] == 448.0 and d["man_bits"] == 3


def test_qtorch_floatingpoint_accepted():
    from qtorch import FloatingPoint

    f = get_format(FloatingPoint(exp=4, man=3))
    assert isinstance(f, Format) and f.max == 480.0 and not f.has_inf and not f.has_nan
    assert get_format(FloatingPoint(exp=5, man=2)).max == 114688.0
    x = torch.tensor([1.3, 470.0, 1000.0])
    assert lowprec.quantize(x, FloatingPoint(exp=4, man=3)).tolist() == [1.25, 480.0, 480.0]


def test_main_prints_table():
    out = subprocess.run([sys.executable, "-m", "lowprec"], capture_output=True, text=True, check=True).stdout
    for n in ("e4m3", "e5m2", "e2m1", "e8m0", "int4", "bf16", "448", "57344", "nvfp4"):
        assert n in out
