"""Scoring rollouts: rewards, group advantages, sides, and their table form.

The training loop and the ``rollout_generation`` / ``reward_labeling`` pipelines share
these functions, so what is inspected in the parquet tables is exactly what trains.

A row's side follows the sign of its advantage: ``aligned`` (a > 0, D⁺), ``unaligned``
(a < 0, D⁻) or ``neutral`` (a = 0: every row of a group whose rewards are all equal, and a
row exactly at its group's mean). Neutral rows carry no signal; they stay in the labeled
table and are counted per group, but belong to neither split.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import Tensor

from fgrpo_pipeline.algorithms.advantages import ADVANTAGE_SCALES, group_advantages, group_stats
from fgrpo_pipeline.algorithms.params import Params, require_choice
from fgrpo_pipeline.algorithms.rewards import REWARDS, RewardFn, combine_rewards, score_completions

LABEL_COLUMNS = ("reward", "correct", "advantage", "side")


@dataclass
class LabelingConfig(Params):
    """How rollouts are scored (``reward_labeling`` in parameters_reward_labeling.yml): the
    weighted rewards, the reward whose value 1 counts as correct, the advantage scale."""

    BLOCK = "reward_labeling"

    rewards: dict[str, float] = field(default_factory=lambda: {"exact_number": 1.0})
    correctness_reward: str = "exact_number"
    advantage_scale: str = "group"

    def check(self) -> None:
        combine_rewards(self.rewards)  # names and weights
        REWARDS.check(self.correctness_reward, "reward_labeling.correctness_reward")
        require_choice(self.advantage_scale, ADVANTAGE_SCALES, "advantage_scale")

    def reward_fn(self) -> RewardFn:
        return combine_rewards(self.rewards)

    def correctness_fn(self) -> RewardFn:
        return REWARDS.get(self.correctness_reward)


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
    """Per advantage: ``aligned`` where it is > 0, ``unaligned`` where < 0, else ``neutral``."""
    return [
        "aligned" if a > 0 else "unaligned" if a < 0 else "neutral" for a in advantages.tolist()
    ]


def label_table(table: pd.DataFrame, scored: ScoredRollouts) -> pd.DataFrame:
    """The rollout table with reward, correctness, advantage and side columns added."""
    labeled = table.copy()
    labeled["reward"] = scored.rewards.tolist()
    labeled["correct"] = scored.correct.tolist()
    labeled["advantage"] = scored.advantages.tolist()
    labeled["side"] = side_labels(scored.advantages)
    return labeled


def split_sides(labeled: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(aligned, unaligned): the rows with advantage > 0 and < 0; rows with advantage 0
    (neutral) are in neither."""
    advantage = labeled["advantage"]
    return (
        labeled[advantage > 0].reset_index(drop=True),
        labeled[advantage < 0].reset_index(drop=True),
    )


def summarise_groups(labeled: pd.DataFrame, group_size: int) -> pd.DataFrame:
    """Per group: prompt, reward mean/std/spread, the zero-std flag, the number of rows on
    each side (``n_aligned``, ``n_unaligned``, ``n_neutral``; they add up to G) and the
    accuracy."""
    stats = group_stats(torch.tensor(labeled["reward"].to_numpy(), dtype=torch.float64), group_size)
    groups = labeled.groupby("group", sort=True)
    first = groups.first()

    def count(side: str):
        return groups["side"].apply(lambda s: int((s == side).sum())).to_numpy()

    return pd.DataFrame(
        {
            "group": first.index.to_numpy(),
            "prompt_id": first["prompt_id"].to_numpy(),
            "prompt": first["prompt"].to_numpy(),
            "reward_mean": stats.mean.numpy(),
            "reward_std": stats.std.numpy(),
            "reward_spread": stats.spread.numpy(),
            "zero_std": stats.zero_std.numpy(),
            "n_aligned": count("aligned"),
            "n_unaligned": count("unaligned"),
            "n_neutral": count("neutral"),
            "accuracy": groups["correct"].mean().to_numpy(),
        }
    )
