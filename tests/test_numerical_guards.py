"""Numerical guards: the implicit-reward bound, GRPO's token log-ratio clamp, and skipped
non-finite steps, at extreme values."""

import pytest
import torch

from fgrpo_pipeline.algorithms.divergences import divergence_names
from fgrpo_pipeline.algorithms.losses import (
    DEFAULT_REWARD_BOUND,
    MAX_TOKEN_LOG_RATIO,
    LossConfig,
    bounded,
    f_grpo_loss,
    fdo_loss,
    grpo_loss,
)

BETA = 0.1
EXTREMES = [-1e4, -50.0, -20.0, 0.0, 20.0, 50.0, 1e4]  # values of r_θ = β·Σ log π/π_ref


def _logps_for(rewards):
    """Sequence log-probs whose implicit reward β(logps − ref) is ``rewards``, as a leaf."""
    ref = torch.zeros(len(rewards))
    return (torch.tensor(rewards) / BETA).requires_grad_(True), ref


def test_bounded_clamps_the_value_and_passes_the_gradient_through():
    x = torch.tensor([-100.0, -3.0, 0.0, 3.0, 100.0], requires_grad=True)
    y = bounded(x, 50.0)
    assert y.tolist() == [-50.0, -3.0, 0.0, 3.0, 50.0]
    y.sum().backward()
    assert x.grad.tolist() == [1.0] * 5
    assert bounded(x, None) is x


@pytest.mark.parametrize("divergence", divergence_names())
def test_f_grpo_loss_and_gradient_are_finite_at_extreme_implicit_rewards(divergence):
    rewards = EXTREMES + EXTREMES[::-1][:1]  # 8 = two groups of 4
    logps, ref = _logps_for(rewards)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 1.0, -1.0, 0.5, -0.5])
    out = f_grpo_loss(logps, ref, advantages, divergence=divergence, beta=BETA, group_size=4)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert torch.isfinite(logps.grad).all()
    assert all(torch.isfinite(torch.tensor(v)) for v in out.metrics.values())


@pytest.mark.parametrize("divergence", divergence_names())
@pytest.mark.parametrize("extreme", [-50.0, 50.0, -1e4, 1e4])
def test_fdo_loss_and_gradient_are_finite_at_extreme_implicit_rewards(divergence, extreme):
    chosen, chosen_ref = _logps_for([extreme, 0.0])
    rejected, rejected_ref = _logps_for([extreme, 1.0])
    out = fdo_loss(chosen, chosen_ref, rejected, rejected_ref, divergence=divergence, beta=BETA)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()


def test_the_bound_changes_nothing_inside_it():
    logps, ref = _logps_for([-3.0, 2.0, 49.0, -49.0])
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])
    kwargs = {"divergence": "kl", "beta": BETA, "group_size": 4}
    inside = f_grpo_loss(logps, ref, advantages, **kwargs)
    free = f_grpo_loss(logps, ref, advantages, reward_bound=None, **kwargs)
    assert inside.loss.item() == free.loss.item()


def test_without_the_bound_kl_overflows_where_the_bound_keeps_it_finite():
    logps, ref = _logps_for([100.0, 0.0])  # exp(r − 1) = inf in float32 at r = 100
    kwargs = {"divergence": "kl", "beta": BETA, "group_size": 2}
    advantages = torch.tensor([-1.0, 1.0])
    assert not torch.isfinite(f_grpo_loss(logps, ref, advantages, reward_bound=None, **kwargs).loss)
    assert torch.isfinite(f_grpo_loss(logps, ref, advantages, **kwargs).loss)
    assert DEFAULT_REWARD_BOUND == 50.0


def test_a_saturated_unaligned_sequence_is_still_pushed_down():
    logps, ref = _logps_for([200.0, 0.0])
    out = f_grpo_loss(
        logps, ref, torch.tensor([-1.0, 1.0]), divergence="kl", beta=BETA, group_size=2
    )
    out.loss.backward()
    assert logps.grad[0] > 0  # gradient descent lowers its log-prob


@pytest.mark.parametrize("aggregation", ["grpo", "dr_grpo", "dapo"])
def test_grpo_loss_is_finite_at_extreme_token_log_ratios(aggregation):
    logps = torch.tensor([[0.0, -200.0], [150.0, -1.0]], requires_grad=True)
    old = torch.zeros(2, 2)
    ref = torch.tensor([[-300.0, 0.0], [0.0, 200.0]])
    out = grpo_loss(
        logps,
        old,
        torch.tensor([1.0, -1.0]),
        torch.ones(2, 2),
        ref_logps=ref,
        kl_coef=0.1,
        aggregation=aggregation,
    )
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(logps.grad).all()
    assert MAX_TOKEN_LOG_RATIO == 20.0


@pytest.mark.parametrize("bound", [0, -1.0, float("inf"), "50"])
def test_bad_bounds_are_rejected(bound):
    with pytest.raises(ValueError, match="reward_bound"):
        LossConfig(reward_bound=bound)


@pytest.fixture
def nan_on_even_steps():
    """A registered loss (a plugin, as any new loss is) that is NaN on every second call."""
    from fgrpo_pipeline.algorithms.losses import LOSSES, get_loss

    calls = {"n": 0}
    f_grpo = get_loss("f_grpo")

    @LOSSES.register("nan_on_even_steps")
    def _loss(inputs, config):
        calls["n"] += 1
        out = f_grpo(inputs, config)
        if calls["n"] % 2 == 0:
            out.loss = out.loss * float("nan")
        return out

    yield
    del LOSSES._entries["nan_on_even_steps"]


def test_a_non_finite_step_is_skipped_counted_and_never_applied(nan_on_even_steps):
    from fgrpo_pipeline.tasks.sources import make_arithmetic_prompts
    from fgrpo_pipeline.training.config import TrainerConfig
    from fgrpo_pipeline.training.loop import train
    from tests.conftest import half_taught_policy

    prompts = make_arithmetic_prompts(n_train=20, n_test=0, operations=("+",), operand_max=9)
    policy = half_taught_policy(prompts)
    config = TrainerConfig.from_params(
        {
            "loss": "nan_on_even_steps",
            "steps": 4,
            "prompts_per_step": 4,
            "group_size": 4,
            "learning_rate": 1e-2,
            "checkpoint_every": 1,
            "sampling": {"max_new_tokens": 3},
        }
    )
    result = train(policy, prompts, config, progress=False)
    metrics = result.metrics
    assert metrics["skipped_steps"].tolist() == [0, 1, 1, 2]
    assert metrics["grad_norm"].isna().tolist() == [False, True, False, True]
    for step in (2, 4):  # a skipped step leaves the weights as the step before left them
        before = result.checkpoints[step - 1].model.state_dict()
        after = result.checkpoints[step].model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
