"""One run of the precision sweep: (task, optimizer, precision, lr, seed, steps, thresholds) -> a results row.

A run builds the task with its seed, converts the model with ``lowprec.nn.convert`` under the precision policy,
wraps the optimizer with ``lowprec.optim.wrap``, and trains deterministically on CPU. Each step is logged to
``DIR/runs/<run_id>/metrics.csv`` (written to a temporary name, then renamed), the lowprec telemetry frame to
``telemetry.csv``. Divergence (non-finite loss, spike, blow-up; see ``studies.config.Thresholds``) stops the run
early; the row says when, why, and which telemetry site went first. An exception inside a run becomes a row with
``status = "error"`` and ``divergence_reason = "error: ..."`` so a sweep never crashes on one bad cell.
"""
from __future__ import annotations

import math
import random
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lowprec.policy import TENSOR_ROLES

from studies.config import RunSpec, Thresholds
from studies.optimizers import make_optimizer
from studies.store import RESULT_COLUMNS, write_csv_atomic  # noqa: F401 - RESULT_COLUMNS re-exported until schema.py

ROLES = TENSOR_ROLES  # roles with telemetry columns
METRIC_COLUMNS = (
    ["step", "tokens", "loss", "val_loss", "lr", "grad_norm", "update_ratio"]
    + [f"{r}_{k}" for r in ROLES for k in ("underflow", "overflow")]
    + ["state_zero_frac", "lost_update_frac"]
)
# optimizer-state entries that hold a second moment or a magnitude bound (their zero fraction is logged)
SECOND_MOMENT_KEYS = ("exp_avg_sq", "max_exp_avg_sq", "bound")  # AdamW, AMSGrad, StoSignSGD's G


# ----------------------------------------------------------------------------------------------- divergence
def _nonfinite(loss: float) -> str:
    """The divergence reason of a non-finite loss: "nan" or "inf"."""
    return "nan" if math.isnan(loss) else "inf"


class DivergenceDetector:
    """Stateful divergence check over training losses (every step) and validation losses (every evaluation)."""

    def __init__(self, thresholds: Thresholds):
        self.t = thresholds
        self.initial_loss: float | None = None
        self.running_min = math.inf
        self.spike_count = 0
        self.initial_val: float | None = None
        self.blowup_count = 0

    def train(self, step: int, loss: float) -> str:
        """Return the divergence reason ("nan", "inf", "spike") or "" for the training loss at ``step``."""
        if not math.isfinite(loss):
            return _nonfinite(loss)
        if self.initial_loss is None:
            self.initial_loss = loss
        if step > self.t.warmup_steps:
            floor = self.running_min + self.t.spike_min_rise * abs(self.initial_loss)
            if loss > self.t.spike_factor * self.running_min and loss > floor:
                self.spike_count += 1
                if self.spike_count >= self.t.spike_patience:
                    return "spike"
            else:
                self.spike_count = 0
        self.running_min = min(self.running_min, loss)
        return ""

    def val(self, step: int, loss: float) -> str:
        """Return "nan", "inf", "blow-up" or "" for the validation loss at ``step``."""
        if not math.isfinite(loss):
            return _nonfinite(loss)
        if self.initial_val is None:
            self.initial_val = loss
            return ""
        if step > self.t.warmup_steps and loss > self.initial_val + self.t.blowup_margin * abs(self.initial_val):
            self.blowup_count += 1
            if self.blowup_count >= self.t.blowup_patience:
                return "blow-up"
        else:
            self.blowup_count = 0
        return ""


# ----------------------------------------------------------------------------------------------- helpers
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


def _optimizer_chain(opt) -> list:
    """The optimizer and the optimizers it wraps (attribute ``optimizer``/``inner``), outermost first."""
    chain, seen = [], set()
    while opt is not None and id(opt) not in seen and len(chain) < 6:
        chain.append(opt)
        seen.add(id(opt))
        opt = getattr(opt, "optimizer", None) or getattr(opt, "inner", None)
    return chain


def _set_lr(opt, lr: float) -> None:
    for o in _optimizer_chain(opt):
        for g in getattr(o, "param_groups", []):
            g["lr"] = lr


def _tensors(obj):
    """Tensors inside a state_dict, skipping hyper-parameters ("param_groups") and RNG states ("rng")."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if k not in ("param_groups", "rng"):
                yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def state_bytes_per_param(opt, n_params: int) -> float:
    """Bytes of the optimizer's per-parameter state tensors (``state_dict()`` without param_groups and RNG
    states, including wrapped optimizers' state such as SignConverted's "base") / the number of parameters."""
    sd = opt.state_dict()
    total = sum(t.numel() * t.element_size() for t in _tensors(sd))
    return total / max(1, n_params)


def _decoded(value):
    """A state entry as a float tensor: a tensor, a lowprec Encoded, or an Encoded's to_dict()."""
    if isinstance(value, torch.Tensor):
        return value
    try:
        import lowprec

        if isinstance(value, lowprec.Encoded):
            return lowprec.decode(value)
        if isinstance(value, dict) and "codes" in value:
            return lowprec.decode(lowprec.Encoded.from_dict(value))
    except Exception:  # not an encoded state: ignore
        return None
    return None


