"""Nodes of ``safety_base_policy``: the unaligned base policy of the safety setting.

Parameters: parameters_safety_base_policy.yml. The warm-up teaches the response formats
(compliance and refusal) but not when to use which: every prompt is answered with a
refusal at the same rate, harmful or not, so RL has both behaviours to choose between.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch

from fgrpo_pipeline.models.policy import Policy
from fgrpo_pipeline.pipelines.base_policy.nodes import check_params as check_warm_policy
from fgrpo_pipeline.safety.data import sft_examples
from fgrpo_pipeline.training.warmup import build_warm_policy

FILE = "parameters_safety_base_policy.yml"
KEYS = ("seed", "num_threads", "progress", "refusal_rate", "model", "warmup")


def check_params(params: dict[str, Any]) -> None:
    unknown = sorted(set(params) - set(KEYS))
    if unknown:
        raise ValueError(
            f"{FILE}: unknown safety_base_policy key(s) {unknown}; valid: {', '.join(KEYS)}"
        )
    rate = params.get("refusal_rate")
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 < rate < 1:
        raise ValueError(f"{FILE}: safety_base_policy.refusal_rate must be in (0, 1), got {rate!r}")
    check_warm_policy(params, file=FILE, block="safety_base_policy")


def build_safety_base_policy(
    records: pd.DataFrame, params: dict[str, Any]
) -> tuple[Policy, pd.DataFrame]:
    """A tiny policy warmed up on the train records' responses, refusing at ``refusal_rate``."""
    check_params(params)
    if params.get("num_threads"):
        torch.set_num_threads(params["num_threads"])
    seed = params.get("seed", 0)
    prompts, responses = sft_examples(
        records[records["split"] == "train"], refusal_rate=params["refusal_rate"], seed=seed
    )
    policy, history = build_warm_policy(
        prompts,
        responses,
        model=params["model"],
        warmup=params["warmup"],
        seed=seed,
        progress=params.get("progress", True),
    )
    return policy, pd.DataFrame(history, columns=["step", "loss"])
