"""The fair protocol as sweep phases, and the study driver behind ``precision-sweep run``.

Phases (each optional, run in this order):

- ``tune``: every optimizer gets the same budget — its LR grid (the task's ``lr_grid`` or ``--lrs``) at
  ``tune_precision`` (fp32) with ``tune_seeds``, at every horizon of the ladder (``horizons``; the middle one
  for ablation variants, each tuned by this same rule; ``studies.horizon``). The best LR per optimizer has the
  lowest mean final validation loss over the tune seeds; a diverged or failed run counts as +inf (worst). An optimizer not tuned itself uses
  its base optimizer's LR. With ``tune_per_precision`` the grid runs at every precision.
  Edge extension (the same rule for every optimizer): while the best LR is the lowest (highest) LR tried, the
  next LR outward is run — the lowest (highest) tried LR divided (multiplied) by the ratio of the grid's two
  lowest (highest) points, rounded to 2 significant digits — at most ``tune_max_extensions`` times per optimizer
  and precision; the best over every LR tried is chosen. study.json records the LRs tried (``lr_tried``) and
  whether the choice is still at an edge of them (``lr_at_edge``: the optimum may then lie outside).
- target: target loss = mean final validation loss of the ``target_optimizer`` (AdamW) at ``tune_precision`` at
  its chosen LR, × (1 + ``target_slack``). Without a tune phase, the same rule over the main phase's runs of that
  optimizer at that precision (at its best LR when several were run).
- ``main``: every optimizer × precision × seed at its chosen LR (the task's default LR without tuning, or each of
  ``--lrs`` when given), at every horizon (``horizon_precisions`` off the middle one). A tune run at the chosen LR
  is the same configuration as seed 0 of its main cell and is run once (``studies.sweep`` reuses it).
- ``ablation``: stosignsgd and its variants at ``ablation_precision``, each with its own tuned LR.
- ``rounding``: nearest vs stochastic rounding of master weights and optimizer states, per optimizer, at variants
  of ``rounding_precision``.
- ``failure``: the FP8 failure map: ``failure_optimizers`` × ``failure_precisions`` (state / master storage
  policies) × seeds × ``failure_horizons``, each optimizer at its full-precision tuned LR of that horizon.
- ``mechanism``: the non-smooth convex task(s) in fp32 with each optimizer's default LR.

After the runs, ``studies.summary.summarize`` writes the answer (ladder speedups, paired loss changes vs fp32,
the failure map, the mechanism, claims) to study.json's ``summary``.

tokens_to_target is filled in for every row of a task that has a target (``finalize``), from its metrics.csv.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from studies import horizon
from studies.config import StudyConfig
from studies.optimizers import base_optimizer, default_lr
from studies.config import AUTO_COMPILED_MIN_STEPS, COMPILED_TASKS, RunSpec, resolve_engine, rounding_variants
from studies.config import apply_overrides
from studies.records import check_folder, merge_folders, study_fingerprint
from studies.schema import float_or_nan, read_study
from studies.store import ResultsStore, write_json_atomic
from studies.sweep import run_specs, shard
from studies.finalize import data_hash, finalize, versions as _versions
from studies.summary import summarize, summarize_folder

__all__ = ["PhaseIncomplete", "tuned_optimizers", "tune_horizons", "tune_grids", "main_precisions",
           "tune_precisions", "plan_tune", "next_lr",
           "at_edge", "plan_extension", "choose_lrs", "chosen_lr", "compute_targets", "plan_after_tune", "finalize",
           "run_study", "data_hash", "merge_study"]


class PhaseIncomplete(RuntimeError):
    """A phase that later phases depend on is not complete (a shard ran only its part); rerun after all shards."""


def _task(cfg: StudyConfig, name: str, size: str | None = None):
    from studies.tasks import get_task

    return get_task(name, size=size or cfg.size, data=cfg.data if name in cfg.tasks else None)


def _spec(cfg: StudyConfig, *, phase: str, task: str, optimizer: str, precision: str, lr: float, seed: int,
          size: str | None = None, steps: int | None = None, data: str | None = None) -> RunSpec:
    """One run; ``steps`` None: the study's steps / tokens (the task's own for the mechanism phase)."""
    data_sha256 = data_hash(data) if data else None
    own = phase == "mechanism"  # the convex tasks keep their own step count (mechanism_steps or the default)
    spec = RunSpec(
        task=task, optimizer=optimizer, precision=precision, lr=float(lr), seed=int(seed), phase=phase,
        size=size or cfg.size, data=data, steps=steps if (steps is not None or own) else cfg.steps,
        tokens=None if (steps is not None or own) else cfg.tokens,
        eval_every=None if own else horizon.eval_every_at(cfg, steps),
        schedule=cfg.schedule,
        warmup_frac=cfg.warmup_frac, telemetry_every=cfg.telemetry_every,
        thresholds=dataclasses.asdict(cfg.thresholds), data_sha256=data_sha256)
    if cfg.engine == "eager":
        return spec
    return dataclasses.replace(spec, engine=resolve_engine(cfg.engine, task, spec.planned_steps(_task(cfg, task, size)),
                                                                 spec.policy))


def _lr_grid(cfg: StudyConfig, task, optimizer: str) -> list[float]:
    if cfg.lrs:
        return list(cfg.lrs)
    grid = task.lr_grid.get(optimizer) or task.lr_grid.get(base_optimizer(optimizer))
    return [float(v) for v in grid] if grid else [default_lr(task, optimizer)]


def tuned_optimizers(cfg: StudyConfig) -> list[str]:
    """Optimizers that get an LR grid: the study's, the target optimizer, every ablation variant (each tuned by the
    same rule) and the optimizers of the rounding and failure phases."""
    names = list(cfg.optimizers)
    extra = [cfg.target_optimizer]
    if "ablation" in cfg.phases:
        extra += list(cfg.ablation_optimizers)
    if "rounding" in cfg.phases:
        extra += [base_optimizer(o) for o in (cfg.rounding_optimizers or cfg.optimizers)]
    if "failure" in cfg.phases and cfg.failure_precisions:
        extra += [base_optimizer(o) for o in cfg.failure_optimizers]
    for n in extra:
        if n not in names:
            names.append(n)
    return names


def tune_horizons(cfg: StudyConfig, optimizer: str) -> list[int | None]:
    """The horizons ``optimizer`` is tuned at: every horizon of the ladder for the main and target optimizers
    (and those of the failure phase), the middle one for ablation variants and rounding-only optimizers."""
    everywhere = set(cfg.optimizers) | {cfg.target_optimizer}
    if "failure" in cfg.phases and cfg.failure_precisions:
        everywhere |= {base_optimizer(o) for o in cfg.failure_optimizers}
    return horizon.ladder(cfg) if optimizer in everywhere else [horizon.middle(cfg)]


def main_precisions(cfg: StudyConfig, task: str) -> list[str]:
    """The main-phase precisions of ``task``: its ``task_precisions`` entry, else the study's ``precisions``."""
    return list(cfg.task_precisions.get(task, cfg.precisions))


