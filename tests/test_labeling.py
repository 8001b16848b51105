"""Reward labeling: sides by the sign of the advantage, the two splits and the group summary."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from fgrpo_pipeline.algorithms.advantages import ADVANTAGE_SCALES
from fgrpo_pipeline.algorithms.labeling import side_labels
from fgrpo_pipeline.models.policy import build_char_tokenizer
from fgrpo_pipeline.pipelines.reward_labeling.nodes import label_rollouts
from fgrpo_pipeline.rollout.tables import ROLLOUT_COLUMNS
from fgrpo_pipeline.tasks.checks import validate_aligned, validate_unaligned

G = 4
# (prompt, ground truth, the G completions). Rewards are exact_number + format:
# right answer 2, a wrong number 1, not a number 0.
GROUPS = [
    ("1+2=", "3", ["3", "3", "3", "3"]),  # all right: zero spread, every a = 0
    ("2+2=", "4", ["4", "5", "4", "7"]),  # 2, 1, 2, 1: two a > 0, two a < 0
    ("5-9=", "-4", ["x", "y", "", "?"]),  # all 0: zero spread, every a = 0
    ("3+4=", "7", ["7", "5", "x", "6"]),  # 2, 1, 0, 1: the mean is 1, so two rows a = 0
]
# per group: (n_aligned, n_unaligned, n_neutral)
COUNTS = [(0, 0, 4), (2, 2, 0), (0, 0, 4), (1, 1, 2)]
PARAMS = {
    "rewards": {"exact_number": 1.0, "format": 1.0},
    "correctness_reward": "exact_number",
}


def _rollouts() -> pd.DataFrame:
    """A rollouts table as rollout_generation writes it (token ids from the char tokenizer)."""
    tokenizer = build_char_tokenizer()
    rows = []
    for g, (prompt, truth, completions) in enumerate(GROUPS):
        for completion in completions:
            ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
            ids = [*ids, tokenizer.eos_token_id]
            rows.append(
                {
                    "group": g,
                    "prompt_id": f"p{g}",
                    "prompt": prompt,
                    "ground_truth": truth,
                    "completion": completion,
                    "completion_ids": ids,
                    "old_logps": [-0.5] * len(ids),
                    "ref_logps": [-0.5] * len(ids),
                    "length": len(ids),
                    "truncated": False,
                }
            )
    table = pd.DataFrame(rows)
    assert tuple(table.columns) == ROLLOUT_COLUMNS
    return table


@pytest.mark.parametrize("advantage_scale", ADVANTAGE_SCALES)
def test_zero_advantage_rows_are_neutral_and_in_neither_split(advantage_scale):
    rollouts = _rollouts()
    labeled, aligned, unaligned, groups = label_rollouts(
        rollouts, {**PARAMS, "advantage_scale": advantage_scale}
    )
    a = labeled["advantage"]
    assert (a == 0).sum() == sum(n for _, _, n in COUNTS), "the check needs a = 0 rows"

    # the labeled table keeps every row, in order, each with the side of its advantage's sign
    assert len(labeled) == len(rollouts)
    pd.testing.assert_frame_equal(labeled[list(ROLLOUT_COLUMNS)], rollouts)
    assert (labeled["side"] == "neutral").tolist() == (a == 0).tolist()
    assert (labeled["side"] == "aligned").tolist() == (a > 0).tolist()
    assert (labeled["side"] == "unaligned").tolist() == (a < 0).tolist()

    # the splits: aligned none ≤ 0, unaligned none ≥ 0, exactly the labeled rows of each sign
    assert len(aligned) and len(unaligned)
    assert not (aligned["advantage"] <= 0).any()
    assert not (unaligned["advantage"] >= 0).any()
    assert set(aligned["side"]) == {"aligned"} and set(unaligned["side"]) == {"unaligned"}
    pd.testing.assert_frame_equal(aligned, labeled[a > 0].reset_index(drop=True))
    pd.testing.assert_frame_equal(unaligned, labeled[a < 0].reset_index(drop=True))
    assert len(aligned) + len(unaligned) + int((a == 0).sum()) == len(labeled)

    # the group summary counts each side, neutral rows included
    got = list(zip(groups["n_aligned"], groups["n_unaligned"], groups["n_neutral"], strict=True))
    assert got == COUNTS
    assert groups["zero_std"].tolist() == [True, False, True, False]
    assert (groups["n_aligned"] + groups["n_unaligned"] + groups["n_neutral"] == G).all()
    assert groups["n_neutral"].sum() == (labeled["side"] == "neutral").sum()

    # the run-time input checks accept the splits
    validate_aligned(aligned, "aligned")
    validate_unaligned(unaligned, "unaligned")


def test_side_labels_follow_the_sign():
    advantages = torch.tensor([1.5, 0.0, -0.2, -0.0, 1e-9, -1e-9])
    assert side_labels(advantages) == [
        "aligned",
        "neutral",
        "unaligned",
        "neutral",
        "aligned",
        "unaligned",
    ]


def test_a_split_with_neutral_or_wrong_side_rows_is_refused_naming_the_row():
    labeled, _, _, _ = label_rollouts(_rollouts(), {**PARAMS, "advantage_scale": "group"})
    # what the old rule (a ≤ 0) wrote as the unaligned split: neutral rows in it
    stale = labeled[labeled["advantage"] <= 0].reset_index(drop=True)
    with pytest.raises(ValueError, match=r"unaligned: column 'advantage', row 0: 0.0 is not < 0"):
        validate_unaligned(stale, "unaligned")
    swapped = labeled[labeled["advantage"] < 0].reset_index(drop=True)
    with pytest.raises(ValueError, match=r"aligned: column 'advantage', row 0: -.* is not > 0"):
        validate_aligned(swapped, "aligned")
    relabeled = labeled[labeled["advantage"] > 0].reset_index(drop=True)
    relabeled.loc[1, "side"] = "neutral"
    with pytest.raises(ValueError, match=r"column 'side', row 1: 'neutral' in the aligned split"):
        validate_aligned(relabeled, "aligned")
    # tables without labels (user-supplied offline data, the safety splits) only need texts
    validate_unaligned(pd.DataFrame({"prompt": ["1+1="], "completion": ["3"]}), "unaligned")
