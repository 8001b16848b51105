"""Nodes of ``evaluation``: base vs trained policy on the held-out split, and plots.

Parameters: parameters_evaluation.yml.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from fgrpo_pipeline.heldout.evaluate import EvaluationConfig, evaluate_policy
from fgrpo_pipeline.models.policy import Policy
from fgrpo_pipeline.reporting.plots import training_curves

RUN_KEYS = ("split",)


def check_params(params: dict[str, Any]) -> EvaluationConfig:
    try:
        return EvaluationConfig(**{k: v for k, v in params.items() if k not in RUN_KEYS})
    except (TypeError, ValueError) as err:
        raise ValueError(f"parameters_evaluation.yml: {err}") from err


def evaluate_base_and_trained(
    base_policy: Policy, trained_policy: Policy, prompts: pd.DataFrame, params: dict[str, Any]
) -> tuple[dict[str, Any], pd.DataFrame]:
    """``{"base": {...}, "trained": {...}, "change": {...}}`` and every sampled completion."""
    config = check_params(params)
    held_out = prompts[prompts["split"] == params.get("split", "test")]
    if held_out.empty:
        raise ValueError("evaluation: the prompts table has no held-out rows")
    report: dict[str, Any] = {}
    samples = []
    for name, policy in (("base", base_policy), ("trained", trained_policy)):
        metrics, rows = evaluate_policy(policy, base_policy, held_out, config)
        report[name] = metrics
        samples.append(rows.assign(policy=name))
    report["change"] = {
        key: report["trained"][key] - report["base"][key]
        for key in ("sampled_accuracy", "greedy_accuracy", "mean_reward", "completion_length")
    }
    return report, pd.concat(samples, ignore_index=True)


def plot_training_curves(metrics: pd.DataFrame) -> Figure:
    return training_curves(metrics, title="online training, per step")
