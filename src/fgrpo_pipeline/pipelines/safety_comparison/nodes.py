"""Nodes of ``safety_comparison``: f-HAL at λ ∈ {0, 0.5, 1} (configurable), S seeds.

Parameters: parameters_safety_comparison.yml (the sweep), with parameters_safety_training.yml
(what each run trains; ``training_overrides`` merged over it) and
parameters_safety_evaluation.yml. When an MLflow run is active (kedro-mlflow), every
(λ, seed) is a nested child run with its parameters, per-step metrics (``train/…``, the
reward-hacking monitor's columns included) and held-out metrics (``eval/…``); the parent gets
the table (``safety/<lam>/<metric>``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import mlflow
import pandas as pd
from matplotlib.figure import Figure

from fgrpo_pipeline.experiments.safety_sweep import (
    METRICS,
    SWEPT_KEYS,
    Anchors,
    check_lams_and_seeds,
    lam_label,
    run_params,
    run_safety_comparison,
)
from fgrpo_pipeline.models.policy import Policy
from fgrpo_pipeline.pipelines.comparison.nodes import check_sweep_options
from fgrpo_pipeline.pipelines.safety_training.nodes import (
    JUDGE_KEY,
    MONITOR_KEY,
    check_evaluation_params,
)
from fgrpo_pipeline.pipelines.safety_training.nodes import check_params as check_training
from fgrpo_pipeline.reporting.plots import comparison_curves, latent_scatter, safety_comparison_bars
from fgrpo_pipeline.safety.judge import GoldJudge
from fgrpo_pipeline.safety.latent import latent_projection
from fgrpo_pipeline.safety.reward_model import RewardModel, reward_model_reward
from fgrpo_pipeline.tracking import ChildRuns
from fgrpo_pipeline.training.config import TrainerConfig
from fgrpo_pipeline.training.preferences import preferences_from_splits

FILE = "parameters_safety_comparison.yml"
KEYS = ("lams", "seeds", "training_overrides", "num_threads", "progress")
CURVE_PANELS = (
    ("rm_reward", "reward-model reward (train rollouts)"),
    ("gold_score", "gold score (train rollouts)"),
    ("kl_to_ref", "KL(π_old‖π_ref) per sequence"),
)


def check_params(params: Mapping[str, Any]) -> None:
    """The ``safety_comparison`` block on its own: keys, λ, seeds, overrides, threads."""
    try:
        check_sweep_options(
            params,
            block="safety_comparison",
            keys=KEYS,
            swept=SWEPT_KEYS,
            swept_by="the sweep sets the loss (f_hal), λ from `lams` and the seed from `seeds`",
        )
        check_lams_and_seeds(params.get("lams"), params.get("seeds"))
    except ValueError as err:
        raise ValueError(f"{FILE}: {err}") from err


def sweep_training_params(
    params: Mapping[str, Any], training: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any], GoldJudge]:
    """(flat training parameters of the sweep, monitor options, the training rollouts'
    judge); every run is checked."""
    check_params(params)
    merged = {**training, **(params.get("training_overrides") or {})}
    if params.get("num_threads"):
        merged["num_threads"] = params["num_threads"]
    merged["progress"] = params.get("progress", True)
    _, monitor, judge = check_training(merged)
    merged.pop(MONITOR_KEY, None)
    merged.pop(JUDGE_KEY, None)
    for lam in params["lams"]:
        try:
            TrainerConfig.from_params(run_params(merged, lam, params["seeds"][0]))
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"{FILE}: training_overrides over parameters_safety_training.yml, λ={lam}: {err}"
            ) from err
    return merged, monitor, judge


class LamRuns(ChildRuns):
    """A nested MLflow run per (λ, seed)."""

    def start_lam(self, lam: float, seed: int, config: TrainerConfig) -> None:
        tags = {"comparison": "safety", "loss": "f_hal", "lam": lam_label(lam), "seed": str(seed)}
        tags["divergence"] = config.loss.divergence
        self.start((lam, seed), f"lam{lam_label(lam)}-seed{seed}", tags, config.to_dict())

    def end_lam(self, lam: float, seed: int, row: dict[str, Any], metrics: pd.DataFrame) -> None:
        values = {f"eval/{k}": v for k, v in row.items() if k not in ("lam", "seed")}
        self.end((lam, seed), metrics, values)


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
    evaluation_config, eval_judge = check_evaluation_params(evaluation)
    anchors = Anchors.from_prompts(prompts[prompts["split"] == "anchor"])
    preferences = preferences_from_splits(aligned, unaligned)
    if preferences is None and any(lam > 0 for lam in params["lams"]):
        raise ValueError("safety_comparison: λ > 0 needs aligned and unaligned offline data")
    runs = LamRuns() if mlflow.active_run() is not None else None
    try:
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
            on_run_start=runs.start_lam if runs else None,
            on_run_end=runs.end_lam if runs else None,
            progress=params.get("progress", True),
        )
    except BaseException:
        if runs is not None:
            runs.fail()
        raise
    if runs is not None:
        values = {
            f"safety/{row['lam']}/{metric}": row[metric]
            for _, row in result.table.iterrows()
            for metric in METRICS
        }
        mlflow.log_metrics({k: float(v) for k, v in values.items() if math.isfinite(float(v))})
    return result.table, result.runs, result.curves, latent_projection(result.hidden)


def plot_safety_curves(curves: pd.DataFrame) -> Figure:
    return comparison_curves(curves, title="f-HAL: reward model vs gold judge", panels=CURVE_PANELS)


def plot_safety_latent(latent: pd.DataFrame) -> Figure:
    return latent_scatter(latent, title="last-prompt-token hidden states (anchor prompts)")


def plot_safety_table(table: pd.DataFrame) -> Figure:
    return safety_comparison_bars(table)
