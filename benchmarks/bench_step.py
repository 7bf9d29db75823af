"""Full training step of the study's tiny GPT, through the project's runner, against eager PyTorch (issue 10).

    python benchmarks/bench_step.py                      # default tiny GPT (d_model 64), 1 thread, 5 repeats
    python benchmarks/bench_step.py --d-model 256        # the larger size
    python benchmarks/bench_step.py --cpu-time           # process CPU time instead of wall time (shared machine)
    python benchmarks/bench_step.py --precisions fp32 fp8-all --repeats 7 --steps 20
    python benchmarks/bench_step.py --d-model 256 --no-fast  # lowprec.fast off: the eager quantizers (before)
    python benchmarks/bench_step.py --device cuda --engines eager   # on a GPU: native FP8 GEMMs where possible

One case per precision: ``studies.training.setup`` builds the lm task (``gpt``, size ``default``; ``--d-model``
changes only the width) with ``lowprec.nn.convert`` and the wrapped registry AdamW, and a repeat times
``--steps`` consecutive calls of ``studies.training.train_step`` (forward, loss read for divergence detection,
backward, grad norm, wrapped optimizer step, and, on the telemetry-sampled steps, the update ratio and telemetry
columns: every ``telemetry_every`` = 10 steps, so the default 10 steps include one sampled step). Evaluation
(every 25 steps in the study) is not part of a step and not timed. The baseline ("eager") is the same fp32 model
(same seed, same batches) trained with ``torch.optim.AdamW`` in a plain loop: zero_grad, loss, backward, step.

``--device cuda``: model, data and optimizer on the GPU (``studies.training.OnDevice``: the quantized GEMMs take
``torch._scaled_mm`` where the spec allows), the baseline on the GPU too; each repeat ends with a device
synchronisation, so its time includes the queued kernels.

Cases are interleaved round-robin (a load change hits all alike); ms per step is the repeat's time / steps.
Prints per case the median and spread (min-max) over the repeats and the ratio of medians to the eager baseline
(also the ratio per repeat, min-max, each against the same round's baseline).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from typing import Callable

import torch

import studies.tasks as tasks_mod
from lowprec import hardware
from lowprec.fast import fast_path_enabled, set_fast_path
from studies.config import RunSpec
from studies.finalize import cpu_model
from studies.training import OnDevice, Parallel, setup, train_step

__all__ = ["main"]

ISSUE_TARGETS = {"fp32": 0.7, "fp8-all": 1.3, "nvfp4": 1.8, "mxfp8": 1.5}


def _sized_get_task(d_model: int | None) -> Callable:
    """``studies.tasks.get_task`` with the lm task's ``d_model`` replaced (heads and the rest unchanged)."""
    orig = tasks_mod.get_task

    def get_task(name: str, **kw):
        task = orig(name, **kw)
        if d_model is None:
            return task
        return dataclasses.replace(task, config={**task.config, "d_model": d_model})
    return get_task


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def runner_case(precision: str, steps: int, lr: float, engine: str = "eager",
                device: str = "cpu") -> Callable[[], None]:
    """A repeat of ``steps`` runner steps (the step counter keeps running, so batches and sampling advance)."""
    spec = RunSpec(task="gpt", optimizer="adamw", precision=precision, lr=lr, seed=0, steps=10**6, engine=engine)
    run = setup(spec, Parallel() if device == "cpu" else OnDevice(device))
    counter = [0]

    def rep() -> None:
        for _ in range(steps):
            train_step(run, counter[0])
            counter[0] += 1
        _sync(device)
    return rep


def eager_case(steps: int, lr: float, device: str = "cpu") -> Callable[[], None]:
    """The same fp32 model and batches, torch.optim.AdamW (default foreach) in a plain loop."""
    task = tasks_mod.get_task("gpt")
    trun = task.build(0, device=device)
    opt = torch.optim.AdamW(trun.model.parameters(), lr=lr)
    counter = [0]

    def rep() -> None:
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            trun.train_loss(counter[0]).backward()
            opt.step()
            counter[0] += 1
        _sync(device)
    return rep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=None, help="width of the tiny GPT (default: the task's, 64)")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "fp8-all", "nvfp4", "mxfp8"])
    ap.add_argument("--engines", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"],
                    help="runner engines to time (studies.training; compiled: torch.compile'd forward+backward)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10, help="training steps per repeat (10: one sampled step)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed repeats per case first (compiles, caches)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cpu-time", action="store_true", help="process CPU time instead of wall time")
    ap.add_argument("--no-fast", action="store_true", help="turn lowprec's compiled fast path off (eager only)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the model trains (default cpu)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA GPU here")
    if args.repeats < 3 or args.steps < 1:
        ap.error("--repeats must be >= 3 and --steps >= 1")
    torch.set_num_threads(args.threads)
    if args.no_fast:
        set_fast_path(False)
    tasks_mod.get_task = _sized_get_task(args.d_model)  # setup() looks get_task up in studies.tasks at call time
    clock = time.process_time if args.cpu_time else time.perf_counter
    lr = 3e-3
    cases: list[tuple[str, Callable[[], None]]] = [("eager fp32 + torch.optim.AdamW",
                                                     eager_case(args.steps, lr, args.device))]
    for e in args.engines:
        for p in args.precisions:
            cases.append((f"runner {e} {p}", runner_case(p, args.steps, lr, e, args.device)))
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        for _, f in cases:
            f()
    warm_s = time.perf_counter() - t0
    times: list[list[float]] = [[] for _ in cases]
    for _ in range(args.repeats):
        for i, (_, f) in enumerate(cases):
            t = clock()
            f()
            times[i].append((clock() - t) * 1000 / args.steps)
    d = args.d_model or tasks_mod.get_task("gpt").config["d_model"]
    n_params = sum(p.numel() for p in tasks_mod.get_task("gpt").build(0).model.parameters())
    print(f"tiny GPT d_model={d} ({n_params:,} params), {args.threads} thread(s), torch {torch.__version__}, "
          f"{'CPU' if args.cpu_time else 'wall'} time, {args.repeats} repeats x {args.steps} steps "
          f"(interleaved), warm-up {warm_s:.1f} s, lowprec fast path {'on' if fast_path_enabled() else 'off'}")
    # ratios move with the CPU kind (and a noisy machine): say which one measured them
    if args.device == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(0)}; native FP8 GEMMs: {hardware.scaled_mm_ok('cuda')}")
    print(f"CPU: {cpu_model()} (torch kernels: {torch.backends.cpu.get_cpu_capability()}); baseline spread over the "
          f"repeats {min(times[0]):.2f}-{max(times[0]):.2f} ms")
    print("| case | ms/step (median) | ms/step (min-max) | ratio to eager (median) | ratio (min-max) | target |")
    print("|---|---:|---:|---:|---:|---:|")
    base = times[0]
    for (name, _), t in zip(cases, times):
        r = [a / b for a, b in zip(t, base)]
        p = name.split()[-1]
        target = f"<= {ISSUE_TARGETS[p]}x" if name.startswith("runner") and p in ISSUE_TARGETS else ""
        print(f"| {name} | {statistics.median(t):.2f} | {min(t):.2f}-{max(t):.2f} | "
              f"{statistics.median(t) / statistics.median(base):.2f}x | {min(r):.2f}-{max(r):.2f} | {target} |")


if __name__ == "__main__":
    main()
