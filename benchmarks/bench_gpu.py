"""The native FP8 path on a CUDA device against the emulation: bit-exactness, GEMM agreement, and timings.

    python benchmarks/bench_gpu.py                    # on a CUDA GPU (sm_89+ for FP8 GEMMs)
    python benchmarks/bench_gpu.py --device cpu --small   # a dry run of every section on the CPU
    python benchmarks/bench_gpu.py --json out.json    # also write every number as JSON

Sections (each runs on its own; one that fails prints its error and the others still run):

1. ``casts``: torch's float8 casts on the device against ml_dtypes (an independent oracle, on the CPU) for every
   finite fp32 in range, sampled: all 2^8 codes, the midpoints between adjacent codes (ties), one fp32 ulp either
   side of each midpoint, and random fp32 bit patterns. Then ``lowprec.quantize`` on the device against the same
   oracle. Counts of differing values (0 = bit-exact); out-of-range values are reported separately (torch's and
   lowprec's overflow rules are documented to differ for E5M2: lowprec saturates by default).
2. ``quantize_devices``: ``lowprec.quantize`` of one tensor on the device against the CPU (tested against the
   oracles elsewhere) for the formats and the block / channel / tensor scalings of the presets, nearest rounding:
   counts of differing bits. Stochastic rounding on the device: every draw is one of the two neighbours the CPU
   gives (round down / round up), and the mean of the draws is within 5 standard errors of x (unbiased).
3. ``gemm_accuracy``: ``lowprec.gemm.matmul`` of E4M3 x E4M3 and E5M2 x E4M3 tensor-scaled operands by the native
   path (``torch._scaled_mm``, cuBLAS with and without ``use_fast_accum``) and by the emulated path (fp32 matmul,
   TF32 off), each against the float64 product of the same grid values, for K = 256 ... 16384: relative
   Frobenius error and the largest error in units of the row's ``sum |a||b|``. Beside them the emulated narrow
   accumulators ``lowprec.accumulate`` offers (``e8m13`` in chunks of 32, nearest and toward zero), on a smaller
   M x N, to see which model of the tensor core's accumulation is closest.
4. ``timing``: CUDA-event medians (after warm-ups) of 8192^3 GEMMs (bf16, fp32, TF32, ``_scaled_mm``
   tensor-wise and row-wise, ``lowprec.gemm.matmul`` native and emulated with the operands already quantized)
   and of ``lowprec.quantize`` of 2^28 fp32 values against a device copy of the same bytes (the bandwidth floor).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
import traceback
from typing import Callable

import numpy as np
import torch

import lowprec
from lowprec import gemm, hardware
from lowprec.accumulate import matmul as acc_matmul

__all__ = ["main"]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device: str, warmup: int = 3, reps: int = 10) -> tuple[float, float, float]:
    """Median, min and max milliseconds of ``fn`` (CUDA events on a GPU, perf_counter on the CPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    for _ in range(reps):
        if device.startswith("cuda"):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t) * 1000)
    return statistics.median(out), min(out), max(out)


# ---------------------------------------------------------------------------------------------------- 1. casts
def _cast_inputs(name: str, n_random: int) -> np.ndarray:
    """fp32 inputs for format ``name``: codes, midpoints, midpoints +- 1 fp32 ulp, random bit patterns."""
    import ml_dtypes
    dt = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2}[name]
    codes = np.arange(256, dtype=np.uint8).view(dt).astype(np.float32)
    codes = np.unique(codes[np.isfinite(codes)])
    mids = ((codes[:-1].astype(np.float64) + codes[1:]) / 2).astype(np.float32)
    up = np.nextafter(mids, np.float32(np.inf))
    down = np.nextafter(mids, np.float32(-np.inf))
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, size=n_random, dtype=np.uint64).astype(np.uint32).view(np.float32)
    bits = bits[np.isfinite(bits)]
    vals = np.concatenate([codes, mids, up, down, bits, np.float32([0.0, -0.0])]).astype(np.float32)
    return vals


def _bits_differ(a: np.ndarray, b: np.ndarray) -> int:
    """Values whose fp32 bits differ, NaN == NaN (any payload)."""
    both_nan = np.isnan(a) & np.isnan(b)
    return int(((a.view(np.uint32) != b.view(np.uint32)) & ~both_nan).sum())


