import numpy as np
import pytest
import torch

from lowprec.accumulate import FP8_TENSOR_CORE, Accumulator, matmul


@pytest.mark.parametrize("shape_a,shape_b", [((5, 70), (70, 3)), ((2, 4, 33), (33, 6)), ((70,), (70, 3)),
                                             ((5, 40), (40,))])
def test_fp32_accumulator_equals_torch_matmul(shape_a, shape_b):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(*shape_a, generator=g), torch.randn(*shape_b, generator=g)
    out = matmul(a, b, "fp32", chunk=8)
    ref = torch.matmul(a, b)
    assert out.shape == ref.shape
    # only the summation order differs: a few fp32 ulps of the sum of |products|
    bound = 1e-5 * torch.matmul(a.abs(), b.abs())
    assert torch.all((out - ref).abs() <= bound)


def test_fp16_accumulator_matches_numpy_sequential_reference():
    # integers: every product and every chunk partial sum is exact in fp32, so the only roundings are the
    # accumulator's, reproduced with numpy float16 (an independent implementation of IEEE binary16 RNE)
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 9, (4, 300), generator=g).float()
    b = torch.randint(0, 9, (300, 5), generator=g).float()     # sums ~4800: above 2048 fp16 spacing is 2+
    for chunk in (1, 7, 32):
        out = matmul(a, b, "fp16", chunk=chunk).numpy()
        an, bn = a.numpy(), b.numpy()
        ref = np.zeros((4, 5), dtype=np.float16)
        for k0 in range(0, 300, chunk):
            part = an[:, k0:k0 + chunk] @ bn[k0:k0 + chunk]
            ref = (ref.astype(np.float32) + part).astype(np.float16)
        np.testing.assert_array_equal(out, ref.astype(np.float32))
        assert not np.array_equal(out, an @ bn)   # the narrow accumulator really lost something


def test_error_grows_with_k_for_narrow_accumulator():
    g = torch.Generator().manual_seed(2)
    errs = []
    for K in (64, 512, 4096):
        a, b = torch.rand(8, K, generator=g), torch.rand(K, 8, generator=g)
        ref = a.double() @ b.double()
        out = matmul(a, b, "bf16", chunk=1)
        errs.append(((out.double() - ref).abs() / ref).mean().item())
    # bf16 (8 significant bits) sequential accumulation of positive terms: error grows with K
    # (measured ~0.006, 0.07, 0.75); require each 8x longer K to at least triple it
    assert errs[1] > 3 * errs[0] and errs[2] > 3 * errs[1]
    # fp32 accumulation on the same data stays at float error
    a, b = torch.rand(8, 4096, generator=g), torch.rand(4096, 8, generator=g)
    ref = a.double() @ b.double()
    assert ((matmul(a, b, "fp32", chunk=1).double() - ref).abs() / ref).max() < 1e-5


def test_profiles_and_promotion_order_errors():
    g = torch.Generator().manual_seed(3)
    a, b = torch.rand(8, 2048, generator=g), torch.rand(2048, 8, generator=g)
    ref = a.double() @ b.double()

    def err(acc, **kw):
        return ((matmul(a, b, acc, **kw).double() - ref).abs() / ref).mean().item()

    e_bf16, e_fp16, e_tc = err("bf16", chunk=4), err("fp16", chunk=4), err("e8m13", chunk=4)
    assert e_bf16 > e_fp16 > e_tc > 0          # 7, 10, 13 fraction bits
    assert err(FP8_TENSOR_CORE) < e_tc         # promoting to fp32 every 32 elements bounds the chain length
    assert err("bf16", chunk=4, promote=64) < e_bf16


def test_accumulator_spec_parse_and_errors():
    acc = Accumulator.parse("e8m13:chunk4:promote32")
    assert acc == FP8_TENSOR_CORE and str(acc) == "e8m13:chunk4:promote32"
    assert Accumulator.parse(str(Accumulator.parse("fp16"))) == Accumulator.parse("fp16:chunk32")
    with pytest.raises(ValueError, match="unscaled"):
        Accumulator.parse("e4m3:block32")
    with pytest.raises(ValueError, match="chunk"):
        Accumulator(Accumulator.parse("fp16").spec, chunk=0)
    with pytest.raises(ValueError, match="promote"):
        Accumulator.parse("fp16:chunk4:promote6")
    with pytest.raises(ValueError, match="inner dimensions"):
        matmul(torch.ones(2, 3), torch.ones(4, 2), "fp16")
    with pytest.raises(ValueError):
        Accumulator.parse("int8")
