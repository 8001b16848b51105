"""The paper's central comparison at our scale: every f-GRPO divergence against GRPO, S seeds.

Plain Python/torch (no Kedro, no MLflow). A method is an arm of the sweep engine
(:mod:`fgrpo_pipeline.experiments.sweep`): each (method, seed) trains a copy of the same base
policy and is evaluated on the held-out prompts with
:func:`fgrpo_pipeline.heldout.evaluate.evaluate_policy`; the base policy is evaluated once
and is the 0 of the **Relative Overall** score (paper): per benchmark, method means are
min–max normalised with the base at 0 and the best method at 100, then averaged over the
benchmarks. Our two "benchmarks" are held-out sampled accuracy (pass@1) and greedy accuracy.

A method is a divergence name (loss ``f_grpo`` with that divergence) or ``grpo``. The seed
is the training seed (prompt order, sampling); the base policy is the same for every run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pandas as pd

from fgrpo_pipeline.algorithms.divergences import divergence_names
from fgrpo_pipeline.experiments import sweep
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
from fgrpo_pipeline.heldout.evaluate import EvaluationConfig, evaluate_policy
from fgrpo_pipeline.models.policy import Policy
from fgrpo_pipeline.training.preferences import PreferenceData

logger = logging.getLogger(__name__)

BASELINE = "grpo"
SWEPT_KEYS = ("loss", "divergence", "seed")  # set per run by the sweep
# summary column -> key of the evaluation metrics: the "benchmarks" of Relative Overall
BENCHMARKS = {"accuracy_mean": "sampled_accuracy", "greedy_accuracy_mean": "greedy_accuracy"}
HELD_OUT = ("sampled_accuracy", "greedy_accuracy", "mean_reward", "kl_to_ref", "completion_length")
RUN_COLUMNS = (
    "method",
    "loss",
    "divergence",
    "seed",
    *HELD_OUT,
    "train_reward_final",
    "train_accuracy_final",
    "steps",
    "train_time",
    "eval_time",
    "wall_time",
)
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


def run_row(result: ArmResult[dict[str, Any]]) -> dict[str, Any]:
    """A run's row of the runs table (``RUN_COLUMNS``)."""
    loss, divergence = method_loss(result.arm.label)
    held_out, metrics = result.evaluation, result.metrics
    return {
        "method": result.arm.label,
        "loss": loss,
        "divergence": divergence,
        "seed": result.seed,
        **{k: held_out[k] for k in HELD_OUT},
        "train_reward_final": final_mean(metrics, "reward_mean"),
        "train_accuracy_final": final_mean(metrics, "accuracy"),
        "steps": result.config.steps,
        "train_time": result.train_time,
        "eval_time": result.eval_time,
        "wall_time": result.wall_time,
    }


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
        return evaluate_policy(policy, base_policy, test_prompts, evaluation_config)[0]

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


def summarise(runs: pd.DataFrame, base: Mapping[str, Any]) -> pd.DataFrame:
    """One row per method, best Relative Overall first.

    ``runs`` needs columns method, seed, sampled_accuracy, greedy_accuracy, mean_reward,
    kl_to_ref, wall_time (loss and divergence are carried over when present); ``base`` the
    base policy's sampled_accuracy and greedy_accuracy.

    * ``*_mean`` / ``*_std``: mean and sample standard deviation (ddof 1, NaN for one seed)
      over seeds; ``accuracy`` is held-out sampled accuracy (pass@1), ``reward_mean`` the
      held-out mean reward, ``wall_time_mean`` seconds per run (training + evaluation).
    * ``relative_overall``: per benchmark (sampled and greedy accuracy), 100 · (method mean −
      base) / (best method mean − base), averaged over benchmarks. A benchmark on which no
      method beats the base cannot be normalised and is left out (NaN if none is left).
    * ``avg_rank``: per benchmark, rank of the method mean (1 = best; means equal to
      ``TIE_DECIMALS`` decimals tie and share the average rank), averaged over benchmarks.
    """
    needed = {"method", "sampled_accuracy", "greedy_accuracy", "mean_reward", "kl_to_ref"}
    missing = sorted((needed | {"wall_time"}) - set(runs.columns))
    if missing:
        raise ValueError(f"runs table lacks column(s) {missing}")
    if runs.empty:
        raise ValueError("runs table is empty")
    for key in BENCHMARKS.values():
        if key not in base:
            raise ValueError(f"base metrics lack {key!r}")

    grouped = runs.groupby("method", sort=False)
    summary = pd.DataFrame(
        {
            "n_seeds": grouped.size(),
            "accuracy_mean": grouped["sampled_accuracy"].mean(),
            "accuracy_std": grouped["sampled_accuracy"].std(ddof=1),
            "greedy_accuracy_mean": grouped["greedy_accuracy"].mean(),
            "greedy_accuracy_std": grouped["greedy_accuracy"].std(ddof=1),
            "reward_mean": grouped["mean_reward"].mean(),
            "kl_to_ref_mean": grouped["kl_to_ref"].mean(),
            "wall_time_mean": grouped["wall_time"].mean(),
        }
    )
    summary["accuracy_change"] = summary["accuracy_mean"] - base["sampled_accuracy"]
    summary["greedy_accuracy_change"] = summary["greedy_accuracy_mean"] - base["greedy_accuracy"]

    scores, ranks = [], []
    for column, key in BENCHMARKS.items():
        span = summary[column].max() - float(base[key])
        if span > 0:
            scores.append(100.0 * (summary[column] - float(base[key])) / span)
        else:
            logger.warning("no method beats the base on %s: left out of relative_overall", key)
        # rounded: means of equal counts can differ in the last bit and must still tie
        ranks.append(summary[column].round(TIE_DECIMALS).rank(ascending=False, method="average"))
    summary["relative_overall"] = pd.concat(scores, axis=1).mean(axis=1) if scores else float("nan")
    summary["avg_rank"] = pd.concat(ranks, axis=1).mean(axis=1)

    summary = summary.reset_index()
    if {"loss", "divergence"} <= set(runs.columns):
        labels = runs.drop_duplicates("method")[["method", "loss", "divergence"]]
    else:
        labels = pd.DataFrame(
            [(m, *_method_loss_or_none(m)) for m in summary["method"]],
            columns=["method", "loss", "divergence"],
        )
    summary = labels.merge(summary, on="method", how="right")
    summary = summary.sort_values(
        ["relative_overall", "avg_rank"], ascending=[False, True], kind="stable"
    )
    return summary.reset_index(drop=True)


def _method_loss_or_none(method: str) -> tuple[str | None, str | None]:
    try:
        return method_loss(method)
    except ValueError:
        return None, None