def section_casts(device: str, small: bool) -> dict:
    import ml_dtypes
    out = {}
    for name, tdt, mdt in (("e4m3", torch.float8_e4m3fn, ml_dtypes.float8_e4m3fn),
                           ("e5m2", torch.float8_e5m2, ml_dtypes.float8_e5m2)):
        x = _cast_inputs(name, 1 << (16 if small else 24))
        fmax = float(lowprec.get_format(name).max)
        oracle = x.astype(mdt).astype(np.float32)              # round to nearest, ties to even
        xd = torch.from_numpy(x).to(device)
        torch_cast = xd.to(tdt).float().cpu().numpy()
        lp = lowprec.quantize(xd, name).cpu().numpy()
        inr = np.abs(x) <= fmax
        out[name] = {
            "values": int(x.size), "in_range": int(inr.sum()),
            "torch_cast_vs_ml_dtypes_in_range": _bits_differ(torch_cast[inr], oracle[inr]),
            "lowprec_vs_ml_dtypes_in_range": _bits_differ(lp[inr], oracle[inr]),
            "lowprec_vs_torch_cast_in_range": _bits_differ(lp[inr], torch_cast[inr]),
            "out_of_range": int((~inr).sum()),
            "out_of_range_torch_cast_gives": sorted({str(v) for v in np.unique(np.abs(torch_cast[~inr]))})[:4],
            "out_of_range_lowprec_gives": sorted({str(v) for v in np.unique(np.abs(lp[~inr]))})[:4],
        }
        print(f"  {name}: {out[name]}")
    return out


# --------------------------------------------------------------------------------------- 2. quantize on devices
DEVICE_SPECS = ("e4m3", "e5m2", "e3m2", "e2m3", "e2m1", "int8", "int4", "bf16", "fp16", "e4m3:tensor",
                "e5m2:tensor", "e4m3:channel", "e4m3:block128", "e4m3:block128x128", "int4:channel", "int8:block32",
                "mxfp8", "mxfp6", "mxfp4", "mxfp8:scale_round=rceil", "nvfp4", "nvfp4:block16x16")


def section_quantize_devices(device: str, small: bool) -> dict:
    g = torch.Generator().manual_seed(3)
    rows = 256 if small else 4096
    x = torch.randn(rows, 512, generator=g) * torch.logspace(-6, 4, 512)
    x[0, :4] = torch.tensor([0.0, -0.0, 1e-40, -1e-40])
    xd = x.to(device)
    out = {}
    for sp in DEVICE_SPECS:
        try:
            c = lowprec.quantize(x, sp)
            d = lowprec.quantize(xd, sp).cpu()
            out[sp] = _bits_differ(c.numpy(), d.numpy())
        except Exception as exc:   # a spec this build cannot run is reported, not fatal
            out[sp] = f"{type(exc).__name__}: {str(exc)[:120]}"
    print(f"  nearest, {x.numel():,} values, differing bits device vs CPU: {out}")
    # stochastic: each draw is one of x's two grid neighbours (from ml_dtypes' codes), and the draws' mean is x
    import ml_dtypes
    draws = 256 if small else 4096
    base = torch.linspace(-3, 3, 97, dtype=torch.float64)   # inside every format's range below; includes codes
    res = {}
    for name, mdt in (("e4m3", ml_dtypes.float8_e4m3fn), ("e5m2", ml_dtypes.float8_e5m2),
                      ("e2m1", ml_dtypes.float4_e2m1fn)):
        codes = np.arange(16 if mdt is ml_dtypes.float4_e2m1fn else 256, dtype=np.uint8)
        grid = np.unique(np.abs(codes.view(mdt).astype(np.float64)))
        grid = torch.from_numpy(grid[np.isfinite(grid)])
        ax = base.abs()
        down = grid[torch.searchsorted(grid, ax, right=True) - 1] * base.sign()
        up = grid[torch.searchsorted(grid, ax, right=False)] * base.sign()
        xs = base.float().to(device).expand(draws, -1).contiguous()
        gd = torch.Generator(device=device).manual_seed(11)
        s = lowprec.quantize(xs, name, rounding="stochastic", generator=gd).cpu().double()
        neighbour = (s == down) | (s == up)
        p = ((base - down) / (up - down)).where(up != down, torch.zeros(()))
        se = (up - down).abs() * (p * (1 - p)).sqrt() / math.sqrt(draws)
        mean = s.mean(0)
        z = ((mean - base).abs() / se).where(se > 0, torch.zeros(()))
        res[name] = {"draws": draws, "inputs": base.numel(), "not_a_neighbour": int((~neighbour).sum()),
                     "max_z": float(z.max()), "grid_inputs_moved": int(((se == 0) & (s != base).any(0)).sum())}
    print(f"  stochastic on {device}: {res}")
    out["stochastic"] = res
    return out


# -------------------------------------------------------------------------------------------- 3. GEMM accuracy
def _operand(x: torch.Tensor, sp: str) -> gemm.Operand:
    q, s = lowprec.quantize_with_scale(x, sp)
    return gemm.Operand(q, s, lowprec.QuantSpec.parse(sp))


