"""One run of the precision sweep: (task, optimizer, precision, lr, seed, steps, thresholds) -> a results row.

The loop reads top to bottom, nanoGPT-style: :func:`setup` (seed, task, ``lowprec.nn.convert`` under the run's
policy, ``lowprec.optim.wrap``), then per step :func:`train_step` (forward, divergence check of the loss,
backward, optimizer step; update ratio and telemetry read on sampled steps only), :func:`evaluate` every
``eval_every`` steps, and :func:`finish` (``metrics.csv``, ``telemetry.csv``, the explanation, the row).

Files: ``DIR/runs/<run_id>/metrics.csv`` (one row per step, ``studies.schema.METRIC_COLUMNS``) and
``telemetry.csv`` (the lowprec Telemetry frame), each written atomically. Divergence (non-finite loss, spike,
blow-up; see ``studies.config.Thresholds``) stops the run early with ``status = "diverged"``; the row says when,
why, and which telemetry site went first. A run that fails (a ValueError, RuntimeError, OSError or
ArithmeticError: bad input, a torch error, out of memory, unreadable data) becomes a row with ``status = "error"``
and ``divergence_reason = "error: ..."`` so a sweep never stops on one bad cell; any other exception is a bug and
propagates.

Checkpoints (``checkpoint_every=N``, single-process runs): after every N-th step the whole training state (model,
optimizer with its packed states and generators, telemetry, divergence detector, metrics so far, global RNG
states) goes to ``runs/<run_id>/checkpoint.pt`` (atomic rename); a run started again with a checkpoint present
continues after its step and ends bit-identical to an uninterrupted run. The file is removed when the run ends.
It is a pickle (``torch.load(weights_only=False)``): load only checkpoints this package wrote.

Per-step cost: the training loss is read on the host every step (the divergence detector needs it); the gradient
norm stays on the device until the run ends; parameters are cloned (for ``update_ratio`` and
``lost_update_frac``) only on telemetry-sampled steps (every ``telemetry_every`` steps and the last one).
"""
from __future__ import annotations

import io
import json
import math
import random
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from studies.config import RunSpec, Thresholds, compiled_unsupported
from studies.diagnosis import (SECOND_MOMENT_KEYS, DivergenceDetector, explain, optimizer_chain,
                               state_bytes_per_param, state_zero_frac)
from studies.optimizers import make_optimizer
from studies.schema import METRIC_COLUMNS as _SCHEMA_METRIC_COLUMNS
from studies.store import RESULT_COLUMNS, write_atomic, write_csv_atomic

__all__ = ["METRIC_COLUMNS", "RESULT_COLUMNS", "RUN_FAILURES", "CHECKPOINT_NAME", "Parallel", "OnDevice", "DEVICES",
           "resolve_device", "Run", "lr_at", "setup", "evaluate", "train_step", "save_checkpoint", "load_checkpoint",
           "finish", "train", "execute_run"]

METRIC_COLUMNS = list(_SCHEMA_METRIC_COLUMNS)
# the exceptions that make a run an "error" row instead of stopping the sweep (anything else is a bug)
RUN_FAILURES = (ValueError, RuntimeError, OSError, ArithmeticError)
CHECKPOINT_NAME = "checkpoint.pt"


def lr_at(step: int, steps: int, lr: float, schedule: str, warmup_frac: float) -> float:
    """Learning rate for 0-based ``step``: "constant", or "cosine" = linear warm-up over warmup_frac·steps then
    cosine decay to 10% of ``lr`` at the last step."""
    if schedule == "constant":
        return lr
    warm = int(warmup_frac * steps)
    if warm > 0 and step < warm:
        return lr * (step + 1) / warm
    span = max(1, steps - warm - 1)
    progress = min(1.0, (step - warm) / span)
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


