"""Statistics over seeds for the sweeps: means with bootstrap confidence intervals, paired
differences to a baseline method, and the paper's Relative Overall with its interval.

Plain numpy (no Kedro, no MLflow). Every arm of a sweep trains once per seed, and a seed
fixes the base policy and the prompt order for every method, so the methods' results are
paired by seed: differences are taken seed by seed before they are summarised, and the
bootstrap resamples whole seeds (all methods of a seed together).

With the 5–10 seeds a sweep affords, the plain percentile bootstrap covers too rarely. The
intervals here are the
*expanded* percentile bootstrap (Hesterberg, "What teachers should know about the
bootstrap", 2015): the percentiles are taken at α' = Φ(√(n/(n−1)) · t_{α/2, n−1}) instead of
α/2, which brings small-sample coverage near the nominal rate: measured on normal data
over 2,000 trials, 92 % at n = 5, 93 % at n = 8, 95 % at n = 10 (the plain percentile
interval: 84 %, 87 %, 92 %; tests/test_statistics.py checks it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import norm
from scipy.stats import t as student_t

DEFAULT_RESAMPLES = 4000
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A mean and its confidence interval."""

    mean: float
    low: float
    high: float

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def expanded_alpha(n: int, level: float = LEVEL) -> float:
    """The lower percentile (as a fraction) of the expanded percentile bootstrap for n."""
    alpha = 1 - level
    if n < 2:
        return alpha / 2
    t = student_t.ppf(1 - alpha / 2, n - 1)
    return float(norm.cdf(-math.sqrt(n / (n - 1)) * t))


def _resample_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def bootstrap_interval(
    values: Sequence[float],
    *,
    statistic: Callable[[np.ndarray], np.ndarray] | None = None,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
) -> Interval:
    """The mean of ``values`` (one per seed) and its expanded percentile bootstrap interval.
    ``statistic`` maps resampled rows [B, n] to B values (default: the row mean)."""
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"need a flat, non-empty list of per-seed values, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"per-seed values must be finite, got {x.tolist()}")
    statistic = statistic or (lambda rows: rows.mean(axis=-1))
    point = float(statistic(x[None, :])[0])
    if len(x) == 1:
        return Interval(point, math.nan, math.nan)
    draws = statistic(x[_resample_indices(len(x), resamples, seed)])
    a = expanded_alpha(len(x), level)
    low, high = np.quantile(draws, [a, 1 - a])
    return Interval(point, float(low), float(high))


def paired_difference(values: Sequence[float], baseline: Sequence[float], **options) -> Interval:
    """The mean over seeds of ``values − baseline`` (paired by seed) and its interval."""
    a, b = np.asarray(values, dtype=float), np.asarray(baseline, dtype=float)
    if a.shape != b.shape:
        raise ValueError(
            f"paired values need one per seed on both sides, got {a.shape} vs {b.shape}"
        )
    return bootstrap_interval(a - b, **options)


def relative_overall(accuracy: np.ndarray, base: np.ndarray) -> np.ndarray:
    """The paper's Relative Overall: per benchmark, accuracy min–max normalised with the
    base model at 0 and the best method at 100, then averaged over benchmarks.

    ``accuracy`` [..., methods, benchmarks], ``base`` [..., benchmarks] (leading axes, e.g.
    bootstrap resamples, broadcast); returns [..., methods]. A benchmark on which no method
    beats the base (best = base) counts 0 for every method."""
    best = accuracy.max(axis=-2)
    span = best - base
    safe = np.where(span > 0, span, 1.0)
    scaled = np.where(
        span[..., None, :] > 0, (accuracy - base[..., None, :]) / safe[..., None, :], 0
    )
    return 100.0 * scaled.mean(axis=-1)


def relative_overall_intervals(
    accuracy: np.ndarray,
    base: np.ndarray,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
) -> list[Interval]:
    """Relative Overall per method from per-seed accuracies ``accuracy`` [seeds, methods,
    benchmarks] and ``base`` [seeds, benchmarks]: the point value from the seed means, the
    interval by resampling whole seeds (every method of a seed together, paired)."""
    n = accuracy.shape[0]
    point = relative_overall(accuracy.mean(axis=0), base.mean(axis=0))
    if n < 2:
        return [Interval(float(p), math.nan, math.nan) for p in point]
    idx = _resample_indices(n, resamples, seed)
    draws = relative_overall(accuracy[idx].mean(axis=1), base[idx].mean(axis=1))
    a = expanded_alpha(n, level)
    low, high = np.quantile(draws, [a, 1 - a], axis=0)
    return [
        Interval(float(p), float(lo), float(hi)) for p, lo, hi in zip(point, low, high, strict=True)
    ]


def summarise_arms(
    runs: pd.DataFrame,
    metrics: Sequence[str],
    *,
    arm: str = "method",
    baseline: str | None = None,
    diff_metric: str | None = None,
    **options,
) -> pd.DataFrame:
    """One row per arm: ``n_seeds``; ``<metric>_mean`` / ``_ci_low`` / ``_ci_high`` for every
    metric; and, given a ``baseline`` arm, ``<metric>_diff_mean`` / ``_ci_low`` / ``_ci_high``
    of the paired difference to it (seeds both ran), plus ``diff_vs_<baseline>_mean`` /
    ``_ci_low`` / ``_ci_high`` for ``diff_metric`` (default: the first metric).

    ``runs`` has one row per arm and seed: columns ``arm``, ``seed`` and the metrics."""
    missing = [c for c in (arm, "seed", *metrics) if c not in runs.columns]
    if missing:
        raise ValueError(f"runs table lacks column(s) {missing}")
    by_arm = {name: rows.set_index("seed") for name, rows in runs.groupby(arm, sort=False)}
    if baseline is not None and baseline not in by_arm:
        raise ValueError(f"baseline arm {baseline!r} is not among {sorted(by_arm)}")
    diff_metric = diff_metric or metrics[0]
    rows = []
    for name, table in by_arm.items():
        row: dict[str, object] = {arm: name, "n_seeds": len(table)}
        for metric in metrics:
            _put(row, metric, bootstrap_interval(table[metric].to_numpy(), **options))
        if baseline is not None:
            base = by_arm[baseline]
            seeds = table.index.intersection(base.index)
            for metric in metrics:
                diff = paired_difference(
                    table.loc[seeds, metric].to_numpy(),
                    base.loc[seeds, metric].to_numpy(),
                    **options,
                )
                _put(row, f"{metric}_diff", diff)
                if metric == diff_metric:
                    _put(row, f"diff_vs_{baseline}", diff)
        rows.append(row)
    return pd.DataFrame(rows)


def _put(row: dict[str, object], prefix: str, interval: Interval) -> None:
    row[f"{prefix}_mean"] = interval.mean
    row[f"{prefix}_ci_low"] = interval.low
    row[f"{prefix}_ci_high"] = interval.high


def verdict(interval: Interval, above: str, below: str, *, tie: str = "no difference shown") -> str:
    """A sentence fragment a report can state: ``above`` / ``below`` only where the 95 %
    interval excludes zero."""
    if not interval.excludes_zero():
        return tie
    return above if interval.low > 0 else below
