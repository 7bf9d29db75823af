"""The study's answer, computed from its results rows: horizon-ladder speedups, losses vs fp32 with paired
per-seed intervals, the FP8 failure map, the convex mechanism, and the agree/disagree lines against the paper.

``summarize`` returns a JSON-ready dict (written to study.json as ``summary``); ``verdict_lines`` turns it into
the verdict-first text the terminal prints. Every verdict follows ``studies.scaling.verdict``: "insufficient
evidence" when fewer than 3 paired seeds or when the interval spans the null value (1 for speedups, 0 for loss
differences, the other optimizer's interval for divergence fractions).
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from studies import horizon
from studies.config import StudyConfig, apply_overrides
from studies.schema import float_or_nan
from studies.scaling import MIN_SEEDS, ladder_speedup, paired_difference, verdict
from studies.stats import mean_ci, wilson_ci

__all__ = ["PAPER_SPEEDUP", "summarize", "summarize_folder", "verdict_lines"]

PAPER_SPEEDUP = (1.44, 2.14)  # the paper's claimed StoSignSGD-over-AdamW speedup range
_SIGN = "stosignsgd"


def _diverged(r: dict) -> bool:
    return str(r.get("diverged")) == "True"


def _loss(r: dict) -> float:
    """Final validation loss; +inf for a diverged run (worse than any value), nan for a failed one."""
    if r.get("status") == "error":
        return math.nan
    return math.inf if _diverged(r) else float_or_nan(r.get("final_val_loss"))


def _cells(cfg: StudyConfig, rows: list[dict], phase: str) -> dict[tuple, dict[int, dict]]:
    """(task, steps, precision, optimizer) -> {seed: row} of the finished rows of ``phase``."""
    out: dict[tuple, dict[int, dict]] = defaultdict(dict)
    for r in rows:
        if r.get("phase") == phase and r.get("status") != "error":
            out[(r["task"], horizon.row_steps(r), r["precision"], r["optimizer"])][int(r["seed"])] = r
    return out


def _ci(values: list[float]) -> dict[str, float]:
    m, lo, hi = mean_ci(values)
    return {"mean": m, "lo": lo, "hi": hi, "n": sum(1 for v in values if math.isfinite(v))}


def _ladder(cfg: StudyConfig, main: dict) -> dict:
    """{task: {precision: {optimizer: [one entry per horizon]}}} with the end-of-schedule loss and the speedup
    read off AdamW's curve at the same precision (paired over the seeds every series shares)."""
    out: dict = {}
    base = cfg.target_optimizer
    for (task, steps, prec, opt), by_seed in sorted(main.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][3],
                                                                                   kv[0][1] or 0)):
        losses = [_loss(r) for r in by_seed.values()]
        tokens = max(float_or_nan(r.get("tokens")) for r in by_seed.values())
        entry: dict[str, Any] = {"steps": steps, "tokens": tokens, "loss": _ci(losses),
                                 "diverged": sum(_diverged(r) for r in by_seed.values()), "n": len(by_seed),
                                 "tokens_to_target": _ci([float_or_nan(r.get("tokens_to_target")) for r in by_seed.values()])}
        curve = sorted(((s, rs) for (t, s, p, o), rs in main.items() if (t, p, o) == (task, prec, base)
                        and s is not None), key=lambda x: x[0])
        if opt != base and len(curve) >= 2:
            seeds = set(by_seed)
            for _, rs in curve:
                seeds &= set(rs)
            seeds_l = sorted(seeds)
            ct = [max(float_or_nan(r.get("tokens")) for r in rs.values()) for _, rs in curve]
            if len(seeds_l) >= 1 and all(b > a for a, b in zip(ct, ct[1:])):
                sp = ladder_speedup(ct, [[_loss(rs[s]) for s in seeds_l] for _, rs in curve], tokens,
                                    [_loss(by_seed[s]) for s in seeds_l], paired=True)
                entry["speedup"] = sp.to_dict()
                entry["speedup"]["verdict"] = verdict(sp.lo, sp.hi, sp.n, 1.0, below="slower than AdamW",
                                                      above="faster than AdamW")
        out.setdefault(task, {}).setdefault(prec, {}).setdefault(opt, []).append(entry)
    return out


def _vs_fp32(cfg: StudyConfig, main: dict) -> dict:
    """Per task, optimizer and precision at the middle horizon: the paired per-seed loss change vs fp32."""
    out: dict = {}
    mid = horizon.middle(cfg)
    for (task, steps, prec, opt), by_seed in main.items():
        ref = main.get((task, steps, "fp32", opt))
        if steps != mid or prec == "fp32" or ref is None:
            continue
        m, lo, hi, n = paired_difference({s: _loss(r) for s, r in ref.items()},
                                         {s: _loss(r) for s, r in by_seed.items()})
        out.setdefault(task, {}).setdefault(prec, {})[opt] = {
            "delta": m, "lo": lo, "hi": hi, "n": n,
            "diverged": sum(_diverged(r) for r in by_seed.values()), "runs": len(by_seed),
            "verdict": verdict(lo, hi, n, 0.0, below="lower loss than fp32", above="higher loss than fp32")}
    return out