class Parallel:
    """How one run is spread over processes. This base class is a single process and changes nothing; a
    data-parallel rank (``studies.ddp.DDPParallel``) overrides the hooks the loop calls:

    - ``wrap(trun)``: after ``lowprec.nn.convert``, route ``trun``'s forward passes through a wrapper (DDP);
    - ``batch(step)``: the index of the training batch this process draws at ``step``;
    - ``mean(value)``: a scalar (the training loss) averaged over processes;
    - ``agree(reason)``: the divergence reason every process adopts (all stop at the same step);
    - ``world``: processes per step (tokens per step are ``world`` × the task's);
    - ``device``: where the task's model and data live (and the optimizer's generator).
    """

    world = 1
    device = "cpu"

    def wrap(self, trun) -> None:
        return None

    def batch(self, step: int) -> int:
        return step

    def mean(self, value: float) -> float:
        return value

    def agree(self, reason: str) -> str:
        return reason


DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> str:
    """``"cpu"`` or ``"cuda"`` for a ``--device`` choice: ``auto`` is cuda where torch sees a GPU, else cpu;
    ``cuda`` without one is a ValueError naming what is valid here."""
    if name not in DEVICES:
        raise ValueError(f"unknown device {name!r}; valid: {', '.join(DEVICES)}")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda: torch sees no CUDA GPU here; valid here: auto, cpu")
    return name


class OnDevice(Parallel):
    """A single process whose model, data and optimizer generator live on ``device`` (e.g. ``"cuda"``). On a
    device other than the CPU the converted layers use ``backend="auto"``: the native FP8 GEMM
    (``torch._scaled_mm``) wherever the hardware and the spec allow it, emulation elsewhere."""

    def __init__(self, device: str) -> None:
        self.device = str(torch.device(device))


@dataclass
class Run:
    """Everything :func:`setup` builds for one run, and what the loop has logged so far."""

    spec: RunSpec
    par: Parallel
    trun: Any                        # studies.tasks.TaskRun
    opt: torch.optim.Optimizer       # lowprec.optim.wrap(...) of the registry optimizer
    tel: Any                         # lowprec.telemetry.Telemetry shared by the layers and the optimizer
    params: list[torch.Tensor]
    steps: int
    eval_every: int
    tokens_per_step: int
    detector: DivergenceDetector
    metrics: list[dict[str, Any]] = field(default_factory=list)
    compiled: Any = None             # engine "compiled": trun.compiled(), the twin run on unsampled steps

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.params)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def _blank() -> dict[str, Any]:
    return {c: math.nan for c in METRIC_COLUMNS}


# ----------------------------------------------------------------------------------------------- setup
def setup(spec: RunSpec, par: Parallel) -> Run:
    """Seed, build the task's model and data, convert the model and wrap the optimizer under ``spec.policy``."""
    import lowprec.nn
    from lowprec.telemetry import Telemetry
    from studies.tasks import get_task

    _seed_everything(spec.seed)
    task = get_task(spec.task, size=spec.size, data=spec.data)
    trun = task.build(spec.seed, device=par.device)
    tps = int(trun.tokens_per_step) * par.world
    steps = spec.planned_steps(task, par.world)
    tel = Telemetry(every=spec.telemetry_every, zero_states=SECOND_MOMENT_KEYS, check_nonfinite="deferred")
    # On a CPU torch._scaled_mm is slower than emulation and gives the same numbers up to summation order, so the
    # study emulates there; on a GPU the native FP8 GEMM runs wherever the hardware has it.
    backend = "emulated" if torch.device(par.device).type == "cpu" else "auto"
    lowprec.nn.convert(trun.model, spec.policy, telemetry=tel, backend=backend)
    par.wrap(trun)
    params = [p for p in trun.model.parameters() if p.requires_grad]
    opt = _optimizer(spec, params, tel, par.device)
    return Run(spec=spec, par=par, trun=trun, opt=opt, tel=tel, params=params, steps=steps,
               eval_every=int(spec.eval_every or task.eval_every), tokens_per_step=tps,
               detector=DivergenceDetector(Thresholds(**spec.thresholds)), compiled=_compiled_twin(spec, par, trun))


def _compiled_twin(spec: RunSpec, par: Parallel, trun) -> Any:
    """``trun.compiled()`` for engine "compiled" (None for "eager"); ValueError where it cannot compile."""
    if spec.engine == "eager":
        return None
    if spec.engine != "compiled":
        raise ValueError(f"unknown engine {spec.engine!r}; valid: eager, compiled")
    if par.world != 1:
        raise ValueError("engine compiled runs on a single process; data-parallel runs are eager")
    why = compiled_unsupported(spec.task, spec.policy)
    twin = None if why else trun.compiled()
    if twin is None:
        raise ValueError(f"engine compiled: {why or f'task {spec.task!r} has no compiled forward'}")
    return twin


