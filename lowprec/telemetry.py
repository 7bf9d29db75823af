"""Numerics telemetry: what each quantization site did to its tensor, sampled every N steps.

A *site* is one place a tensor is quantized: ``"<module name>:<role>"`` for layers converted by
``lowprec.nn.convert`` (``"blocks.0.attn.qkv:weight"``, ``...:activation``, ``...:grad``) and
``"optim:<name>"`` for ``lowprec.optim.wrap`` (``"optim:grad"``, ``"optim:exp_avg"``, ``"optim:exp_avg_sq"``,
``"optim:master"``). One site seen several times in one step (weight tying, gradient accumulation, every
parameter of an optimizer) is aggregated into one row per step by summing counts.

Columns of ``frame()`` (one row per step and site, in execution order):

- ``flushed_frac``: of the finite nonzero inputs, the fraction that became zero (underflow). 0 when none.
- ``saturated_frac``: of all elements, the fraction that was finite but beyond the representable range
  (``|x| > format max * scale``, with a relative slack of 1e-6 for the rounding of the scale itself; clamped
  when the spec saturates) or became inf/NaN (overflow).
- ``nan_count``, ``inf_count``: NaN / ±inf in the quantized output.
- ``sqnr_db``: ``10·log10(Σx² / Σ(x−q)²)`` = torchao's ``20·log10(‖x‖/‖x−q‖)``; inf when exact.
- ``scale_min``, ``scale_max``: range of the scale tensor (NaN when unscaled).
- ``zero_frac``: fraction of output elements equal to zero (for second moments: entries at zero).
- ``lost_update_frac``: master-weight sites only: of the parameters whose unrounded update was nonzero, the
  fraction left unchanged by rounding to the master format.
- ``unpacked``: optimizer-state sites only: elements held as unpacked fp32 at this step because they hold NaN/inf
  that the state's format cannot store (``lowprec.optim``); recorded on every step, sampled or not. 0 otherwise.

Statistics are computed only on sampled steps (``step % every == 0``). On the other steps ``check_nonfinite``
decides what a site pays so that ``first_nonfinite()`` still names the first site (in execution order) whose
output held a NaN or inf:

- ``True`` (default): one ``isfinite(q.sum())`` read on the host; a site whose output is not finite gets a full
  row (``sampled`` False) at that step.
- ``"deferred"``: one device-side ``q.sum()``, no host synchronisation and no ``.item()``: the sums are kept
  and read together (one transfer per device) when a sampled step begins, when 65,536 are pending, or when
  ``first_nonfinite``, ``nonfinite_events``, ``rows`` or ``frame`` is called. No rows are made on unsampled
  steps; ``nonfinite_events()`` lists the (step, site) pairs instead.
- ``False``: nothing (an unsampled step costs nothing at all).
The step counter ``step`` is this object's own and the one truth for every site: ``next_step()`` advances it,
and ``lowprec.optim.wrap(..., telemetry=t)`` calls it at the end of every optimizer step, so share one
``Telemetry`` between ``convert`` and ``wrap`` and the rows of one training step carry one number. A run loop
that numbers its steps differently (from 1, or resuming at step k) calls ``set_step(k)`` before the step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from lowprec.fast import (STAT_COUNTS, SUM_FINITE, SUM_UNDECIDED, lost_updates, record_counts, sum_finite,
                          sums_finite)
from lowprec.policy import TENSOR_ROLES

__all__ = ["Telemetry", "ROLES", "SECOND_MOMENTS", "COLUMNS"]

ROLES = TENSOR_ROLES
SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum")  # AdamW/Adam, AMSGrad, RMSprop, Adagrad

_COUNTS = ("numel", "nonzero", "flushed", "saturated", "nan", "inf", "sig2", "err2", "zeros", "intended", "lost",
           "unpacked")
_MAX_PENDING = 1 << 16  # deferred checks held before they are read (bounds their memory)
COLUMNS = ("step", "site", "role", "format", "sampled", "numel", "flushed_frac", "saturated_frac", "nan_count",
           "inf_count", "sqnr_db", "scale_min", "scale_max", "zero_frac", "lost_update_frac", "unpacked")


@dataclass
class _Acc:
    step: int
    site: str
    role: str
    fmt: str
    sampled: bool
    counts: dict = field(default_factory=dict)
    scale_min: float = math.nan
    scale_max: float = math.nan
    seq: int = 0

    def add(self, name: str, value) -> None:
        self.counts[name] = self.counts.get(name, 0) + value

    def value(self, name: str) -> float:
        v = self.counts.get(name, 0)
        return float(v.item()) if isinstance(v, torch.Tensor) else float(v)


class Telemetry:
    """Collects per-site quantization statistics every ``every`` steps (see module docstring)."""

    def __init__(self, every: int = 1, *, check_nonfinite: bool | str = True,
                 zero_states: tuple[str, ...] = SECOND_MOMENTS) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        if check_nonfinite not in (True, False, "deferred"):
            raise ValueError(f"check_nonfinite must be True, False or 'deferred', got {check_nonfinite!r}")
        self.every = every
        self.check_nonfinite = bool(check_nonfinite)
        self.deferred = check_nonfinite == "deferred"
        self.zero_states = tuple(zero_states)
        self.step = 0
        self._accs: dict[tuple[int, str, str], _Acc] = {}
        self._last_sampled: list[_Acc] = []      # the accumulators of the latest sampled step (for summary)
        self._seq = 0                            # execution order of rows and deferred checks
        # (seq, step, site, device-side q.sum()), or from flag_many (first seq, step, [sites], [sums] stacked)
        self._pending: list[tuple[int, int, str | list[str], torch.Tensor]] = []
        self._pending_n = 0                      # deferred sums held in _pending
        self._events: list[tuple[int, int, str]] = []                  # (seq, step, site) found non-finite

    # ------------------------------------------------------------------ step control
    @property
    def sampling(self) -> bool:
        """True when the current step is a sampled one (statistics are computed)."""
        return self.step % self.every == 0

    def wants(self) -> bool:
        """True when a site should call ``record`` this step (sampled, or checking for NaN/inf)."""
        return self.sampling or self.check_nonfinite

    def next_step(self) -> None:
        """Advance the step counter by one (``lowprec.optim.wrap`` calls this after each optimizer step)."""
        self.step += 1

    def set_step(self, step: int) -> None:
        """Set the step counter: the records that follow carry ``step`` (and are sampled when
        ``step % every == 0``)."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        self.step = step

    def reset(self) -> None:
        self.step = 0
        self._accs.clear()
        self._last_sampled = []
        self._pending, self._events, self._pending_n = [], [], 0

    def _acc(self, site: str, role: str, fmt: str, sampled: bool) -> _Acc:
        key = (self.step, site, role)
        acc = self._accs.get(key)
        if acc is None:
            self._seq += 1
            acc = self._accs[key] = _Acc(self.step, site, role, fmt, sampled, seq=self._seq)
            if sampled:
                if self._pending:
                    self._resolve()     # a sampled step synchronises anyway: read the deferred checks now
                if self._last_sampled and self._last_sampled[0].step != self.step:
                    self._last_sampled = []
                self._last_sampled.append(acc)
        return acc

    # ------------------------------------------------------------------ recording
    def skip(self, site: str, q: torch.Tensor) -> bool:
        """What ``record(site, ..., q)`` first does: True when nothing is to be recorded, i.e. not a sampled step
        and (if checked) q all finite. The check is one sum (a NaN/inf anywhere makes it nonfinite; a rare false
        alarm from an fp32 overflow of the sum only costs a full record), decided without summing where a native
        pass shows it (``lowprec.fast.sum_finite``: the same answer). Deferred: the sum is kept on the device,
        to be read later. A caller that makes the check itself and gets False calls ``record(..., checked=True)``
        (the check is not made twice)."""
        if self.sampling:
            return False
        if not self.check_nonfinite:
            return True
        if self.deferred:
            self.flag(site, q)
            return True
        known = sum_finite(q)
        return known == SUM_FINITE if known != SUM_UNDECIDED else bool(torch.isfinite(q.sum()))

    def flag(self, site: str, t: torch.Tensor) -> None:
        """Deferred NaN/inf check of ``t`` at this step: one device-side sum, no host synchronisation (no sum at
        all where a native pass over a CPU tensor shows it finite: ``lowprec.fast.sum_finite``; the same events).
        Does nothing unless ``check_nonfinite="deferred"`` and the step is not sampled (``record`` calls it
        itself)."""
        if not self.deferred or self.sampling:
            return
        self._seq += 1
        if sum_finite(t) == SUM_FINITE:   # certainly finite (the native pre-check): no sum to read later
            return
        self._pending.append((self._seq, self.step, site, t.detach().sum()))
        self._pending_n += 1
        if self._pending_n >= _MAX_PENDING:
            self._resolve()

    def flag_many(self, pairs: list[tuple[str, torch.Tensor]]) -> None:
        """``flag(site, t)`` for every ``(site, t)`` in ``pairs``, in order: the same events, from one native
        pre-check of all of them (CPU float32) or else from their sums kept as one stacked tensor (one entry
        instead of one per tensor)."""
        if not self.deferred or self.sampling or not pairs:
            return
        dev = pairs[0][1].device
        if len(pairs) == 1 or any(t.device != dev for _, t in pairs):
            for site, t in pairs:
                self.flag(site, t)
            return
        known = sums_finite([t for _, t in pairs])
        if SUM_UNDECIDED not in known:
            # the native pre-check decided every one: sums only of the non-finite ones (none, as a rule), each
            # its own entry with its place in the sequence
            for k, ((site, t), kind) in enumerate(zip(pairs, known)):
                if kind != SUM_FINITE:
                    self._pending.append((self._seq + 1 + k, self.step, site, t.detach().sum()))
                    self._pending_n += 1
        else:
            sums = torch.stack([t.detach().sum().float() for _, t in pairs])
            self._pending.append((self._seq + 1, self.step, [site for site, _ in pairs], sums))
            self._pending_n += len(pairs)
        self._seq += len(pairs)
        if self._pending_n >= _MAX_PENDING:
            self._resolve()

    def _resolve(self) -> None:
        """Read the deferred sums: one stack and one host transfer per device."""
        by_device: dict[torch.device, list[tuple[int, int, str | list[str], torch.Tensor]]] = {}
        for entry in self._pending:
            by_device.setdefault(entry[3].device, []).append(entry)
        self._pending, self._pending_n = [], 0
        for entries in by_device.values():
            ok = torch.isfinite(torch.cat([e[3].float().reshape(-1) for e in entries]))
            if bool(ok.all()):   # the usual case: no event, and no per-check reading in Python
                continue
            finite = ok.tolist()
            i = 0
            for seq, step, site, _ in entries:
                sites = site if isinstance(site, list) else [site]
                self._events.extend((seq + k, step, s) for k, s in enumerate(sites) if not finite[i + k])
                i += len(sites)
        self._events.sort()

    def nonfinite_events(self) -> list[tuple[int, str]]:
        """(step, site) of every deferred check that found a NaN/inf, in execution order (``"deferred"`` mode;
        rows with NaN/inf are in ``rows()``)."""
        self._resolve()
        return [(step, site) for _, step, site in self._events]

    @torch.no_grad()
    def record(self, site: str, role: str, x: torch.Tensor, q: torch.Tensor, *,
               scale: "torch.Tensor | Callable[[], torch.Tensor | None] | None" = None,
               fmt_max: float | None = None, fmt: str = "", unpacked: bool = False, checked: bool = False) -> None:
        """Record one quantization ``x -> q`` (same shape; ``scale`` broadcastable to x, or None, or a function
        returning it, called only when a row is recorded).

        ``fmt_max``: the element format's largest finite value (for ``saturated_frac``). ``unpacked=True``: ``q``
        is a state kept unpacked (column ``unpacked``); recorded on every step. ``checked=True``: the caller made
        this record's NaN/inf check already (:meth:`skip` returned False).
        """
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; valid roles: {ROLES}")
        if not unpacked and not checked and self.skip(site, q):
            return
        acc = self._acc(site, role, fmt, self.sampling)
        if unpacked:
            acc.add("unpacked", q.numel())
        if callable(scale):
            scale = scale()
        x = x.detach()
        q = q.detach()
        counts = record_counts(x, q, scale, None if fmt_max is None else fmt_max * (1 + 1e-6))
        if counts is not None:  # one native pass (float32 on the CPU); the torch counts below are its reference
            acc.add("numel", q.numel())
            for name in STAT_COUNTS:
                acc.add(name, counts[name])
            if "scale_min" in counts:   # the scale's range from the same pass
                self._merge_range(acc, counts["scale_min"], counts["scale_max"])
            else:
                self._scale_range(acc, scale)
            return
        ax = x.abs()
        if bool(torch.isfinite(x.sum() + q.sum())):
            # all of x and q finite (a NaN/inf anywhere makes its sum nonfinite; an fp32 overflow of the sums
            # only sends us to the general branch): the same counts with fewer full-size passes
            q_zero = None
            if x.dtype == q.dtype == torch.float32 and q.numel() < 2**31:
                # float comparisons into bool tensors are slow on CPU; on the magnitude bits (an int32 in
                # [0, 2**31)) "== 0" is the sign of (bits - 1), and the counts are int32 sums of 0/-1 masks
                xz, qz = self._zero_mask(x), self._zero_mask(q)  # -1 where x (q) == 0, else 0
                zeros = -qz.sum(dtype=torch.int32).long()
                acc.add("nonzero", q.numel() + xz.sum(dtype=torch.int32).long())
                acc.add("flushed", zeros + (xz & qz).sum(dtype=torch.int32).long())  # zeros of q minus x == q == 0
                acc.add("zeros", zeros)
            else:
                q_zero = q == 0
                acc.add("nonzero", torch.count_nonzero(x))
                acc.add("flushed", torch.count_nonzero((x != 0) & q_zero))
                acc.add("zeros", torch.count_nonzero(q_zero))
            acc.add("numel", q.numel())
            acc.add("saturated", torch.count_nonzero(ax > self._limit(x, scale, fmt_max)) if fmt_max is not None
                    else 0)
            acc.add("nan", 0)
            acc.add("inf", 0)
        else:
            # comparisons on |x| are much cheaper than torch.isfinite on CPU; NaN compares False everywhere
            finite_x = ax < math.inf
            nonzero = finite_x & (ax > 0)
            q_zero = q == 0
            acc.add("numel", q.numel())
            acc.add("nonzero", torch.count_nonzero(nonzero))
            acc.add("flushed", torch.count_nonzero(nonzero & q_zero))
            q_finite = q.abs() < math.inf
            over = finite_x & ~q_finite
            if fmt_max is not None:
                over |= finite_x & (ax > self._limit(x, scale, fmt_max))
            acc.add("saturated", torch.count_nonzero(over))
            nan = torch.count_nonzero(q != q)
            acc.add("nan", nan)
            acc.add("inf", q.numel() - torch.count_nonzero(q_finite) - nan)
            acc.add("zeros", torch.count_nonzero(q_zero))
        acc.add("sig2", torch.linalg.vector_norm(x, dtype=torch.float64) ** 2)
        acc.add("err2", torch.linalg.vector_norm(x - q, dtype=torch.float64) ** 2)
        self._scale_range(acc, scale)

    @staticmethod
    def _scale_range(acc: _Acc, scale: torch.Tensor | None) -> None:
        if scale is not None:
            s = scale.detach()
            Telemetry._merge_range(acc, float(s.min()), float(s.max()))

    @staticmethod
    def _merge_range(acc: _Acc, smin: float, smax: float) -> None:
        acc.scale_min = smin if math.isnan(acc.scale_min) else min(acc.scale_min, smin)
        acc.scale_max = smax if math.isnan(acc.scale_max) else max(acc.scale_max, smax)

    @staticmethod
    def _zero_mask(t: torch.Tensor) -> torch.Tensor:
        """int32 mask of float32 ``t``: -1 where ``t == 0`` (either sign), else 0 (the sign of magnitude bits - 1)."""
        z = t.view(torch.int32) & 0x7FFFFFFF
        z -= 1
        z >>= 31
        return z

    @staticmethod
    def _limit(x: torch.Tensor, scale: torch.Tensor | None, fmt_max: float) -> "float | torch.Tensor":
        # a few fp32 ulps of slack: with current scaling (scale = amax / max) the amax element itself sits
        # at max * scale up to rounding and must not count as saturated
        return fmt_max * (1 + 1e-6) if scale is None else fmt_max * (1 + 1e-6) * scale.detach().to(x.dtype)

    @torch.no_grad()
    def record_zeros(self, site: str, role: str, q: torch.Tensor, fmt: str = "") -> None:
        """Record only the zero fraction and NaN/inf of a stored tensor (an unquantized optimizer state)."""
        if self.skip(site, q):
            return
        acc = self._acc(site, role, fmt, self.sampling)
        acc.add("numel", q.numel())
        acc.add("zeros", torch.count_nonzero(q == 0))
        acc.add("nan", torch.count_nonzero(torch.isnan(q)))
        acc.add("inf", torch.count_nonzero(torch.isinf(q)))

    @torch.no_grad()
    def record_update(self, site: str, old: torch.Tensor, unrounded: torch.Tensor, new: torch.Tensor,
                      fmt: str = "") -> None:
        """Record lost updates: ``unrounded != old`` (an update was intended) but ``new == old`` after rounding."""
        if not self.sampling:
            return
        acc = self._acc(site, "master", fmt, True)
        counts = lost_updates(old, unrounded, new)   # one native pass; the torch counts below are its reference
        if counts is not None:
            acc.add("intended", counts[0])
            acc.add("lost", counts[1])
            return
        intended = unrounded != old
        acc.add("intended", intended.sum())
        acc.add("lost", (intended & (new == old)).sum())

    # ------------------------------------------------------------------ reading
    @staticmethod
    def _row(acc: _Acc) -> dict:
        v = acc.value
        numel, nonzero = v("numel"), v("nonzero")
        sig2, err2, intended = v("sig2"), v("err2"), v("intended")
        has_q = "sig2" in acc.counts
        if not has_q:
            sqnr = math.nan
        elif err2 == 0:
            sqnr = math.inf
        elif math.isnan(sig2) or math.isnan(err2) or math.isinf(err2):
            sqnr = math.nan
        else:
            sqnr = 10 * math.log10(sig2 / err2) if sig2 > 0 else -math.inf
        return {
            "step": acc.step, "site": acc.site, "role": acc.role, "format": acc.fmt, "sampled": acc.sampled,
            "numel": int(numel),
            "flushed_frac": (v("flushed") / nonzero if nonzero else 0.0) if has_q else math.nan,
            "saturated_frac": (v("saturated") / numel if numel else 0.0) if has_q else math.nan,
            "nan_count": int(v("nan")), "inf_count": int(v("inf")),
            "sqnr_db": sqnr, "scale_min": acc.scale_min, "scale_max": acc.scale_max,
            "zero_frac": v("zeros") / numel if numel else math.nan,
            "lost_update_frac": v("lost") / intended if intended else (0.0 if "intended" in acc.counts else math.nan),
            "unpacked": int(v("unpacked")),
        }

    def rows(self) -> list[dict]:
        self._resolve()
        return [self._row(a) for a in self._accs.values()]

    def frame(self):
        """All recorded rows as a pandas DataFrame, in execution order."""
        import pandas as pd
        return pd.DataFrame(self.rows(), columns=list(COLUMNS))

    def first_nonfinite(self) -> str | None:
        """The first site (in execution order) whose quantized output held a NaN or inf; None if none did."""
        self._resolve()
        first = next(((a.seq, a.site) for a in self._accs.values() if a.value("nan") + a.value("inf") > 0), None)
        if self._events and (first is None or self._events[0][0] < first[0]):
            return self._events[0][2]
        return None if first is None else first[1]

    def unpacked_sites(self, step: int | None = None) -> list[str]:
        """Sites that held unpacked (non-finite) optimizer states at ``step``; default: the step just completed
        (``self.step - 1``, since ``wrap``'s ``step()`` ends with ``next_step()``)."""
        at = self.step - 1 if step is None else step
        return [a.site for a in self._accs.values() if a.step == at and a.value("unpacked") > 0]

    def summary(self) -> dict[str, float]:
        """Latest sampled step: ``<role>_underflow`` / ``<role>_overflow`` for every role (count-weighted over
        that role's sites, NaN when the role was not quantized), ``state_zero_frac`` (second-moment states,
        see ``zero_states``) and ``lost_update_frac`` (NaN when not measured)."""
        out = {}
        for role in ROLES:
            out[f"{role}_underflow"] = math.nan
            out[f"{role}_overflow"] = math.nan
        out["state_zero_frac"] = math.nan
        out["lost_update_frac"] = math.nan
        latest = self._last_sampled
        if not latest:
            return out
        for role in ROLES:
            accs = [a for a in latest if a.role == role and "sig2" in a.counts]
            if accs:
                nonzero = sum(a.value("nonzero") for a in accs)
                numel = sum(a.value("numel") for a in accs)
                out[f"{role}_underflow"] = sum(a.value("flushed") for a in accs) / nonzero if nonzero else 0.0
                out[f"{role}_overflow"] = sum(a.value("saturated") for a in accs) / numel if numel else 0.0
        zs = [a for a in latest if a.role == "state" and a.site.split(":", 1)[-1] in self.zero_states]
        if zs:
            numel = sum(a.value("numel") for a in zs)
            out["state_zero_frac"] = sum(a.value("zeros") for a in zs) / numel if numel else math.nan
        ms = [a for a in latest if "intended" in a.counts]
        if ms:
            intended = sum(a.value("intended") for a in ms)
            out["lost_update_frac"] = sum(a.value("lost") for a in ms) / intended if intended else 0.0
        return out
