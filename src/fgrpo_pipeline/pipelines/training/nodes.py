"""Nodes of ``training``: the online f-GRPO / f-HAL / FDO / GRPO / DPO loop.

Parameters: parameters_training.yml. The aligned / unaligned splits of ``reward_labeling``
are the off-policy preference data that FDO and f-HAL draw their minibatches from.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from fgrpo_pipeline.models.lora import merge_for_export
from fgrpo_pipeline.models.policy import Policy
from fgrpo_pipeline.training.config import RUN_KEYS, TrainerConfig, check_run_params
from fgrpo_pipeline.training.loop import train
from fgrpo_pipeline.training.preferences import preferences_from_splits


def check_params(params: dict[str, Any]) -> TrainerConfig:
    """The training config; also checked against the processes the run is launched in
    (``prompts_per_step`` divisible across them, mixed precision), so a multi-process run
    (``python -m fgrpo_pipeline.launch kedro``) fails before any node runs."""
    try:
        check_run_params(params)
        config = TrainerConfig.from_params({k: v for k, v in params.items() if k not in RUN_KEYS})
        config.check_launch()
        return config
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
        resume_dir=params.get("resume_dir"),
    )
    # A LoRA policy is saved merged, so any transformers loader reads it back; keep adapters
    # alone with an AdapterDataset entry instead (see README, "Real models").
    checkpoints = {
        f"step_{step:06d}": merge_for_export(ckpt) for step, ckpt in result.checkpoints.items()
    }
    return merge_for_export(result.policy), result.metrics, result.completions, checkpoints
