"""What the running torch build and machine can do natively, each answer with its reason.

``probe()`` tries the operations ``lowprec.nn`` would use on the native path (a tiny FP8 ``torch._scaled_mm``
checked against the fp32 matmul of the same values) instead of guessing from version numbers.
Results are cached per process; ``probe(refresh=True)`` runs the checks again.
"""
from __future__ import annotations

import functools
import shutil
import subprocess

import torch

__all__ = ["probe", "scaled_mm_ok", "report"]

Capability = tuple[bool, str]


def _float8_dtypes() -> Capability:
    names = ("float8_e4m3fn", "float8_e5m2")
    missing = [n for n in names if not hasattr(torch, n)]
    if missing:
        return False, f"torch {torch.__version__} lacks dtypes {missing}"
    return True, f"torch {torch.__version__} has torch.float8_e4m3fn and torch.float8_e5m2"


def _try_scaled_mm(device: str, rowwise: bool) -> Capability:
    """Run a 32x32x32 E4M3 x E4M3 (and E5M2 x E4M3) scaled matmul and compare with fp32 on the same values."""
    if not hasattr(torch, "_scaled_mm"):
        return False, "torch._scaled_mm does not exist in this build"
    if not _float8_dtypes()[0]:
        return False, "no float8 dtypes"
    try:
        g = torch.Generator().manual_seed(0)
        a = torch.randn(32, 32, generator=g).to(torch.float8_e4m3fn).to(device)
        b = torch.randn(32, 32, generator=g).to(torch.float8_e4m3fn).to(device)
        e = torch.randn(32, 32, generator=g).to(torch.float8_e5m2).to(device)
        if rowwise:
            sa = torch.full((32, 1), 0.5, device=device)
            sb = torch.full((1, 32), 2.0, device=device)
        else:
            sa = torch.tensor(0.5, device=device)
            sb = torch.tensor(2.0, device=device)
        out = torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=torch.float32)
        ref = (a.float() * sa) @ (b.float().t() * sb)
        if not torch.allclose(out, ref, rtol=1e-5, atol=1e-4):
            return False, f"torch._scaled_mm on {device} ran but disagrees with the fp32 matmul"
        out2 = torch._scaled_mm(e, b.t(), scale_a=sa, scale_b=sb, out_dtype=torch.float32)
        ref2 = (e.float() * sa) @ (b.float().t() * sb)
        if not torch.allclose(out2, ref2, rtol=1e-5, atol=1e-4):
            return False, f"torch._scaled_mm E5M2 x E4M3 on {device} disagrees with the fp32 matmul"
    except (RuntimeError, TypeError, ValueError) as exc:  # what an unsupported build/device raises; reported
        kind = "row-wise" if rowwise else "tensor-wise"
        return False, f"torch._scaled_mm ({kind}) failed on {device}: {type(exc).__name__}: {str(exc)[:160]}"
    kind = "row-wise" if rowwise else "tensor-wise"
    return True, f"torch._scaled_mm E4M3/E5M2 {kind} ran on {device} and matched fp32 on the same values"


def _cuda() -> Capability:
    if not torch.cuda.is_available():
        return False, f"torch.cuda.is_available() is False (torch {torch.__version__})"
    return True, f"{torch.cuda.get_device_name(0)}"


def _cuda_fp8() -> Capability:
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    major, minor = torch.cuda.get_device_capability(0)
    if (major, minor) >= (8, 9):
        return True, f"compute capability sm_{major}{minor} >= sm_89 has FP8 tensor cores"
    return False, f"compute capability sm_{major}{minor} < sm_89: no FP8 tensor cores"


def _compile(try_it: bool) -> Capability:
    compiler = shutil.which("g++") or shutil.which("gcc") or shutil.which("cc")
    if not hasattr(torch, "compile"):
        return False, "torch.compile does not exist in this build"
    if not try_it:
        if compiler is None:
            return False, "no C/C++ compiler on PATH for the CPU inductor backend (not tried)"
        return True, f"torch.compile present, C compiler {compiler} (not tried; probe(try_compile=True) runs it)"
    try:
        fn = torch.compile(lambda t: (t * 2 + 1).relu())
        x = torch.randn(8)
        if not torch.equal(fn(x), (x * 2 + 1).relu()):
            return False, "torch.compile ran but gave a different result"
    except (RuntimeError, TypeError, ValueError, OSError, ImportError, subprocess.SubprocessError) as exc:
        # torch.compile failures: dynamo/inductor errors are RuntimeErrors; a missing compiler OSError/subprocess
        return False, f"torch.compile failed: {type(exc).__name__}: {str(exc)[:160]}"
    return True, "torch.compile compiled and ran a small elementwise function on CPU"


@functools.lru_cache(maxsize=4)
def _probe(try_compile: bool) -> dict[str, Capability]:
    caps: dict[str, Capability] = {}
    caps["float8_dtypes"] = _float8_dtypes()
    caps["float4_dtype"] = (
        (True, "torch.float4_e2m1fn_x2 exists (storage only)")
        if hasattr(torch, "float4_e2m1fn_x2") else (False, "torch.float4_e2m1fn_x2 missing")
    )
    caps["scaled_mm_cpu"] = _try_scaled_mm("cpu", rowwise=False)
    caps["scaled_mm_rowwise_cpu"] = _try_scaled_mm("cpu", rowwise=True)
    caps["cuda"] = _cuda()
    caps["cuda_fp8"] = _cuda_fp8()
    if caps["cuda"][0]:
        caps["scaled_mm_cuda"] = _try_scaled_mm("cuda", rowwise=False)
        caps["scaled_mm_rowwise_cuda"] = _try_scaled_mm("cuda", rowwise=True)
    else:
        caps["scaled_mm_cuda"] = (False, "no CUDA device")
        caps["scaled_mm_rowwise_cuda"] = (False, "no CUDA device")
    caps["compile"] = _compile(try_compile)
    return caps


def probe(*, try_compile: bool = False, refresh: bool = False) -> dict[str, Capability]:
    """Capability name -> (available, reason).

    Keys: float8_dtypes, float4_dtype, scaled_mm_cpu, scaled_mm_rowwise_cpu, cuda, cuda_fp8, scaled_mm_cuda,
    scaled_mm_rowwise_cuda, compile. ``scaled_mm_*`` are established by running a small FP8 GEMM and checking it
    against fp32. ``compile`` is only tried (~15 s on CPU) with ``try_compile=True``.
    """
    if refresh:
        _probe.cache_clear()
    return dict(_probe(bool(try_compile)))


def scaled_mm_ok(device: torch.device | str, rowwise: bool = False) -> bool:
    """True when the native FP8 GEMM (tensor-wise, or row-wise scales) works on ``device``'s type."""
    kind = torch.device(device).type
    if kind not in ("cpu", "cuda"):
        return False
    key = f"scaled_mm_{'rowwise_' if rowwise else ''}{kind}"
    return _probe(False)[key][0]


def report() -> str:
    """probe() as an aligned text table."""
    caps = probe()
    width = max(len(k) for k in caps)
    return "\n".join(f"{k:<{width}}  {'yes' if ok else 'no ':<3}  {why}" for k, (ok, why) in caps.items())
