"""Statistics for the precision-sweep study: confidence intervals, tokens-to-target, speedups.

Everything here is plain numpy + the standard library (no scipy at runtime):

- :func:`mean_ci`       Student-t interval for a mean (the t quantile is computed here, see :func:`t_quantile`).
- :func:`bootstrap_ci`  seeded percentile bootstrap for any statistic.
- :func:`tokens_to_target` first crossing of a target loss, linearly interpolated between evaluations.
- :func:`speedup_ci`    AdamW tokens / optimizer tokens with a bootstrap interval and an explicit status when a
                        target was not reached.
- :func:`wilson_ci` / :func:`divergence_fraction` a fraction of seeds with a Wilson score interval.

The horizon-ladder speedup (AdamW's end-of-schedule scaling curve), paired per-seed differences and the
"insufficient evidence" rule live in :mod:`studies.scaling`.

Conventions: non-finite values (NaN, +-inf) mean "no value" (a diverged run, a target never reached) and are
dropped where a statistic of values is asked for; every function says what it does with them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

__all__ = [
    "t_quantile",
    "mean_ci",
    "bootstrap_ci",
    "tokens_to_target",
    "SpeedupResult",
    "speedup_ci",
    "wilson_ci",
    "divergence_fraction",
    "STATUS_OK",
    "STATUS_PARTIAL",
    "STATUS_OPT_NOT_REACHED",
    "STATUS_BASE_NOT_REACHED",
    "STATUS_NO_DATA",
]

STATUS_OK = "ok"
STATUS_PARTIAL = "partial"  # some optimizer seeds reached the target, some did not
STATUS_OPT_NOT_REACHED = "not reached by optimizer"
STATUS_BASE_NOT_REACHED = "baseline never reached target"
STATUS_NO_DATA = "no data"


# --------------------------------------------------------------------------------------------- helpers


def _check_level(level: float) -> float:
    if not isinstance(level, (int, float)) or not 0.0 < float(level) < 1.0:
        raise ValueError(f"level must be a number in (0, 1), e.g. 0.95; got {level!r}")
    return float(level)


def _as_1d(values: Iterable[float] | np.ndarray, name: str) -> np.ndarray:
    try:
        arr = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=float)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a sequence of numbers; got {type(values).__name__}: {exc}") from None
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional; got shape {arr.shape}")
    return arr


def _finite(values: Iterable[float] | np.ndarray, name: str) -> np.ndarray:
    arr = _as_1d(values, name)
    return arr[np.isfinite(arr)]


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz's method)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def _t_cdf(t: float, df: float) -> float:
    """CDF of Student's t distribution with `df` degrees of freedom."""
    x = df / (df + t * t)
    tail = 0.5 * _betainc(df / 2.0, 0.5, x)  # P(T > |t|)
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """Quantile of Student's t distribution: the t with P(T <= t) = p (df > 0), found by bisection on the CDF."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1); got {p!r}")
    if not df > 0:
        raise ValueError(f"df must be > 0; got {df!r}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
        if hi > 1e12:
            return math.inf
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


# --------------------------------------------------------------------------------------------- intervals


def mean_ci(values: Iterable[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean with a two-sided Student-t confidence interval: ``(mean, lo, hi)``.

    Non-finite entries (NaN, inf: e.g. diverged runs) are dropped first. n = 0 gives ``(nan, nan, nan)``;
    n = 1 gives ``(v, nan, nan)`` (no spread, no interval). Identical values give a zero-width interval.
    """
    level = _check_level(level)
    x = _finite(values, "values")
    n = x.size
    if n == 0:
        return (math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if n == 1:
        return (mean, math.nan, math.nan)
    sem = float(x.std(ddof=1)) / math.sqrt(n)
    half = t_quantile(0.5 + level / 2.0, n - 1) * sem
    return (mean, mean - half, mean + half)


def _apply_stat(stat: Callable[..., float], samples: np.ndarray) -> np.ndarray:
    """stat over each row of `samples` (n_boot, n); vectorized when stat accepts axis=."""
    try:
        out = np.asarray(stat(samples, axis=1), dtype=float)
        if out.shape == (samples.shape[0],):
            return out
    except TypeError:
        pass
    return np.array([float(stat(row)) for row in samples])


def bootstrap_ci(
    values: Iterable[float],
    stat: Callable[..., float] = np.mean,
    level: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Percentile bootstrap interval: ``(stat(values), lo, hi)``.

    Resamples the finite values with replacement `n_boot` times (numpy Generator seeded with `seed`, so the
    result is reproducible) and takes the (1-level)/2 and (1+level)/2 quantiles of the statistic.
    Non-finite entries are dropped; n = 0 -> all nan; n = 1 -> ``(stat, nan, nan)``.
    """
    level = _check_level(level)
    if not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive int; got {n_boot!r}")
    x = _finite(values, "values")
    n = x.size
    if n == 0:
        return (math.nan, math.nan, math.nan)
    est = float(stat(x))
    if n == 1:
        return (est, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    samples = x[rng.integers(0, n, size=(n_boot, n))]
    boots = _apply_stat(stat, samples)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(boots, [alpha, 1.0 - alpha])
    return (est, float(lo), float(hi))


def wilson_ci(successes: int, n: int, level: float = 0.95) -> tuple[float, float, float]:
    """Fraction ``k/n`` with its Wilson score interval ``(p, lo, hi)``; n = 0 -> all nan."""
    level = _check_level(level)
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n; got successes={successes}, n={n}")
    if n == 0:
        return (math.nan, math.nan, math.nan)
    z = NormalDist().inv_cdf(0.5 + level / 2.0)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if successes == 0 else max(0.0, centre - half)  # exact bounds at the ends (no rounding residue)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return (p, lo, hi)


def divergence_fraction(diverged: Iterable[bool], level: float = 0.95) -> tuple[float, float, float, int, int]:
    """Fraction of runs (seeds) of one cell that diverged: ``(frac, lo, hi, k, n)`` with a Wilson interval.

    Accepts booleans or the strings "True"/"False" (as read back from a CSV).
    """
    flags = []
    for v in diverged:
        if isinstance(v, str):
            s = v.strip().lower()
            if s not in ("true", "false", "1", "0"):
                raise ValueError(f"diverged entries must be booleans or 'True'/'False'; got {v!r}")
            flags.append(s in ("true", "1"))
        else:
            flags.append(bool(v))
    k, n = sum(flags), len(flags)
    frac, lo, hi = wilson_ci(k, n, level)
    return (frac, lo, hi, k, n)


# --------------------------------------------------------------------------------------------- tokens to target


def tokens_to_target(tokens: Sequence[float], val_loss: Sequence[float], target: float) -> float:
    """Tokens at which `val_loss` first reaches ``<= target``; nan when it never does.

    `tokens` must be non-decreasing (the evaluation points of one run). Between the last evaluation above the
    target and the first one at or below it, the crossing is linearly interpolated. If the first evaluation is
    already at or below the target, its tokens are returned (nothing earlier to interpolate from). NaN or inf
    losses count as "not reached" at that point (a NaN evaluation just before the crossing means no
    interpolation: the crossing's own tokens are returned).
    """
    t = _as_1d(tokens, "tokens")
    y = _as_1d(val_loss, "val_loss")
    if t.shape != y.shape:
        raise ValueError(f"tokens and val_loss must have the same length; got {t.size} and {y.size}")
    if not isinstance(target, (int, float, np.floating, np.integer)) or not math.isfinite(float(target)):
        raise ValueError(f"target must be a finite number; got {target!r}")
    if t.size and (not np.all(np.isfinite(t)) or np.any(np.diff(t) < 0)):
        raise ValueError("tokens must be finite and non-decreasing (evaluation points in training order)")
    target = float(target)
    hit = np.isfinite(y) & (y <= target)
    if not hit.any():
        return math.nan
    i = int(np.argmax(hit))
    if i == 0 or not math.isfinite(y[i - 1]):
        return float(t[i])
    l0, l1 = float(y[i - 1]), float(y[i])
    frac = (l0 - target) / (l0 - l1)  # l0 > target >= l1, so 0 < frac <= 1
    return float(t[i - 1] + frac * (t[i] - t[i - 1]))


def run_tokens_to_target(tokens: Sequence[float], val_loss: Sequence[float], target: float) -> float:
    """`tokens_to_target` of one run's logged metrics: only the rows with a finite validation loss (the evaluation
    points; the other steps log none) count, taken in order of tokens; nan when there is none."""
    t = _as_1d(tokens, "tokens")
    y = _as_1d(val_loss, "val_loss")
    if t.shape != y.shape:
        raise ValueError(f"tokens and val_loss must have the same length; got {t.size} and {y.size}")
    keep = np.isfinite(y)
    t, y = t[keep], y[keep]
    order = np.argsort(t, kind="stable")
    return tokens_to_target(t[order], y[order], target) if t.size else math.nan


# --------------------------------------------------------------------------------------------- speedup


@dataclass(frozen=True)
class SpeedupResult:
    """Speedup of an optimizer over the baseline (AdamW at the same precision) in tokens-to-target.

    ratio = mean(baseline tokens) / mean(optimizer tokens) over the seeds that reached the target; lo/hi: the
    percentile-bootstrap interval of that ratio of means (both groups resampled independently, seeded).
    status: "ok" (every seed of both reached), "partial" (some seeds of either group did not reach: the ratio
    is conditional on reaching; `base_reached` / `opt_reached` < 1 say how often), "not reached by optimizer"
    (ratio nan), "baseline never reached target" (ratio nan), "no data".
    Unpacks as ``ratio, lo, hi = speedup_ci(...)``.
    """

    ratio: float
    lo: float
    hi: float
    status: str
    base_reached: float  # fraction of baseline seeds that reached the target
    opt_reached: float  # fraction of optimizer seeds that reached the target
    n_base: int
    n_opt: int

    def __iter__(self) -> Iterator[float]:
        return iter((self.ratio, self.lo, self.hi))

    def to_dict(self) -> dict:
        return {
            "speedup": self.ratio,
            "lo": self.lo,
            "hi": self.hi,
            "status": self.status,
            "base_reached": self.base_reached,
            "opt_reached": self.opt_reached,
            "n_base": self.n_base,
            "n_opt": self.n_opt,
        }


def speedup_ci(
    base_tokens: Iterable[float],
    opt_tokens: Iterable[float],
    level: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> SpeedupResult:
    """Tokens-to-target speedup: baseline (AdamW) tokens / optimizer tokens, with a bootstrap interval.

    Inputs are per-seed tokens-to-target; nan (or inf) = that seed never reached the target (or diverged).
    The ratio is of the means over the seeds that reached. The interval resamples each group's reached seeds
    independently `n_boot` times and takes percentiles of the ratio of means; it is nan when either group has
    fewer than two reached seeds. See :class:`SpeedupResult` for the status values. A speedup > 1 means the
    optimizer needs fewer tokens than the baseline.
    """
    level = _check_level(level)
    b_all = _as_1d(base_tokens, "base_tokens")
    o_all = _as_1d(opt_tokens, "opt_tokens")
    if np.any(b_all[np.isfinite(b_all)] <= 0) or np.any(o_all[np.isfinite(o_all)] <= 0):
        raise ValueError("tokens-to-target must be > 0 (nan for 'not reached')")
    b, o = b_all[np.isfinite(b_all)], o_all[np.isfinite(o_all)]
    nb, no = b_all.size, o_all.size
    fb = b.size / nb if nb else math.nan
    fo = o.size / no if no else math.nan
    nan = math.nan
    if nb == 0 or no == 0:
        return SpeedupResult(nan, nan, nan, STATUS_NO_DATA, fb, fo, nb, no)
    if b.size == 0:
        return SpeedupResult(nan, nan, nan, STATUS_BASE_NOT_REACHED, fb, fo, nb, no)
    if o.size == 0:
        return SpeedupResult(nan, nan, nan, STATUS_OPT_NOT_REACHED, fb, fo, nb, no)
    ratio = float(b.mean() / o.mean())
    lo = hi = nan
    if b.size >= 2 and o.size >= 2:
        rng = np.random.default_rng(seed)
        bm = b[rng.integers(0, b.size, size=(n_boot, b.size))].mean(axis=1)
        om = o[rng.integers(0, o.size, size=(n_boot, o.size))].mean(axis=1)
        alpha = (1.0 - level) / 2.0
        lo, hi = (float(v) for v in np.quantile(bm / om, [alpha, 1.0 - alpha]))
    status = STATUS_OK if (o.size == no and b.size == nb) else STATUS_PARTIAL
    return SpeedupResult(ratio, lo, hi, status, fb, fo, nb, no)

