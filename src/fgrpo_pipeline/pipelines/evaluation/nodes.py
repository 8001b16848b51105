"""Nodes of ``evaluation``: base vs trained policy on the held-out split (and the extra splits,
e.g. ood), and plots.

Parameters: parameters_evaluation.yml (:class:`EvaluationConfig`).
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from fgrpo_pipeline.heldout.evaluate import EvaluationConfig, evaluate_splits
from fgrpo_pipeline.models.policy import Policy
from fgrpo_pipeline.pipelines.parameters import read_params
from fgrpo_pipeline.reporting.plots import training_curves


def evaluate_base_and_trained(
    base_policy: Policy, trained_policy: Policy, prompts: pd.DataFrame, params: dict[str, Any]
) -> tuple[dict[str, Any], pd.DataFrame]:
    """``{"base": {...}, "trained": {...}, "change": {...}}`` and every sampled completion.

    Each extra split ``s`` adds ``s_<metric>`` keys (``ood_sampled_accuracy``, ...) to base
    and trained, and its two accuracies to ``change``; so does each stratum ``v`` of the
    primary split with ``strata`` set (``carry_sampled_accuracy``, ...).
    """
    config = read_params(EvaluationConfig, params)
    report: dict[str, Any] = {}
    samples = []
    for name, policy in (("base", base_policy), ("trained", trained_policy)):
        metrics, rows = evaluate_splits(policy, base_policy, prompts, config)
        report[name] = metrics
        samples.append(rows.assign(policy=name))
    accuracies = ("sampled_accuracy", "greedy_accuracy")
    changed = [*accuracies, "mean_reward", "completion_length"]
    changed += [f"{split}_{key}" for split in config.extra_splits for key in accuracies]
    # the strata's keys depend on the data (its values), so they are read off the report
    changed += [
        key
        for key in report["trained"]
        if key.endswith(tuple(f"_{name}" for name in accuracies)) and key not in changed
    ]
    report["change"] = {key: report["trained"][key] - report["base"][key] for key in changed}
    return report, pd.concat(samples, ignore_index=True)


def plot_training_curves(metrics: pd.DataFrame) -> Figure:
    return training_curves(metrics, title="online training, per step")
