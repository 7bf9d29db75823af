"""Time one optimizer step of StoSignSGD, Signum, SignSGD, Lion and torch.optim.AdamW(foreach=True), side by side.

    python benchmarks/bench_optimizers.py                 # 4 tensors of 4M = 16M parameters, 1 thread
    python benchmarks/bench_optimizers.py --tensors 4 --numel 4194304 --threads 2 --repeats 10

Each optimizer gets fresh gradients once (steps reuse them), two warm-up steps (they include StoSignSGD's one-time
torch.compile of its fused CPU step), then the median of --repeats timed steps. "StoSignSGD" is the default (the
fused step, see stosign.fused); "(fused=False)" and "(foreach=True)" are the eager paths, bit-identical to it.
Ratios are against AdamW. State bytes per parameter are read from the optimizer's state after the run.

Then the wrapped optimizer (``lowprec.optim.wrap(AdamW(foreach=True), policy)``: grad quantize -> state decode ->
AdamW step -> master rounding -> state encode) on the same parameters and on a tiny-GPT-like set of small tensors
(``--small``: 2-layer d_model 64 shapes, where per-tensor overhead dominates), without telemetry and with a
``Telemetry`` on unsampled steps, exact and deferred NaN checks (``--wrapped ''`` skips this part).
"""
import argparse
import math
import statistics
import time

import torch

from stosign import Lion, SignSGD, StoSignSGD

_clock = time.perf_counter

# parameter shapes of the study's tiny GPT (studies task "gpt": vocab 103, context 32, d_model 64, 2 layers; 29 tensors,
# 115k parameters), in its parameter order
GPT_SHAPES = [(103, 64), (32, 64)] + [(64,), (64,), (192, 64), (192,), (64, 64), (64,), (64,), (64,), (256, 64),
                                      (256,), (64, 256), (64,)] * 2 + [(64,), (64,), (103, 64)]

# parameter shapes of the default tiny GPT (d_model 64, 2 layers, vocab 256, context 64): many small tensors
SMALL_SHAPES = [(256, 64), (64, 64)] + [(64,), (64,), (192, 64), (192,), (64, 64), (64,), (64,), (64,),
                                        (256, 64), (256,), (64, 256), (64,)] * 2 + [(64,), (64,)]


