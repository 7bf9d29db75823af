"""The independent oracle of the format tests: ml_dtypes' types for our format names."""
import contextlib
import ml_dtypes

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
