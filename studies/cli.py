"""``precision-sweep``: which optimizer survives which precision, on which task, and why.

    precision-sweep run [--quick] [--config FILE] [--tasks ...] [--optimizers ...] [--precisions ...] ...
    precision-sweep report DIR
    precision-sweep list

Settings are layered: the default study (or ``--quick``), then ``--config FILE`` (TOML, same field names), then
the command-line options. Unknown names and malformed values exit with status 2 and one line naming the valid
choices; any other failure of ``run`` prints one line (with a hint) and exits 1 — ``--debug`` shows tracebacks.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Sequence


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as ONE line (no usage block) and exits with status 2."""

    def error(self, message: str):  # noqa: D401
        sys.stderr.write(f"precision-sweep: error: {message}\n")
        raise SystemExit(2)


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


def _int_at_least(minimum: int, what: str):
    """An argparse ``type`` for an integer >= ``minimum`` (``what`` names the range in the error)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = None
        if v is None or v < minimum:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}")
        return v

    return parse


_seeds_arg = _config_arg("parse_seeds")
_shard_arg = _config_arg("parse_shard")
_lrs_arg = _config_arg("parse_floats", "lrs")
_pos_int = _int_at_least(1, "positive")
_nonneg_int = _int_at_least(0, "non-negative")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="precision-sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = p.add_subparsers(dest="command", metavar="{run,report,list}", parser_class=_Parser)
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
    steps.add_argument("--steps", type=_pos_int, help="training steps per run (default: the task's)")
    steps.add_argument("--tokens", type=_pos_int, help="training tokens per run (steps = tokens / tokens-per-step)")
    r.add_argument("--workers", type=_pos_int, help="parallel worker processes (default 2)")
    r.add_argument("--out", metavar="DIR", help="output folder (default ./precision-sweep-results)")
    r.add_argument("--shard", type=_shard_arg, metavar="K/N",
                   help="run only shard K of N (deterministic split, for cluster job arrays)")
    r.add_argument("--data", metavar="PATH",
                   help="your data: a text file or a nanoGPT uint16 .bin token file (trains the GPT on it)")
    r.add_argument("--phases", help="comma-separated subset of tune,main,ablation,rounding,mechanism")
    r.add_argument("--tune-per-precision", action="store_true", default=None,
                   help="tune the LR at every precision instead of once at fp32")
    r.add_argument("--tune-max-extensions", type=_nonneg_int, metavar="N",
                   help="when an optimizer's best LR is at an edge of its grid, try up to N more LRs outward "
                        "(same rule for every optimizer; default 1, 0 disables)")
    r.add_argument("--no-report", action="store_true", help="skip rendering the report")
    r.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")

    rep = sub.add_parser("report", help="re-render the report of a results folder")
    rep.add_argument("dir", metavar="DIR")

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
                 "out", "data", "phases", "tune_per_precision", "tune_max_extensions"):
        v = getattr(args, name, None)
        if v is not None:
            overrides[name] = v
    if args.no_report:
        overrides["report"] = False
    if args.steps is not None:
        overrides["tokens"] = None
    if args.tokens is not None:
        overrides["steps"] = None
    if args.data and not args.tasks:
        overrides["tasks"] = ["text"]
    if args.data and "phases" not in overrides:
        overrides["phases"] = [p for p in cfg.phases if p != "mechanism"]
    cfg = apply_overrides(cfg, overrides)
    return cfg.validate()


def _cmd_run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from studies.protocol import PhaseIncomplete, run_study

    cfg = config_from_args(args)
    command = "precision-sweep " + " ".join(shlex.quote(a) for a in argv)
    t0 = time.perf_counter()
    try:
        study = run_study(cfg, command=command, shard_kn=args.shard, debug=args.debug)
    except PhaseIncomplete as e:
        print(f"precision-sweep: {e}", file=sys.stderr)
        return 0
    elapsed = time.perf_counter() - t0
    counts = study.get("counts", {})
    n = sum(c.get("done", 0) for c in counts.values())
    skipped = sum(c.get("skipped", 0) for c in counts.values())
    reused = sum(c.get("reused", 0) for c in counts.values())
    errors = sum(c.get("errors", 0) for c in counts.values())
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
    _render(str(d))
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
    try:
        if args.command == "run":
            return _cmd_run(args, argv)
        if args.command == "report":
            return _cmd_report(args)
        return _cmd_list()
    except (ValueError, TypeError) as e:
        if args.debug:
            raise
        msg = " ".join(str(e).split())
        sys.stderr.write(f"precision-sweep: error: {msg}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("precision-sweep: interrupted; rerun the same command to resume (completed runs are "
                         "kept)\n")
        return 130
    except Exception as e:  # noqa: BLE001 - one line instead of a traceback
        if args.debug:
            raise
        msg = " ".join(f"{type(e).__name__}: {e}".split())
        sys.stderr.write(f"precision-sweep: error: {msg} (rerun with --debug for the traceback; completed runs "
                         f"are kept and a rerun resumes)\n")
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
