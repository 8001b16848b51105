"""Nodes of ``comparison``: every f-GRPO divergence against GRPO over several seeds.

Parameters: parameters_comparison.yml (the sweep), with parameters_training.yml (what each
run trains, ``comparison.training_overrides`` merged over it) and parameters_evaluation.yml
(the held-out evaluation). When an MLflow run is active (kedro-mlflow), every (method, seed)
becomes a nested child run (:mod:`.tracking`) with its parameters, per-step metrics
(``train/…``), held-out metrics (``eval/…``) and tags; the parent run gets the per-method
summary (``comparison/<method>/…``). Without an active run MLflow is not touched.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from fgrpo_pipeline.experiments.divergence_sweep import (
    HELD_OUT,
    DivergenceSweepParams,
    method_arm,
    method_loss,
    run_comparison,
)
from fgrpo_pipeline.experiments.sweep import (
    SWEEP_KEYS,
    Arm,
    ArmResult,
    merge_training_params,
    plan_sweep,
)
from fgrpo_pipeline.heldout.evaluate import EvaluationConfig
from fgrpo_pipeline.models.policy import Policy
from fgrpo_pipeline.pipelines.comparison.tracking import ChildRun, child_runs, log_parent_metrics
from fgrpo_pipeline.pipelines.parameters import read_params
from fgrpo_pipeline.reporting.plots import comparison_curves
from fgrpo_pipeline.training.preferences import preferences_from_splits

FILE = "parameters_comparison.yml"
KEYS = ("methods", "seeds", *SWEEP_KEYS)
TIMES = ("train_time", "eval_time", "wall_time")
FINALS = ("train_reward_final", "train_accuracy_final")
SUMMARY = ("relative_overall", "avg_rank", "accuracy_mean", "greedy_accuracy_mean")


def check_params(params: Mapping[str, Any]) -> DivergenceSweepParams:
    """The ``comparison`` block on its own: keys, methods, seeds, overrides, threads."""
    return read_params(DivergenceSweepParams, params)


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


def describe_run(arm: Arm, seed: int, result: ArmResult) -> ChildRun:
    """The MLflow child run of one (method, seed)."""
    loss, divergence = method_loss(arm.label)
    labels = {"method": arm.label, "loss": loss, "divergence": divergence or "none"}
    row = result.row
    values = {f"eval/{k}": row[k] for k in HELD_OUT} | {k: row[k] for k in (*TIMES, *FINALS)}
    return ChildRun(
        name=f"{arm.label}-seed{seed}",
        tags={"comparison": "divergences", **labels, "seed": str(seed)},
        params={**result.config.to_dict(), **labels},
        values=values,
    )


def compare_divergences(
    base_policy: Policy,
    prompts: pd.DataFrame,
    aligned: pd.DataFrame,
    unaligned: pd.DataFrame,
    params: dict[str, Any],
    training: dict[str, Any],
    evaluation: dict[str, Any],
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """(per-method summary, one row per method × seed, per-step curves, base policy report)."""
    training_params = sweep_training_params(params, training)
    config = read_params(EvaluationConfig, evaluation)
    result = run_comparison(
        base_policy,
        prompts[prompts["split"] == "train"],
        prompts[prompts["split"] == config.split],
        methods=list(params["methods"]),
        seeds=list(params["seeds"]),
        training_params=training_params,
        evaluation_config=config,
        preferences=preferences_from_splits(aligned, unaligned),
        on_arm=child_runs(describe_run),
        progress=params.get("progress", True),
    )
    log_parent_metrics(
        {
            f"comparison/{row['method']}/{column}": row[column]
            for _, row in result.summary.iterrows()
            for column in SUMMARY
        }
        | {f"comparison/base/{k}": result.base[k] for k in ("sampled_accuracy", "greedy_accuracy")}
    )
    base = {"policy": "base", **result.base, "relative_overall": 0.0}
    return result.summary, result.runs, result.curves, base


def plot_comparison_curves(curves: pd.DataFrame) -> Figure:
    return comparison_curves(curves)
