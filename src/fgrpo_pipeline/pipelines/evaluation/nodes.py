"""Nodes of ``evaluation``: base vs trained policy on the held-out split, and plots.

Parameters: parameters_evaluation.yml (:class:`EvaluationConfig`).
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from fgrpo_pipeline.heldout.evaluate import EvaluationConfig, evaluate_policy
from fgrpo_pipeline.models.policy import Policy
from fgrpo_pipeline.pipelines.parameters import read_params
from fgrpo_pipeline.reporting.plots import training_curves


def evaluate_base_and_trained(
    base_policy: Policy, trained_policy: Policy, prompts: pd.DataFrame, params: dict[str, Any]
) -> tuple[dict[str, Any], pd.DataFrame]:
    """``{"base": {...}, "trained": {...}, "change": {...}}`` and every sampled completion."""
    config = read_params(EvaluationConfig, params)
    held_out = prompts[prompts["split"] == config.split]
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
