"""Quantizer speed, side by side: lowprec vs qtorch's float_quantize vs torch's native float8 cast round trip.

    python benchmarks/bench_quantize.py            # 16M fp32 elements, 1 thread, median of 7 interleaved rounds
    python benchmarks/bench_quantize.py --n 4000000 --threads 2 --no-compile
    python benchmarks/bench_quantize.py --bandwidth-only   # only the memory-bandwidth table (issue 10's target)
    python benchmarks/bench_quantize.py --bandwidth-only --cpu-time   # process CPU time (a shared machine)

Prints two markdown tables. The first: milliseconds, "x" columns are speed-ups of lowprec over the peer (>1 =
faster); qtorch's first import JIT-compiles its C++ extension (~20 s, not timed). The second: ``lowprec.quantize``
(nearest e4m3, stochastic e4m3, mxfp8, nvfp4; fp32 in, fp32 out) as a fraction of this machine's memory-bandwidth
floor, the time of a plain ``out.copy_(x)`` of the same tensor (the same read + write bytes), measured in the same
rounds: median and spread (min-max) over the rounds; the targets are >= 50% nearest and >= 25% stochastic (random
bits included). Each quantizer runs twice per round, by default (the compiled fast path of ``lowprec.fast`` for these
sizes) and eager (``set_fast_path(False)``); a ``clone`` row shows the floor of an op that returns a new tensor
(first-touch page faults of the fresh 64 MiB), the next the same onto transparent huge pages (how ``lowprec.fast``
allocates its results), and two rows the random bits alone: the eager draw (torch's CPU generator) and the same
words by ``lowprec.fast``'s native mt19937 (the fused stochastic kernel draws them in-loop, without a buffer).
On a shared machine use ``--cpu-time`` (this process's CPU time; page faults count, as system time).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

import lowprec
from lowprec.fast import _empty, _native_random_bits, set_fast_path
from lowprec.rounding import random_bits


CLOCK = [time.perf_counter]  # --cpu-time: time.process_time (this process's CPU time, on a shared machine)


def timer(fn: Callable[[], object]) -> float:
    t = CLOCK[0]()
    fn()
    return (CLOCK[0]() - t) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16 * 1024 * 1024)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument("--no-qtorch", action="store_true")
    ap.add_argument("--bandwidth-only", action="store_true", help="only the memory-bandwidth floor table")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time by this process's CPU time (time.process_time) instead of wall clock: other "
                         "processes on a shared machine then cost nothing (page faults, as system time, still count)")
    args = ap.parse_args()
    if args.cpu_time:
        CLOCK[0] = time.process_time
    torch.set_num_threads(args.threads)
    x = torch.randn(args.n, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    if args.bandwidth_only:
        bandwidth_table(x, g, args.rounds, args.threads)
        return

    qtorch_fq = None
    if not args.no_qtorch:
        from qtorch.quant import float_quantize as qtorch_fq  # JIT-compiles on first import

    def lp(spec: str, rounding: str = "nearest") -> Callable[[], object]:
        return lambda: lowprec.quantize(x, spec, rounding=rounding, generator=g)

    def qt(e: int, m: int, rounding: str) -> Callable[[], object] | None:
        return None if qtorch_fq is None else (lambda: qtorch_fq(x, e, m, rounding=rounding))

    def native(dt: torch.dtype) -> Callable[[], object]:
        return lambda: x.to(dt).to(torch.float32)

    rows: list[tuple[str, Callable | None, Callable | None, Callable | None]] = [
        ("e4m3 nearest", lp("e4m3"), qt(4, 3, "nearest"), native(torch.float8_e4m3fn)),
        ("e5m2 nearest", lp("e5m2"), qt(5, 2, "nearest"), native(torch.float8_e5m2)),
        ("e2m1 nearest (emulated)", lp("e2m1"), qt(2, 1, "nearest"), None),
        ("bf16 nearest", lp("bf16"), qt(8, 7, "nearest"), native(torch.bfloat16)),
        ("e4m3 stochastic", lp("e4m3", "stochastic"), qt(4, 3, "stochastic"), None),
        ("e5m2 stochastic", lp("e5m2", "stochastic"), qt(5, 2, "stochastic"), None),
        ("e2m1 stochastic", lp("e2m1", "stochastic"), qt(2, 1, "stochastic"), None),
        ("bf16 stochastic", lp("bf16", "stochastic"), qt(8, 7, "stochastic"), None),
        ("mxfp8 (block 32, E8M0)", lp("mxfp8"), None, None),
        ("mxfp4 (block 32, E8M0)", lp("mxfp4"), None, None),
        ("nvfp4 (block 16, E4M3 + fp32)", lp("nvfp4"), None, None),
        ("torch.rand (reference)", lambda: torch.rand(args.n, generator=g), None, None),
    ]
    if not args.no_compile:
        for spec_, rnd in (("e4m3", "stochastic"), ("e2m1", "stochastic"), ("e2m1", "nearest")):
            fn = lowprec.compiled_quantizer(spec_, rounding=rnd)
            t0 = time.perf_counter()
            fn(x)
            print(f"lowprec.compiled_quantizer({spec_!r}, rounding={rnd!r}): first call (compile) "
                  f"{time.perf_counter() - t0:.1f} s")
            qt_ = qt(*((4, 3) if spec_ == "e4m3" else (2, 1)), rnd)
            rows.append((f"{spec_} {rnd} (torch.compile)", (lambda f=fn: f(x)), qt_, None))

    times: dict[int, list[list[float]]] = {i: [[], [], []] for i in range(len(rows))}
    for _ in range(2):  # warm up
        for _, *fns in rows:
            for f in fns:
                if f is not None:
                    f()
    for _ in range(args.rounds):  # interleaved so that load changes hit every column alike
        for i, (_, *fns) in enumerate(rows):
            for j, f in enumerate(fns):
                if f is not None:
                    times[i][j].append(timer(f))

    def med(v: list[float]) -> float | None:
        return statistics.median(v) if v else None

    def fmt(v: float | None, suffix: str = "") -> str:
        return "—" if v is None else f"{v:.1f}{suffix}"

    print(f"\n{args.n:,} fp32 elements, torch {torch.__version__}, {args.threads} thread(s), "
          f"median of {args.rounds} rounds, ms")
    print("| operation | lowprec | qtorch | torch native cast | vs qtorch | vs native |")
    print("|---|---:|---:|---:|---:|---:|")
    for i, (name, *_) in enumerate(rows):
        a, b, c = (med(times[i][j]) for j in range(3))
        print(f"| {name} | {fmt(a)} | {fmt(b)} | {fmt(c)} | {fmt(b / a if a and b else None, '×')} | "
              f"{fmt(c / a if a and c else None, '×')} |")
    bandwidth_table(x, g, args.rounds, args.threads)


def bandwidth_table(x: torch.Tensor, g: torch.Generator, rounds: int, threads: int) -> None:
    """lowprec.quantize as a fraction of the memory-bandwidth floor (a plain copy of the same bytes), per round."""
    out = torch.empty_like(x)

    def eager(f: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            set_fast_path(False)
            try:
                return f()
            finally:
                set_fast_path(True)
        return run

    ops: list[tuple[str, Callable[[], object]]] = [
        ("copy (floor)", lambda: out.copy_(x)),
        ("clone (copy into a new tensor, as every quantize result is)", lambda: x.clone()),
        ("clone onto huge pages (lowprec.fast._empty + copy: the fast path's fresh-output floor)",
         lambda: _empty(x.shape, x.dtype).copy_(x)),
        ("random bits of stochastic rounding (lowprec.rounding.random_bits)",
         lambda: random_bits(x.shape, x.device, g)),
        ("the same random bits, native mt19937 draws (lowprec.fast, into a huge-page buffer)",
         lambda: _native_random_bits(x.shape, g)),
    ]
    for name, f in (("e4m3 nearest", lambda: lowprec.quantize(x, "e4m3")),
                    ("e4m3 stochastic", lambda: lowprec.quantize(x, "e4m3", rounding="stochastic", generator=g)),
                    ("mxfp8", lambda: lowprec.quantize(x, "mxfp8")),
                    ("nvfp4", lambda: lowprec.quantize(x, "nvfp4"))):
        ops += [(name, f), (f"{name} (eager, fast path off)", eager(f))]
    for _, f in ops:  # warm up
        f()
    times: list[list[float]] = [[] for _ in ops]
    for _ in range(max(rounds, 3)):  # interleaved: a load change hits the floor and the quantizers alike
        for i, (_, f) in enumerate(ops):
            times[i].append(timer(f))
    nbytes = 2 * x.numel() * x.element_size()  # read x, write the result
    floor = times[0]
    clock = "process CPU time" if CLOCK[0] is time.process_time else "wall clock"
    print(f"\nmemory-bandwidth floor: {x.numel():,} fp32 values, read + write {nbytes / 2**20:.0f} MiB, "
          f"{threads} thread(s), {len(floor)} rounds, {clock}; floor = plain copy, "
          f"{nbytes / statistics.median(floor) / 1e6:.2f} GB/s (median)")
    print("| operation | ms (median) | ms (min-max) | fraction of floor (median) | fraction (min-max, per round) |")
    print("|---|---:|---:|---:|---:|")
    for (name, _), t in zip(ops, times):
        fr = [f / q for f, q in zip(floor, t)]  # per round: floor time / op time
        print(f"| {name} | {statistics.median(t):.1f} | {min(t):.1f}-{max(t):.1f} | "
              f"{statistics.median(fr):.0%} | {min(fr):.0%}-{max(fr):.0%} |")


if __name__ == "__main__":
    main()
