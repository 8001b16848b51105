"""Nodes of ``training``: the online f-GRPO / f-HAL / FDO / GRPO / DPO loop.

Parameters: parameters_training.yml (:class:`TrainingParams`). The aligned / unaligned
splits of ``reward_labeling`` are the off-policy preference data that FDO and f-HAL draw
their minibatches from.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from fgrpo_pipeline.models.lora import merge_for_export
from fgrpo_pipeline.models.policy import Policy
from fgrpo_pipeline.pipelines.parameters import read_params
from fgrpo_pipeline.pipelines.training.params import TrainingParams
from fgrpo_pipeline.training.loop import train
from fgrpo_pipeline.training.preferences import preferences_from_splits


def train_policy(
    policy: Policy,
    prompts: pd.DataFrame,
    aligned: pd.DataFrame,
    unaligned: pd.DataFrame,
    params: dict[str, Any],
) -> tuple[Policy, pd.DataFrame, pd.DataFrame, dict[str, Policy], Policy]:
    """(trained policy, per-step metrics, logged completions, checkpoints by step, and the
    trained policy as it trained — LoRA: the adapter on its base — for the MLflow Model)."""
    run = read_params(TrainingParams, params)
    preferences = preferences_from_splits(aligned, unaligned)
    train_prompts = prompts[prompts["split"] == "train"]
    result = train(
        policy,
        train_prompts,
        run.config,
        preferences=preferences,
        progress=run.progress,
        resume_dir=run.resume_dir,
    )
    # A LoRA policy is saved merged, so any transformers loader reads it back; keep adapters
    # alone with an AdapterDataset entry instead (see README, "Real models").
    checkpoints = {
        f"step_{step:06d}": merge_for_export(ckpt) for step, ckpt in result.checkpoints.items()
    }
    merged = merge_for_export(result.policy)
    return merged, result.metrics, result.completions, checkpoints, result.policy
