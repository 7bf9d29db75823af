"""The independent oracle of the format tests (ml_dtypes' types for our format names), the eager reference switch,
and a bit-exact comparison of nested optimizer states."""
import contextlib

import ml_dtypes
import torch

ML_DTYPES = {
    "e4m3": ml_dtypes.float8_e4m3fn,
    "e5m2": ml_dtypes.float8_e5m2,
    "e3m2": ml_dtypes.float6_e3m2fn,
    "e2m3": ml_dtypes.float6_e2m3fn,
    "e2m1": ml_dtypes.float4_e2m1fn,
    "e8m0": ml_dtypes.float8_e8m0fnu,
}


@contextlib.contextmanager
def fast_path_off():
    """Inside: lowprec's fast paths are off, so ``quantize`` runs the eager reference (the oracle of the fast
    kernels); the previous settings are restored on exit."""
    from lowprec.fast import fast_path_settings, set_fast_path

    was = fast_path_settings()
    set_fast_path(False)
    try:
        yield
    finally:
        set_fast_path(*was)


def same_tree(a, b) -> bool:
    """Whether two nested structures (tensors, dicts, lists, tuples, scalars) are equal bit for bit: tensors of the
    same dtype and shape, uint8 codes compared as they are, other tensors as float32 with NaN mapped to one value (so
    NaN equals NaN, and a NaN where the other side has a number does not)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(
            a.view(torch.uint8) if a.dtype == torch.uint8 else a.float().nan_to_num(123.0),
            b.view(torch.uint8) if b.dtype == torch.uint8 else b.float().nan_to_num(123.0))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_tree(x, y) for x, y in zip(a, b))
    return a == b


def assert_same_run(ref, got) -> None:
    """Two runs of a wrapped optimizer, each ``(params, optimizer, telemetry or None)``, ended bit-identical:
    parameters (NaN equal to NaN), ``state_dict()`` (:func:`same_tree`), telemetry frames and NaN/inf events."""
    (ref_p, ref_opt, ref_tel), (got_p, got_opt, got_tel) = ref, got
    for a, b in zip(ref_p, got_p, strict=True):
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))
    assert same_tree(ref_opt.state_dict(), got_opt.state_dict())
    if ref_tel is not None:
        assert ref_tel.frame().equals(got_tel.frame())
        assert ref_tel.nonfinite_events() == got_tel.nonfinite_events()
