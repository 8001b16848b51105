"""Spec §7 on a tabular problem: one prompt, K responses, a softmax policy over K logits.

Iterate "sample G responses from π_old, take one loss step" and follow the *exact*
expected reward Σ_y π(y)·r(y). Theory: it rises toward the best response's reward.
"""

import pytest
import torch

from fgrpo_pipeline.algorithms.advantages import group_advantages
from fgrpo_pipeline.algorithms.divergences import divergence_names
from fgrpo_pipeline.algorithms.losses import LossConfig, LossInputs, get_loss

K = 8
REWARDS = torch.linspace(0.0, 1.0, K, dtype=torch.float64)  # best response: reward 1
GROUP_SIZE = 8
GROUPS_PER_STEP = 4
STEPS = 150
SEEDS = range(4)


def run_tabular(loss_name: str, divergence: str, seed: int) -> torch.Tensor:
    """Expected reward after each step (length STEPS + 1)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.zeros(K, dtype=torch.float64, requires_grad=True)  # π_ref = uniform
    ref_logp = torch.log_softmax(logits.detach(), 0)
    optimizer = torch.optim.Adam([logits], lr=0.05)
    config = LossConfig(name=loss_name, divergence=divergence, beta=0.1)
    loss_fn = get_loss(loss_name)
    history = [float(torch.softmax(logits.detach(), 0) @ REWARDS)]
    for _ in range(STEPS):
        probs = torch.softmax(logits.detach(), 0)
        ys = torch.multinomial(probs, GROUP_SIZE * GROUPS_PER_STEP, replacement=True, generator=gen)
        rewards = REWARDS[ys]
        logp = torch.log_softmax(logits, 0)[ys].unsqueeze(1)  # one "token" per response
        inputs = LossInputs(
            logps=logp,
            ref_logps=ref_logp[ys].unsqueeze(1),
            old_logps=logp.detach(),
            mask=torch.ones_like(logp),
            advantages=group_advantages(rewards, GROUP_SIZE),
            rewards=rewards,
            group_size=GROUP_SIZE,
        )
        loss = loss_fn(inputs, config).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(float(torch.softmax(logits.detach(), 0) @ REWARDS))
    return torch.tensor(history)


METHODS = [("f_grpo", name) for name in divergence_names()] + [("grpo", "kl")]


@pytest.mark.parametrize(("loss_name", "divergence"), METHODS)
def test_expected_reward_rises_to_the_best_response(loss_name, divergence):
    curves = torch.stack([run_tabular(loss_name, divergence, seed) for seed in SEEDS])
    mean = curves.mean(0)
    start, end = mean[0].item(), mean[-1].item()
    assert start == pytest.approx(REWARDS.mean().item())
    # ends near the best response's reward (1.0), far above the start (0.5)
    assert end > 0.9, f"{loss_name}/{divergence} ended at {end:.3f}"
    # monotone within noise: compare means over consecutive windows of 10 steps
    windows = mean[1:].view(-1, 10).mean(1)
    assert (torch.diff(windows) > -0.01).all(), windows
    # and every seed improved on its own
    assert (curves[:, -1] > curves[:, 0] + 0.3).all()
