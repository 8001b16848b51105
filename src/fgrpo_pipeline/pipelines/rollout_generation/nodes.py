"""Nodes of ``rollout_generation``: G completions per prompt from the base policy.

Parameters: parameters_rollout_generation.yml (:class:`RolloutGenerationConfig`). The
sampling policy here is the reference (the base policy), so its generation log-probabilities
are also the reference's: they are recorded once rather than recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import pandas as pd
import torch

from fgrpo_pipeline.algorithms.params import Params, require, require_choice
from fgrpo_pipeline.models.policy import Policy
from fgrpo_pipeline.pipelines.parameters import read_params
from fgrpo_pipeline.rollout import (
    ENGINES,
    SamplingConfig,
    checked_engine_options,
    get_engine,
    repeat_each,
)
from fgrpo_pipeline.rollout.tables import rollouts_to_table


@dataclass
class RolloutGenerationConfig(Params):
    """``rollout_generation``: ``group_size`` completions for each of ``num_prompts`` prompts
    of ``split``; the sampler is seeded by ``seed`` (which replaces ``sampling.seed``)."""

    BLOCK = "rollout_generation"

    split: str = "train"
    num_prompts: int = 64
    group_size: int = 8
    engine: str = "hf"
    engine_options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def check(self) -> None:
        require_choice(self.split, ("train", "test"), "split")
        require(self.num_prompts >= 1, "num_prompts", f"must be ≥ 1, got {self.num_prompts}")
        require(
            self.group_size >= 2,
            "group_size",
            f"must be ≥ 2 (advantages compare G ≥ 2), got {self.group_size}",
        )
        ENGINES.check(self.engine, "rollout_generation.engine")
        self.engine_options = checked_engine_options(self.engine, self.engine_options)
        self.sampling = replace(self.sampling, seed=self.seed)


def generate_rollouts(
    policy: Policy, prompts: pd.DataFrame, params: dict[str, Any]
) -> pd.DataFrame:
    """One row per completion, ``group_size`` per prompt, for ``num_prompts`` prompts."""
    config = read_params(RolloutGenerationConfig, params)
    pool = prompts[prompts["split"] == config.split]
    if pool.empty:
        raise ValueError(f"prompts table has no rows with split={config.split!r}")
    gen = torch.Generator().manual_seed(config.seed)
    n = min(config.num_prompts, len(pool))
    chosen = pool.iloc[torch.randperm(len(pool), generator=gen)[:n].tolist()]
    g = config.group_size
    batch = get_engine(config.engine, **config.engine_options).generate(
        policy, chosen["prompt"].tolist(), g, config.sampling
    )
    return rollouts_to_table(
        batch,
        prompt_ids=repeat_each(chosen["id"].tolist(), g),
        ground_truths=repeat_each(chosen["ground_truth"].tolist(), g),
        ref_logps=batch.old_logps,
    )
