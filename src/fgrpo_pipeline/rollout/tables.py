"""Rollouts as a table: one row per completion, as ``rollout_generation`` saves them."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
from torch import Tensor

from fgrpo_pipeline.rollout.engine import RolloutBatch

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