def state_zero_frac(opt) -> float:
    """Fraction of second-moment (or magnitude-bound) optimizer-state entries that are exactly zero; nan if the
    optimizer keeps none (SGD, SignSGD, Signum)."""
    zeros = total = 0
    for o in _optimizer_chain(opt):
        state = getattr(o, "state", None)
        if not isinstance(state, dict):
            continue
        for st in state.values():
            if not isinstance(st, dict):
                continue
            for key in SECOND_MOMENT_KEYS:
                if key in st:
                    t = _decoded(st[key])
                    if t is not None and t.numel() > 1:
                        zeros += int((t == 0).sum())
                        total += t.numel()
        if total:
            break
    return zeros / total if total else math.nan


def _role_fractions(tel) -> dict[str, float]:
    """Telemetry.summary() restricted to the metrics columns (<role>_underflow/_overflow, state_zero_frac,
    lost_update_frac at the latest sampled step); NaN entries are left out."""
    try:
        summary = tel.summary()
    except Exception:
        return {}
    out = {}
    for k, v in (summary or {}).items():
        if k in METRIC_COLUMNS and isinstance(v, (int, float)) and not math.isnan(v):
            out[k] = float(v)
    return out


def _set_telemetry_step(tel, step: int) -> None:
    fn = getattr(tel, "set_step", None)
    if callable(fn):
        fn(step)
        return
    if hasattr(tel, "step") and not callable(getattr(tel, "step")):
        tel.step = step


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------- explanation
def _pct(x: float) -> str:
    if x == 0:
        return "0%"
    if x < 0.001:
        return "<0.1%"
    return f"{100 * x:.1f}%" if x < 0.1 else f"{100 * x:.0f}%"


def _fmt_of(f, i) -> str:
    v = f.loc[i, "format"] if "format" in f else ""
    return f" in {v}" if isinstance(v, str) and v else ""


def explain(frame, metrics: list[dict], spec: RunSpec, diverged: bool, step: int | None, reason: str,
            first_site: str | None) -> tuple[str, str]:
    """(site, one sentence) explaining a divergence, or naming the closest site of a run that did not diverge.

    Evidence, from the telemetry records up to the divergence step (the whole run otherwise): the first site whose
    output held a NaN/inf (``first_site``); the site with the largest flushed-to-zero or saturated fraction; the
    latest zero fraction of a second-moment state (exp_avg_sq, StoSignSGD's bound). The site returned is the
    first non-finite site if any, else the worst flushed/saturated site.
    """
    head = f"{spec.optimizer} {spec.precision}, seed {spec.seed}"
    worst_site, worst_text, worst_val = "", "", 0.0
    zero_text = ""
    f = frame if frame is not None and len(frame) else None
    if f is not None and diverged and step is not None and "step" in f:
        f = f[f["step"] <= step]
    if f is not None and len(f):
        for col, what in (("flushed_frac", "flushed to zero"), ("saturated_frac", "saturated")):
            if col not in f:
                continue
            vals = f[col].astype(float).fillna(0.0)
            if len(vals) and vals.max() > worst_val:
                i = vals.idxmax()
                worst_val = float(vals.max())
                worst_site = str(f.loc[i, "site"])
                at = f" at step {int(f.loc[i, 'step'])}" if "step" in f else ""
                worst_text = (f"{_pct(worst_val)} of {f.loc[i, 'role']} entries at {worst_site} {what}"
                              f"{_fmt_of(f, i)}{at}")
        if "zero_frac" in f and "site" in f:
            sm = f[f["site"].astype(str).str.split(":").str[-1].isin(SECOND_MOMENT_KEYS) & f["zero_frac"].notna()]
            if len(sm):
                last = sm[sm["step"] == sm["step"].max()] if "step" in sm else sm
                i = last["zero_frac"].astype(float).idxmax()
                z = float(last.loc[i, "zero_frac"])
                if z >= 0.01:
                    name = str(last.loc[i, "site"]).split(":")[-1]
                    zero_text = f"{_pct(z)} of {name} entries were zero{_fmt_of(last, i)} ({last.loc[i, 'site']})"
    if not zero_text:
        zf = [m["state_zero_frac"] for m in metrics if isinstance(m.get("state_zero_frac"), float)
              and not math.isnan(m["state_zero_frac"])]
        if zf and zf[-1] >= 0.01:
            zero_text = f"{_pct(zf[-1])} of second-moment state entries were zero"
    if diverged:
        site = first_site or worst_site
        s = f"{head}: diverged at step {step} ({reason})"
        details = [t for t in (zero_text, worst_text) if t]
        if first_site:
            details.append(f"the first non-finite value appeared at {first_site}")
        if details:
            s += "; before it, " + "; ".join(details)
        quantized = frame is not None and "flushed_frac" in frame and frame["flushed_frac"].notna().any()
        if not quantized:
            s += "; nothing was quantized (full precision), so the optimizer at this learning rate diverged on " \
                 "its own"
        return site, s + "."
    if worst_text:
        s = f"{head}: did not diverge; closest site: {worst_text}"
    else:
        s = f"{head}: did not diverge; no quantized site flushed or saturated"
    if zero_text:
        s += f"; {zero_text}"
    return worst_site, s + "."


