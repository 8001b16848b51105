"""Nodes of ``base_policy``: build the tiny local policy and warm it up on the task.

Parameters: parameters_base_policy.yml. The warm-up teaches the answer format so the base
policy is right often but not always: RL needs groups whose rewards differ.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch

from fgrpo_pipeline.models.policy import Policy, load_pretrained_policy
from fgrpo_pipeline.training.warmup import build_warm_policy

MODEL_KEYS = (
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "intermediate_size",
    "max_position_embeddings",
)
WARMUP_KEYS = ("steps", "batch_size", "learning_rate", "weight_decay")
SOURCES = ("tiny", "pretrained")
PRETRAINED_KEYS = (
    "model",
    "revision",
    "dtype",
    "local_files_only",
    "tokenizer",
    "gradient_checkpointing",
)


def check_params(
    params: dict[str, Any],
    *,
    file: str = "parameters_base_policy.yml",
    block: str = "base_policy",
) -> None:
    """Unknown keys and out-of-range values fail before any work."""
    if block == "base_policy" and _check_source(params) == "pretrained":
        return  # no local model to build, no warm-up
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


def _check_source(params: dict[str, Any]) -> str:
    source = params.get("source", "tiny")
    if source not in SOURCES:
        raise ValueError(
            f"parameters_base_policy.yml: unknown base_policy.source {source!r}; "
            f"valid: {', '.join(SOURCES)}"
        )
    if source == "pretrained":
        pretrained = params.get("pretrained") or {}
        unknown = sorted(set(pretrained) - set(PRETRAINED_KEYS))
        if unknown:
            raise ValueError(
                f"parameters_base_policy.yml: unknown base_policy.pretrained key(s) {unknown}; "
                f"valid: {', '.join(PRETRAINED_KEYS)}"
            )
        if not pretrained.get("model"):
            raise ValueError(
                "parameters_base_policy.yml: base_policy.pretrained.model (a hub id or a "
                "save_pretrained directory) is not set"
            )
    return source


def build_base_policy(prompts: pd.DataFrame, params: dict[str, Any]) -> tuple[Policy, pd.DataFrame]:
    """The base policy: built locally and warmed up on the train split's answers
    (``source: tiny``), or a pretrained model as it is (``source: pretrained``)."""
    source = _check_source(params)
    if source == "pretrained":
        policy = load_pretrained_policy(**params["pretrained"])
        return policy, pd.DataFrame(columns=["step", "loss"])
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
