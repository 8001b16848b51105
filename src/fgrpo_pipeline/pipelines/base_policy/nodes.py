"""Nodes of ``base_policy``: build the tiny local policy and warm it up on the task.

Parameters: parameters_base_policy.yml. The warm-up teaches the answer format so the base
policy is right often but not always: RL needs groups whose rewards differ.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch

from fgrpo_pipeline.modeling import Policy, build_char_tokenizer, build_tiny_policy, set_seed
from fgrpo_pipeline.warmup import supervised_warmup

MODEL_KEYS = (
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "intermediate_size",
    "max_position_embeddings",
)
WARMUP_KEYS = ("steps", "batch_size", "learning_rate", "weight_decay")


def check_params(params: dict[str, Any]) -> None:
    """Unknown keys and out-of-range values fail before any work."""
    for block, keys in (("model", MODEL_KEYS), ("warmup", WARMUP_KEYS)):
        unknown = sorted(set(params.get(block) or {}) - set(keys))
        if unknown:
            raise ValueError(
                f"parameters_base_policy.yml: unknown base_policy.{block} key(s) {unknown}; "
                f"valid: {', '.join(keys)}"
            )
    for key in ("steps", "batch_size"):
        value = params["warmup"][key]
        if not isinstance(value, int) or value < (0 if key == "steps" else 1):
            raise ValueError(f"parameters_base_policy.yml: base_policy.warmup.{key}={value!r}")
    if not params["warmup"]["learning_rate"] > 0:
        raise ValueError("parameters_base_policy.yml: base_policy.warmup.learning_rate must be > 0")


def build_base_policy(prompts: pd.DataFrame, params: dict[str, Any]) -> tuple[Policy, pd.DataFrame]:
    """A locally built Qwen2-style policy, warmed up on the train split's answers."""
    check_params(params)
    if params.get("num_threads"):
        torch.set_num_threads(params["num_threads"])
    seed = params.get("seed", 0)
    set_seed(seed)
    tokenizer = build_char_tokenizer()
    policy = build_tiny_policy(tokenizer, seed=seed, **params["model"])
    train = prompts[prompts["split"] == "train"]
    history = supervised_warmup(
        policy,
        train["prompt"].tolist(),
        train["ground_truth"].tolist(),
        seed=seed,
        progress=params.get("progress", True),
        **params["warmup"],
    )
    policy.model.eval()
    return policy, pd.DataFrame(history, columns=["step", "loss"])