def _failure_map(cfg: StudyConfig, rows: list[dict]) -> dict:
    """{task: {precision: {optimizer: {k, n, p, lo, hi, per_horizon, explanations}}}}: divergences pooled over the
    failure horizons and seeds, with a Wilson interval and the telemetry explanation of each failed run."""
    out: dict = {}
    for (task, steps, prec, opt), by_seed in sorted(_cells(cfg, rows, "failure").items(),
                                                    key=lambda kv: (kv[0][0], kv[0][2], kv[0][3], kv[0][1] or 0)):
        cell = out.setdefault(task, {}).setdefault(prec, {}).setdefault(
            opt, {"k": 0, "n": 0, "per_horizon": {}, "explanations": []})
        k = sum(_diverged(r) for r in by_seed.values())
        cell["k"] += k
        cell["n"] += len(by_seed)
        cell["per_horizon"][str(steps)] = {"k": k, "n": len(by_seed),
                                           "loss": _ci([_loss(r) for r in by_seed.values()])}
        cell["explanations"] += [f"seed {s}, {steps} steps: {r.get('explanation', '')}".strip()
                                 for s, r in sorted(by_seed.items()) if _diverged(r)]
    for per_prec in out.values():
        for per_opt in per_prec.values():
            for cell in per_opt.values():
                cell["p"], cell["lo"], cell["hi"] = wilson_ci(cell["k"], cell["n"])
    return out


def _parts(out_dir: Path | None, run_id: str) -> dict[str, float]:
    path = out_dir / "runs" / run_id / "loss_parts.json" if out_dir else None
    if path is None or not path.is_file():
        return {}
    try:
        return {k: float(v) for k, v in json.loads(path.read_text()).items()}
    except (ValueError, TypeError, AttributeError):
        return {}


def _mechanism(rows: list[dict], optimal: dict[str, float], out_dir: Path | None) -> dict:
    """{task: {optimizer: {"gap", "stalled", "reducible"}}}: final loss - optimum, and its split by kink (the
    stalled term, which deterministic SignSGD cannot reduce, and the reducible one; from the run's
    loss_parts.json), each as mean with a t interval over seeds."""
    out: dict = {}
    groups: dict = defaultdict(list)
    for r in rows:
        if r.get("phase") == "mechanism" and r.get("status") != "error":
            groups[(r["task"], r["optimizer"])].append(r)
    stalled: dict = {}
    for (task, opt), rs in sorted(groups.items()):
        parts = {int(r["seed"]): _parts(out_dir, r["run_id"]) for r in rs}
        stalled[(task, opt)] = {s: p.get("stalled", math.nan) for s, p in parts.items()}
        out.setdefault(task, {})[opt] = {
            "gap": _ci([_loss(r) - optimal.get(task, 0.0) for r in rs]),
            "stalled": _ci([p.get("stalled", math.nan) for p in parts.values()]),
            "reducible": _ci([p.get("reducible", math.nan) for p in parts.values()])}
    for (task, opt), by_seed in stalled.items():  # the discriminating comparison: StoSignSGD vs each sign method
        if opt == _SIGN:
            continue
        if (task, _SIGN) in stalled:
            m, lo, hi, n = paired_difference(by_seed, stalled[(task, _SIGN)])
            out[task][opt]["stosignsgd_minus_this_stalled"] = {
                "delta": m, "lo": lo, "hi": hi, "n": n,
                "verdict": verdict(lo, hi, n, 0.0, below=f"{_SIGN} stalls less", above=f"{_SIGN} stalls more")}
    return out


def _is_fp8(precision: str) -> bool:
    p = precision.lower()
    return "fp8" in p or "e4m3" in p or "e5m2" in p


def _fails_word(base: str, a: dict, s: dict) -> str:
    """Claim 1 ("AdamW fails in FP8, StoSignSGD does not") from divergence counts {k, n, lo, hi} of both."""
    if a["n"] < MIN_SEEDS or s["n"] < MIN_SEEDS:
        return "insufficient evidence (n < 3)"
    if a["k"] == 0:
        return f"disagree: {base} never diverged"
    if a["lo"] > s["hi"]:
        return f"agree: {base} diverges more often (Wilson intervals apart)"
    return "insufficient evidence (Wilson intervals overlap)"


