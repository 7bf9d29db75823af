"""Time one optimizer step of StoSignSGD, Signum, SignSGD and torch.optim.AdamW(foreach=True), side by side.

    python benchmarks/bench_optimizers.py                 # 4 tensors of 4M = 16M parameters, 1 thread
    python benchmarks/bench_optimizers.py --tensors 4 --numel 4194304 --threads 2 --repeats 10

Each optimizer gets fresh gradients once (steps reuse them), two warm-up steps, then the median of --repeats timed
steps. Ratios are against AdamW. State bytes per parameter are read from the optimizer's state after the run.
"""
import argparse
import statistics
import time

import torch

from stosign import SignSGD, StoSignSGD


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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
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
        "StoSignSGD(foreach=True)": lambda: StoSignSGD(params, lr=1e-3, weight_decay=wd, foreach=True),
        "Signum": lambda: SignSGD(params, lr=1e-3, momentum=0.9, weight_decay=wd),
        "SignSGD": lambda: SignSGD(params, lr=1e-3, weight_decay=wd),
    }
    rows = []
    for name, make in makers.items():
        opt = make()
        for _ in range(2):
            opt.step()
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t0)
        rows.append((name, statistics.median(times) * 1e3, min(times) * 1e3, state_bytes_per_param(opt, numel)))
        del opt
    base = rows[0][1]
    print(f"{numel / 1e6:.1f}M parameters ({args.tensors} x {args.numel}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), weight_decay={wd}")
    print(f"{'optimizer':<26}{'median ms':>10}{'min ms':>9}{'vs AdamW':>10}{'state B/param':>15}")
    for name, med, mn, sb in rows:
        print(f"{name:<26}{med:>10.1f}{mn:>9.1f}{med / base:>9.2f}x{sb:>15.1f}")


if __name__ == "__main__":
    main()
