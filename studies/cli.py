"""``precision-sweep``: which optimizer survives which precision, on which task, and why.

    precision-sweep run [--quick] [--config FILE] [--tasks ...] [--optimizers ...] [--precisions ...] ...
    precision-sweep report DIR
    precision-sweep merge OUT DIR...
    precision-sweep export DIR --tensorboard LOGDIR
    precision-sweep list

Settings are layered: the default study (or ``--quick``), then ``--config FILE`` (TOML, same field names), then
the command-line options. Unknown names and malformed values exit with status 2 and one line naming the valid
choices; any other failure of ``run`` prints one line (with a hint) and exits 1 — ``--debug`` shows tracebacks.
Limits (seeds, steps, tokens, workers, threads) are checked before anything is built. Ctrl-C and SIGTERM stop the
sweep and its workers at once (exit 130; at most ``STOP_DEADLINE_S`` later even if the orderly stop wedges);
completed runs are kept.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Sequence

from studies.arguments import OneLineParser, nonneg_int, positive_int

__all__ = ["MAX_STEPS", "MAX_TOKENS", "MAX_WORKERS", "MAX_THREADS", "build_parser", "config_from_args",
           "check_limits", "main"]

MAX_STEPS = 10_000_000        # training steps per run
MAX_TOKENS = 10 ** 13         # training tokens per run
MAX_WORKERS = 10_000          # concurrent submitit jobs
MAX_THREADS = 1_024           # torch threads per run
CALIBRATION_STEPS = 3         # steps of the dry run's timing runs


def _config_arg(parser: str, *extra):
    """An argparse ``type`` calling ``studies.config.<parser>(text, *extra)``; its ValueError becomes the one-line
    argparse error."""
    def parse(text: str):
        from studies import config

        try:
            return getattr(config, parser)(text, *extra)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


_seeds_arg = _config_arg("parse_seeds")
_shard_arg = _config_arg("parse_shard")
_lrs_arg = _config_arg("parse_floats", "lrs")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="precision-sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = p.add_subparsers(dest="command", metavar="{run,report,merge,export,list}", parser_class=OneLineParser)
    sub.required = True

    r = sub.add_parser("run", help="run a study (no options: the default study)")
    r.add_argument("--quick", action="store_true",
                   help="smoke grid: adamw, stosignsgd x fp32, fp8-all on a tiny GPT (~1 minute on 2 cores)")
    r.add_argument("--config", metavar="FILE", help="TOML file with the same fields (e.g. studies/paper.toml)")
    r.add_argument("--tasks", help="comma-separated task names (see `precision-sweep list`)")
    r.add_argument("--size", help="task size: quick, default or paper")
    r.add_argument("--optimizers", help="comma-separated optimizer names")
    r.add_argument("--precisions",
                   help="comma-separated presets (fp32,bf16,fp8-all,...); policy strings containing '=' are "
                        "separated by ';' (e.g. 'fp32;weight=e4m3,grad=e5m2')")
    r.add_argument("--lrs", type=_lrs_arg,
                   help="comma-separated learning rates: the tuning grid of every optimizer (with the tune "
                        "phase) or the LRs to run (without it)")
    r.add_argument("--seeds", type=_seeds_arg,
                   help="N = seeds 0..N-1, or a list like 0,3,7 (one explicit seed: '7,')")
    steps = r.add_mutually_exclusive_group()
    steps.add_argument("--steps", type=positive_int, help="training steps per run (default: the task's)")
    steps.add_argument("--tokens", type=positive_int, help="training tokens per run (steps = tokens / tokens-per-step)")
    r.add_argument("--horizons", type=_config_arg("parse_steps", "horizons"), metavar="N,N,...",
                   help="horizon ladder: steps per horizon (LR tuned at each; default study: 100,200,400); "
                        "--steps/--tokens without --horizons mean one horizon")
    r.add_argument("--workers", type=positive_int,
                   help="parallel worker processes (default 2; at most the CPU cores), or with --executor "
                        "submitit the most jobs running at once")
    r.add_argument("--threads", type=positive_int, default=1,
                   help="torch threads per run (default 1): fixed per run and recorded, so --workers never changes "
                        "a number")
    r.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where runs train (default auto: cuda when torch sees a GPU, else cpu); on cuda the "
                        "quantized GEMMs use the native FP8 path (torch._scaled_mm) where the hardware has it")
    r.add_argument("--engine", choices=("auto", "eager", "compiled"),
                   help="how runs train: eager (the reference), compiled (torch.compile'd forward, backward and "
                        "evaluation on the steps telemetry does not sample; gpt/text tasks), or auto (default: eager "
                        "for now; the compiled engine has not measured enough faster to repay compiling)")
    r.add_argument("--checkpoint-every", type=positive_int, metavar="N",
                   help="save each run's whole training state every N steps (runs/<id>/checkpoint.pt); a run killed "
                        "mid-way resumes from its last checkpoint and ends bit-identical to an uninterrupted one")
    r.add_argument("--executor", choices=("local", "submitit"), default="local",
                   help="local: this machine (process pool, the default); submitit: Slurm jobs (job arrays), or "
                        "submitit's local executor with --cluster local")
    r.add_argument("--cluster", choices=("slurm", "local"), default="slurm",
                   help="with --executor submitit: slurm (default) or local (same code path, no scheduler)")
    r.add_argument("--partition", help="Slurm partition (--executor submitit)")
    r.add_argument("--time-min", type=positive_int, default=60, help="Slurm time limit per run, minutes (default 60)")
    r.add_argument("--mem-gb", type=float, help="Slurm memory per run, GB")
    r.add_argument("--wait", type=float, default=0.0, metavar="MINUTES",
                   help="with --shard: wait up to MINUTES for the other shards' runs in the same --out, so every "
                        "shard finishes the whole study (tune rounds and targets need all of them)")
    r.add_argument("--append", action="store_true",
                   help="allow adding a different study to a results folder that already holds one")
    r.add_argument("--dry-run", action="store_true",
                   help="print the runs per phase and an ETA from a short timing run; run nothing")
    r.add_argument("--out", metavar="DIR", help="output folder (default ./precision-sweep-results)")
    r.add_argument("--shard", type=_shard_arg, metavar="K/N",
                   help="run only shard K of N (deterministic split, for cluster job arrays)")
    r.add_argument("--data", metavar="PATH",
                   help="your data: a text file or a nanoGPT uint16 .bin token file (trains the GPT on it)")
    r.add_argument("--phases", help="comma-separated subset of tune,main,ablation,rounding,failure,mechanism")
    r.add_argument("--tune-per-precision", action="store_true", default=None,
                   help="tune the LR at every precision instead of once at fp32")
    r.add_argument("--tune-max-extensions", type=nonneg_int, metavar="N",
                   help="when an optimizer's best LR is at an edge of its grid, try up to N more LRs outward "
                        "(same rule for every optimizer; default 1, 0 disables)")
    r.add_argument("--no-report", action="store_true", help="skip rendering the report")
    r.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")

    rep = sub.add_parser("report", help="re-render the report of a results folder")
    rep.add_argument("dir", metavar="DIR")

    mg = sub.add_parser("merge", help="combine shard folders into one (each run once; conflicting runs refused)")
    mg.add_argument("out", metavar="OUT")
    mg.add_argument("dirs", metavar="DIR", nargs="+")

    ex = sub.add_parser("export", help="write per-run scalars for a dashboard")
    ex.add_argument("dir", metavar="DIR")
    ex.add_argument("--tensorboard", metavar="LOGDIR", required=True, help="TensorBoard log folder to write")

    sub.add_parser("list", help="list tasks, optimizers, precision presets and formats")
    return p


def config_from_args(args: argparse.Namespace):
    """Defaults (or --quick) <- --config FILE <- command-line options; validated (ValueError on bad names)."""
    from studies.config import apply_overrides, default_config, load_toml, quick_config

    cfg = quick_config() if args.quick else default_config()
    if args.config:
        cfg = apply_overrides(cfg, load_toml(args.config))
    overrides = {}
    for name in ("tasks", "size", "optimizers", "precisions", "lrs", "seeds", "steps", "tokens", "workers",
                 "out", "data", "phases", "tune_per_precision", "tune_max_extensions", "horizons", "engine"):
        v = getattr(args, name, None)
        if v is not None:
            overrides[name] = v
    if args.no_report:
        overrides["report"] = False
    if args.steps is not None:
        overrides["tokens"] = None
    if args.tokens is not None:
        overrides["steps"] = None
    if (args.steps is not None or args.tokens is not None) and args.horizons is None:
        overrides["horizons"] = None  # one run length: the one given
    if args.data and not args.tasks:
        overrides["tasks"] = ["text"]
    if args.data and "phases" not in overrides:
        overrides["phases"] = [p for p in cfg.phases if p != "mechanism"]
    cfg = apply_overrides(cfg, overrides)
    return cfg.validate()


def check_limits(cfg, *, executor: str = "local", threads: int = 1) -> None:
    """Refuse budgets that cannot be meant (one-line ValueError, exit 2) before anything is built."""
    cores = os.cpu_count() or 1
    for name, v, top in (("steps", cfg.steps, MAX_STEPS), ("tokens", cfg.tokens, MAX_TOKENS),
                         ("mechanism_steps", cfg.mechanism_steps, MAX_STEPS),
                         ("horizons", max(cfg.horizons or [0]), MAX_STEPS),
                         ("failure_horizons", max(cfg.failure_horizons or [0]), MAX_STEPS)):
        if v is not None and v > top:
            raise ValueError(f"{name} {v} is above the limit of {top:,} per run")
    if executor == "local" and cfg.workers > max(2, cores):
        raise ValueError(f"workers {cfg.workers} is more than this machine's {cores} CPU cores")
    if cfg.workers > MAX_WORKERS:
        raise ValueError(f"workers {cfg.workers} is above the limit of {MAX_WORKERS:,}")
    if executor == "local" and threads > cores:
        raise ValueError(f"threads {threads} is more than this machine's {cores} CPU cores")
    if threads > MAX_THREADS:
        raise ValueError(f"threads {threads} is above the limit of {MAX_THREADS:,}")



def _dry_run(cfg, threads: int, calibrate: bool = True) -> str:
    """The runs per phase (distinct configurations once) and an ETA from a CALIBRATION_STEPS-step run of each
    task; LR-extension rounds are bounded, not predicted."""
    import dataclasses

    import torch

    from studies import protocol
    from studies.tasks import get_task
    from studies.training import execute_run

    tune = protocol.plan_tune(cfg) if "tune" in cfg.phases else []
    rest = protocol.plan_after_tune(cfg, {})
    specs, keys = [], set()
    for s in tune + rest:
        if s.reuse_key not in keys:
            keys.add(s.reuse_key)
            specs.append(s)
    per_phase: dict[str, int] = {}
    for s in tune + rest:
        per_phase[s.phase] = per_phase.get(s.phase, 0) + 1
    lines = [f"dry run: {len(tune) + len(rest)} runs ({len(specs)} distinct configurations) into {cfg.out}"]
    for ph in cfg.phases:
        if ph in per_phase:
            lines.append(f"  {ph:10s} {per_phase[ph]} runs")
    if tune and cfg.tune_max_extensions:
        groups = len({(s.task, s.optimizer, s.precision, s.steps) for s in tune})
        lines.append(f"  tune LR extensions: up to {cfg.tune_max_extensions * groups * len(cfg.tune_seeds)} more runs "
                     f"({cfg.tune_max_extensions} round(s) x {groups} grids x {len(cfg.tune_seeds)} seed(s))")
    if not calibrate or not specs:
        return "\n".join(lines)
    cost: dict[tuple, tuple[float, float]] = {}  # (task, size, precision) -> (setup s, s per step)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for s in specs:
                key = (s.task, s.size, s.precision)
                if key in cost:
                    continue
                times = []
                for n in (1, 1 + CALIBRATION_STEPS):  # the difference is the cost of the steps alone
                    cal = dataclasses.replace(s, steps=n, tokens=None, eval_every=n)
                    t0 = time.perf_counter()
                    execute_run(cal, f"{tmp}/{n}", debug=True)
                    times.append(time.perf_counter() - t0)
                step = max(0.0, times[1] - times[0]) / CALIBRATION_STEPS
                cost[key] = (max(0.0, times[0] - step), step)
    finally:
        torch.set_num_threads(prev)
    total = 0.0
    for s in specs:
        setup, step = cost[(s.task, s.size, s.precision)]
        total += setup + step * s.planned_steps(get_task(s.task, size=s.size, data=s.data))
    eta = total / max(1, cfg.workers)
    lines.append(f"ETA ~{eta / 60:.1f} min with {cfg.workers} worker(s) x {threads} thread(s) (timed: a 1-step "
                 f"and a {1 + CALIBRATION_STEPS}-step run of each task x precision; LR extensions not included)")
    return "\n".join(lines)


def _cmd_run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from studies.protocol import PhaseIncomplete, run_study

    cfg = config_from_args(args)
    check_limits(cfg, executor=args.executor, threads=args.threads)
    from studies.training import resolve_device
    device = resolve_device(args.device)
    if not 0 <= args.wait <= 7 * 24 * 60:  # also refuses nan
        raise ValueError(f"--wait must be between 0 and {7 * 24 * 60} minutes, got {args.wait:g}")
    if args.dry_run:
        print(_dry_run(cfg, args.threads))
        return 0
    command = "precision-sweep " + " ".join(shlex.quote(a) for a in argv)
    options = None
    if args.executor == "submitit":
        options = {"cluster": args.cluster, "partition": args.partition, "time_min": args.time_min,
                   "mem_gb": args.mem_gb}
    t0 = time.perf_counter()
    try:
        study = run_study(cfg, command=command, shard_kn=args.shard, debug=args.debug, threads=args.threads,
                          executor=args.executor, executor_options=options, append=args.append,
                          wait_min=args.wait, device=device, checkpoint_every=args.checkpoint_every)
    except PhaseIncomplete as e:
        print(f"precision-sweep: {e}", file=sys.stderr)
        return 0
    elapsed = time.perf_counter() - t0
    counts = study.get("counts", {})
    n = sum(c.get("done", 0) for c in counts.values())
    skipped = sum(c.get("skipped", 0) for c in counts.values())
    reused = sum(c.get("reused", 0) for c in counts.values())
    errors = sum(c.get("errors", 0) for c in counts.values())
    from studies.summary import verdict_lines

    lines = verdict_lines(study.get("summary", {})) if not cfg.report else []  # else: the report's summary
    if lines:  # the answer first
        print("\n".join(["verdicts (95% intervals; 'insufficient evidence' when n < 3 or the interval spans the "
                          "null):", *(f"  {line}" for line in lines)]))
    print(f"{n} runs in {elapsed:.0f} s ({skipped} already done, {reused} reused, {errors} failed); "
          f"results in {Path(cfg.out) / 'results.csv'}")
    if cfg.report:
        _render(cfg.out)
    return 0


def _render(out_dir: str) -> None:
    from studies.report import render_with_summary

    res, text = render_with_summary(out_dir)
    path = res.get("html", out_dir) if isinstance(res, dict) else res
    print(text)
    if "report:" not in text:
        print(f"report: {path}")


def _cmd_report(args: argparse.Namespace) -> int:
    d = Path(args.dir)
    if not (d / "results.csv").is_file():
        raise ValueError(f"no results.csv in {d} (expected the --out folder of `precision-sweep run`)")
    from studies.records import check_results

    check_results(d)  # a damaged or duplicated row is named (file, line), never rendered or counted twice
    _render(str(d))
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from studies.protocol import merge_study

    c = merge_study(args.out, args.dirs)
    print(f"merged {c['folders']} folder(s) into {args.out}: {c['runs']} runs ({c['duplicates']} duplicates "
          f"dropped); results in {Path(args.out) / 'results.csv'}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from studies.export import export_tensorboard

    n = export_tensorboard(args.dir, args.tensorboard)
    print(f"exported {n} runs to {args.tensorboard} (tensorboard --logdir {shlex.quote(args.tensorboard)})")
    return 0


def _cmd_list() -> int:
    from studies.optimizers import OPTIMIZERS
    from studies.tasks import TASKS

    print("tasks:")
    for name, desc in TASKS.items():
        print(f"  {name:20s} {desc}")
    print("optimizers:")
    for name, e in OPTIMIZERS.items():
        print(f"  {name:20s} {e.description}")
    print("precision presets:")
    try:
        from lowprec.policy import PrecisionPolicy
        from lowprec.policy import PRESETS

        for name in PRESETS:
            print(f"  {name:20s} {PrecisionPolicy.preset(name)}")
    except ImportError as e:  # pragma: no cover - lowprec training layer missing
        print(f"  (unavailable: {e})")
    print("formats:")
    from lowprec.formats import FORMATS

    for name, f in FORMATS.items():
        print(f"  {name:20s} {getattr(f, 'kind', '')} {getattr(f, 'bits', '')} bits, max {getattr(f, 'max', '')}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``precision-sweep`` console script; returns the exit status (also raises SystemExit
    when called as a script)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    old = _stop_on_sigterm()
    try:
        if args.command == "run":
            return _cmd_run(args, argv)
        if args.command == "report":
            return _cmd_report(args)
        if args.command == "merge":
            return _cmd_merge(args)
        if args.command == "export":
            return _cmd_export(args)
        return _cmd_list()
    except (ValueError, TypeError) as e:
        if args.debug:
            raise
        msg = " ".join(str(e).split())
        sys.stderr.write(f"precision-sweep: error: {msg}\n")
        return 2
    except KeyboardInterrupt:
        from studies.executor import kill_children

        kill_children()
        sys.stderr.write(_INTERRUPTED)
        return 130
    except Exception as e:  # noqa: BLE001 - one line instead of a traceback
        if args.debug:
            raise
        msg = " ".join(f"{type(e).__name__}: {e}".split())
        sys.stderr.write(f"precision-sweep: error: {msg} (rerun with --debug for the traceback; completed runs "
                         f"are kept and a rerun resumes)\n")
        return 1
    finally:
        if old is not None:
            for sig, handler in old.items():
                signal.signal(sig, handler)


_INTERRUPTED = ("precision-sweep: interrupted; workers stopped; rerun the same command to resume (completed runs "
                "are kept)\n")
STOP_DEADLINE_S = 3.0   # the orderly stop after Ctrl-C / SIGTERM takes ~0.4 s; past this the process exits anyway
_hard_stop: list[threading.Thread] = []


def _interrupt(signum, frame) -> None:
    """Ctrl-C and SIGTERM: raise KeyboardInterrupt (the orderly stop in ``main``), and arm the hard stop: should
    that stop wedge (a worker pool shutting down once kept the leader alive past 30 s in CI's Ctrl-C test; the
    cause was not found), after ``STOP_DEADLINE_S`` the workers are killed, the message is written and the process
    exits 130. Results on disk are whole either way (every file is written to a temporary name and replaced)."""
    if not _hard_stop:
        def hard_stop() -> None:
            time.sleep(STOP_DEADLINE_S)
            from studies.executor import kill_children

            kill_children()
            sys.stderr.write(_INTERRUPTED)
            sys.stderr.flush()
            os._exit(130)
        _hard_stop.append(threading.Thread(target=hard_stop, daemon=True, name="precision-sweep-hard-stop"))
        _hard_stop[0].start()
    raise KeyboardInterrupt


def _stop_on_sigterm() -> dict | None:
    """Handle Ctrl-C and SIGTERM with :func:`_interrupt` (main thread only); return the previous handlers (None
    when not installed)."""
    try:
        return {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread
        return None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
