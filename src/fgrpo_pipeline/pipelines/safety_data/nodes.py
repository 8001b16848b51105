"""Nodes of ``safety_data``: compliance–refusal records, their splits, and the tables
that the reward model, the base policy and f-HAL train on (parameters_safety_data.yml:
:class:`SafetyDataConfig`).
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from fgrpo_pipeline.pipelines.parameters import read_params
from fgrpo_pipeline.safety.data import (
    SafetyDataConfig,
    aligned_unaligned,
    load_preference_pairs,
    preference_pairs,
    safety_prompts,
    split_records,
)


def load_safety_records(params: dict[str, Any]) -> pd.DataFrame:
    """Compliance–refusal records with a ``split`` column (train / test / anchor)."""
    config = read_params(SafetyDataConfig, params)
    records = config.load_records()
    try:
        return split_records(records, **config.split.as_kwargs(), seed=config.seed)
    except ValueError as err:
        raise ValueError(f"parameters_safety_data.yml: safety_data.split: {err}") from err


def build_safety_tables(
    records: pd.DataFrame, params: dict[str, Any]
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(prompts, aligned, unaligned, reward-model train pairs, held-out pairs).

    Aligned / unaligned (the offline FDO data) and the reward model's training pairs come
    from the train split only; held-out pairs from the test split, half benign, so the
    reward model's blind spot shows in its per-class accuracy.
    """
    config = read_params(SafetyDataConfig, params)
    options = config.reward_pairs
    train = records[records["split"] == "train"]
    test = records[records["split"] == "test"]
    aligned, unaligned = aligned_unaligned(train)
    try:
        if options.path:
            train_pairs = load_preference_pairs(options.path)
        else:
            train_pairs = preference_pairs(
                train,
                n_pairs=options.n_train,
                benign_fraction=options.benign_fraction,
                seed=config.seed,
            )
        test_pairs = preference_pairs(
            test, n_pairs=options.n_test, benign_fraction=0.5, seed=config.seed + 1
        )
    except ValueError as err:
        raise ValueError(f"parameters_safety_data.yml: safety_data.reward_pairs: {err}") from err
    return safety_prompts(records), aligned, unaligned, train_pairs, test_pairs