def _optimizer(spec: RunSpec, params: list[torch.Tensor], tel, device: str) -> torch.optim.Optimizer:
    """The registry optimizer over ``params`` (its generator seeded by the run's seed), wrapped under the policy
    with its state / master-weight rounding stream seeded from the run's seed too (``rounding_seed``)."""
    import lowprec.optim
    from studies.tasks.base import rounding_seed

    gen = torch.Generator(device=device).manual_seed(1_000_003 * spec.seed + 12_345)
    return lowprec.optim.wrap(make_optimizer(spec.optimizer, params, spec.lr, generator=gen), spec.policy,
                              telemetry=tel, seed=rounding_seed(spec.seed))


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for o in optimizer_chain(opt):
        for g in o.param_groups:
            g["lr"] = lr


# ----------------------------------------------------------------------------------------------- evaluate
def evaluate(run: Run) -> float:
    """The validation loss of the current model (eval mode, no gradient; train mode restored)."""
    model = run.trun.model
    trun = run.trun if run.compiled is None or run.tel.sampling else run.compiled
    model.eval()
    with torch.no_grad():
        v = float(trun.val_loss())
    model.train()
    return v


# ----------------------------------------------------------------------------------------------- step
def _sampled(run: Run, k: int) -> bool:
    return k % run.spec.telemetry_every == 0 or k == run.steps


def train_step(run: Run, step: int) -> tuple[dict[str, Any], str]:
    """Train 0-based ``step`` (logged as step ``k = step + 1``): its metrics row and divergence reason ("" if
    none). A non-finite loss stops before the backward pass (the model is left as it was)."""
    spec, opt, params, tel = run.spec, run.opt, run.params, run.tel
    k = step + 1
    tel.set_step(k)  # the rows of training step k carry k (the initial evaluation's carry 0)
    lr = lr_at(step, run.steps, spec.lr, spec.schedule, spec.warmup_frac)
    _set_lr(opt, lr)
    opt.zero_grad(set_to_none=True)
    sampled = _sampled(run, k)
    trun = run.trun if run.compiled is None or sampled else run.compiled  # telemetry is recorded eagerly
    loss = trun.train_loss(run.par.batch(step))
    lv = run.par.mean(float(loss.detach()))
    rec = {**_blank(), "step": k, "tokens": k * run.tokens_per_step, "loss": lv, "lr": lr}
    reason = run.detector.train(k, lv)
    if reason in ("nan", "inf"):
        return rec, reason
    loss.backward()
    with torch.no_grad():
        gn = [p.grad.detach().float().pow(2).sum() for p in params if p.grad is not None]
        rec["grad_norm"] = torch.stack(gn).sum().sqrt() if gn else 0.0  # a device tensor until finish()
        before = [p.detach().clone() for p in params] if sampled else None
    opt.step()
    if sampled:
        with torch.no_grad():
            du = sum(float((p.detach() - b).float().pow(2).sum()) for p, b in zip(params, before))
            wn = sum(float(b.float().pow(2).sum()) for b in before)
        rec["update_ratio"] = math.sqrt(du) / math.sqrt(wn) if wn > 0 else math.nan
        rec.update(_telemetry_columns(tel))
        if math.isnan(rec["state_zero_frac"]):
            rec["state_zero_frac"] = state_zero_frac(opt)
        if math.isnan(rec["lost_update_frac"]):  # no master rounding measured: entries left unchanged
            with torch.no_grad():
                same = sum(int((p.detach() == b).sum()) for p, b in zip(params, before))
            rec["lost_update_frac"] = same / max(1, run.n_params)
    return rec, reason


def _telemetry_columns(tel) -> dict[str, float]:
    """Telemetry.summary() restricted to the metrics columns (<role>_underflow/_overflow, state_zero_frac,
    lost_update_frac at the latest sampled step); NaN entries are left out."""
    return {k: float(v) for k, v in tel.summary().items()
            if k in METRIC_COLUMNS and isinstance(v, (int, float)) and not math.isnan(v)}


