"""Nodes of ``safety_comparison``: f-HAL at λ ∈ {0, 0.5, 1} (configurable), S seeds.

Parameters: parameters_safety_comparison.yml (the sweep), with parameters_safety_training.yml
(what each run trains; ``training_overrides`` merged over it) and
parameters_safety_evaluation.yml. When an MLflow run is active (kedro-mlflow), every
(λ, seed) is a nested child run (:mod:`fgrpo_pipeline.pipelines.comparison.tracking`, shared
with ``comparison``) with its parameters, per-step metrics (``train/…``, the
reward-hacking monitor's columns included) and held-out metrics (``eval/…``); the parent gets
the table (``safety/<lam>/<metric>``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from fgrpo_pipeline.experiments.safety_sweep import (
    LOSS,
    METRICS,
    Anchors,
    SafetySweepParams,
    lam_arm,
    lam_label,
    run_safety_comparison,
    safety_evaluation_options,
    safety_training_options,
)
from fgrpo_pipeline.experiments.sweep import (
    SWEEP_KEYS,
    Arm,
    ArmResult,
    merge_training_params,
    plan_sweep,
)
from fgrpo_pipeline.models.policy import Policy
from fgrpo_pipeline.pipelines.comparison.tracking import ChildRun, child_runs, log_parent_metrics
from fgrpo_pipeline.pipelines.parameters import read_params
from fgrpo_pipeline.reporting.plots import comparison_curves, latent_scatter, safety_comparison_bars
from fgrpo_pipeline.safety.judge import GoldJudge
from fgrpo_pipeline.safety.latent import latent_projection
from fgrpo_pipeline.safety.reward_model import RewardModel, reward_model_reward
from fgrpo_pipeline.training.preferences import preferences_from_splits

FILE = "parameters_safety_comparison.yml"
TRAINING_FILE = "parameters_safety_training.yml"
EVALUATION_FILE = "parameters_safety_evaluation.yml"
KEYS = ("lams", "seeds", *SWEEP_KEYS)
CURVE_PANELS = (
    ("rm_reward", "reward-model reward (train rollouts)"),
    ("gold_score", "gold score (train rollouts)"),
    ("kl_to_ref", "KL(π_old‖π_ref) per sequence"),
)


def check_params(params: Mapping[str, Any]) -> SafetySweepParams:
    """The ``safety_comparison`` block on its own: keys, λ, seeds, overrides, threads."""
    return read_params(SafetySweepParams, params)


def sweep_training_params(
    params: Mapping[str, Any], training: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any], GoldJudge]:
    """(flat training parameters of the sweep, monitor options, the training rollouts'
    judge); every run is checked."""
    check_params(params)
    try:
        merged, monitor, judge = safety_training_options(merge_training_params(params, training))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{TRAINING_FILE}: {err}") from err
    try:
        plan_sweep([lam_arm(lam) for lam in params["lams"]], params["seeds"][:1], merged)
    except ValueError as err:
        raise ValueError(f"{FILE}: training_overrides over {TRAINING_FILE}, {err}") from err
    return merged, monitor, judge


def describe_run(arm: Arm, seed: int, result: ArmResult) -> ChildRun:
    """The MLflow child run of one (λ, seed)."""
    lam = lam_label(arm.overrides["lam"])
    tags = {"comparison": "safety", "loss": LOSS, "lam": lam, "seed": str(seed)}
    return ChildRun(
        name=f"lam{lam}-seed{seed}",
        tags={**tags, "divergence": result.config.loss.divergence},
        params=result.config.to_dict(),
        values={f"eval/{k}": v for k, v in result.row.items() if k not in ("lam", "seed")},
    )


def compare_safety(
    base_policy: Policy,
    reward_model: RewardModel,
    prompts: pd.DataFrame,
    aligned: pd.DataFrame,
    unaligned: pd.DataFrame,
    params: dict[str, Any],
    training: dict[str, Any],
    evaluation: dict[str, Any],
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(table: base + one row per λ, one row per λ × seed, per-step curves, anchor PCA)."""
    training_params, monitor, train_judge = sweep_training_params(params, training)
    try:
        evaluation_config, eval_judge = safety_evaluation_options(evaluation)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{EVALUATION_FILE}: {err}") from err
    anchors = Anchors.from_prompts(prompts[prompts["split"] == "anchor"])
    preferences = preferences_from_splits(aligned, unaligned)
    if preferences is None and any(lam > 0 for lam in params["lams"]):
        raise ValueError("safety_comparison: λ > 0 needs aligned and unaligned offline data")
    result = run_safety_comparison(
        base_policy,
        prompts[prompts["split"] == "train"],
        prompts[prompts["split"] == "test"],
        anchors,
        reward_fn=reward_model_reward(reward_model),
        preferences=preferences,
        lams=list(params["lams"]),
        seeds=list(params["seeds"]),
        training_params=training_params,
        evaluation_config=evaluation_config,
        monitor=monitor,
        train_judge=train_judge,
        eval_judge=eval_judge,
        on_arm=child_runs(describe_run),
        progress=params.get("progress", True),
    )
    log_parent_metrics(
        {
            f"safety/{row['lam']}/{metric}": row[metric]
            for _, row in result.table.iterrows()
            for metric in METRICS
        }
    )
    return result.table, result.runs, result.curves, latent_projection(result.hidden)


def plot_safety_curves(curves: pd.DataFrame) -> Figure:
    return comparison_curves(curves, title="f-HAL: reward model vs gold judge", panels=CURVE_PANELS)


def plot_safety_latent(latent: pd.DataFrame) -> Figure:
    return latent_scatter(latent, title="last-prompt-token hidden states (anchor prompts)")


def plot_safety_table(table: pd.DataFrame) -> Figure:
    return safety_comparison_bars(table)