def _speed_word(sp: dict) -> str:
    """Claim 2 (1.44x-2.14x fewer tokens than AdamW) from a ladder speedup {speedup, lo, hi, n}."""
    lo_p, hi_p = PAPER_SPEEDUP
    if sp.get("status") != "ok":  # beyond AdamW's curve: only a bound, not a value
        return f"insufficient evidence ({sp.get('status')})"
    if sp["n"] < MIN_SEEDS or math.isnan(float_or_nan(sp["lo"])):
        return "insufficient evidence"
    if float_or_nan(sp["hi"]) < lo_p:
        return f"disagree: interval below {lo_p}x"
    if float_or_nan(sp["lo"]) > hi_p:
        return f"disagree: interval above {hi_p}x"
    if float_or_nan(sp["lo"]) >= 1.0:
        return "agree: faster than AdamW, interval overlaps the paper's range"
    return "insufficient evidence (interval spans 1)"


def _counts(k: int, n: int) -> dict:
    _, lo, hi = wilson_ci(k, n) if n else (math.nan, math.nan, math.nan)
    return {"k": k, "n": n, "lo": lo, "hi": hi}


def _claims(cfg: StudyConfig, ladder: dict, fmap: dict, vs: dict) -> list[str]:
    """The answer per task and FP8 main precision (divergences at the middle horizon, loss change vs fp32, the
    ladder speedup at the longest horizon, each claim's agree/disagree), then claim 1 per failure-map storage."""
    lines = []
    base = cfg.target_optimizer
    mid = horizon.middle(cfg)
    for task, per_prec in ladder.items():
        for prec, per_opt in per_prec.items():
            if not _is_fp8(prec) or base not in per_opt or _SIGN not in per_opt:
                continue
            at_mid = {o: next((e for e in per_opt[o] if e["steps"] == mid), None) for o in (base, _SIGN)}
            parts = [f"[{task}, {prec}]"]
            if all(at_mid.values()):
                a, s = (_counts(at_mid[o]["diverged"], at_mid[o]["n"]) for o in (base, _SIGN))
                parts.append(f"diverged {base} {a['k']}/{a['n']} vs {_SIGN} {s['k']}/{s['n']} "
                             f"(claim 'AdamW fails in FP8': {_fails_word(base, a, s)})")
            d = vs.get(task, {}).get(prec, {})
            if d:
                parts.append("loss vs fp32 " + ", ".join(
                    f"{o} {float_or_nan(d[o]['delta']):+.4f} [{float_or_nan(d[o]['lo']):+.4f}, {float_or_nan(d[o]['hi']):+.4f}]"
                    for o in (base, _SIGN) if o in d))
            entries = [e for e in per_opt[_SIGN] if "speedup" in e]
            if entries:
                e, sp = entries[-1], entries[-1]["speedup"]  # the longest horizon
                parts.append(f"speedup on AdamW's curve @{e['steps']} steps {_fmt_x(sp['speedup'])} "
                             f"[{_fmt_x(sp['lo'])}, {_fmt_x(sp['hi'])}] (claim '{PAPER_SPEEDUP[0]}x-"
                             f"{PAPER_SPEEDUP[1]}x faster': {_speed_word(sp)})")
            lines.append("; ".join(parts))
    for task, per_prec in fmap.items():
        for prec, per_opt in per_prec.items():
            a, s = per_opt.get(base), per_opt.get(_SIGN)
            if a and s:
                lines.append(f"claim 'AdamW fails in FP8, StoSignSGD does not' [{task}, storage {prec}]: {base} "
                             f"diverged {a['k']}/{a['n']} vs {_SIGN} {s['k']}/{s['n']}: {_fails_word(base, a, s)}")
    return lines


def _fmt_x(v: float | None) -> str:
    v = float_or_nan(v)
    return "nan" if math.isnan(v) else ("inf" if math.isinf(v) else f"{v:.2f}x")


def _g(v: float | None, fmt: str) -> str:
    """``v`` formatted with ``fmt``; a value read back from JSON as null is nan."""
    return format(float_or_nan(v), fmt)