def _errors(y: torch.Tensor, ref: torch.Tensor, absdot: torch.Tensor) -> tuple[float, float]:
    d = (y.double() - ref)
    return float(d.norm() / ref.norm()), float((d.abs() / absdot.clamp_min(1e-300)).max())


def section_gemm_accuracy(device: str, small: bool) -> dict:
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    out = {}
    M = N = 256 if small else 1024
    Ks = (256, 1024) if small else (256, 1024, 4096, 16384)
    native = hardware.scaled_mm_ok(torch.device(device))
    try:
        for pair in (("e4m3:tensor", "e4m3:tensor"), ("e5m2:tensor", "e4m3:tensor")):
            for K in Ks:
                g = torch.Generator().manual_seed(K)
                a = _operand(torch.randn(M, K, generator=g).to(device), pair[0])
                b = _operand(torch.randn(K, N, generator=g).to(device), pair[1])
                ref = a.q.double() @ b.q.double()
                absdot = a.q.double().abs() @ b.q.double().abs()
                row = {"emulated_fp32": _errors(gemm.matmul(a, b, "emulated"), ref, absdot)}
                if native:
                    row["native"] = _errors(gemm.matmul(a, b, "native"), ref, absdot)
                    a8 = (a.q / a.scale).to(gemm.native_dtype(a.spec))
                    b8 = (b.q / b.scale).to(gemm.native_dtype(b.spec))
                    yf = torch._scaled_mm(a8, b8.t().contiguous().t(), scale_a=a.scale.float().reshape(()),
                                          scale_b=b.scale.float().reshape(()), out_dtype=torch.float32,
                                          use_fast_accum=True)
                    row["native_fast_accum"] = _errors(yf, ref, absdot)
                    row["native_vs_emulated_rel"] = float(
                        (gemm.matmul(a, b, "native") - gemm.matmul(a, b, "emulated")).norm()
                        / gemm.matmul(a, b, "emulated").norm())
                    # which emulated accumulator is closest to the fast-accum hardware result (a 128 x 128 corner)
                    m = 128
                    ac, bc = a.q[:m], b.q[:, :m]
                    hw = yf[:m, :m].double()
                    for acc in ("e8m13:chunk32", "e8m13:toward_zero:chunk32", "e8m13:chunk4", "fp32"):
                        y = acc_matmul(ac, bc, acc).double()   # a.q, b.q carry their scales
                        row[f"acc {acc} vs fast_accum rel"] = float((y - hw).norm() / hw.norm())
                        row[f"acc {acc} vs fp64 rel"] = float((y - ref[:m, :m]).norm() / ref[:m, :m].norm())
                    row["fast_accum vs fp64 rel (corner)"] = float((hw - ref[:m, :m]).norm() / ref[:m, :m].norm())
                out[f"{pair[0]} x {pair[1]} K={K}"] = row
                print(f"  {pair[0]} x {pair[1]}, M=N={M}, K={K}: " +
                      ", ".join(f"{k}={v[0]:.3g}/{v[1]:.3g}" if isinstance(v, tuple) else f"{k}={v:.3g}"
                                for k, v in row.items()))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    return out