def tune_precisions(cfg: StudyConfig, task: str) -> list[str]:
    return main_precisions(cfg, task) if cfg.tune_per_precision else [cfg.tune_precision]


def plan_tune(cfg: StudyConfig) -> list[RunSpec]:
    """The LR grid runs of the tune phase."""
    specs = []
    for tname in cfg.tasks:
        task = _task(cfg, tname)
        for opt in tuned_optimizers(cfg):
            for h in tune_horizons(cfg, opt):
                for prec in tune_precisions(cfg, tname):
                    specs += _tune_specs(cfg, tname, opt, prec, _lr_grid(cfg, task, opt), h)
    return specs


def tune_grids(cfg: StudyConfig) -> dict[tuple[str, str, str], list[float]]:
    """{(horizon key, precision, optimizer): the base LR grid} of every tuned cell (the start of ``tried``)."""
    return {(horizon.horizon_key(cfg, t, h), p, o): sorted(set(_lr_grid(cfg, _task(cfg, t), o)))
            for t in cfg.tasks for o in tuned_optimizers(cfg) for h in tune_horizons(cfg, o)
            for p in tune_precisions(cfg, t)}


def next_lr(tried: list[float], base: list[float], best: float) -> float | None:
    """The edge-extension LR: when ``best`` is the lowest (highest) of ``tried``, that LR divided (multiplied) by
    the ratio of the two lowest (highest) points of the base grid ``base``, rounded to 2 significant digits like
    the tasks' grids; None when ``best`` is interior or ``base`` has fewer than two distinct points (no spacing).
    """
    grid = sorted(set(float(v) for v in base))
    tried = sorted(set(float(v) for v in tried))
    if len(grid) < 2 or best not in (tried[0], tried[-1]):
        return None
    if best == tried[0]:
        raw = tried[0] * grid[0] / grid[1]
    else:
        raw = tried[-1] * grid[-1] / grid[-2]
    lr = float(f"{raw:.2g}")
    return lr if lr not in tried and lr > 0 else raw


