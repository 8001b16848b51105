"""Defects found by the line-by-line review of the loop against the spec and TRL, each
pinned by a test that failed before its fix, and the loop options users expect.

Each test runs the real loop on a real tiny transformer for a few steps."""

import copy
import math

import pandas as pd
import pytest
import torch

from fgrpo_pipeline.models.policy import Policy
from fgrpo_pipeline.rollout import ENGINES, HFEngine
from fgrpo_pipeline.training.config import lr_factor
from fgrpo_pipeline.training.loop import train
from fgrpo_pipeline.training.preferences import PreferenceData
from fgrpo_pipeline.training.preferences import offline_minibatch as _offline_minibatch
from tests.test_trainer import config as trainer_config


def config(**overrides):
    """The trainer tests' small config, two steps unless told otherwise."""
    return trainer_config(**{"steps": 2, **overrides})


@ENGINES.register("hf_perturbed")
class PerturbedHFEngine(HFEngine):
    """The HF engine reporting its log-probs shifted by ``shift`` per token, as an engine
    with other numerics (vLLM's kernels) would: same samples, other log-probs."""

    def __init__(self, shift: float = 0.3) -> None:
        super().__init__()
        self.shift = shift

    def generate(self, policy, prompts, group_size, sampling):
        batch = super().generate(policy, prompts, group_size, sampling)
        batch.old_logps = (batch.old_logps + self.shift) * batch.completion_mask
        return batch


# --------------------------------------------------------------- 1. DPO pairs one prompt


def _preferences():
    """Three prompts with both sides, one with only an aligned, one with only an
    unaligned response."""
    chosen = [("1+1=", "2"), ("1+1=", "2 "), ("2+2=", "4"), ("3+3=", "6"), ("7+1=", "8")]
    rejected = [("1+1=", "3"), ("2+2=", "5"), ("2+2=", "9"), ("3+3=", "7"), ("5+5=", "1")]
    return PreferenceData(
        [p for p, _ in chosen],
        [c for _, c in chosen],
        [p for p, _ in rejected],
        [c for _, c in rejected],
    )


def test_preference_data_knows_its_same_prompt_pairs():
    data = _preferences()
    assert len(data.paired) == 3
    assert data.unpaired_prompts == 2  # 7+1= and 5+5=


def test_offline_dpo_draws_pairs_of_one_prompt(policy):
    data = _preferences()
    gen = torch.Generator().manual_seed(0)
    drawn = _offline_minibatch(data, policy, policy.model, 64, gen, 1.0, paired=True)
    chosen_prompts, rejected_prompts = drawn.chosen_texts[0], drawn.rejected_texts[0]
    assert chosen_prompts == rejected_prompts
    assert set(chosen_prompts) == {"1+1=", "2+2=", "3+3="}  # every paired prompt, no other


def test_dpo_trains_on_same_prompt_pairs(policy, prompts):
    result = train(
        policy,
        prompts,
        config(loss="dpo", offline_batch_size=8, log_completions_every=1),
        preferences=_preferences(),
        progress=False,
    )
    offline = result.completions[result.completions["source"] == "offline"]
    assert len(offline) == 2 * 2 * 8  # steps × sides × pairs
    for _, pair in offline.groupby(["step", "pair"]):
        assert sorted(pair["side"]) == ["aligned", "unaligned"]
        assert pair["prompt"].nunique() == 1
    assert (result.metrics["offline_prompts_skipped"] == 2).all()


def test_dpo_refuses_preference_data_without_a_pair(policy, prompts):
    data = PreferenceData(["1+1="], ["2"], ["2+2="], ["5"])
    with pytest.raises(ValueError, match="loss dpo trains on pairs .* none of .* 2 prompts"):
        train(policy, prompts, config(loss="dpo"), preferences=data, progress=False)


# ------------------------------------- 5. π_old is the policy; the engine's log-probs correct


def test_grpo_ratio_is_one_on_a_fresh_batch_whatever_the_engine_reports(policy, prompts):
    shift = 0.3  # the engine reports log-probs 0.3 nats higher than the policy's
    result = train(
        policy,
        prompts,
        config(loss="grpo", engine="hf_perturbed", engine_options={"shift": shift}),
        progress=False,
    )
    # the ratio π_θ/π_old is 1 at the step's start: nothing is clipped (before the fix the
    # engine's numbers were π_old: ratio e^-0.3 < 1 − ε and a fifth of tokens clipped)
    assert (result.metrics["clip_fraction"] == 0).all()
    # auto: on for an engine other than hf; the truncated weight π_old/π_engine = e^-0.3
    assert result.metrics["is_ratio_mean"].tolist() == pytest.approx([math.exp(-shift)] * 2)
    assert (result.metrics["is_frac_capped"] == 0).all()


