"""Why a run diverged: the divergence detector, the optimizer-state probes and the one-sentence explanation.

- :class:`DivergenceDetector` decides, loss by loss, whether a run has diverged (the rules are
  ``studies.config.Thresholds``').
- :func:`optimizer_chain`, :func:`decoded_states`, :func:`state_zero_frac`, :func:`state_bytes_per_param` look
  inside an optimizer as ``lowprec.optim.wrap`` leaves it (packed states decoded, wrapped optimizers followed).
- :func:`explain` turns the lowprec telemetry frame of a run into the site that went first and a sentence.
"""
from __future__ import annotations

import math
from typing import Any, Iterator

import torch

from lowprec.optim import LowPrecisionOptimizer

from studies.config import RunSpec, Thresholds

__all__ = ["SECOND_MOMENT_KEYS", "DIVERGENCE_REASONS", "DivergenceDetector", "optimizer_chain", "decoded_states",
           "state_zero_frac", "state_bytes_per_param", "explain"]

# optimizer-state entries that hold a second moment or a magnitude bound (their zero fraction is logged)
SECOND_MOMENT_KEYS = ("exp_avg_sq", "max_exp_avg_sq", "bound")  # AdamW, AMSGrad, StoSignSGD's G
# every reason a run can stop early ("" = it did not)
DIVERGENCE_REASONS = ("nan", "inf", "spike", "blow-up")


# ----------------------------------------------------------------------------------------------- detector
def _nonfinite(loss: float) -> str:
    """The divergence reason of a non-finite loss: "nan" or "inf"."""
    return "nan" if math.isnan(loss) else "inf"


class DivergenceDetector:
    """Stateful divergence check over training losses (every step) and validation losses (every evaluation).
    The thresholds are checked here, once (ValueError naming the bad one)."""

    def __init__(self, thresholds: Thresholds):
        self.t = thresholds.validate()
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


# ----------------------------------------------------------------------------------------------- optimizer state
def optimizer_chain(opt: torch.optim.Optimizer) -> list[torch.optim.Optimizer]:
    """The optimizer and the optimizers it wraps, outermost first: ``lowprec.optim.wrap``'s ``.optimizer``,
    then ``stosign.SignConverted``'s ``.base``, and so on (a cycle or a chain deeper than 6 stops the walk)."""
    chain: list[torch.optim.Optimizer] = []
    seen: set[int] = set()
    while isinstance(opt, torch.optim.Optimizer) and id(opt) not in seen and len(chain) < 6:
        chain.append(opt)
        seen.add(id(opt))
        opt = getattr(opt, "optimizer", None) or getattr(opt, "base", None)
    return chain


