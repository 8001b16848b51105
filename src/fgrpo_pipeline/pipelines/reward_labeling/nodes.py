"""Nodes of ``reward_labeling``: rewards, group advantages and the aligned/unaligned split
(rows with advantage 0 are neutral: kept in the labeled table, in neither split).

Parameters: parameters_reward_labeling.yml.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from fgrpo_pipeline.algorithms.advantages import ADVANTAGE_SCALES
from fgrpo_pipeline.algorithms.labeling import (
    label_table,
    score_rollouts,
    split_sides,
    summarise_groups,
)
from fgrpo_pipeline.algorithms.rewards import REWARDS, combine_rewards, get_reward
from fgrpo_pipeline.tasks.checks import validate_rollouts


def check_params(params: dict[str, Any]) -> None:
    combine_rewards(dict(params.get("rewards") or {}))
    REWARDS.check(params.get("correctness_reward"), "reward_labeling.correctness_reward")
    if params.get("advantage_scale") not in ADVANTAGE_SCALES:
        raise ValueError(
            "parameters_reward_labeling.yml: advantage_scale must be one of "
            f"{', '.join(ADVANTAGE_SCALES)}"
        )


def label_rollouts(
    rollouts: pd.DataFrame, params: dict[str, Any]
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(labeled rollouts with side aligned / unaligned / neutral, aligned split a > 0,
    unaligned split a < 0, per-group summary with each side's count)."""
    check_params(params)
    g = validate_rollouts(rollouts, source="rollouts")
    scored = score_rollouts(
        rollouts["completion"].tolist(),
        rollouts["prompt"].tolist(),
        rollouts["ground_truth"].tolist(),
        reward_fn=combine_rewards(dict(params["rewards"])),
        correctness_fn=get_reward(params["correctness_reward"]),
        group_size=g,
        advantage_scale=params["advantage_scale"],
    )
    labeled = label_table(rollouts, scored)
    aligned, unaligned = split_sides(labeled)
    return labeled, aligned, unaligned, summarise_groups(labeled, g)
