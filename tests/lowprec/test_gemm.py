"""lowprec.gemm: the operand description and the choice of GEMM path (oracle: torch's float8 casts and fp32
matmul of the same values)."""
import pytest
import torch

from lowprec.accumulate import Accumulator
from lowprec.accumulate import matmul as acc_matmul
from lowprec.nn import Site
from lowprec.gemm import Operand, matmul, native_dtype, native_reason, use_native
from lowprec.quantize import QuantSpec, quantize_with_scale

torch.set_num_threads(1)


def test_native_dtype_and_reasons():
    assert native_dtype(QuantSpec.parse("e4m3:tensor")) is torch.float8_e4m3fn
    assert native_dtype(QuantSpec.parse("e5m2")) is torch.float8_e5m2
    assert native_dtype(QuantSpec.parse("bf16")) is None and native_dtype(QuantSpec.parse("e3m2")) is None
    assert native_reason(QuantSpec.parse("e4m3:channel")) is None
    assert "block" in native_reason(QuantSpec.parse("mxfp8"))
    assert "not E4M3/E5M2" in native_reason(QuantSpec.parse("bf16"))
    assert native_reason(None) == "operand not quantized"


def test_operand_transpose_moves_a_channel_scale():
    x = torch.randn(6, 4)
    q, s = quantize_with_scale(x, QuantSpec.parse("e4m3:channel:axis=0"))
    op = Operand(q, s, QuantSpec.parse("e4m3:channel:axis=0"))
    t = op.t()
    assert t.q.shape == (4, 6) and t.scale.shape == tuple(reversed(s.shape))
    assert torch.equal(t.q, q.t())


def test_paths_emulated_accumulated_native(scaled_mm_calls):
    torch.manual_seed(0)
    spec = QuantSpec.parse("e4m3:tensor")
    a, b = torch.randn(8, 32), torch.randn(32, 16)
    qa, sa = quantize_with_scale(a, spec)
    qb, sb = quantize_with_scale(b, spec)
    A, B = Operand(qa, sa, spec), Operand(qb, sb, spec)
    # the operand values are exactly torch's float8 grid times the scale
    assert torch.equal(qa, (qa / sa).to(torch.float8_e4m3fn).float() * sa)
    emulated = matmul(A, B, "emulated")
    assert torch.equal(emulated, qa @ qb) and scaled_mm_calls == []
    native = matmul(A, B, "native")
    assert len(scaled_mm_calls) == 1
    torch.testing.assert_close(native, qa @ qb, rtol=2e-6, atol=2e-6)    # summation order only
    # auto never takes the CPU's software _scaled_mm (hundreds of times slower than the fp32 matmul); on a CUDA
    # device it takes the native path where possible (tests/lowprec/test_nn.py, gpu)
    assert use_native(A, B, "auto", None) is False
    assert torch.equal(matmul(A, B, "auto"), qa @ qb) and len(scaled_mm_calls) == 1
    acc = Accumulator(QuantSpec.parse("bf16"), chunk=8)
    assert use_native(A, B, "auto", acc) is False
    assert torch.equal(matmul(A, B, "auto", acc), acc_matmul(qa, qb, acc))
    # empty operands never go native: an empty product is exact zeros
    E = Operand(torch.zeros(0, 32), sa, spec)
    assert use_native(E, B, "native", None) is False and matmul(E, B, "native").shape == (0, 16)


def test_native_backend_refuses_unquantized_operands():
    spec = QuantSpec.parse("e4m3:tensor")
    a = Operand(torch.randn(4, 4), None, None)
    b = Operand(torch.randn(4, 4), None, spec)
    assert use_native(a, b, "native", None) is False     # the layer refuses such policies up front (Site)
    with pytest.raises(ValueError, match="activation: operand not quantized"):
        Site("weight=e4m3:tensor", "native")


@pytest.mark.parametrize("backend,accumulator", [("emulated", None), ("emulated", "bf16"), ("emulated", "fp32"),
                                                 ("auto", None), ("native", None)])
def test_matmul_returns_a_new_tensor_of_its_own(backend, accumulator):
    # the quantized linear layer adds its bias into the GEMM's result in place (lowprec.nn.function): that must
    # never write into an operand or into a tensor another caller holds
    spec = QuantSpec.parse("e4m3:tensor")
    a = Operand(*quantize_with_scale(torch.randn(5, 8), spec), spec)
    b = Operand(*quantize_with_scale(torch.randn(8, 3), spec), spec)
    ref = a.q @ b.q
    acc = None if accumulator is None else Accumulator.parse(accumulator)
    y = matmul(a, b, backend, acc)
    y2 = matmul(a, b, backend, acc)
    assert y.dtype == torch.float32 and y.shape == (5, 3)
    held = {a.q.untyped_storage().data_ptr(), b.q.untyped_storage().data_ptr(), y2.untyped_storage().data_ptr()}
    assert y.untyped_storage().data_ptr() not in held
    if accumulator in (None, "fp32"):
        assert torch.allclose(y, ref, rtol=1e-6, atol=1e-6)