def decoded_states(opt: torch.optim.Optimizer, keys: tuple[str, ...] = SECOND_MOMENT_KEYS
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, values) of every state tensor named in ``keys`` from the first optimizer in :func:`optimizer_chain`
    that holds any (a wrapper shares its base optimizer's state); packed states of ``lowprec.optim.wrap`` come
    decoded to fp32 (``LowPrecisionOptimizer.decoded_state``)."""
    for o in optimizer_chain(opt):
        if isinstance(o, LowPrecisionOptimizer):
            items = [(name, t) for _, name, t in o.decoded_state() if name in keys]
        else:
            items = [(key, st[key]) for st in o.state.values() for key in keys
                     if isinstance(st, dict) and isinstance(st.get(key), torch.Tensor)]
        if items:
            yield from items
            return


def state_zero_frac(opt: torch.optim.Optimizer) -> float:
    """Fraction of second-moment (or magnitude-bound) optimizer-state entries that are exactly zero; nan if the
    optimizer keeps none (SGD, SignSGD, Signum). Scalars (0-d entries) are not counted."""
    zeros = total = 0
    for _, t in decoded_states(opt):
        if t.numel() > 1:
            zeros += int((t == 0).sum())
            total += t.numel()
    return zeros / total if total else math.nan


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
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


def state_bytes_per_param(opt: torch.optim.Optimizer, n_params: int) -> float:
    """Bytes of the optimizer's per-parameter state tensors (``state_dict()`` without param_groups and RNG
    states, including wrapped optimizers' state such as SignConverted's "base") / the number of parameters."""
    total = sum(t.numel() * t.element_size() for t in _tensors(opt.state_dict()))
    return total / max(1, n_params)


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


def _worst_site(f) -> tuple[str, str]:
    """(site, text) of the largest flushed-to-zero or saturated fraction in telemetry frame ``f``."""
    site, text, worst = "", "", 0.0
    for col, what in (("flushed_frac", "flushed to zero"), ("saturated_frac", "saturated")):
        if col not in f:
            continue
        vals = f[col].astype(float).fillna(0.0)
        if len(vals) and vals.max() > worst:
            i = vals.idxmax()
            worst = float(vals.max())
            site = str(f.loc[i, "site"])
            at = f" at step {int(f.loc[i, 'step'])}" if "step" in f else ""
            text = f"{_pct(worst)} of {f.loc[i, 'role']} entries at {site} {what}{_fmt_of(f, i)}{at}"
    return site, text


def _unpacked_text(f) -> str:
    """The first optimizer state held unpacked because it held NaN/inf its format cannot store (the telemetry
    column ``unpacked``, lowprec.optim's bug-9 guard), or ""."""
    if f is None or "unpacked" not in f:
        return ""
    hit = f[f["unpacked"].fillna(0).astype(float) > 0]
    if not len(hit):
        return ""
    i = hit.index[0]
    at = f" at step {int(hit.loc[i, 'step'])}" if "step" in hit else ""
    fmt = hit.loc[i, "format"] if "format" in hit else ""
    fmt = f" {fmt}" if isinstance(fmt, str) and fmt else ""
    n, site = int(hit.loc[i, "unpacked"]), hit.loc[i, "site"]
    return f"{n} entries of {site} held NaN/inf that its format{fmt} cannot store{at}"


def _zero_state_text(f, metrics: list[dict]) -> str:
    """The latest zero fraction (>= 1%) of a second-moment state: from the telemetry frame, else the metrics."""
    if f is not None and "zero_frac" in f and "site" in f:
        sm = f[f["site"].astype(str).str.split(":").str[-1].isin(SECOND_MOMENT_KEYS) & f["zero_frac"].notna()]
        if len(sm):
            last = sm[sm["step"] == sm["step"].max()] if "step" in sm else sm
            i = last["zero_frac"].astype(float).idxmax()
            z = float(last.loc[i, "zero_frac"])
            if z >= 0.01:
                name = str(last.loc[i, "site"]).split(":")[-1]
                return f"{_pct(z)} of {name} entries were zero{_fmt_of(last, i)} ({last.loc[i, 'site']})"
    zf = [m["state_zero_frac"] for m in metrics if isinstance(m.get("state_zero_frac"), float)
          and not math.isnan(m["state_zero_frac"])]
    if zf and zf[-1] >= 0.01:
        return f"{_pct(zf[-1])} of second-moment state entries were zero"
    return ""


def explain(frame, metrics: list[dict], spec: RunSpec, diverged: bool, step: int | None, reason: str,
            first_site: str | None) -> tuple[str, str]:
    """(site, one sentence) explaining a divergence, or naming the closest site of a run that did not diverge.

    Evidence, from the telemetry records up to the divergence step (the whole run otherwise): the first site whose
    output held a NaN/inf (``first_site``); the site with the largest flushed-to-zero or saturated fraction; the
    latest zero fraction of a second-moment state (exp_avg_sq, StoSignSGD's bound); the first optimizer state that
    held NaN/inf its format cannot store (kept unpacked by lowprec.optim). The site returned is the first
    non-finite site if any, else the worst flushed/saturated site.
    """
    head = f"{spec.optimizer} {spec.precision}, seed {spec.seed}"
    f = frame if frame is not None and len(frame) else None
    if f is not None and diverged and step is not None and "step" in f:
        f = f[f["step"] <= step]
    worst_site, worst_text = _worst_site(f) if f is not None and len(f) else ("", "")
    zero_text = _zero_state_text(f if f is not None and len(f) else None, metrics)
    if diverged:
        site = first_site or worst_site
        s = f"{head}: diverged at step {step} ({reason})"
        details = [t for t in (zero_text, worst_text, _unpacked_text(f)) if t]
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
