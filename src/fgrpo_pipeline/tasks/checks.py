"""Checks of the tables the pipelines read, each raising one ``ValueError`` that names the
source, the column and the row.

Plain pandas (no Kedro, no MLflow). The Kedro layer runs them on a run's inputs before any
node starts (``hooks.py``), so a bad file costs nothing and leaves nothing half-written.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import pandas as pd

from fgrpo_pipeline.rollout.tables import ROLLOUT_COLUMNS

SIDE_COLUMNS = ("prompt", "completion")


def require_columns(df: pd.DataFrame, columns: Sequence[str], source: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"{source}: expected a table, got {type(df).__name__}")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(
            f"{source}: missing column(s) {missing}; expected {list(columns)}, "
            f"found {list(df.columns)}"
        )


def validate_text_columns(
    df: pd.DataFrame, columns: Sequence[str], source: str, *, non_empty: Sequence[str] = ()
) -> None:
    """``columns`` present and string-valued; those in ``non_empty`` not blank."""
    require_columns(df, columns, source)
    for column in columns:
        for row, value in df[column].items():
            if not isinstance(value, str):
                raise ValueError(
                    f"{source}: column {column!r}, row {row!r}: expected a string, got {value!r}"
                )
            if column in non_empty and not value.strip():
                raise ValueError(f"{source}: column {column!r}, row {row!r}: empty {column}")


def validate_rollouts(df: pd.DataFrame, source: str) -> int:
    """A rollouts table: its columns, texts, groups of one size G ≥ 2 listed consecutively,
    and lengths ≥ 0. Returns G."""
    require_columns(df, ROLLOUT_COLUMNS, source)
    validate_text_columns(df, ("prompt", "completion"), source, non_empty=("prompt",))
    if df.empty:
        raise ValueError(f"{source}: no rows")
    for row, value in df["length"].items():
        if not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"{source}: column 'length', row {row!r}: {value!r} is not ≥ 0")
    if not df["group"].is_monotonic_increasing:
        raise ValueError(f"{source}: column 'group': each group's rows must be consecutive")
    sizes = df.groupby("group").size()
    if sizes.nunique() != 1:
        raise ValueError(
            f"{source}: column 'group': groups of unequal size {sorted(set(sizes))}; "
            f"{len(df)} rows are not a whole number of groups of one size G"
        )
    group_size = int(sizes.iloc[0])
    if group_size < 2:
        raise ValueError(f"{source}: column 'group': G = {group_size}; advantages need G ≥ 2")
    return group_size


def validate_sides(df: pd.DataFrame, source: str) -> None:
    """An aligned / unaligned table: prompt and completion strings, prompts not blank."""
    validate_text_columns(df, SIDE_COLUMNS, source, non_empty=("prompt",))


def _validate_split(df: pd.DataFrame, source: str, side: str) -> None:
    """:func:`validate_sides`, and where the table has the labels ``reward_labeling`` writes,
    every row on ``side``: advantage > 0 (aligned) or < 0 (unaligned), never 0 (neutral)."""
    validate_sides(df, source)
    if "advantage" in df.columns:
        for row, value in df["advantage"].items():
            if not isinstance(value, numbers.Real) or not (
                value > 0 if side == "aligned" else value < 0
            ):
                sign = "> 0" if side == "aligned" else "< 0"
                raise ValueError(
                    f"{source}: column 'advantage', row {row!r}: {value!r} is not {sign}; "
                    f"the {side} split holds only rows with advantage {sign} (0 is neutral, "
                    "in neither split): re-run reward_labeling"
                )
    if "side" in df.columns:
        for row, value in df["side"].items():
            if value != side:
                raise ValueError(
                    f"{source}: column 'side', row {row!r}: {value!r} in the {side} split"
                )


def validate_aligned(df: pd.DataFrame, source: str) -> None:
    """The ``aligned`` split (see :func:`_validate_split`)."""
    _validate_split(df, source, "aligned")


def validate_unaligned(df: pd.DataFrame, source: str) -> None:
    """The ``unaligned`` split (see :func:`_validate_split`)."""
    _validate_split(df, source, "unaligned")