# ----------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(run: Run, path: Path, steps_done: int) -> None:
    """Write the training state after step ``steps_done`` to ``path`` atomically (module docstring)."""
    state = {"run_id": run.spec.run_id, "steps_done": steps_done, "model": run.trun.model, "tel": run.tel,
             "opt": run.opt.state_dict(), "detector": run.detector, "metrics": run.metrics,
             "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate()}}
    buf = io.BytesIO()
    torch.save(state, buf)  # one pickle: the model's sites (delayed scalers included) keep sharing the telemetry
    write_atomic(path, buf.getvalue())


def load_checkpoint(run: Run, path: Path) -> int:
    """Put the state saved at ``path`` into ``run`` (built by :func:`setup` for the same spec); return the
    number of steps it had done. ValueError if the checkpoint belongs to another run."""
    state = torch.load(path, weights_only=False)
    if state["run_id"] != run.spec.run_id:
        raise ValueError(f"{path} is a checkpoint of run {state['run_id']}, not of {run.spec.run_id}")
    run.trun.model, run.tel = state["model"], state["tel"]
    run.params = [p for p in run.trun.model.parameters() if p.requires_grad]
    # the optimizer through its own state_dict (packed states and generators; torch optimizers do not pickle
    # their extra attributes): the same construction as setup(), then the saved state
    run.opt = _optimizer(run.spec, run.params, run.tel, run.par.device)
    run.opt.load_state_dict(state["opt"])
    run.compiled = _compiled_twin(run.spec, run.par, run.trun)  # the twin must share the loaded model
    run.detector, run.metrics = state["detector"], state["metrics"]
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["random"])
    return int(state["steps_done"])


# ----------------------------------------------------------------------------------------------- the loop
def train(spec: RunSpec, run_dir: Path, target_loss: float | None, par: Parallel,
          checkpoint_every: int | None = None) -> dict[str, Any]:
    """Set up (or resume from the run's checkpoint), train until ``steps`` or divergence, evaluate every
    ``eval_every`` steps, finish: the row's columns from ``steps`` on (see :func:`finish`)."""
    run = setup(spec, par)
    ckpt = run_dir / CHECKPOINT_NAME
    if checkpoint_every is not None and (par.world != 1 or checkpoint_every < 1):
        raise ValueError(f"checkpoint_every must be a positive integer on a single-process run, got "
                         f"{checkpoint_every!r} with {par.world} processes")
    reason, diverged_step = "", None
    if checkpoint_every is not None and ckpt.is_file():
        steps_done = load_checkpoint(run, ckpt)
    else:
        v0 = evaluate(run)
        run.metrics.append({**_blank(), "step": 0, "tokens": 0, "val_loss": v0, "lr": 0.0})
        reason = par.agree(run.detector.val(0, v0))
        diverged_step = 0 if reason else None
        steps_done = 0
    for step in range(steps_done, run.steps if not reason else 0):
        k = step + 1
        rec, reason = train_step(run, step)
        if reason in ("nan", "inf"):
            run.metrics.append(rec)
            diverged_step, steps_done = k, k
            break
        steps_done = k
        if not reason and (k % run.eval_every == 0 or k == run.steps):
            rec["val_loss"] = evaluate(run)
            reason = run.detector.val(k, rec["val_loss"])
        reason = par.agree(reason)
        run.metrics.append(rec)
        if reason:
            diverged_step = k
            break
        if checkpoint_every is not None and k % checkpoint_every == 0 and k < run.steps:
            save_checkpoint(run, ckpt, k)
    row = finish(run, run_dir, target_loss, reason, diverged_step, steps_done)
    ckpt.unlink(missing_ok=True)
    return row


