"""The paper's central comparison at our scale: every f-GRPO divergence against GRPO, S seeds.

Plain Python/torch (no Kedro, no MLflow). A method is an arm of the sweep engine
(:mod:`fgrpo_pipeline.experiments.sweep`): each (method, seed) trains a copy of the same base
policy and is evaluated on the held-out prompts with
:func:`fgrpo_pipeline.heldout.evaluate.evaluate_policy`; the base policy is evaluated once
and is the 0 of the **Relative Overall** score (paper): per benchmark, method means are
min–max normalised with the base at 0 and the best method at 100, then averaged over the
benchmarks. The benchmarks are pass@1 (sampled accuracy) on the held-out problems of two
difficulties, sums without and with a carry (the ``difficulty`` strata of ``test``), and on
``ood`` (sums beyond the training range) where some method beats the base there; a task
without them (GSM8K) is scored on its held-out split whole. Every metric is
summarised over seeds with a 95 % bootstrap interval, and paired by seed against GRPO
(:mod:`fgrpo_pipeline.experiments.statistics`).

A method is a divergence name (loss ``f_grpo`` with that divergence) or ``grpo``. The seed
is the training seed (prompt order, sampling); the base policy is the same for every run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from fgrpo_pipeline.algorithms.divergences import divergence_names
from fgrpo_pipeline.experiments import sweep
from fgrpo_pipeline.experiments.statistics import relative_overall_intervals, summarise_arms
from fgrpo_pipeline.experiments.sweep import (
    Arm,
    ArmResult,
    OnArm,
    SweepParams,
    Training,
    check_distinct,
    check_prompts,
    check_seeds,
    final_mean,
    finished_run,
    plan_sweep,
    run_sweep,
)
from fgrpo_pipeline.heldout.evaluate import EvaluationConfig, evaluate_splits
from fgrpo_pipeline.models.policy import Policy
from fgrpo_pipeline.training.preferences import PreferenceData

logger = logging.getLogger(__name__)

BASELINE = "grpo"
SWEPT_KEYS = ("loss", "divergence", "seed")  # set per run by the sweep
# Relative Overall's benchmarks, those the runs have: pass@1 on the held-out split's easy and
# hard problems (sums without / with a carry) and on the ood split; else on the split whole
BENCHMARKS = ("no_carry_sampled_accuracy", "carry_sampled_accuracy", "ood_sampled_accuracy")
FALLBACK_BENCHMARKS = ("sampled_accuracy",)
HELD_OUT = ("sampled_accuracy", "greedy_accuracy", "mean_reward", "kl_to_ref", "completion_length")
# per benchmark, when evaluated (NaN otherwise)
BENCHMARK_COLUMNS = tuple(
    f"{part}_{kind}_accuracy"
    for part in ("no_carry", "carry", "ood")
    for kind in ("sampled", "greedy")
)
FINALS = ("train_reward_final", "train_accuracy_final")
TIMES = ("train_time", "eval_time", "wall_time")
RUN_COLUMNS = (
    "method",
    "loss",
    "divergence",
    "seed",
    *HELD_OUT,
    *BENCHMARK_COLUMNS,
    *FINALS,
    "steps",
    *TIMES,
)
# summarised with intervals, in this order (those the runs have)
SUMMARY_METRICS = (*HELD_OUT[:2], *BENCHMARK_COLUMNS, *HELD_OUT[2:], *FINALS)
DIFF_METRIC = "sampled_accuracy"  # diff_vs_grpo_* is the paired difference of this metric
CURVE_COLUMNS = ("method", "seed", "step", "reward_mean", "accuracy", "kl_to_ref")
TIE_DECIMALS = 9  # method means equal to this many decimals tie in avg_rank

OnRunStart = Callable[[str, int], None]
OnRunEnd = Callable[[str, int, dict[str, Any], pd.DataFrame], None]


def method_names() -> list[str]:
    """Every valid method: the divergences (f-GRPO with that f) and ``grpo``."""
    return [*divergence_names(), BASELINE]


def method_loss(method: str) -> tuple[str, str | None]:
    """``(loss, divergence)`` of a method; the divergence is None for GRPO."""
    if method == BASELINE:
        return "grpo", None
    if method in divergence_names():
        return "f_grpo", method
    raise ValueError(f"unknown method {method!r}; valid: {', '.join(method_names())}")


@dataclass
class DivergenceSweepParams(SweepParams):
    """The ``comparison`` block (parameters_comparison.yml): the methods (divergence names
    and/or ``grpo``) × ``seeds``, the training overrides of every run, threads, progress."""

    BLOCK: ClassVar[str] = "comparison"
    SWEPT: ClassVar[tuple[str, ...]] = SWEPT_KEYS
    SWEPT_BY: ClassVar[str] = (
        "the sweep sets loss and divergence from `methods` and the seed from `seeds`"
    )

    methods: list = field(default_factory=list)

    def check(self) -> None:
        try:
            check_methods_and_seeds(self.methods, self.seeds)
        except ValueError as err:
            raise ValueError(f"{err} (methods: {', '.join(method_names())})") from None


def check_methods_and_seeds(methods: Sequence[str], seeds: Sequence[int]) -> None:
    """Non-empty, known, distinct methods; non-empty, distinct integer seeds."""
    check_distinct(methods, "methods", "names", method_loss)
    check_seeds(seeds)


def method_arm(method: str) -> Arm:
    """The arm of a method: loss ``f_grpo`` with that divergence, or ``grpo`` (which takes
    no divergence: :meth:`Arm.params` drops the training parameters' one)."""
    loss, divergence = method_loss(method)
    overrides = {"loss": loss} if divergence is None else {"loss": loss, "divergence": divergence}
    return Arm(method, overrides)


@dataclass
class ComparisonResult:
    """Runs (one row per method × seed), the per-method summary, curves and the base."""

    runs: pd.DataFrame
    summary: pd.DataFrame
    curves: pd.DataFrame
    base: dict[str, Any]
    metrics: dict[tuple[str, int], pd.DataFrame] = field(default_factory=dict)


def method_row(
    method: str,
    seed: int,
    held_out: Mapping[str, Any],
    metrics: pd.DataFrame,
    *,
    steps: int,
    train_time: float,
    eval_time: float,
) -> dict[str, Any]:
    """One (method, seed)'s row of the runs table (``RUN_COLUMNS``; a benchmark's columns are
    NaN where the runs were not evaluated on it)."""
    loss, divergence = method_loss(method)
    return {
        "method": method,
        "loss": loss,
        "divergence": divergence,
        "seed": seed,
        **{k: held_out[k] for k in HELD_OUT},
        **{k: held_out.get(k, float("nan")) for k in BENCHMARK_COLUMNS},
        "train_reward_final": final_mean(metrics, "reward_mean"),
        "train_accuracy_final": final_mean(metrics, "accuracy"),
        "steps": steps,
        "train_time": train_time,
        "eval_time": eval_time,
        "wall_time": train_time + eval_time,
    }


def run_row(result: ArmResult[dict[str, Any]]) -> dict[str, Any]:
    """A finished run's row of the runs table (:func:`method_row`)."""
    return method_row(
        result.arm.label,
        result.seed,
        result.evaluation,
        result.metrics,
        steps=result.config.steps,
        train_time=result.train_time,
        eval_time=result.eval_time,
    )


def _describe(report: Mapping[str, Any]) -> str:
    return (
        f"sampled accuracy {report['sampled_accuracy']:.3f}, greedy "
        f"{report['greedy_accuracy']:.3f}, KL {report['kl_to_ref']:.3f}"
    )


def run_comparison(
    base_policy: Policy,
    train_prompts: pd.DataFrame,
    test_prompts: pd.DataFrame,
    *,
    methods: Sequence[str],
    seeds: Sequence[int],
    training_params: Mapping[str, Any],
    evaluation_config: EvaluationConfig,
    preferences: PreferenceData | None = None,
    on_run_start: OnRunStart | None = None,
    on_run_end: OnRunEnd | None = None,
    on_arm: OnArm | None = None,
    progress: bool = True,
) -> ComparisonResult:
    """Train and evaluate every (method, seed) from ``base_policy``; see the module doc.

    ``training_params`` are the flat ``training`` parameters (loss, divergence and seed are
    set per run; a ``progress`` key switches the per-run training bar, ``progress`` the outer
    bar over runs). Every run's configuration is validated before the first one starts.
    ``on_run_start(method, seed)`` is called before a run trains, ``on_run_end(method, seed,
    row, metrics)`` after it is evaluated, with its row of ``runs`` and per-step metrics;
    ``on_arm(arm, seed, result)`` then gets the whole :class:`~.sweep.ArmResult`.
    """
    check_methods_and_seeds(methods, seeds)
    check_prompts("comparison", train_prompts, test_prompts)
    plan = plan_sweep([method_arm(m) for m in methods], seeds, training_params)

    def evaluate(policy: Policy) -> dict[str, Any]:
        return evaluate_splits(policy, base_policy, test_prompts, evaluation_config)[0]

    result = run_sweep(
        plan,
        base_policy,
        train_prompts,
        evaluate,
        training=Training(preferences=preferences),
        row=run_row,
        describe=_describe,
        on_start=(lambda arm, seed, _: on_run_start(arm.label, seed)) if on_run_start else None,
        on_arm=finished_run(lambda arm: arm.label, on_run_end, on_arm),
        progress=progress,
        desc="comparison",
    )
    runs = result.table(RUN_COLUMNS)
    return ComparisonResult(
        runs=runs,
        summary=summarise(runs, result.base),
        curves=curves_table(result.metrics),
        base=result.base,
        metrics=result.metrics,
    )


def curves_table(metrics_by_run: Mapping[tuple[str, int], pd.DataFrame]) -> pd.DataFrame:
    """Per-step curves of all runs as one long table: method, seed, step, reward_mean,
    accuracy, kl_to_ref (a column a run's metrics lack is NaN)."""
    return sweep.curves_table(metrics_by_run, CURVE_COLUMNS)


def summarise(
    runs: pd.DataFrame,
    base: Mapping[str, Any],
    *,
    benchmarks: Sequence[str] = BENCHMARKS,
    baseline: str = BASELINE,
    **options: Any,
) -> pd.DataFrame:
    """One row per method, best Relative Overall first; ``options`` go to the bootstrap.

    ``runs`` has one row per method × seed (columns method, seed and the metrics, as
    :func:`method_row` makes them); ``base`` the base policy's values of the benchmarks. A
    seed fixes the base policy and the prompt order of every method, so methods are paired
    by seed.

    * ``n_seeds``; ``<metric>_mean`` / ``_ci_low`` / ``_ci_high``: the mean over seeds and its
      95 % bootstrap interval, for every metric of ``SUMMARY_METRICS`` the runs have;
    * ``<metric>_diff_mean`` / ``_ci_low`` / ``_ci_high``: the paired difference to
      ``baseline`` (GRPO), and ``diff_vs_<baseline>_*`` that of ``DIFF_METRIC``;
    * ``<benchmark>_change``: mean minus the base policy's value;
    * ``relative_overall_mean`` / ``_ci_low`` / ``_ci_high``: per benchmark, 100 · (method mean −
      base) / (best method mean − base), averaged over the benchmarks (:func:`_benchmarks`:
      those the runs have and some method beats the base on); the interval resamples whole
      seeds;
    * ``avg_rank``: per benchmark the rank of the method mean (1 = best; means equal to
      ``TIE_DECIMALS`` decimals tie), averaged over the benchmarks;
    * ``wall_time_mean``: seconds per run (training + evaluation), when the runs have it.
    """
    if runs.empty:
        raise ValueError("runs table is empty")
    benchmarks = _benchmarks(runs, base, benchmarks)
    metrics = [m for m in SUMMARY_METRICS if m in runs and runs[m].notna().all()]
    methods = list(dict.fromkeys(runs["method"]))
    table = summarise_arms(
        runs,
        metrics,
        arm="method",
        baseline=baseline if baseline in methods else None,
        diff_metric=DIFF_METRIC,
        **options,
    )
    for name in benchmarks:
        table[f"{name}_change"] = table[f"{name}_mean"] - float(base[name])
    _put_relative_overall(table, runs, methods, benchmarks, base, options)
    means = table[[f"{b}_mean" for b in benchmarks]].round(TIE_DECIMALS)
    table["avg_rank"] = means.rank(ascending=False, method="average").mean(axis=1)
    if "wall_time" in runs:
        table["wall_time_mean"] = table["method"].map(runs.groupby("method")["wall_time"].mean())
    labels = [_method_loss_or_none(m) for m in table["method"]]
    table.insert(1, "loss", [loss for loss, _ in labels])
    table.insert(2, "divergence", [divergence for _, divergence in labels])
    table = table.sort_values(
        ["relative_overall_mean", "avg_rank"], ascending=[False, True], kind="stable"
    )
    return table.reset_index(drop=True)


def _benchmarks(runs: pd.DataFrame, base: Mapping[str, Any], wanted: Sequence[str]) -> list[str]:
    """The benchmarks Relative Overall averages: those of ``wanted`` every run has (else
    ``FALLBACK_BENCHMARKS``), less those no method beats the base on (they cannot be
    normalised: best − base ≤ 0)."""
    present = [b for b in wanted if b in runs and runs[b].notna().all()]
    present = present or [b for b in FALLBACK_BENCHMARKS if b in runs]
    if not present:
        raise ValueError(f"runs table has none of the benchmark columns {list(wanted)}")
    if missing := [b for b in present if b not in base]:
        raise ValueError(f"base metrics lack {missing}")
    means = runs.groupby("method")[present].mean()
    beaten = [b for b in present if means[b].max() > float(base[b])]
    for name in sorted(set(present) - set(beaten)):
        logger.warning("no method beats the base on %s: left out of relative_overall", name)
    return beaten or present


def _put_relative_overall(
    table: pd.DataFrame,
    runs: pd.DataFrame,
    methods: list[str],
    benchmarks: list[str],
    base: Mapping[str, Any],
    options: Mapping[str, Any],
) -> None:
    """Relative Overall with its interval over the seeds every method ran."""
    by_run = runs.set_index(["method", "seed"])
    seeds = sorted(set.intersection(*(set(runs.loc[runs["method"] == m, "seed"]) for m in methods)))
    if not seeds:
        raise ValueError("Relative Overall pairs methods by seed: no seed has every method")
    accuracy = np.array(
        [[by_run.loc[(m, s), benchmarks].to_numpy(float) for m in methods] for s in seeds]
    )
    base_values = np.tile([float(base[b]) for b in benchmarks], (len(seeds), 1))
    intervals = relative_overall_intervals(accuracy, base_values, **options)
    intervals = dict(zip(methods, intervals, strict=True))
    for part in ("mean", "low", "high"):
        column = "relative_overall_" + ("mean" if part == "mean" else f"ci_{part}")
        table[column] = [getattr(intervals[m], part) for m in table["method"]]


def _method_loss_or_none(method: str) -> tuple[str | None, str | None]:
    try:
        return method_loss(method)
    except ValueError:
        return None, None
