"""Nodes of ``rollout_generation``: G completions per prompt from the base policy.

Parameters: parameters_rollout_generation.yml. The sampling policy here is the reference
(the base policy), so its generation log-probabilities are also the reference's: they are
recorded once rather than recomputed.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch

from fgrpo_pipeline.models.policy import Policy
from fgrpo_pipeline.rollout import ENGINES, SamplingConfig, get_engine, repeat_each
from fgrpo_pipeline.rollout.tables import rollouts_to_table


def check_params(params: dict[str, Any]) -> None:
    ENGINES.check(params.get("engine"), "rollout_generation.engine")
    SamplingConfig(**params.get("sampling", {}))
    if params.get("split") not in ("train", "test"):
        raise ValueError("parameters_rollout_generation.yml: split must be 'train' or 'test'")
    if not isinstance(params.get("group_size"), int) or params["group_size"] < 2:
        raise ValueError("parameters_rollout_generation.yml: group_size must be an integer ≥ 2")
    if not isinstance(params.get("num_prompts"), int) or params["num_prompts"] < 1:
        raise ValueError("parameters_rollout_generation.yml: num_prompts must be an integer ≥ 1")


def generate_rollouts(
    policy: Policy, prompts: pd.DataFrame, params: dict[str, Any]
) -> pd.DataFrame:
    """One row per completion, ``group_size`` per prompt, for ``num_prompts`` prompts."""
    check_params(params)
    pool = prompts[prompts["split"] == params["split"]]
    if pool.empty:
        raise ValueError(f"prompts table has no rows with split={params['split']!r}")
    gen = torch.Generator().manual_seed(params.get("seed", 0))
    n = min(params["num_prompts"], len(pool))
    chosen = pool.iloc[torch.randperm(len(pool), generator=gen)[:n].tolist()]
    g = params["group_size"]
    sampling = SamplingConfig(**{**params.get("sampling", {}), "seed": params.get("seed", 0)})
    batch = get_engine(params["engine"]).generate(policy, chosen["prompt"].tolist(), g, sampling)
    return rollouts_to_table(
        batch,
        prompt_ids=repeat_each(chosen["id"].tolist(), g),
        ground_truths=repeat_each(chosen["ground_truth"].tolist(), g),
        ref_logps=batch.old_logps,
    )