def at_edge(tried: list[float], best: float) -> bool:
    """Whether ``best`` is the lowest or highest of two or more distinct LRs tried."""
    tried = sorted(set(float(v) for v in tried))
    return len(tried) >= 2 and best in (tried[0], tried[-1])


def _tune_specs(cfg: StudyConfig, tname: str, opt: str, prec: str, lrs: list[float], steps: int | None = None
                ) -> list[RunSpec]:
    return [_spec(cfg, phase="tune", task=tname, optimizer=opt, precision=prec, lr=lr, seed=seed, data=cfg.data,
                  steps=steps) for lr in lrs for seed in cfg.tune_seeds]


def plan_extension(cfg: StudyConfig, tried: dict[tuple[str, str, str], list[float]], rows: list[dict]
                   ) -> list[RunSpec]:
    """One edge-extension round: for every (task, precision, optimizer) whose best LR over the rows of its ``tried``
    LRs is at an edge, add the next LR outward to ``tried`` (in place) and return its tune runs (all tune seeds).

    ``rows`` must hold the finished runs of every tried LR; the caller bounds the number of rounds.
    """
    chosen = choose_lrs(cfg, rows)
    specs: list[RunSpec] = []
    for (key, prec, opt), lrs in tried.items():
        best = chosen.get(key, {}).get(prec, {}).get(opt, {}).get("lr")
        if best is None:
            continue
        tname, steps = horizon.split_key(key)
        lr = next_lr(lrs, _lr_grid(cfg, _task(cfg, tname), opt), best)
        if lr is not None:
            lrs.append(lr)
            lrs.sort()
            specs += _tune_specs(cfg, tname, opt, prec, [lr], steps if steps is not None else horizon.middle(cfg))
    return specs


def _score(rows: list[dict]) -> float:
    """Mean final validation loss; +inf when any run diverged, failed or has no finite value."""
    vals = []
    for r in rows:
        v = float_or_nan(r.get("final_val_loss"))
        if str(r.get("diverged")) == "True" or r.get("status") == "error" or not math.isfinite(v):
            return math.inf
        vals.append(v)
    return sum(vals) / len(vals) if vals else math.inf


def choose_lrs(cfg: StudyConfig, rows: list[dict], phase: str = "tune") -> dict:
    """{task key: {precision: {optimizer: {"lr": best, "scores": {lr: score}}}}} from the rows of ``phase``; the
    key is ``studies.horizon.horizon_key`` (the task name, "task@steps" off the middle horizon of a ladder).

    Ties and all-diverged grids pick the smallest LR (the most conservative choice).
    """
    groups: dict = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.get("phase") != phase:
            continue
        groups[(horizon.row_key(cfg, r), r["precision"], r["optimizer"])][float(r["lr"])].append(r)
    out: dict = {}
    for (task, prec, opt), by_lr in groups.items():
        scores = {lr: _score(rs) for lr, rs in sorted(by_lr.items())}
        best = min(scores, key=lambda lr: (scores[lr], lr))
        out.setdefault(task, {}).setdefault(prec, {})[opt] = {"lr": best, "scores": scores}
    return out


