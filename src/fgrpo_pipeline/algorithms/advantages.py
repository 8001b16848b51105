"""Group-relative advantages (spec §1).

Rewards arrive as one flat tensor laid out group after group: the ``group_size`` (G)
responses to prompt 0, then the G responses to prompt 1, and so on. Within a group,
``a_i = (r_i − mean_j r_j) / (std_j r_j + eps)``. A response with ``a_i > 0`` is *aligned*
(D⁺), ``a_i < 0`` *unaligned* (D⁻) and ``a_i = 0`` *neutral* (in neither). A group whose
rewards are all equal carries no signal: its advantages are set to exactly 0 (not merely
rounded near it), so all its responses are neutral.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

ADVANTAGE_SCALES = ("group", "none")


def check_group_layout(n: int, group_size: int, what: str = "rewards") -> int:
    """Number of groups in ``n`` items; ``ValueError`` if G < 1 or G does not divide n."""
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    if n % group_size != 0:
        raise ValueError(
            f"{what} has {n} entries, not divisible by group_size={group_size}: "
            "rewards must be laid out group after group, G per prompt"
        )
    return n // group_size


def _as_groups(rewards: Tensor, group_size: int) -> Tensor:
    rewards = torch.as_tensor(rewards)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be a flat [N] tensor, got shape {tuple(rewards.shape)}")
    n_groups = check_group_layout(rewards.numel(), group_size)
    if not torch.isfinite(rewards).all():
        bad = torch.nonzero(~torch.isfinite(rewards)).flatten().tolist()
        raise ValueError(f"rewards must be finite; NaN/inf at positions {bad[:10]}")
    return rewards.to(torch.float32 if not rewards.is_floating_point() else rewards.dtype).view(
        n_groups, group_size
    )


def group_advantages(
    rewards: Tensor, group_size: int, *, scale: str = "group", eps: float = 1e-6
) -> Tensor:
    """Advantages of ``rewards`` [N] within groups of ``group_size``.

    ``scale="group"`` divides by the group's sample standard deviation (unbiased, as TRL
    and verl compute it) plus ``eps``; ``scale="none"`` only centres (Dr. GRPO). Groups with
    zero spread get advantage exactly 0.
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"unknown advantage scale {scale!r}; valid: {', '.join(ADVANTAGE_SCALES)}")
    groups = _as_groups(rewards, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale == "group":
        std = groups.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(centred)
        centred = centred / (std + eps)
    flat = (groups.amax(dim=1) == groups.amin(dim=1)).unsqueeze(1)
    return torch.where(flat, torch.zeros_like(centred), centred).reshape(-1)


def aligned_mask(advantages: Tensor) -> Tensor:
    """Bool mask of aligned responses (D⁺): strictly positive advantage."""
    return torch.as_tensor(advantages) > 0


def frac_reward_zero_std(rewards: Tensor, group_size: int) -> float:
    """Fraction of groups whose rewards are all equal."""
    return group_stats(rewards, group_size).zero_std.float().mean().item()


@dataclass(frozen=True)
class GroupStats:
    """Per-group reward summary: mean, std, spread (max − min) and the zero-std flag."""

    mean: Tensor
    std: Tensor
    spread: Tensor
    zero_std: Tensor


def group_stats(rewards: Tensor, group_size: int) -> GroupStats:
    groups = _as_groups(rewards, group_size)
    spread = groups.amax(dim=1) - groups.amin(dim=1)
    std = groups.std(dim=1) if group_size > 1 else torch.zeros(groups.shape[0])
    return GroupStats(mean=groups.mean(dim=1), std=std, spread=spread, zero_std=spread == 0)