# --------------------------------------------------------------------------------------------------- 4. timing
def section_timing(device: str, small: bool) -> dict:
    out = {}
    n = 256 if small else 8192
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, n, device=device, generator=g)
    w = torch.randn(n, n, device=device, generator=g)
    flops = 2 * n**3
    cases: dict[str, Callable[[], object]] = {}
    xb, wb = x.bfloat16(), w.bfloat16()
    cases["bf16 torch.mm"] = lambda: xb @ wb

    def fp32(tf32: bool) -> Callable[[], object]:
        def f():
            prev = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = tf32
            try:
                return x @ w
            finally:
                torch.backends.cuda.matmul.allow_tf32 = prev
        return f
    cases["fp32 torch.mm (TF32 off)"] = fp32(False)
    if device.startswith("cuda"):
        cases["fp32 torch.mm (TF32 on)"] = fp32(True)
    a = _operand(x, "e4m3:tensor")
    b = _operand(w, "e4m3:tensor")
    if hardware.scaled_mm_ok(torch.device(device)):
        a8, b8 = (a.q / a.scale).to(torch.float8_e4m3fn), (b.q / b.scale).to(torch.float8_e4m3fn).t().contiguous().t()
        sa, sb = a.scale.float().reshape(()), b.scale.float().reshape(())
        for fast in (False, True):
            cases[f"_scaled_mm e4m3 tensor-wise, fp32 out, fast_accum={fast}"] = (
                lambda fast=fast: torch._scaled_mm(a8, b8, scale_a=sa, scale_b=sb, out_dtype=torch.float32,
                                                   use_fast_accum=fast))
        cases["_scaled_mm e4m3 tensor-wise, bf16 out"] = (
            lambda: torch._scaled_mm(a8, b8, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16))
        if hardware.scaled_mm_ok(torch.device(device), rowwise=True):
            ra, rb = torch.ones(n, 1, device=device), torch.ones(1, n, device=device)
            cases["_scaled_mm e4m3 row-wise, fp32 out"] = (
                lambda: torch._scaled_mm(a8, b8, scale_a=ra, scale_b=rb, out_dtype=torch.float32))
            cases["_scaled_mm e4m3 row-wise, bf16 out"] = (
                lambda: torch._scaled_mm(a8, b8, scale_a=ra, scale_b=rb, out_dtype=torch.bfloat16))
        cases["lowprec.gemm.matmul native (casts operands each call)"] = lambda: gemm.matmul(a, b, "native")
    cases["lowprec.gemm.matmul emulated (fp32 mm)"] = lambda: gemm.matmul(a, b, "emulated")
    reps = 3 if small else 10
    for name, fn in cases.items():
        med, lo, hi = time_ms(fn, device, reps=reps)
        out[name] = {"ms": med, "min": lo, "max": hi, "TFLOP/s": flops / med / 1e9}
        print(f"  | {name} | {med:.3f} | {lo:.3f}-{hi:.3f} | {flops / med / 1e9:.1f} |")
    del x, w, xb, wb, a, b
    cases = {}
    # quantize bandwidth: 2^28 fp32 values read and written (2 GiB moved), against a copy of the same bytes
    nq = (1 << 22) if small else (1 << 28)
    v = torch.randn(nq, device=device, generator=g)
    moved = 2 * 4 * nq
    buf = torch.empty_like(v)
    copy_ms = time_ms(lambda: buf.copy_(v), device, reps=reps)[0]
    out["copy"] = {"ms": copy_ms, "GB/s": moved / copy_ms / 1e6}
    print(f"  copy of {nq:,} fp32: {copy_ms:.3f} ms = {moved / copy_ms / 1e6:.0f} GB/s (read + write)")
    gq = torch.Generator(device=device).manual_seed(1)
    for sp in ("e4m3", "e4m3:tensor", "e4m3:stochastic", "mxfp8", "nvfp4", "bf16:stochastic"):
        try:
            ms = time_ms(lambda sp=sp: lowprec.quantize(v, sp, generator=gq if "stochastic" in sp else None),
                         device, warmup=2, reps=reps)
            out[f"quantize {sp}"] = {"ms": ms[0], "min": ms[1], "max": ms[2], "of_copy_floor": copy_ms / ms[0]}
            print(f"  | quantize {sp} | {ms[0]:.2f} | {ms[1]:.2f}-{ms[2]:.2f} | {copy_ms / ms[0]:.1%} of copy |")
        except Exception as exc:
            out[f"quantize {sp}"] = f"{type(exc).__name__}: {str(exc)[:160]}"
            print(f"  quantize {sp}: {out[f'quantize {sp}']}")
    try:   # the compiled quantizer (inductor: Triton on a GPU)
        t0 = time.perf_counter()
        cq = lowprec.compiled_quantizer("e4m3")
        cq(v)
        _sync(device)
        compile_s = time.perf_counter() - t0
        ms = time_ms(lambda: cq(v), device, warmup=2, reps=reps)
        same = bool(torch.equal(cq(v[:1 << 20]), lowprec.quantize(v[:1 << 20], "e4m3")))
        out["compiled_quantizer e4m3"] = {"ms": ms[0], "of_copy_floor": copy_ms / ms[0], "compile_s": compile_s,
                                          "equal_to_eager": same}
        print(f"  | compiled_quantizer e4m3 | {ms[0]:.2f} | {copy_ms / ms[0]:.1%} of copy | compile "
              f"{compile_s:.1f} s, equal to eager: {same} |")
    except Exception as exc:
        out["compiled_quantizer e4m3"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        print(f"  compiled_quantizer: {out['compiled_quantizer e4m3']}")
    return out


SECTIONS = {"casts": section_casts, "quantize_devices": section_quantize_devices,
            "gemm_accuracy": section_gemm_accuracy, "timing": section_timing}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="small sizes (a dry run)")
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA GPU here (use --device cpu --small for a dry run)")
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU"
    print(f"device {args.device} ({name}), torch {torch.__version__}, lowprec.hardware:")
    print(hardware.report())
    results: dict = {"device": name, "torch": torch.__version__,
                     "probe": {k: list(v) for k, v in hardware.probe().items()}}
    for s in args.sections:
        print(f"\n## {s}")
        t = time.perf_counter()
        try:
            results[s] = SECTIONS[s](args.device, args.small)
        except Exception:   # one section's failure is reported; the others still run
            results[s] = {"error": traceback.format_exc()}
            print(results[s]["error"])
        print(f"  ({time.perf_counter() - t:.1f} s)")
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
