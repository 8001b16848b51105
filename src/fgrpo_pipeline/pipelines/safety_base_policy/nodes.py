"""Nodes of ``safety_base_policy``: the unaligned base policy of the safety setting.

Parameters: parameters_safety_base_policy.yml (:class:`SafetyBasePolicyConfig`). The warm-up
teaches the response formats (compliance and refusal) but not when to use which: every
prompt is answered with a refusal at the same rate, harmful or not, so RL has both
behaviours to choose between.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from fgrpo_pipeline.algorithms.params import Params, require
from fgrpo_pipeline.models.policy import Policy, TinyModelConfig
from fgrpo_pipeline.pipelines.base_policy.params import WarmupConfig
from fgrpo_pipeline.pipelines.parameters import read_params
from fgrpo_pipeline.safety.data import sft_examples
from fgrpo_pipeline.training.warmup import build_warm_policy


@dataclass
class SafetyBasePolicyConfig(Params):
    """``safety_base_policy``: a tiny policy warmed up on the train records' responses, each
    answered with a refusal at ``refusal_rate``."""

    BLOCK = "safety_base_policy"
    RUN_KEYS = ("progress",)

    seed: int = 0
    num_threads: int = 0
    progress: bool = True
    refusal_rate: float = 0.3
    model: TinyModelConfig = field(
        default_factory=lambda: TinyModelConfig(max_position_embeddings=96)
    )
    warmup: WarmupConfig = field(default_factory=lambda: WarmupConfig(steps=300))

    def check(self) -> None:
        require(self.num_threads >= 0, "num_threads", f"must be ≥ 0, got {self.num_threads}")
        require(
            0 < self.refusal_rate < 1,
            "refusal_rate",
            f"must be in (0, 1), got {self.refusal_rate!r}",
        )


def build_safety_base_policy(
    records: pd.DataFrame, params: dict[str, Any]
) -> tuple[Policy, pd.DataFrame]:
    """A tiny policy warmed up on the train records' responses, refusing at ``refusal_rate``."""
    config = read_params(SafetyBasePolicyConfig, params)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    prompts, responses = sft_examples(
        records[records["split"] == "train"], refusal_rate=config.refusal_rate, seed=config.seed
    )
    policy, history = build_warm_policy(
        prompts,
        responses,
        model=config.model.as_kwargs(),
        warmup=config.warmup.as_kwargs(),
        seed=config.seed,
        progress=config.progress,
    )
    return policy, pd.DataFrame(history, columns=["step", "loss"])