def _json_safe(obj: Any) -> Any:
    """Infinities as the strings "inf" / "-inf" (JSON has none; NaN is written as null): ``_f`` reads both back."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and math.isinf(obj):
        return "inf" if obj > 0 else "-inf"
    return obj


def summarize(cfg: StudyConfig, rows: list[dict], *, optimal: dict[str, float] | None = None,
              lr_at_edge: dict | None = None, out_dir: str | Path | None = None) -> dict:
    """The study's answer from its rows (see the module docstring); ``lr_at_edge`` (study.json's) lists the
    tuned cells whose chosen LR is not interior; ``out_dir`` (the results folder) supplies the convex runs'
    loss_parts.json."""
    main = _cells(cfg, rows, "main")
    ladder = _ladder(cfg, main)
    fmap = _failure_map(cfg, rows)
    vs = _vs_fp32(cfg, main)
    edges = [f"{t} {p} {o}" for t, pp in (lr_at_edge or {}).items() for p, po in pp.items()
             for o, e in po.items() if e]
    mech = _mechanism(rows, optimal or {}, Path(out_dir) if out_dir else None)
    return _json_safe({
        "ladder": ladder, "vs_fp32": vs, "failure_map": fmap, "mechanism": mech,
        "claims": _claims(cfg, ladder, fmap, vs), "lr_not_interior": edges,
        "rule": "verdicts: 'insufficient evidence' when n < 3 paired seeds or the 95% interval spans the null (1 for "
                "speedups, 0 for loss changes); speedup = AdamW tokens on its end-of-schedule curve (log-tokens "
                "interpolation) / optimizer tokens, paired seed bootstrap; a bound of 0 (inf) means that resample's "
                "loss was worse (better) than AdamW's whole curve"})


def verdict_lines(summary: dict) -> list[str]:
    """The verdict-first text: the claims, then per task and precision the loss change vs fp32 and the speedup
    at each horizon, the failure map, the mechanism, and the cells whose LR is not interior."""
    out = list(summary.get("claims", []))
    for task, per_prec in summary.get("vs_fp32", {}).items():
        for prec, per_opt in per_prec.items():
            for opt, v in per_opt.items():
                out.append(f"{task} {prec} {opt}: loss vs fp32 {_g(v['delta'], '+.4f')} "
                           f"[{_g(v['lo'], '+.4f')}, {_g(v['hi'], '+.4f')}] "
                           f"(n={v['n']}, diverged {v['diverged']}/{v['runs']}): {v['verdict']}")
    for task, per_prec in summary.get("ladder", {}).items():
        for prec, per_opt in per_prec.items():
            for opt, entries in per_opt.items():
                for e in entries:
                    if "speedup" in e:
                        sp = e["speedup"]
                        point = float_or_nan(sp["speedup"])
                        where = ("" if sp["status"] == "ok" or not (point == 0 or math.isinf(point)) else
                                 " (loss worse than AdamW's at its shortest horizon)" if point == 0 else
                                 " (loss better than AdamW's at its longest horizon)")
                        value = (sp["status"] + where if where else _fmt_x(point) if sp["status"] == "ok"
                                 else f"{_fmt_x(point)} ({sp['status']})")
                        out.append(f"{task} {prec} {opt} @{e['steps']} steps: speedup {value} "
                                   f"[{_fmt_x(sp['lo'])}, {_fmt_x(sp['hi'])}]: {sp['verdict']}")
    for task, per_prec in summary.get("failure_map", {}).items():
        for prec, per_opt in per_prec.items():
            cells = ", ".join(f"{o} {c['k']}/{c['n']} [{_g(c['lo'], '.2f')}, {_g(c['hi'], '.2f')}]"
                              for o, c in per_opt.items())
            out.append(f"failure map {task} {prec}: diverged {cells}")
    for task, per_opt in summary.get("mechanism", {}).items():
        cells = ", ".join(f"{o} stalled {_g(v['stalled']['mean'], '.4g')} [{_g(v['stalled']['lo'], '.3g')}, "
                          f"{_g(v['stalled']['hi'], '.3g')}] + reducible {_g(v['reducible']['mean'], '.4g')}"
                          for o, v in per_opt.items())
        out.append(f"mechanism {task} (final loss by kink, n={max(v['gap']['n'] for v in per_opt.values())}): "
                   f"{cells}")
        for o, v in per_opt.items():
            d = v.get("stosignsgd_minus_this_stalled")
            if d:
                out.append(f"mechanism {task}: stalled term {_SIGN} - {o} {_g(d['delta'], '+.4g')} "
                           f"[{_g(d['lo'], '+.3g')}, {_g(d['hi'], '+.3g')}] (paired, n={d['n']}): {d['verdict']}")
    if summary.get("lr_not_interior"):
        out.append("LR at an edge of the tried grid (optimum may lie outside): "
                   + "; ".join(summary["lr_not_interior"]))
    return out


def summarize_folder(out_dir: str | Path, study: dict, rows: list[dict]) -> dict:
    """The answer recomputed from ``rows`` (the runs a results folder holds now) with the study's own
    configuration from study.json, so a verdict never outlives the rows it came from (a merged, trimmed or
    damaged folder); study.json's recorded summary only where it records no configuration."""
    if "config" not in study:
        return study.get("summary") or {}
    cfg = apply_overrides(StudyConfig(), {k: v for k, v in study["config"].items() if k != "out"})
    return summarize(cfg, rows, optimal=study.get("optimal_loss"), lr_at_edge=study.get("lr_at_edge"),
                     out_dir=out_dir)
