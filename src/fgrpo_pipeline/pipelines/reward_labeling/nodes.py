"""Nodes of ``reward_labeling``: rewards, group advantages and the aligned/unaligned split
(rows with advantage 0 are neutral: kept in the labeled table, in neither split).

Parameters: parameters_reward_labeling.yml (:class:`LabelingConfig`).
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from fgrpo_pipeline.algorithms.labeling import (
    LabelingConfig,
    label_table,
    score_rollouts,
    split_sides,
    summarise_groups,
)
from fgrpo_pipeline.pipelines.parameters import read_params
from fgrpo_pipeline.tasks.checks import validate_rollouts


def label_rollouts(
    rollouts: pd.DataFrame, params: dict[str, Any]
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(labeled rollouts with side aligned / unaligned / neutral, aligned split a > 0,
    unaligned split a < 0, per-group summary with each side's count)."""
    config = read_params(LabelingConfig, params)
    g = validate_rollouts(rollouts, source="rollouts")
    scored = score_rollouts(
        rollouts["completion"].tolist(),
        rollouts["prompt"].tolist(),
        rollouts["ground_truth"].tolist(),
        reward_fn=config.reward_fn(),
        correctness_fn=config.correctness_fn(),
        group_size=g,
        advantage_scale=config.advantage_scale,
    )
    labeled = label_table(rollouts, scored)
    aligned, unaligned = split_sides(labeled)
    return labeled, aligned, unaligned, summarise_groups(labeled, g)