def test_the_engine_correction_is_capped_and_can_be_switched_off(policy, prompts):
    capped = train(
        policy,
        prompts,
        config(loss="grpo", engine="hf_perturbed", engine_options={"shift": -1.0}),
        progress=False,
    )
    assert capped.metrics["is_ratio_mean"].tolist() == pytest.approx([math.e] * 2)
    assert (capped.metrics["is_frac_capped"] == 1).all()  # e > cap 2: every token capped
    off = train(
        policy,
        prompts,
        config(loss="grpo", engine="hf_perturbed", engine_is_correction=False),
        progress=False,
    )
    assert "is_ratio_mean" not in off.metrics
    hf = train(policy, prompts, config(loss="grpo"), progress=False)
    assert "is_ratio_mean" not in hf.metrics  # auto: off for the hf engine


def test_the_correction_gives_snis_the_engine_as_proposal():
    """snis weights softmax r − log q(y) over the proposal q the responses came from: with
    the correction, q is the engine's distribution (π_old / uncapped weight), not π_old."""
    from fgrpo_pipeline.algorithms.losses import LossConfig, LossInputs, get_loss

    gen = torch.Generator().manual_seed(0)
    n, t, g = 8, 3, 4
    logps = -torch.rand(n, t, generator=gen) - 0.5
    engine = logps - 0.4 * torch.rand(n, t, generator=gen)  # per-token other numerics
    mask = torch.ones(n, t)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    common = {
        "ref_logps": logps - 2.0 * torch.rand(n, t, generator=gen),
        "mask": mask,
        "advantages": rewards - 0.5,
        "rewards": rewards,
        "group_size": g,
    }
    cfg = LossConfig(weights="snis")
    weights = torch.exp(logps - engine)  # all < cap: no truncation
    corrected = get_loss("f_grpo")(
        LossInputs(logps=logps, old_logps=logps, is_weights=weights, **common), cfg
    )
    as_if_engine = get_loss("f_grpo")(LossInputs(logps=logps, old_logps=engine, **common), cfg)
    plain = get_loss("f_grpo")(LossInputs(logps=logps, old_logps=logps, **common), cfg)
    torch.testing.assert_close(corrected.loss, as_if_engine.loss)
    assert corrected.metrics["ess_aligned"] == pytest.approx(as_if_engine.metrics["ess_aligned"])
    assert not torch.allclose(corrected.loss, plain.loss)


# ------------------------------------------------ 6. the policy scores in generation's mode


def _with_attention_dropout(policy, p=0.1):
    model = copy.deepcopy(policy.model)
    for module in model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = p
    return Policy(model=model, tokenizer=policy.tokenizer)


@pytest.mark.parametrize(
    "lora", [None, {"r": 4, "alpha": 8, "dropout": 0.05}], ids=["full", "lora"]
)
def test_implicit_reward_is_zero_at_the_reference_with_dropout(policy, prompts, lora):
    noisy = _with_attention_dropout(policy)
    result = train(
        noisy,
        prompts,
        config(lora=lora, engine_is_correction=True, steps=3),
        progress=False,
    )
    first = result.metrics.iloc[0]
    # θ = θ_ref at step 1: r_θ = β·Σ log π_θ/π_ref is exactly 0 on both sides
    assert first["implicit_reward_aligned"] == pytest.approx(0.0, abs=1e-6)
    assert first["implicit_reward_unaligned"] == pytest.approx(0.0, abs=1e-6)
    # and at every step the scoring pass is generation's function: π_θ/π_old ≈ 1
    assert result.metrics["is_ratio_mean"].tolist() == pytest.approx([1.0] * 3, abs=1e-4)
    # the input policy keeps its dropout (training works on a copy)
    assert any(getattr(m, "attention_dropout", 0) == 0.1 for m in noisy.model.modules())


# --------------------------------------------------- 7. top_p < 1 with losses that use π_old


@pytest.mark.parametrize(
    "loss", [{"loss": "grpo"}, {"loss": "f_grpo", "weights": "snis"}], ids=["grpo", "snis"]
)
def test_top_p_below_one_is_refused_where_the_loss_needs_pi_old(loss):
    with pytest.raises(ValueError, match="'sampling.top_p' = 0.9 < 1 samples from the nucleus"):
        config(**loss, sampling={"top_p": 0.9})
    config(**loss, sampling={"top_p": 0.9}, engine_is_correction=True)  # corrected: accepted
    config(sampling={"top_p": 0.9})  # f-GRPO with uniform weights does not use π_old


# ------------------------------------------------------------------ the f-HAL λ and options


def _splits_preferences(prompts):
    """Aligned = the right sum, unaligned = a wrong one, for every training prompt."""
    rows = prompts[prompts["split"] == "train"]
    right = rows["ground_truth"].tolist()
    wrong = [str(int(t) + 1) for t in right]
    return PreferenceData(rows["prompt"].tolist(), right, rows["prompt"].tolist(), wrong)