def state_bytes_per_param(opt: torch.optim.Optimizer, numel: int) -> float:
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    return total / numel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tensors", type=int, default=4)
    ap.add_argument("--numel", type=int, default=4 * 1024 * 1024, help="elements per tensor")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--cpu-time", action="store_true",
                    help="time with this process's CPU time instead of wall time (steadier on a shared machine)")
    ap.add_argument("--wrapped", default="fp8-states,fp8-all",
                    help="comma-separated lowprec policies to time wrapped around AdamW ('' to skip)")
    ap.add_argument("--wrapped-only", action="store_true",
                    help="only the wrapped step on the study's tiny-GPT shapes against plain torch AdamW (the "
                         "study's AdamW: foreach=None, torch's per-tensor loop on CPU), fused and fused=False, "
                         "with the study's Telemetry(every=10); median and spread of --repeats repeats")
    ap.add_argument("--steps", type=int, default=20, help="--wrapped-only: steps per repeat")
    args = ap.parse_args()
    global _clock
    _clock = time.process_time if args.cpu_time else time.perf_counter
    torch.set_num_threads(args.threads)
    if args.wrapped_only:
        wrapped_gpt([p for p in args.wrapped.split(",") if p], max(args.repeats, 3), args.steps)
        return
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(args.numel)) for _ in range(args.tensors)]
    grads = [torch.randn(args.numel) for _ in range(args.tensors)]
    for p, g in zip(params, grads):
        p.grad = g
    numel = args.tensors * args.numel
    wd = args.weight_decay
    makers = {
        "AdamW(foreach=True)": lambda: torch.optim.AdamW(params, lr=1e-3, weight_decay=wd, foreach=True),
        "StoSignSGD": lambda: StoSignSGD(params, lr=1e-3, weight_decay=wd),
        "StoSignSGD(fused=False)": lambda: StoSignSGD(params, lr=1e-3, weight_decay=wd, fused=False),
        "StoSignSGD(foreach=True)": lambda: StoSignSGD(params, lr=1e-3, weight_decay=wd, foreach=True, fused=False),
        "Signum": lambda: SignSGD(params, lr=1e-3, momentum=0.9, weight_decay=wd),
        "SignSGD": lambda: SignSGD(params, lr=1e-3, weight_decay=wd),
        "Lion": lambda: Lion(params, lr=1e-4, weight_decay=wd),
    }
    rows = []
    for name, make in makers.items():
        opt = make()
        for _ in range(2):
            opt.step()
        times = []
        for _ in range(args.repeats):
            t0 = _clock()
            opt.step()
            times.append(_clock() - t0)
        rows.append((name, statistics.median(times) * 1e3, min(times) * 1e3, state_bytes_per_param(opt, numel)))
        del opt
    base = rows[0][1]
    print(f"{numel / 1e6:.1f}M parameters ({args.tensors} x {args.numel}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), weight_decay={wd}, {'CPU' if args.cpu_time else 'wall'} time")
    print(f"{'optimizer':<26}{'median ms':>10}{'min ms':>9}{'vs AdamW':>10}{'state B/param':>15}")
    for name, med, mn, sb in rows:
        print(f"{name:<26}{med:>10.1f}{mn:>9.1f}{med / base:>9.2f}x{sb:>15.1f}")
    policies = [p for p in args.wrapped.split(",") if p]
    if policies:
        wrapped_rows(params, policies, args.repeats, wd, f"{numel / 1e6:.1f}M parameters")
        torch.manual_seed(0)
        small = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in SMALL_SHAPES]
        for p in small:
            p.grad = torch.randn(p.shape) * 1e-3
        n_small = sum(p.numel() for p in small)
        wrapped_rows(small, policies, max(args.repeats, 20), wd,
                     f"tiny GPT shapes ({len(small)} tensors, {n_small / 1e3:.0f}k parameters)")


def _time_steps(opt: torch.optim.Optimizer, repeats: int) -> list[float]:
    for _ in range(2):
        opt.step()
    times = []
    for _ in range(repeats):
        t0 = _clock()
        opt.step()
        times.append(_clock() - t0)
    return times


def wrapped_rows(params: list[torch.nn.Parameter], policies: list[str], repeats: int, wd: float, what: str) -> None:
    """Median ms per step of AdamW(foreach) alone and wrapped by lowprec under each policy (with and without an
    unsampled Telemetry). The parameters are re-randomised from a fixed seed before each optimizer."""
    import lowprec.optim
    from lowprec.telemetry import Telemetry

    init = [p.detach().clone() for p in params]

    def adamw() -> torch.optim.Optimizer:
        with torch.no_grad():
            for p, v in zip(params, init):
                p.copy_(v)
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=wd, foreach=True)

    rows = [("AdamW(foreach=True)", statistics.median(_time_steps(adamw(), repeats)) * 1e3)]
    for policy in policies:
        rows.append((f"wrap({policy})", statistics.median(_time_steps(lowprec.optim.wrap(adamw(), policy),
                                                                      repeats)) * 1e3))
        for label, check in (("telemetry", True), ("telemetry(deferred)", "deferred")):
            # step 0 is sampled: the warm-up steps pass it, the timed ones are not
            tel = Telemetry(every=10 ** 9, check_nonfinite=check)
            rows.append((f"wrap({policy}) + {label}", statistics.median(_time_steps(
                lowprec.optim.wrap(adamw(), policy, telemetry=tel), repeats)) * 1e3))
    print(f"wrapped AdamW, {what}:")
    print(f"{'optimizer':<36}{'median ms':>10}{'vs AdamW':>10}")
    for name, med in rows:
        print(f"{name:<36}{med:>10.2f}{med / rows[0][1]:>9.2f}x")