# ----------------------------------------------------------------------------------------------- the run
def _base_row(spec: RunSpec) -> dict[str, Any]:
    return {
        "run_id": spec.run_id, "phase": spec.phase, "task": spec.task, "optimizer": spec.optimizer,
        "precision": spec.precision, "lr": spec.lr, "seed": spec.seed, "steps": spec.steps, "steps_done": 0,
        "tokens": 0, "final_loss": math.nan, "final_val_loss": math.nan, "best_val_loss": math.nan,
        "diverged": False, "diverged_step": "", "divergence_reason": "", "divergence_site": "",
        "explanation": "", "target_loss": math.nan, "tokens_to_target": math.nan, "wall_s": math.nan,
        "state_bytes_per_param": math.nan, "status": "ok", "config_json": spec.config_json,
    }


class Parallel:
    """How one run is spread over processes. This base class is a single process and changes nothing; a
    data-parallel rank (``studies.ddp.DDPParallel``) overrides the hooks ``_train`` calls:

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


def execute_run(spec: RunSpec, out_dir: str | Path, *, target_loss: float | None = None,
                debug: bool = False, parallel: Parallel | None = None,
                run_dir: str | Path | None = None) -> dict[str, Any]:
    """Run ``spec``, write ``out_dir/runs/<run_id>/{metrics,telemetry}.csv``, return the results row.

    Any exception becomes a row with ``status="error"`` (traceback in ``runs/<run_id>/error.txt``) unless
    ``debug`` is true, in which case it propagates. ``parallel`` makes this process one rank of a data-parallel
    run (see :class:`Parallel`); ``run_dir`` overrides where the per-run files go.
    """
    t0 = time.perf_counter()
    run_dir = Path(run_dir) if run_dir is not None else Path(out_dir) / "runs" / spec.run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    row = _base_row(spec)
    try:
        row.update(_train(spec, run_dir, target_loss, parallel or Parallel()))
    except Exception as e:
        if debug:
            raise
        msg = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        (run_dir / "error.txt").write_text(traceback.format_exc())
        row.update(status="error", divergence_reason=f"error: {msg}",
                   explanation=f"{spec.optimizer} {spec.precision}, seed {spec.seed}: the run failed ({msg}).")
    row["wall_s"] = round(time.perf_counter() - t0, 3)
    return row


def _train(spec: RunSpec, run_dir: Path, target_loss: float | None, par: Parallel) -> dict[str, Any]:
    import pandas as pd

    import lowprec
    import lowprec.nn
    import lowprec.optim
    from lowprec.telemetry import Telemetry
    from studies.stats import run_tokens_to_target
    from studies.tasks import get_task

    thresholds = Thresholds(**spec.thresholds)
    _seed_everything(spec.seed)
    task = get_task(spec.task, size=spec.size, data=spec.data)
    trun = task.build(spec.seed, device=par.device)
    model = trun.model
    tps = int(trun.tokens_per_step) * par.world
    if spec.steps is not None:
        steps = spec.steps
    elif spec.tokens is not None:
        steps = max(1, math.ceil(spec.tokens / tps))
    else:
        steps = int(task.default_steps)
    eval_every = int(spec.eval_every or task.eval_every)
    schedule = getattr(task, "schedule", None) or spec.schedule

    policy = spec.policy
    tel = Telemetry(every=spec.telemetry_every, zero_states=SECOND_MOMENT_KEYS)
    # On a CPU torch._scaled_mm is slower than emulation and gives the same numbers up to summation order, so the
    # study emulates there; on a GPU the native FP8 GEMM runs wherever the hardware has it.
    backend = "emulated" if torch.device(par.device).type == "cpu" else "auto"
    lowprec.nn.convert(model, policy, telemetry=tel, backend=backend)
    par.wrap(trun)
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    gen = torch.Generator(device=par.device).manual_seed(1_000_003 * spec.seed + 12_345)
    opt = lowprec.optim.wrap(make_optimizer(spec.optimizer, params, spec.lr, generator=gen), policy, telemetry=tel)

    det = DivergenceDetector(thresholds)
    metrics: list[dict[str, Any]] = []
    blank = {c: math.nan for c in METRIC_COLUMNS}
    model.eval()
    with torch.no_grad():
        v0 = float(trun.val_loss())
    model.train()
    metrics.append({**blank, "step": 0, "tokens": 0, "val_loss": v0, "lr": 0.0})
    reason = par.agree(det.val(0, v0))
    diverged_step: int | None = 0 if reason else None
    steps_done = 0
    for step in range(steps if not reason else 0):
        k = step + 1
        lr = lr_at(step, steps, spec.lr, schedule, spec.warmup_frac)
        _set_lr(opt, lr)
        _set_telemetry_step(tel, k)
        opt.zero_grad(set_to_none=True)
        loss = trun.train_loss(par.batch(step))
        lv = par.mean(float(loss.detach()))
        rec = {**blank, "step": k, "tokens": k * tps, "loss": lv, "lr": lr}
        reason = det.train(k, lv)
        if reason in ("nan", "inf"):
            metrics.append(rec)
            diverged_step, steps_done = k, k
            break
        loss.backward()
        with torch.no_grad():
            gn = [p.grad.detach().float().pow(2).sum() for p in params if p.grad is not None]
            rec["grad_norm"] = float(torch.stack(gn).sum().sqrt()) if gn else 0.0
            before = [p.detach().clone() for p in params]
        opt.step()
        with torch.no_grad():
            du = sum(float((p.detach() - b).float().pow(2).sum()) for p, b in zip(params, before))
            wn = sum(float(b.float().pow(2).sum()) for b in before)
            rec["update_ratio"] = math.sqrt(du) / math.sqrt(wn) if wn > 0 else math.nan
        steps_done = k
        if k % spec.telemetry_every == 0 or k == steps:
            rec.update(_role_fractions(tel))
            if math.isnan(rec["state_zero_frac"]):
                rec["state_zero_frac"] = state_zero_frac(opt)
            if math.isnan(rec["lost_update_frac"]):  # no master rounding measured: entries left unchanged
                with torch.no_grad():
                    same = sum(int((p.detach() == b).sum()) for p, b in zip(params, before))
                rec["lost_update_frac"] = same / max(1, n_params)
        if not reason and (k % eval_every == 0 or k == steps):
            model.eval()
            with torch.no_grad():
                rec["val_loss"] = float(trun.val_loss())
            model.train()
            reason = det.val(k, rec["val_loss"])
        reason = par.agree(reason)
        metrics.append(rec)
        if reason:
            diverged_step = k
            break

    mdf = pd.DataFrame(metrics, columns=METRIC_COLUMNS)
    write_csv_atomic(mdf, run_dir / "metrics.csv")
    try:
        frame = tel.frame()
    except Exception:
        frame = None
    if frame is not None:
        write_csv_atomic(frame, run_dir / "telemetry.csv")
    try:
        first_site = tel.first_nonfinite()
    except Exception:
        first_site = None
    diverged = bool(reason)
    site, sentence = explain(frame, metrics, spec, diverged, diverged_step, reason, first_site)

    vals = mdf["val_loss"].astype(float)
    finite_vals = vals[np.isfinite(vals)]
    losses = mdf["loss"].astype(float).dropna()
    ttt = math.nan
    if target_loss is not None and math.isfinite(target_loss):
        ttt = run_tokens_to_target(mdf["tokens"].to_numpy(float), vals.to_numpy(float), target_loss)
    return {
        "steps": steps, "steps_done": steps_done, "tokens": steps_done * tps,
        "final_loss": float(losses.iloc[-1]) if len(losses) else math.nan,
        "final_val_loss": float(vals.dropna().iloc[-1]) if vals.notna().any() else math.nan,
        "best_val_loss": float(finite_vals.min()) if len(finite_vals) else math.nan,
        "diverged": diverged, "diverged_step": diverged_step if diverged else "",
        "divergence_reason": reason, "divergence_site": site if diverged else "",
        "explanation": sentence, "status": "diverged" if diverged else "ok",
        "target_loss": target_loss if target_loss is not None else math.nan, "tokens_to_target": ttt,
        "state_bytes_per_param": state_bytes_per_param(opt, n_params),
    }