@pytest.mark.parametrize(("scaling", "balanced"), [("paper", False), ("balanced", True)])
def test_hal_scaling_balanced_gives_both_terms_comparable_gradients(
    policy, prompts, scaling, balanced
):
    result = train(
        policy,
        prompts,
        config(
            loss="f_hal",
            lam=0.5,
            hal_scaling=scaling,
            steps=1,
            prompts_per_step=8,
            group_size=8,
            offline_batch_size=16,
        ),
        preferences=_splits_preferences(prompts),
        progress=False,
    )
    row = result.metrics.iloc[0]
    online, offline = row["grad_norm_online"], row["grad_norm_offline"]
    assert online > 0 and offline > 0
    ratio = max(online, offline) / min(online, offline)
    assert bool(ratio <= 2.0) == balanced, (scaling, online, offline)
    # the parts' gradients add up to the total (before clipping): |a + b| ≤ |a| + |b|
    assert row["grad_norm"] <= online + offline + 1e-6


def test_term_gradient_norms_are_those_of_each_term_alone(policy, prompts):
    """The logged online norm equals the gradient norm of a run of the online term alone
    (λ·FDO removed by setting its share in a pure f-GRPO run of the same batch)."""
    prefs = _splits_preferences(prompts)
    common = {"steps": 1, "prompts_per_step": 8, "group_size": 8, "max_grad_norm": 1e9}
    hal = train(
        policy, prompts, config(loss="f_hal", lam=0.5, **common), preferences=prefs, progress=False
    )
    alone = train(policy, prompts, config(loss="f_grpo", **common), progress=False)
    # f_grpo is f-HAL's online term at weight 1, on the same rollouts (same seed)
    assert hal.metrics["grad_norm_online"].iloc[0] == pytest.approx(
        0.5 * alone.metrics["grad_norm"].iloc[0], rel=1e-4
    )


def test_lr_schedules_warm_up_and_decay():
    assert [lr_factor("constant", s, 0, 10) for s in (1, 5, 10)] == [1.0, 1.0, 1.0]
    assert [lr_factor("linear", s, 4, 10) for s in (1, 2, 4)] == [0.25, 0.5, 1.0]
    linear = [lr_factor("linear", s, 0, 10) for s in range(1, 11)]
    assert linear[0] == 1.0 and all(a > b for a, b in zip(linear, linear[1:], strict=False))
    assert linear[-1] == pytest.approx(0.1)
    cosine = [lr_factor("cosine", s, 2, 12) for s in range(1, 13)]
    assert cosine[:3] == [0.5, 1.0, 1.0] and cosine[-1] < 0.05
    assert lr_factor("cosine", 8, 2, 12) == pytest.approx(0.5)  # half way through the decay


def test_the_loop_follows_the_schedule_and_logs_it(policy, prompts):
    result = train(
        policy,
        prompts,
        config(steps=4, lr_schedule="linear", warmup_steps=2, learning_rate=1e-3),
        progress=False,
    )
    assert result.metrics["learning_rate"].tolist() == pytest.approx([5e-4, 1e-3, 1e-3, 5e-4])
    with pytest.raises(ValueError, match="'lr_schedule' must be one of constant, linear, cosine"):
        config(lr_schedule="step")
    with pytest.raises(ValueError, match=r"'warmup_steps' must lie in \[0, steps=2\]"):
        config(warmup_steps=3)


def test_drop_zero_spread_counts_and_logs_the_dropped_groups(policy, prompts):
    kept = train(policy, prompts, config(drop_zero_spread=True, steps=3), progress=False)
    plain = train(policy, prompts, config(steps=3), progress=False)
    m, p = kept.metrics, plain.metrics
    zero = (m["frac_reward_zero_std"] * m["groups"]).round().astype(int)
    assert m["dropped_groups"].astype(int).tolist() == zero.tolist()
    # step 1 (same rollouts): the loss is the plain one over the groups with spread
    spread = m["groups"].iloc[0] - m["dropped_groups"].iloc[0]
    assert m["loss"].iloc[0] == pytest.approx(p["loss"].iloc[0] * m["groups"].iloc[0] / spread)
    assert "dropped_groups" not in p


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (
            {"loss": "f_grpo", "hal_scaling": "balanced"},
            "hal_scaling='balanced' applies to loss f_hal",
        ),
        ({"loss": "f_grpo", "epsilon_high": 0.28}, "epsilon_high=0.28 applies to loss grpo only"),
        (
            {"loss": "dpo", "drop_zero_spread": True},
            "drop_zero_spread=True applies to loss f_grpo, f_hal, grpo only, not 'dpo'",
        ),
    ],
)
def test_options_of_one_loss_are_refused_for_another(params, message):
    with pytest.raises(ValueError, match=message):
        config(**params)


def test_completions_table_marks_online_rows(policy, prompts):
    result = train(policy, prompts, config(log_completions_every=1), progress=False)
    table = result.completions
    assert set(table["source"]) == {"online"} and (table["pair"] == -1).all()
    assert isinstance(table, pd.DataFrame)
