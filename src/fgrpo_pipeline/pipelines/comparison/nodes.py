"""Nodes of ``comparison``: every f-GRPO divergence against GRPO over several seeds.

Parameters: parameters_comparison.yml (the sweep), with parameters_training.yml (what each
run trains, ``comparison.training_overrides`` merged over it) and parameters_evaluation.yml
(the held-out evaluation). Every (method, seed) is an arm: a namespaced training node and
evaluation node (:mod:`fgrpo_pipeline.pipelines.arms`); the summary node reads them all.
MLflow child runs are the tracking hook's (:mod:`fgrpo_pipeline.tracking.sweep_runs`); no node
here touches MLflow.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from fgrpo_pipeline.experiments.divergence_sweep import (
    BENCHMARKS,
    FALLBACK_BENCHMARKS,
    RUN_COLUMNS,
    DivergenceSweepParams,
    curves_table,
    method_arm,
    method_loss,
    method_row,
    summarise,
)
from fgrpo_pipeline.experiments.sweep import (
    Training,
    merge_training_params,
    plan_arm,
    plan_sweep,
    train_arm,
)
from fgrpo_pipeline.heldout.evaluate import EvaluationConfig, evaluate_splits
from fgrpo_pipeline.models.policy import Policy
from fgrpo_pipeline.pipelines.arms import (
    ArmSpec,
    headline_metrics,
    per_arm,
    run_record,
    sweep_block,
)
from fgrpo_pipeline.pipelines.parameters import read_params
from fgrpo_pipeline.reporting.plots import comparison_curves, divergence_summary
from fgrpo_pipeline.training.preferences import preferences_from_splits

FILE = "parameters_comparison.yml"
SWEEP = "comparison"
# the parent run's metrics: comparison.<method>/<column> (the catalog entry's prefix)
PARENT_METRICS = ("relative_overall_mean", "avg_rank", "sampled_accuracy_mean", "diff_vs_grpo_mean")


def check_params(params: Mapping[str, Any]) -> DivergenceSweepParams:
    """The ``comparison`` block on its own: keys, methods, seeds, overrides, threads."""
    return read_params(DivergenceSweepParams, params)


def comparison_arms() -> list[ArmSpec]:
    """Every (method, seed) of the ``comparison`` block; none if the block is bad (the
    parameter hook then refuses the run, naming the file)."""
    try:
        params = check_params(sweep_block(SWEEP))
    except ValueError:
        return []
    return [ArmSpec(SWEEP, method, seed) for method in params.methods for seed in params.seeds]


def sweep_training_params(params: Mapping[str, Any], training: Mapping[str, Any]) -> dict[str, Any]:
    """``training`` with ``training_overrides``, ``num_threads`` and ``progress`` over it;
    every method's configuration is checked here, naming the file."""
    check_params(params)
    merged = merge_training_params(params, training)
    try:
        plan_sweep([method_arm(m) for m in params["methods"]], params["seeds"][:1], merged)
    except ValueError as err:
        raise ValueError(f"{FILE}: training_overrides over parameters_training.yml, {err}") from err
    return merged


def train_method(
    base_policy: Policy,
    prompts: pd.DataFrame,
    aligned: pd.DataFrame,
    unaligned: pd.DataFrame,
    params: dict[str, Any],
    training: dict[str, Any],
    *,
    label: str,
    seed: int,
) -> tuple[Policy, pd.DataFrame, dict[str, Any]]:
    """One arm: the base policy trained with ``label``'s loss at ``seed``; (trained policy,
    per-step metrics, what it ran)."""
    training_params = sweep_training_params(params, training)
    run = plan_arm(method_arm(label), seed, training_params)
    trained = train_arm(
        run,
        base_policy,
        prompts[prompts["split"] == "train"],
        Training(preferences=preferences_from_splits(aligned, unaligned)),
        progress=training_params["progress"],
    )
    loss, divergence = method_loss(label)
    tags = {"comparison": "divergences", "method": label, "loss": loss}
    tags |= {"divergence": divergence or "none", "seed": str(seed)}
    return (
        trained.policy,
        trained.metrics,
        run_record(ArmSpec(SWEEP, label, seed), run, trained, tags),
    )


def evaluate_held_out(
    trained_policy: Policy,
    base_policy: Policy,
    prompts: pd.DataFrame,
    evaluation: dict[str, Any],
) -> dict[str, Any]:
    """One arm's held-out metrics on every evaluated split, with ``eval_time`` (seconds)."""
    config = read_params(EvaluationConfig, evaluation)
    started = time.perf_counter()
    metrics, _ = evaluate_splits(trained_policy, base_policy, prompts, config)
    return {**metrics, "eval_time": time.perf_counter() - started}


def evaluate_base(
    base_policy: Policy, prompts: pd.DataFrame, evaluation: dict[str, Any]
) -> dict[str, Any]:
    """The base policy's held-out metrics: the 0 of Relative Overall."""
    config = read_params(EvaluationConfig, evaluation)
    metrics, _ = evaluate_splits(base_policy, base_policy, prompts, config)
    return {"policy": "base", **metrics}


def summarise_divergences(
    params: dict[str, Any], base: dict[str, Any], *arms: Any
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """(per-method summary with intervals, one row per method × seed, per-step curves, the
    parent run's metrics) from every arm's (run, training metrics, evaluation)."""
    check_params(params)
    rows, metrics_by_run = [], {}
    for run, metrics, evaluation in per_arm(arms):
        label, seed = run["label"], run["seed"]
        rows.append(
            method_row(
                label,
                seed,
                evaluation,
                metrics,
                steps=run["steps"],
                train_time=run["train_time"],
                eval_time=evaluation["eval_time"],
            )
        )
        metrics_by_run[(label, seed)] = metrics
    runs = pd.DataFrame(rows, columns=list(RUN_COLUMNS))
    summary = summarise(runs, base)
    parent = headline_metrics(summary, lambda row: row["method"], PARENT_METRICS)
    return summary, runs, curves_table(metrics_by_run), parent


def plot_comparison_curves(curves: pd.DataFrame) -> Figure:
    return comparison_curves(curves)


def plot_comparison_summary(summary: pd.DataFrame, base: dict[str, Any]) -> Figure:
    benchmarks = [b for b in BENCHMARKS if f"{b}_mean" in summary] or list(FALLBACK_BENCHMARKS)
    return divergence_summary(summary, base, benchmarks=["sampled_accuracy", *benchmarks])