def finish(run: Run, run_dir: Path, target_loss: float | None, reason: str, diverged_step: int | None,
           steps_done: int) -> dict[str, Any]:
    """Write ``metrics.csv`` and ``telemetry.csv``, explain the run, and return the row's columns from ``steps``
    on (the losses, divergence, explanation, target, state bytes)."""
    import pandas as pd

    from studies.stats import run_tokens_to_target

    for rec in run.metrics:
        if isinstance(rec["grad_norm"], torch.Tensor):
            rec["grad_norm"] = float(rec["grad_norm"])
    mdf = pd.DataFrame(run.metrics, columns=METRIC_COLUMNS)
    write_csv_atomic(mdf, run_dir / "metrics.csv")
    frame = run.tel.frame()
    write_csv_atomic(frame, run_dir / "telemetry.csv")
    if hasattr(run.trun, "loss_parts"):  # the convex task's final loss split by kink (studies.summary reads it)
        write_atomic(run_dir / "loss_parts.json", json.dumps(run.trun.loss_parts()))
    diverged = bool(reason)
    site, sentence = explain(frame, run.metrics, run.spec, diverged, diverged_step, reason,
                             run.tel.first_nonfinite())
    vals = mdf["val_loss"].astype(float)
    finite_vals = vals[np.isfinite(vals)]
    losses = mdf["loss"].astype(float).dropna()
    ttt = math.nan
    if target_loss is not None and math.isfinite(target_loss):
        ttt = run_tokens_to_target(mdf["tokens"].to_numpy(float), vals.to_numpy(float), target_loss)
    return {
        "steps": run.steps, "steps_done": steps_done, "tokens": steps_done * run.tokens_per_step,
        "final_loss": float(losses.iloc[-1]) if len(losses) else math.nan,
        "final_val_loss": float(vals.dropna().iloc[-1]) if vals.notna().any() else math.nan,
        "best_val_loss": float(finite_vals.min()) if len(finite_vals) else math.nan,
        "diverged": diverged, "diverged_step": diverged_step if diverged else None,
        "divergence_reason": reason, "divergence_site": site if diverged else "",
        "explanation": sentence, "status": "diverged" if diverged else "ok",
        "target_loss": target_loss if target_loss is not None else math.nan, "tokens_to_target": ttt,
        "state_bytes_per_param": state_bytes_per_param(run.opt, run.n_params),
    }


# ----------------------------------------------------------------------------------------------- entry point
def _base_row(spec: RunSpec) -> dict[str, Any]:
    return {
        "run_id": spec.run_id, "phase": spec.phase, "task": spec.task, "optimizer": spec.optimizer,
        "precision": spec.precision, "lr": spec.lr, "seed": spec.seed, "steps": spec.steps, "steps_done": 0,
        "tokens": 0, "final_loss": math.nan, "final_val_loss": math.nan, "best_val_loss": math.nan,
        "diverged": False, "diverged_step": None, "divergence_reason": "", "divergence_site": "",
        "explanation": "", "target_loss": math.nan, "tokens_to_target": math.nan, "wall_s": math.nan,
        "state_bytes_per_param": math.nan, "status": "ok", "config_json": spec.config_json,
    }


def execute_run(spec: RunSpec, out_dir: str | Path, *, target_loss: float | None = None,
                debug: bool = False, parallel: Parallel | None = None, run_dir: str | Path | None = None,
                checkpoint_every: int | None = None) -> dict[str, Any]:
    """Run ``spec``, write ``out_dir/runs/<run_id>/{metrics,telemetry}.csv``, return the results row (the
    columns of ``studies.schema.RESULT_COLUMNS``, typed; ``diverged_step`` is None unless it diverged).

    A failure in :data:`RUN_FAILURES` becomes a row with ``status="error"`` (traceback in
    ``runs/<run_id>/error.txt``) unless ``debug`` is true, in which case it propagates. ``parallel`` makes this
    process one rank of a data-parallel run (see :class:`Parallel`); ``run_dir`` overrides where the files go;
    ``checkpoint_every`` saves a checkpoint every N steps and resumes from one (module docstring).
    """
    t0 = time.perf_counter()
    run_dir = Path(run_dir) if run_dir is not None else Path(out_dir) / "runs" / spec.run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    row = _base_row(spec)
    try:
        row.update(train(spec, run_dir, target_loss, parallel or Parallel(), checkpoint_every))
    except RUN_FAILURES as e:
        if debug:
            raise
        msg = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        (run_dir / "error.txt").write_text(traceback.format_exc())
        row.update(status="error", divergence_reason=f"error: {msg}",
                   explanation=f"{spec.optimizer} {spec.precision}, seed {spec.seed}: the run failed ({msg}).")
    row["wall_s"] = round(time.perf_counter() - t0, 3)
    return row
