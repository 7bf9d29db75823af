"""The horizon ladder's statistics: speedup from the baseline's end-of-schedule scaling curve, paired per-seed
differences, and the verdict rule ("insufficient evidence" when n < 3 or the interval spans the null value).

Why a scaling curve: tokens-to-target inside one fixed cosine schedule mostly measures the end of the schedule
(the baseline reaches its own target near the end by construction). Here each horizon is a complete run with its
own schedule and its own tuned LR, and the speedup at a horizon is the tokens the baseline (AdamW) would need for
the optimizer's end-of-schedule loss — interpolated along the baseline's end-of-schedule losses over the ladder,
linearly in log-tokens — divided by the optimizer's tokens. No mid-schedule points are used.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from studies.stats import STATUS_NO_DATA, STATUS_OK, mean_ci

__all__ = ["STATUS_BEYOND", "MIN_SEEDS", "tokens_on_curve", "LadderSpeedup", "ladder_speedup",
           "paired_difference", "verdict"]

STATUS_BEYOND = "beyond AdamW's range"  # the loss lies outside the baseline's scaling curve
MIN_SEEDS = 3  # fewer paired seeds than this: "insufficient evidence", whatever the interval


def _level(level: float) -> float:
    if not isinstance(level, (int, float)) or not 0.0 < float(level) < 1.0:
        raise ValueError(f"level must be a number in (0, 1), e.g. 0.95; got {level!r}")
    return float(level)


def _vec(values, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional; got shape {arr.shape}")
    return arr



def tokens_on_curve(tokens: Sequence[float], losses: Sequence[float], loss: float) -> tuple[float, str]:
    """Tokens at which the baseline's end-of-schedule curve first reaches ``loss``: ``(tokens, status)``.

    The curve is the points ``(tokens[i], losses[i])`` (one per horizon, tokens strictly increasing), joined by
    straight lines in (log tokens, loss). Walking from the shortest horizon, the first point with loss <= ``loss``
    ends the search; the crossing is interpolated with the point before it. ``status`` is "ok"; or
    "beyond AdamW's range" with tokens -inf when even the shortest horizon is strictly better than ``loss``
    (the baseline needs fewer tokens than its shortest run) and +inf when no horizon reaches ``loss``. A
    non-finite point (a diverged horizon) counts as not reaching; a non-finite ``loss`` gives (nan, "no data").
    """
    t = _vec(tokens, "tokens")
    y = _vec(losses, "losses")
    if t.shape != y.shape or t.size == 0:
        raise ValueError(f"tokens and losses must be non-empty and of one length; got {t.size} and {y.size}")
    if not np.all(np.isfinite(t)) or np.any(t <= 0) or np.any(np.diff(t) <= 0):
        raise ValueError("curve tokens must be positive, finite and strictly increasing")
    if not math.isfinite(float(loss)):
        return (math.nan, STATUS_NO_DATA)
    hit = np.isfinite(y) & (y <= loss)
    if not hit.any():
        return (math.inf, STATUS_BEYOND)
    i = int(np.argmax(hit))
    if i == 0:
        return ((float(t[0]), STATUS_OK) if y[0] == loss else (-math.inf, STATUS_BEYOND))
    if not math.isfinite(y[i - 1]):
        return (float(t[i]), STATUS_OK)
    frac = (y[i - 1] - loss) / (y[i - 1] - y[i])  # y[i-1] > loss >= y[i]
    return (float(math.exp(math.log(t[i - 1]) + frac * (math.log(t[i]) - math.log(t[i - 1])))), STATUS_OK)


@dataclass(frozen=True)
class LadderSpeedup:
    """Speedup read off the baseline's scaling curve: tokens the baseline needs for the optimizer's mean
    end-of-schedule loss / the optimizer's tokens. lo/hi: percentile bootstrap over seeds (resampled jointly
    when ``paired``: seed s of every series together); a bound is +inf (0) when that resample's loss is better
    (worse) than the whole curve. status: "ok", "beyond AdamW's range" (ratio +inf or 0), "no data"."""

    ratio: float
    lo: float
    hi: float
    status: str
    n: int
    paired: bool

    def __iter__(self) -> Iterator[float]:
        return iter((self.ratio, self.lo, self.hi))

    def to_dict(self) -> dict:
        return {"speedup": self.ratio, "lo": self.lo, "hi": self.hi, "status": self.status, "n": self.n,
                "paired": self.paired}


def _ratio(curve_t: np.ndarray, curve_y: np.ndarray, loss: float, opt_tokens: float) -> tuple[float, str]:
    t, status = tokens_on_curve(curve_t, curve_y, loss)
    if status == STATUS_NO_DATA:
        return (math.nan, status)
    return (max(t, 0.0) / opt_tokens, status)  # -inf (better than the shortest point): 0 after the clamp


def ladder_speedup(curve_tokens: Sequence[float], curve_losses: Sequence[Sequence[float]], opt_tokens: float,
                   opt_losses: Sequence[float], *, paired: bool = True, level: float = 0.95, n_boot: int = 2000,
                   seed: int = 0) -> LadderSpeedup:
    """Speedup of an optimizer at ``opt_tokens`` over the baseline's end-of-schedule scaling curve.

    ``curve_losses[i]`` holds the baseline's per-seed final losses at ``curve_tokens[i]``; ``opt_losses`` the
    optimizer's per-seed final losses. The point estimate uses the per-horizon means (``tokens_on_curve``); a
    diverged seed (non-finite) makes its horizon's mean non-finite, so that horizon does not reach. With
    ``paired`` every series must list the same seeds in the same order and resamples take the same seed indices
    from all of them (runs of one seed share data order and initialisation); otherwise each series is resampled
    on its own. The interval is nan with fewer than two seeds.
    """
    level = _level(level)
    ct = _vec(curve_tokens, "curve_tokens")
    cy = [_vec(v, "curve_losses[i]") for v in curve_losses]
    oy = _vec(opt_losses, "opt_losses")
    if len(cy) != ct.size:
        raise ValueError(f"curve_losses needs one series per horizon ({ct.size}), got {len(cy)}")
    if not (isinstance(opt_tokens, (int, float, np.floating, np.integer)) and opt_tokens > 0):
        raise ValueError(f"opt_tokens must be a positive number, got {opt_tokens!r}")
    n = oy.size
    if n == 0 or any(v.size == 0 for v in cy):
        return LadderSpeedup(math.nan, math.nan, math.nan, STATUS_NO_DATA, n, paired)
    if paired and any(v.size != n for v in cy):
        raise ValueError("paired: every series must hold the same seeds (one value per seed, same order)")
    ratio, status = _ratio(ct, np.array([v.mean() for v in cy]), float(oy.mean()), float(opt_tokens))
    lo = hi = math.nan
    if n >= 2 and all(v.size >= 2 for v in cy):
        rng = np.random.default_rng(seed)
        boots = np.empty(n_boot)
        for b in range(n_boot):
            if paired:
                idx = rng.integers(0, n, size=n)
                curve = np.array([v[idx].mean() for v in cy])
                loss = float(oy[idx].mean())
            else:
                curve = np.array([v[rng.integers(0, v.size, size=v.size)].mean() for v in cy])
                loss = float(oy[rng.integers(0, n, size=n)].mean())
            boots[b] = _ratio(ct, curve, loss, float(opt_tokens))[0]
        boots = boots[~np.isnan(boots)]
        if boots.size:
            alpha = (1.0 - level) / 2.0
            lo = float(np.quantile(boots, alpha, method="lower"))
            hi = float(np.quantile(boots, 1.0 - alpha, method="higher"))
    return LadderSpeedup(ratio, lo, hi, status, n, paired)


# --------------------------------------------------------------------------------------------- paired verdicts


def paired_difference(a: dict[int, float], b: dict[int, float], level: float = 0.95
                      ) -> tuple[float, float, float, int]:
    """Mean of ``b[s] - a[s]`` over the seeds ``s`` in both with finite values, with its Student-t interval:
    ``(mean, lo, hi, n)`` (``mean_ci`` of the per-seed differences)."""
    d = [b[s] - a[s] for s in sorted(set(a) & set(b)) if math.isfinite(a[s]) and math.isfinite(b[s])]
    mean, lo, hi = mean_ci(d, level)
    return (mean, lo, hi, len(d))


def verdict(lo: float, hi: float, n: int, null: float, *, below: str, above: str) -> str:
    """``below`` when the whole interval [lo, hi] lies below ``null``, ``above`` when above it; else
    "insufficient evidence" (also when n < MIN_SEEDS or the interval is missing), saying why."""
    if n < MIN_SEEDS:
        return f"insufficient evidence (n = {n} < {MIN_SEEDS})"
    if math.isnan(lo) or math.isnan(hi):
        return "insufficient evidence (no interval)"
    if hi < null:
        return below
    if lo > null:
        return above
    return f"insufficient evidence (interval spans {null:g})"