def wrapped_gpt(policies: list[str], repeats: int, steps: int) -> None:
    """Per-step ms of ``wrap(AdamW(...), policy, telemetry=Telemetry(every=10))`` on the study's tiny-GPT shapes
    (fresh gradients of mixed magnitudes each step, lr 3e-3, betas (0.9, 0.95) as the study uses), fused and
    ``fused=False``, against plain ``torch.optim.AdamW`` (no wrapper) measured in the same run. Each repeat times
    ``steps`` consecutive steps (sampled and unsampled ones in the study's 1:9 mix) after warm-up steps; the
    table gives the median over repeats and the spread (min-max over repeats)."""
    import lowprec.optim
    from lowprec.telemetry import Telemetry

    torch.manual_seed(0)
    init = [torch.randn(s) * 0.02 for s in GPT_SHAPES]
    g = torch.Generator().manual_seed(1)
    grads = [[torch.randn(s, generator=g) * 10.0 ** (i % 3 - 4) for i, s in enumerate(GPT_SHAPES)]
             for _ in range(steps)]

    def make(policy: str | None, fused: bool, check) -> torch.optim.Optimizer:
        params = [torch.nn.Parameter(v.clone()) for v in init]
        opt = torch.optim.AdamW(params, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
        if policy is not None:
            opt = lowprec.optim.wrap(opt, policy, fused=fused,
                                     telemetry=Telemetry(every=10, check_nonfinite=check))
        return opt

    def run(opt: torch.optim.Optimizer, n: int) -> tuple[float, float]:
        """(mean, median) ms per step over ``n`` steps (the median is an unsampled step's)."""
        params = [p for grp in opt.param_groups for p in grp["params"]]
        ts = []
        for k in range(n):
            for p, gr in zip(params, grads[k % steps]):
                p.grad = gr.clone()
            t0 = _clock()
            opt.step()
            ts.append(_clock() - t0)
        return sum(ts) / n * 1e3, statistics.median(ts) * 1e3

    cases = [("torch AdamW (plain)", None, True, True)]
    for policy in policies:
        cases += [(f"wrap({policy})", policy, True, True), (f"wrap({policy}) deferred", policy, True, "deferred"),
                  (f"wrap({policy}) fused=False", policy, False, True)]
    opts = [make(pol, fused, check) for _, pol, fused, check in cases]
    for opt in opts:
        run(opt, 3)                                  # warm-up (first states, caches)
    times: list[list[tuple[float, float]]] = [[] for _ in cases]
    for _ in range(repeats):                         # interleaved: every case sees the same machine load
        for i, opt in enumerate(opts):
            times[i].append(run(opt, steps))
    print(f"wrapped AdamW step, study tiny-GPT shapes ({len(GPT_SHAPES)} tensors, "
          f"{sum(math.prod(s) for s in GPT_SHAPES) / 1e3:.0f}k parameters), Telemetry(every=10), {steps} steps x "
          f"{repeats} repeats, {torch.get_num_threads()} thread(s), "
          f"{'process CPU' if _clock is time.process_time else 'wall'} time")
    print("per repeat: the mean step (1 sampled in 10) and the median step (an unsampled one); the table: the "
          "median over repeats [min-max over repeats]")
    base = [statistics.median(t[j] for t in times[0]) for j in (0, 1)]
    print(f"{'optimizer':<36}{'mean ms':>9}{'[min-max]':>14}{'median ms':>11}{'[min-max]':>14}{'vs AdamW':>10}")
    for (name, *_), ts in zip(cases, times):
        cols = []
        for j in (0, 1):
            v = [t[j] for t in ts]
            cols += [f"{statistics.median(v):>9.2f}", f"{f'[{min(v):.2f}-{max(v):.2f}]':>14}"]
        med = statistics.median(t[1] for t in ts)
        print(f"{name:<36}{cols[0]}{cols[1]}  {cols[2]}{cols[3]}{med / base[1]:>9.2f}x")

if __name__ == "__main__":
    main()