def chosen_lr(cfg: StudyConfig, chosen: dict, task, optimizer: str, precision: str, steps: int | None = None
              ) -> float:
    """The LR for ``optimizer`` at ``precision`` and horizon ``steps``: tuned there (per precision or at
    tune_precision; its own, else its base optimizer's), else the middle horizon's, else the task default."""
    keys = [precision, cfg.tune_precision] if cfg.tune_per_precision else [cfg.tune_precision]
    for tkey in dict.fromkeys([horizon.horizon_key(cfg, task.name, steps), task.name]):
        per_task = chosen.get(tkey, {})
        for key in keys:
            for name in (optimizer, base_optimizer(optimizer)):
                if name in per_task.get(key, {}):
                    return per_task[key][name]["lr"]
    return default_lr(task, optimizer)


def compute_targets(cfg: StudyConfig, rows: list[dict], chosen: dict) -> dict[str, dict]:
    """{task: {"target_loss", "rule", "baseline_runs"}} following the module's target rule."""
    out = {}
    for tname in cfg.tasks:
        prec, opt = cfg.tune_precision, cfg.target_optimizer
        cands = [r for r in rows if r["task"] == tname and r["optimizer"] == opt and r["precision"] == prec
                 and r.get("phase") in ("tune", "main") and horizon.row_key(cfg, r) == tname]
        lr = chosen.get(tname, {}).get(prec, {}).get(opt, {}).get("lr")
        if lr is not None:
            base = [r for r in cands if r["phase"] == "tune" and float(r["lr"]) == lr]
        else:  # no tuning: best LR among the main runs of the baseline
            by_lr: dict = defaultdict(list)
            for r in cands:
                if r["phase"] == "main":
                    by_lr[float(r["lr"])].append(r)
            base = min(by_lr.values(), key=_score) if by_lr else []
        score = _score(base) if base else math.inf
        rule = (f"mean final validation loss of {opt} at {prec} at its chosen LR over {len(base)} run(s), "
                f"x (1 + {cfg.target_slack:g})")
        out[tname] = {"target_loss": score * (1 + cfg.target_slack) if math.isfinite(score) else math.nan,
                      "rule": rule, "baseline_runs": [r["run_id"] for r in base]}
    return out


def plan_after_tune(cfg: StudyConfig, chosen: dict) -> list[RunSpec]:
    """The main (every horizon of the ladder), ablation and rounding (middle horizon), failure (its horizons) and
    mechanism runs (those of them listed in cfg.phases)."""
    specs: list[RunSpec] = []
    tuned = "tune" in cfg.phases
    mid = horizon.middle(cfg)

    def add(phase: str, tname: str, opt: str, prec: str, lr: float, seeds: list[int], steps: int | None) -> None:
        specs.extend(_spec(cfg, phase=phase, task=tname, optimizer=opt, precision=prec, lr=lr, seed=seed,
                           data=cfg.data, steps=steps) for seed in seeds)

    for tname in cfg.tasks:
        task = _task(cfg, tname)
        if "main" in cfg.phases:
            for h in horizon.ladder(cfg):
                for opt in cfg.optimizers:
                    for prec in horizon.precisions_at(cfg, main_precisions(cfg, tname), h):
                        lrs = [chosen_lr(cfg, chosen, task, opt, prec, h)] if tuned or not cfg.lrs else cfg.lrs
                        for lr in lrs:
                            add("main", tname, opt, prec, lr, cfg.seeds, h)
        if "ablation" in cfg.phases and tname in (cfg.ablation_tasks or cfg.tasks):
            for opt in cfg.ablation_optimizers:
                lr = chosen_lr(cfg, chosen, task, opt, cfg.ablation_precision, mid)
                add("ablation", tname, opt, cfg.ablation_precision, lr, cfg.ablation_seeds or cfg.seeds, mid)
        if "rounding" in cfg.phases and tname in (cfg.rounding_tasks or cfg.tasks):
            variants = rounding_variants(cfg.rounding_precision)
            for opt in cfg.rounding_optimizers or cfg.optimizers:
                lr = chosen_lr(cfg, chosen, task, opt, cfg.rounding_precision, mid)
                for prec in variants.values():
                    add("rounding", tname, opt, prec, lr, cfg.rounding_seeds or cfg.seeds[:1], mid)
        if "failure" in cfg.phases:
            for h in horizon.failure_horizons(cfg):
                for opt in cfg.failure_optimizers:
                    lr = chosen_lr(cfg, chosen, task, opt, cfg.tune_precision, h)  # tuned in full precision
                    for prec in cfg.failure_precisions:
                        add("failure", tname, opt, prec, lr, cfg.failure_seeds or cfg.seeds, h)
    if "mechanism" in cfg.phases:
        for tname in cfg.mechanism_tasks:
            task = _task(cfg, tname, cfg.mechanism_size)
            for opt in cfg.mechanism_optimizers:
                for seed in cfg.mechanism_seeds:
                    specs.append(_spec(cfg, phase="mechanism", task=tname, optimizer=opt, precision="fp32",
                                       lr=default_lr(task, opt), seed=seed, size=cfg.mechanism_size or cfg.size,
                                       steps=cfg.mechanism_steps))
    return specs


