"""Overhead of lowprec in training on CPU: convert() forward+backward and the wrapped optimizer step.

    python benchmarks/bench_training.py [--threads 1] [--reps 10] [--d 256] [--seq 128] [--batch 8] [--big 2048]

Prints min and median wall times (cases interleaved round-robin) and ratios of the minima against the fp32 /
plain-optimizer baselines. ``--big D`` adds optimizer steps on four D x D linear layers (2048: 16.8M parameters,
where the per-element cost of the wrapper dominates its per-parameter Python overhead); 0 leaves them out.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from lowprec.nn import convert
from lowprec.optim import wrap
from lowprec.telemetry import Telemetry


class Block(nn.Module):
    """One pre-norm GPT block (attention + 4x MLP)."""

    def __init__(self, d: int, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=-1)
        q, k, v = (t.view(B, T, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, D)
        x = x + self.proj(a)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--big", type=int, default=2048)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = Block(args.d)
    x = torch.randn(args.batch, args.seq, args.d)
    n_params = sum(p.numel() for p in base.parameters())
    print(f"block d={args.d} seq={args.seq} batch={args.batch} params={n_params} threads={args.threads} "
          f"torch={torch.__version__}")

    def fwd_bwd(model, tel=None):
        def run():
            model.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
            if tel is not None:
                tel.next_step()      # wrap() does this in training; here there is no optimizer
        return run

    # every case is timed round-robin (one call of each per round) so that load from other processes hits all
    # cases alike; the table reports the minimum over rounds (least disturbed) and the median
    cases: list[tuple[str, str, object]] = [("fwd+bwd fp32 (nn.Linear)", "fwd", fwd_bwd(base))]
    for policy, backend, tel in [("fp8-hybrid", "emulated", None), ("fp8-hybrid", "native", None),
                                 ("mxfp8", "emulated", None), ("nvfp4", "emulated", None),
                                 ("fp8-hybrid", "emulated", Telemetry(every=1)),
                                 ("fp8-hybrid", "emulated", Telemetry(every=100))]:
        model = convert(copy.deepcopy(base), policy, backend=backend, telemetry=tel)
        label = f"fwd+bwd {policy} {backend}" + (f" telemetry every={tel.every}" if tel else "")
        cases.append((label, "fwd", fwd_bwd(model, tel)))

    def adamw(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(m.parameters(), lr=1e-3)

    def wrapped(policy: str, tel: Telemetry | None = None):
        return lambda m: wrap(adamw(m), policy, telemetry=tel)

    def opt_step(make, model=None):
        model = copy.deepcopy(base) if model is None else model
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        return make(model).step

    cases.append(("AdamW step (plain)", "opt", opt_step(adamw)))
    for policy, tel in (("fp32", None), ("fp8-states", None), ("fp8-all", None), ("fp8-all", Telemetry(every=1)),
                        ("fp8-all", Telemetry(every=100))):
        label = f"AdamW step wrap({policy})" + (f" telemetry every={tel.every}" if tel else "")
        cases.append((label, "opt", opt_step(wrapped(policy, tel))))

    if args.big:
        big = nn.Sequential(*(nn.Linear(args.big, args.big) for _ in range(4)))
        n_big = sum(p.numel() for p in big.parameters())
        cases.append((f"AdamW step (plain) {n_big / 1e6:.1f}M", "big",
                      opt_step(adamw, copy.deepcopy(big))))
        for policy in ("fp8-states", "fp8-all"):
            cases.append((f"AdamW step wrap({policy}) {n_big / 1e6:.1f}M", "big",
                          opt_step(wrapped(policy), copy.deepcopy(big))))
        del big

    for _, _, fn in cases:   # warm-up
        fn()
    times: list[list[float]] = [[] for _ in cases]
    for _ in range(args.reps):
        for i, (_, _, fn) in enumerate(cases):
            t0 = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t0)
    kinds = [c[1] for c in cases]
    base_t = {k: min(times[kinds.index(k)]) for k in dict.fromkeys(kinds)}  # the first case of each kind
    width = max(len(c[0]) for c in cases)
    print(f"{'case':<{width}}  {'min ms':>9}  {'median ms':>9}  {'ratio (min)':>11}")
    for (label, kind, _), ts in zip(cases, times):
        print(f"{label:<{width}}  {min(ts) * 1e3:>9.2f}  {statistics.median(ts) * 1e3:>9.2f}  "
              f"{min(ts) / base_t[kind]:>10.2f}x")


if __name__ == "__main__":
    main()
