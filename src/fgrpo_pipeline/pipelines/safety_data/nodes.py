"""Nodes of ``safety_data``: compliance–refusal records, their splits, and the tables
that the reward model, the base policy and f-HAL train on (parameters_safety_data.yml).
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from fgrpo_pipeline.safety.data import (
    aligned_unaligned,
    load_compliance_refusal,
    load_preference_pairs,
    make_safety_records,
    preference_pairs,
    safety_prompts,
    split_records,
    validate_records,
)

FILE = "parameters_safety_data.yml"
SOURCES = ("synthetic", "jsonl")
KEYS = ("source", "path", "seed", "synthetic", "split", "reward_pairs")
PAIR_KEYS = ("n_train", "benign_fraction", "n_test", "path")


def _fail(message: str) -> None:
    raise ValueError(f"{FILE}: {message}")


def check_params(params: dict[str, Any]) -> None:
    """Keys, source and the blocks it needs, before any work."""
    unknown = sorted(set(params) - set(KEYS))
    if unknown:
        _fail(f"unknown safety_data key(s) {unknown}; valid: {', '.join(KEYS)}")
    source = params.get("source")
    if source not in SOURCES:
        _fail(f"unknown safety_data.source {source!r}; valid: {', '.join(SOURCES)}")
    if source == "jsonl" and not params.get("path"):
        _fail("safety_data.source is jsonl but safety_data.path is not set")
    if source == "synthetic" and not isinstance(params.get("synthetic"), dict):
        _fail("safety_data.synthetic (n_per_class) is missing")
    for block in ("split", "reward_pairs"):
        if not isinstance(params.get(block), dict):
            _fail(f"safety_data.{block} is missing")
    unknown = sorted(set(params["reward_pairs"]) - set(PAIR_KEYS))
    if unknown:
        _fail(f"unknown safety_data.reward_pairs key(s) {unknown}; valid: {', '.join(PAIR_KEYS)}")


def load_safety_records(params: dict[str, Any]) -> pd.DataFrame:
    """Compliance–refusal records with a ``split`` column (train / test / anchor)."""
    check_params(params)
    seed = params.get("seed", 0)
    if params["source"] == "jsonl":
        records = load_compliance_refusal(params["path"])
    else:
        records = make_safety_records(**params["synthetic"], seed=seed)
    validate_records(records, source=f"safety_data.source={params['source']}")
    try:
        return split_records(records, **params["split"], seed=seed)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{FILE}: safety_data.split: {err}") from err


def build_safety_tables(
    records: pd.DataFrame, params: dict[str, Any]
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(prompts, aligned, unaligned, reward-model train pairs, held-out pairs).

    Aligned / unaligned (the offline FDO data) and the reward model's training pairs come
    from the train split only; held-out pairs from the test split, half benign, so the
    reward model's blind spot shows in its per-class accuracy.
    """
    check_params(params)
    seed = params.get("seed", 0)
    options = params["reward_pairs"]
    train = records[records["split"] == "train"]
    test = records[records["split"] == "test"]
    aligned, unaligned = aligned_unaligned(train)
    try:
        if options.get("path"):
            train_pairs = load_preference_pairs(options["path"])
        else:
            train_pairs = preference_pairs(
                train,
                n_pairs=options["n_train"],
                benign_fraction=options["benign_fraction"],
                seed=seed,
            )
        test_pairs = preference_pairs(
            test, n_pairs=options["n_test"], benign_fraction=0.5, seed=seed + 1
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{FILE}: safety_data.reward_pairs: {err}") from err
    return safety_prompts(records), aligned, unaligned, train_pairs, test_pairs
