"""Nodes of ``base_policy``: build the tiny local policy and warm it up on the task.

Parameters: parameters_base_policy.yml (:class:`BasePolicyConfig`). The warm-up teaches the
answer format so the base policy is right often but not always: RL needs groups whose
rewards differ.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch

from fgrpo_pipeline.models.policy import Policy
from fgrpo_pipeline.pipelines.base_policy.params import BasePolicyConfig
from fgrpo_pipeline.pipelines.parameters import read_params
from fgrpo_pipeline.training.warmup import build_warm_policy


def build_base_policy(prompts: pd.DataFrame, params: dict[str, Any]) -> tuple[Policy, pd.DataFrame]:
    """The base policy: built locally and warmed up on the train split's answers
    (``source: tiny``), or a pretrained model as it is (``source: pretrained``)."""
    config = read_params(BasePolicyConfig, params)
    if config.source == "pretrained":
        return config.pretrained.load(), pd.DataFrame(columns=["step", "loss"])
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    train = prompts[prompts["split"] == "train"]
    policy, history = build_warm_policy(
        train["prompt"].tolist(),
        train["ground_truth"].tolist(),
        model=config.model.as_kwargs(),
        warmup=config.warmup.as_kwargs(),
        seed=config.seed,
        progress=config.progress,
    )
    return policy, pd.DataFrame(history, columns=["step", "loss"])
