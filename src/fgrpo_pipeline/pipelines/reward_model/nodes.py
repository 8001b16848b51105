"""Nodes of ``reward_model``: a Bradley–Terry reward model trained on preference pairs.

Parameters: parameters_reward_model.yml. The held-out pairs are half benign, half harmful,
so the per-class accuracies show the blind spot the default training set gives it.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch

from fgrpo_pipeline.models.policy import build_char_tokenizer, set_seed
from fgrpo_pipeline.pipelines.base_policy.nodes import MODEL_KEYS
from fgrpo_pipeline.safety.data import BENIGN, HARMFUL, SAFETY_LABELS
from fgrpo_pipeline.safety.reward_model import (
    RewardModel,
    build_reward_model,
    pairwise_accuracy,
    train_reward_model,
)

FILE = "parameters_reward_model.yml"
KEYS = ("seed", "num_threads", "progress", "model", "training")
TRAINING_KEYS = ("steps", "batch_size", "learning_rate", "weight_decay")


def check_params(params: dict[str, Any]) -> None:
    for block, keys in ((None, KEYS), ("model", MODEL_KEYS), ("training", TRAINING_KEYS)):
        values = params if block is None else params.get(block) or {}
        unknown = sorted(set(values) - set(keys))
        if unknown:
            where = "reward_model" if block is None else f"reward_model.{block}"
            raise ValueError(f"{FILE}: unknown {where} key(s) {unknown}; valid: {', '.join(keys)}")
    training = params.get("training") or {}
    for key, low in (("steps", 0), ("batch_size", 1)):
        value = training.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{FILE}: reward_model.training.{key} must be an integer ≥ {low}")
    if not training.get("learning_rate", 0) > 0:
        raise ValueError(f"{FILE}: reward_model.training.learning_rate must be > 0")


def _class_pairs(pairs: pd.DataFrame, label: str) -> pd.DataFrame:
    """The pairs of one class; none when the pairs carry no ``safety`` column (0 / 1)."""
    if "safety" not in pairs:
        return pairs.iloc[:0]
    return pairs[pairs["safety"].map(SAFETY_LABELS) == label]


def _class_accuracy(model: RewardModel, pairs: pd.DataFrame, label: str) -> float:
    subset = _class_pairs(pairs, label)
    return pairwise_accuracy(model, subset) if len(subset) else float("nan")


def fit_reward_model(
    train_pairs: pd.DataFrame, test_pairs: pd.DataFrame, params: dict[str, Any]
) -> tuple[RewardModel, dict[str, Any], pd.DataFrame]:
    """(reward model, report with held-out pairwise accuracy, per-step training history)."""
    check_params(params)
    if params.get("num_threads"):
        torch.set_num_threads(params["num_threads"])
    seed = params.get("seed", 0)
    set_seed(seed)
    model = build_reward_model(build_char_tokenizer(), seed=seed, **(params.get("model") or {}))
    history = train_reward_model(
        model, train_pairs, seed=seed, progress=params.get("progress", True), **params["training"]
    )
    n_benign = len(_class_pairs(train_pairs, BENIGN)) if "safety" in train_pairs else None
    report = {
        "heldout_accuracy": pairwise_accuracy(model, test_pairs),
        "heldout_accuracy_harmful": _class_accuracy(model, test_pairs, HARMFUL),
        "heldout_accuracy_benign": _class_accuracy(model, test_pairs, BENIGN),
        "train_accuracy": pairwise_accuracy(model, train_pairs),
        "n_train_pairs": len(train_pairs),
        "n_train_benign_pairs": n_benign,
        "n_heldout_pairs": len(test_pairs),
        "final_loss": history[-1]["loss"] if history else None,
    }
    return model, report, pd.DataFrame(history, columns=["step", "loss", "accuracy"])
