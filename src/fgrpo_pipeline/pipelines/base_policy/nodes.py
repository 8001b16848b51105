"""Nodes of ``base_policy``: build the tiny local policy and warm it up on the task.

Parameters: parameters_base_policy.yml. The warm-up teaches the answer format so the base
policy is right often but not always: RL needs groups whose rewards differ.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch

from fgrpo_pipeline.modeling import Policy
from fgrpo_pipeline.warmup import build_warm_policy

MODEL_KEYS = (
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "intermediate_size",
    "max_position_embeddings",
)
WARMUP_KEYS = ("steps", "batch_size", "learning_rate", "weight_decay")


def check_params(
    params: dict[str, Any],
    *,
    file: str = "parameters_base_policy.yml",
    block: str = "base_policy",
) -> None:
    """Unknown keys and out-of-range values fail before any work."""
    for part, keys in (("model", MODEL_KEYS), ("warmup", WARMUP_KEYS)):
        unknown = sorted(set(params.get(part) or {}) - set(keys))
        if unknown:
            raise ValueError(
                f"{file}: unknown {block}.{part} key(s) {unknown}; valid: {', '.join(keys)}"
            )
    warmup = params.get("warmup") or {}
    for key, low in (("steps", 0), ("batch_size", 1)):
        value = warmup.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{file}: {block}.warmup.{key}={value!r}")
    if not warmup.get("learning_rate", 0) > 0:
        raise ValueError(f"{file}: {block}.warmup.learning_rate must be > 0")


def build_base_policy(prompts: pd.DataFrame, params: dict[str, Any]) -> tuple[Policy, pd.DataFrame]:
    """A locally built Qwen2-style policy, warmed up on the train split's answers."""
    check_params(params)
    if params.get("num_threads"):
        torch.set_num_threads(params["num_threads"])
    train = prompts[prompts["split"] == "train"]
    policy, history = build_warm_policy(
        train["prompt"].tolist(),
        train["ground_truth"].tolist(),
        model=params["model"],
        warmup=params["warmup"],
        seed=params.get("seed", 0),
        progress=params.get("progress", True),
    )
    return policy, pd.DataFrame(history, columns=["step", "loss"])
