"""Nodes of ``safety_training``: one f-HAL run rewarded by the reward model, and its
evaluation by the gold judge (ASR, over-refusal) and by latent separation.

Parameters: parameters_safety_training.yml (the run, with the reward-hacking ``monitor``:
:class:`SafetyTrainingParams`) and parameters_safety_evaluation.yml (the held-out evaluation:
:class:`SafetyEvaluationParams`). The gold judge never trains: it is the trainer's
correctness measure and the evaluation's judge.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from fgrpo_pipeline.experiments.safety_sweep import Anchors, evaluate_safety
from fgrpo_pipeline.models.policy import Policy
from fgrpo_pipeline.pipelines.parameters import read_params
from fgrpo_pipeline.pipelines.safety_training.params import (
    SafetyEvaluationParams,
    SafetyTrainingParams,
)
from fgrpo_pipeline.reporting.plots import latent_scatter, reward_hacking_curves
from fgrpo_pipeline.safety.latent import latent_projection
from fgrpo_pipeline.safety.reward_model import RewardModel, reward_model_reward
from fgrpo_pipeline.training.loop import train
from fgrpo_pipeline.training.preferences import preferences_from_splits


def train_safety_policy(
    base_policy: Policy,
    reward_model: RewardModel,
    prompts: pd.DataFrame,
    aligned: pd.DataFrame,
    unaligned: pd.DataFrame,
    params: dict[str, Any],
) -> tuple[Policy, pd.DataFrame, pd.DataFrame]:
    """(trained policy, per-step metrics with the monitor's columns, logged completions)."""
    run = read_params(SafetyTrainingParams, params)
    result = train(
        base_policy,
        prompts[prompts["split"] == "train"],
        run.config,
        preferences=preferences_from_splits(aligned, unaligned),
        progress=run.progress,
        resume_dir=run.resume_dir,
        reward_fn=reward_model_reward(reward_model),
        correctness_fn=run.judge,
        monitors=[run.monitor.build()],
    )
    return result.policy, result.metrics, result.completions


def evaluate_safety_policies(
    base_policy: Policy,
    trained_policy: Policy,
    reward_model: RewardModel,
    prompts: pd.DataFrame,
    params: dict[str, Any],
) -> tuple[dict[str, Any], pd.DataFrame, pd.DataFrame]:
    """(``{"base", "trained", "change"}`` report, sampled completions, anchor projections)."""
    evaluation = read_params(SafetyEvaluationParams, params)
    test = prompts[prompts["split"] == "test"]
    anchors = Anchors.from_prompts(prompts[prompts["split"] == "anchor"])
    reward_fn = reward_model_reward(reward_model)
    report: dict[str, Any] = {}
    samples, hidden = [], {}
    for name, policy in (("base", base_policy), ("trained", trained_policy)):
        metrics, rows, hidden[name] = evaluate_safety(
            policy, base_policy, test, anchors, evaluation.config, reward_fn, evaluation.judge
        )
        report[name] = metrics
        samples.append(rows.assign(policy=name))
    report["change"] = {k: report["trained"][k] - report["base"][k] for k in report["base"]}
    return report, pd.concat(samples, ignore_index=True), latent_projection(hidden)


def plot_safety_training(metrics: pd.DataFrame) -> Figure:
    return reward_hacking_curves(metrics)


def plot_latent_separation(latent: pd.DataFrame) -> Figure:
    return latent_scatter(latent)
