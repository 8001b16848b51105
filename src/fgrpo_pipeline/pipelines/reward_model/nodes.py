"""Nodes of ``reward_model``: a Bradley–Terry reward model trained on preference pairs.

Parameters: parameters_reward_model.yml (:class:`RewardModelConfig`). The held-out pairs are
half benign, half harmful, so the per-class accuracies show the blind spot the default
training set gives it.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch

from fgrpo_pipeline.models.policy import build_char_tokenizer, set_seed
from fgrpo_pipeline.pipelines.parameters import read_params
from fgrpo_pipeline.safety.data import BENIGN, HARMFUL, SAFETY_LABELS
from fgrpo_pipeline.safety.reward_model import (
    RewardModel,
    RewardModelConfig,
    build_reward_model,
    pairwise_accuracy,
    train_reward_model,
)


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
    config = read_params(RewardModelConfig, params)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    set_seed(config.seed)
    model = build_reward_model(build_char_tokenizer(), seed=config.seed, **config.model.as_kwargs())
    history = train_reward_model(
        model,
        train_pairs,
        seed=config.seed,
        progress=config.progress,
        **config.training.as_kwargs(),
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
