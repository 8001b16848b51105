"""Nodes of ``training``: the online f-GRPO / f-HAL / FDO / GRPO / DPO loop.

Parameters: parameters_training.yml. The aligned / unaligned splits of ``reward_labeling``
are the off-policy preference data that FDO and f-HAL draw their minibatches from.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from fgrpo_pipeline.modeling import Policy
from fgrpo_pipeline.trainer import RUN_KEYS, TrainerConfig, preferences_from_splits, train


def check_params(params: dict[str, Any]) -> TrainerConfig:
    try:
        return TrainerConfig.from_params({k: v for k, v in params.items() if k not in RUN_KEYS})
    except (TypeError, ValueError) as err:
        raise ValueError(f"parameters_training.yml: {err}") from err


def train_policy(
    policy: Policy,
    prompts: pd.DataFrame,
    aligned: pd.DataFrame,
    unaligned: pd.DataFrame,
    params: dict[str, Any],
) -> tuple[Policy, pd.DataFrame, pd.DataFrame, dict[str, Policy]]:
    """(trained policy, per-step metrics, logged completions, checkpoints by step)."""
    config = check_params(params)
    preferences = preferences_from_splits(aligned, unaligned)
    train_prompts = prompts[prompts["split"] == "train"]
    result = train(
        policy,
        train_prompts,
        config,
        preferences=preferences,
        progress=params.get("progress", True),
    )
    checkpoints = {f"step_{step:06d}": ckpt for step, ckpt in result.checkpoints.items()}
    return result.policy, result.metrics, result.completions, checkpoints
