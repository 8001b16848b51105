import math

import pytest
import torch

from fgrpo_pipeline.algorithms.advantages import (
    aligned_mask,
    frac_reward_zero_std,
    group_advantages,
    group_stats,
)


def test_group_standardisation_per_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 4.0, 6.0, 8.0])
    adv = group_advantages(rewards, 4)
    first, second = adv[:4], adv[4:]
    # centred within each group, unit sample std (up to eps)
    assert first.sum().item() == pytest.approx(0.0, abs=1e-6)
    assert second.sum().item() == pytest.approx(0.0, abs=1e-6)
    assert first.std().item() == pytest.approx(1.0, rel=1e-5)
    assert second.std().item() == pytest.approx(1.0, rel=1e-5)
    expected = (torch.tensor([2.0, 4, 6, 8]) - 5) / torch.tensor([2.0, 4, 6, 8]).std()
    torch.testing.assert_close(second, expected, rtol=1e-5, atol=1e-5)


def test_scale_none_only_centres():
    rewards = torch.tensor([0.0, 2.0, 10.0, 20.0])
    adv = group_advantages(rewards, 2, scale="none")
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, -5.0, 5.0]))


def test_flat_group_gets_exactly_zero():
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.0, 1.0, 0.0])
    adv = group_advantages(rewards, 3)
    assert torch.equal(adv[:3], torch.zeros(3))
    assert (adv[3:] != 0).all()


def test_aligned_mask_is_strictly_positive_advantage():
    adv = torch.tensor([0.5, 0.0, -0.5, 1e-9])
    assert aligned_mask(adv).tolist() == [True, False, False, True]


def test_frac_zero_std_and_stats():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0])
    assert frac_reward_zero_std(rewards, 2) == pytest.approx(0.75)
    stats = group_stats(rewards, 4)
    assert stats.zero_std.tolist() == [False, False]
    torch.testing.assert_close(stats.spread, torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(stats.mean, torch.tensor([0.75, 0.5]))


def test_count_not_divisible_by_group_size():
    with pytest.raises(ValueError, match="7 entries, not divisible by group_size=4"):
        group_advantages(torch.zeros(7), 4)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_reward_is_rejected(bad):
    with pytest.raises(ValueError, match=r"rewards must be finite; NaN/inf at positions \[2\]"):
        group_advantages(torch.tensor([0.0, 1.0, bad, 1.0]), 2)


def test_bad_scale_and_group_size():
    with pytest.raises(ValueError, match="unknown advantage scale 'max'"):
        group_advantages(torch.zeros(4), 2, scale="max")
    with pytest.raises(ValueError, match="group_size must be a positive integer"):
        group_advantages(torch.zeros(4), 0)
    with pytest.raises(ValueError, match="flat"):
        group_advantages(torch.zeros(2, 2), 2)
