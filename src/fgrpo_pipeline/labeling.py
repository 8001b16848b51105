"""Scoring rollouts: rewards, group advantages, sides, and their table form.

The training loop and the ``rollout_generation`` / ``reward_labeling`` pipelines share
these functions, so what is inspected in the parquet tables is exactly what trains.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor

from fgrpo_pipeline.advantages import group_advantages, group_stats
from fgrpo_pipeline.rewards import score_completions
from fgrpo_pipeline.rollout import RolloutBatch

ROLLOUT_COLUMNS = (
    "group",
    "prompt_id",
    "prompt",
    "ground_truth",
    "completion",
    "completion_ids",
    "old_logps",
    "ref_logps",
    "length",
    "truncated",
)
LABEL_COLUMNS = ("reward", "correct", "advantage", "side")


@dataclass
class ScoredRollouts:
    """Rewards [N], the correctness indicator [N] and group advantages [N] of a batch."""

    rewards: Tensor
    correct: Tensor
    advantages: Tensor


def score_rollouts(
    completions: Sequence[str],
    prompts: Sequence[str],
    ground_truths: Sequence[str],
    *,
    reward_fn: Callable[..., list[float]],
    correctness_fn: Callable[..., list[float]],
    group_size: int,
    advantage_scale: str = "group",
) -> ScoredRollouts:
    """Rewards, correctness (reward of ``correctness_fn`` ≥ 1) and advantages."""
    columns = {"ground_truth": list(ground_truths)}
    rewards = score_completions(reward_fn, list(prompts), list(completions), **columns)
    correct = score_completions(correctness_fn, list(prompts), list(completions), **columns)
    rewards_t = torch.tensor(rewards, dtype=torch.float32)
    return ScoredRollouts(
        rewards=rewards_t,
        correct=torch.tensor(correct, dtype=torch.float32) >= 1.0,
        advantages=group_advantages(rewards_t, group_size, scale=advantage_scale),
    )


def side_labels(advantages: Tensor) -> list[str]:
    """``aligned`` where the advantage is > 0, else ``unaligned``."""
    return ["aligned" if a > 0 else "unaligned" for a in advantages.tolist()]


def _ragged(values: Tensor, lengths: Tensor) -> list[list]:
    return [row[:n].tolist() for row, n in zip(values, lengths.tolist(), strict=True)]


def rollouts_to_table(
    batch: RolloutBatch,
    prompt_ids: Sequence[str],
    ground_truths: Sequence[str],
    ref_logps: Tensor,
) -> pd.DataFrame:
    """One row per completion: ids, text, token ids and per-token log-probs (ragged lists)."""
    lengths = batch.lengths
    return pd.DataFrame(
        {
            "group": [i // batch.group_size for i in range(len(batch.prompts))],
            "prompt_id": list(prompt_ids),
            "prompt": list(batch.prompts),
            "ground_truth": list(ground_truths),
            "completion": list(batch.completions),
            "completion_ids": _ragged(batch.completion_ids, lengths),
            "old_logps": _ragged(batch.old_logps, lengths),
            "ref_logps": _ragged(ref_logps, lengths),
            "length": lengths.tolist(),
            "truncated": batch.truncated.tolist(),
        }
    )


def label_table(table: pd.DataFrame, scored: ScoredRollouts) -> pd.DataFrame:
    """The rollout table with reward, correctness, advantage and side columns added."""
    labeled = table.copy()
    labeled["reward"] = scored.rewards.tolist()
    labeled["correct"] = scored.correct.tolist()
    labeled["advantage"] = scored.advantages.tolist()
    labeled["side"] = side_labels(scored.advantages)
    return labeled


def split_sides(labeled: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(aligned, unaligned): the rows with advantage > 0 and ≤ 0."""
    aligned = labeled["advantage"] > 0
    return labeled[aligned].reset_index(drop=True), labeled[~aligned].reset_index(drop=True)


def summarise_groups(labeled: pd.DataFrame, group_size: int) -> pd.DataFrame:
    """Per group: prompt, reward mean/std/spread, the zero-std flag and aligned count."""
    stats = group_stats(torch.tensor(labeled["reward"].to_numpy(), dtype=torch.float64), group_size)
    first = labeled.groupby("group", sort=True).first()
    return pd.DataFrame(
        {
            "group": first.index.to_numpy(),
            "prompt_id": first["prompt_id"].to_numpy(),
            "prompt": first["prompt"].to_numpy(),
            "reward_mean": stats.mean.numpy(),
            "reward_std": stats.std.numpy(),
            "reward_spread": stats.spread.numpy(),
            "zero_std": stats.zero_std.numpy(),
            "n_aligned": labeled.groupby("group", sort=True)["side"]
            .apply(lambda s: int((s == "aligned").sum()))
            .to_numpy(),
            "accuracy": labeled.groupby("group", sort=True)["correct"].mean().to_numpy(),
        }
    )