def _wait_for(specs: list[RunSpec], store: ResultsStore, wait_min: float, poll_s: float = 1.0) -> None:
    """Block until every spec has a row in ``store`` (any status: other shards' runs) or ``wait_min`` passes."""
    ids = {s.run_id for s in specs}
    deadline = time.monotonic() + 60.0 * wait_min
    while not ids <= {r["run_id"] for r in store.rows()} and time.monotonic() < deadline:
        time.sleep(poll_s)


def _missing(specs: list[RunSpec], store: ResultsStore) -> int:
    done = store.completed()
    return sum(1 for s in specs if s.run_id not in done)


def run_study(cfg: StudyConfig, *, command: str = "", shard_kn: tuple[int, int] | None = None,
              debug: bool = False, progress: bool = True, threads: int = 1, executor: str = "local",
              executor_options: dict[str, Any] | None = None, append: bool = False, wait_min: float = 0.0,
              device: str = "cpu", checkpoint_every: int | None = None) -> dict:
    """Run the study's phases into ``cfg.out``; write study.json; return the study definition (dict).

    With ``shard_kn = (K, N)`` only this shard's part of each phase runs; phases after ``tune`` need every tune run
    (from all shards) and raise PhaseIncomplete until then. Each LR-extension round of the tune phase is planned
    from the finished runs of the rounds before it, so it too waits for every shard (one more rerun per round).
    Runs execute with ``executor`` ("local" or "submitit", see ``studies.sweep.run_specs``) and ``threads`` torch
    threads each. A folder holding a different study (fingerprint) is refused unless ``append``. With
    ``wait_min > 0`` a shard waits up to that many minutes for the other shards' runs in the same folder (tune
    rounds, then the rest before the targets), so every shard of a job array finishes the whole study.
    """
    out = Path(cfg.out)
    fingerprint = study_fingerprint(cfg.to_dict(), threads=threads,
                                    data_sha256=data_hash(cfg.data) if cfg.data else None)
    fingerprint = check_folder(out, fingerprint, append=append)
    out.mkdir(parents=True, exist_ok=True)
    store = ResultsStore(out)
    study: dict[str, Any] = {
        "command": command, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(), "config": cfg.to_dict(), "thresholds": dataclasses.asdict(cfg.thresholds),
        "shard": f"{shard_kn[0]}/{shard_kn[1]}" if shard_kn else None,
        "tasks": {t: _task_info(cfg, t) for t in cfg.tasks},
        "protocol": __doc__.strip(), "status": "running", "size": cfg.size,
        "optimal_loss": _optimal_losses(cfg), "fingerprint": fingerprint,
    }
    write_json_atomic(out / "study.json", study)
    counts: dict[str, dict] = {}
    study["device"] = device   # where the runs train ("cuda": native FP8 GEMMs where the hardware has them)
    how = {"threads": threads, "executor": executor, "executor_options": executor_options, "device": device,
           "checkpoint_every": checkpoint_every}

    def part(specs: list[RunSpec]) -> list[RunSpec]:
        return shard(specs, *shard_kn) if shard_kn else specs

    chosen: dict = {}
    if "tune" in cfg.phases:
        tune = plan_tune(cfg)
        study["lr_grid"] = {t: {o: _lr_grid(cfg, _task(cfg, t), o) for o in tuned_optimizers(cfg)}
                            for t in cfg.tasks}
        tried = tune_grids(cfg)
        counts["tune"] = {}
        # round 0 is the grid; round r >= 1 the edge extensions chosen from the finished rounds 0..r-1. Every
        # round is a deterministic function of the finished runs, so shards plan the same round and a rerun
        # skips what is done; a round with missing runs (other shards) stops here until it is complete.
        batch, rnd = tune, 0
        while True:
            c = run_specs(part(batch), out, workers=cfg.workers, desc="tune" if rnd == 0 else f"tune+{rnd}",
                          debug=debug, progress=progress, **how)
            for k, v in c.items():
                counts["tune"][k] = counts["tune"].get(k, 0) + v
            if shard_kn:
                _wait_for(batch, store, wait_min)
            missing = _missing(batch, store)
            if missing:
                what = "tune runs" if rnd == 0 else f"runs of LR-extension round {rnd}"
                study["status"] = f"waiting: {missing} of {len(batch)} {what} missing"
                write_json_atomic(out / "study.json", study)
                raise PhaseIncomplete(
                    f"the tune phase is incomplete ({missing} of {len(batch)} {what} missing, e.g. other shards); "
                    f"shards sharing this folder: rerun the same command when they have finished (or give --wait); "
                    f"shards with their own folders: `precision-sweep merge OUT DIR...` and rerun with --out OUT")
            ids = {s.run_id for s in tune}
            rows = [r for r in store.rows() if r["run_id"] in ids]
            if rnd >= cfg.tune_max_extensions:
                break
            batch = plan_extension(cfg, tried, rows)
            if not batch:
                break
            tune, rnd = tune + batch, rnd + 1
        chosen = choose_lrs(cfg, rows)
        study["chosen_lrs"] = {t: {p: {o: v["lr"] for o, v in po.items()} for p, po in pp.items()}
                               for t, pp in chosen.items()}
        study["lr_scores"] = {t: {p: {o: {str(k): s for k, s in v["scores"].items()} for o, v in po.items()}
                                  for p, po in pp.items()} for t, pp in chosen.items()}
        lr_tried: dict = {}
        for (k, p, o), v in tried.items():
            lr_tried.setdefault(k, {}).setdefault(p, {})[o] = v
        study["lr_tried"] = lr_tried
        study["lr_at_edge"] = {t: {p: {o: at_edge(tried.get((t, p, o), []), v["lr"]) for o, v in po.items()}
                                   for p, po in pp.items()} for t, pp in chosen.items()}
        study["lr_extension_rule"] = (
            f"edge extension: while an optimizer's best LR is the lowest (highest) LR tried, the next LR outward "
            f"(same ratio as the grid's edge spacing) is run, at most {cfg.tune_max_extensions} time(s) per "
            f"optimizer and precision; 'at edge of grid' means the best LR is still the lowest or highest tried, "
            f"so the optimum may lie outside the range")
    targets = compute_targets(cfg, store.rows(), chosen) if "tune" in cfg.phases else {}
    study["targets"] = targets
    write_json_atomic(out / "study.json", study)

    rest = plan_after_tune(cfg, chosen)
    tvals = {t: v["target_loss"] for t, v in targets.items()}
    counts["main"] = run_specs(part(rest), out, workers=cfg.workers, desc="+".join(
        p for p in cfg.phases if p != "tune") or "runs", targets=tvals, debug=debug, progress=progress, **how)
    if shard_kn:
        _wait_for(rest, store, wait_min)
    if "tune" not in cfg.phases:
        targets = compute_targets(cfg, store.rows(), chosen)
        tvals = {t: v["target_loss"] for t, v in targets.items()}
    study["targets"] = targets
    finalize(out, tvals)
    study["summary"] = summarize(cfg, store.rows(), optimal=study["optimal_loss"],
                                 lr_at_edge=study.get("lr_at_edge"), out_dir=out)
    study["counts"] = counts
    study["engine"] = engine_record(cfg, store.rows())
    study["status"] = "complete" if not _missing(rest, store) else f"partial ({_missing(rest, store)} runs " \
                                                                    f"missing: other shards)"
    study["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    write_json_atomic(out / "study.json", study)
    return study


def engine_record(cfg: StudyConfig, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """study.json's ``engine``: the setting, the rule ``auto`` follows, and how many of the folder's runs trained
    with each engine (read from every run's configuration)."""
    runs: dict[str, int] = {}
    for row in rows:
        e = json.loads(row["config_json"]).get("engine", "eager") if row.get("config_json") else "eager"
        runs[e] = runs.get(e, 0) + 1
    from lowprec.adamw import native_adamw_status
    from lowprec.fast import native_available

    adamw_native, why = native_adamw_status()
    return {"setting": cfg.engine, "runs": runs,
            "native_helpers": native_available(),
            "adamw_step": ("native two-pass loop, bit-identical to torch's foreach AdamW (checked at first use; "
                           "lowprec.adamw)" if adamw_native else f"torch's foreach AdamW ({why})"),
            "auto_rule": f"compiled for tasks {', '.join(COMPILED_TASKS)} with >= {AUTO_COMPILED_MIN_STEPS} steps "
                         f"and no delayed scaling; eager otherwise",
            "compiled": "torch.compile'd forward, backward and evaluation on the steps telemetry does not sample "
                        "(the sampled steps, every telemetry_every-th and the last, run eagerly and record "
                        "telemetry); numbers equal eager up to float reassociation (studies.training)"}


def merge_study(out_dir: str | Path, folders: list[str | Path]) -> dict[str, int]:
    """``studies.records.merge_folders``, then the targets (and every row's target_loss / tokens_to_target)
    recomputed from the merged runs with the study's own configuration: shards without a tune phase each saw only
    their part of the baseline runs."""
    counts = merge_folders(out_dir, folders)
    study = read_study(out_dir)
    if "config" not in study:
        return counts
    cfg = apply_overrides(StudyConfig(), {k: v for k, v in study["config"].items() if k != "out"})
    rows = ResultsStore(out_dir).rows()
    chosen = choose_lrs(cfg, rows) if "tune" in cfg.phases else {}
    targets = compute_targets(cfg, rows, chosen)
    finalize(out_dir, {t: v["target_loss"] for t, v in targets.items()})
    study["targets"] = targets
    study["summary"] = summarize_folder(out_dir, study, ResultsStore(out_dir).rows())
    write_json_atomic(Path(out_dir) / "study.json", study)
    return counts


def _optimal_losses(cfg: StudyConfig) -> dict[str, float]:
    """task -> known optimum of the objective (convex tasks), from a seed-0 build; tasks without one are left out."""
    out = {}
    names = list(cfg.tasks) + (list(cfg.mechanism_tasks) if "mechanism" in cfg.phases else [])
    for name in dict.fromkeys(names):
        if name.startswith("convex"):
            size = cfg.size if name in cfg.tasks else (cfg.mechanism_size or cfg.size)
            opt = getattr(_task(cfg, name, size).build(0), "optimal_loss", None)
            if opt is not None:
                out[name] = float(opt)
    return out


def _task_info(cfg: StudyConfig, name: str) -> dict:
    t = _task(cfg, name)
    return {"description": t.description, "size": t.size, "default_steps": t.default_steps,
            "eval_every": t.eval_every, "tokens_per_step": t.tokens_per_step, "default_lrs": t.default_lrs,
            "lr_grid": t.lr_grid}
