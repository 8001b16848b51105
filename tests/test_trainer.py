"""The online loop on a real tiny transformer: determinism, metrics, losses, bad config."""

import pandas as pd
import pytest
import torch

from fgrpo_pipeline.training.config import TrainerConfig
from fgrpo_pipeline.training.loop import train
from fgrpo_pipeline.training.preferences import PreferenceData

TIMING = ["time_generation", "time_scoring", "time_update", "time_step", "tokens_per_second"]


def config(**overrides):
    params = {
        "steps": 3,
        "prompts_per_step": 4,
        "group_size": 4,
        "learning_rate": 1e-3,
        "sampling": {"max_new_tokens": 3},
        **overrides,
    }
    return TrainerConfig.from_params(params)


def test_same_seed_gives_same_metrics_and_weights(policy, prompts):
    first = train(policy, prompts, config(seed=7), progress=False)
    second = train(policy, prompts, config(seed=7), progress=False)
    pd.testing.assert_frame_equal(
        first.metrics.drop(columns=TIMING), second.metrics.drop(columns=TIMING)
    )
    for a, b in zip(first.policy.model.parameters(), second.policy.model.parameters(), strict=True):
        assert torch.equal(a, b)
    other = train(policy, prompts, config(seed=8), progress=False)
    assert not first.metrics["loss"].equals(other.metrics["loss"])


def test_training_leaves_the_input_policy_untouched(policy, prompts):
    before = [p.detach().clone() for p in policy.model.parameters()]
    result = train(policy, prompts, config(), progress=False)
    for p, q in zip(policy.model.parameters(), before, strict=True):
        assert torch.equal(p, q)
    changed = any(
        not torch.equal(p, q) for p, q in zip(result.policy.model.parameters(), before, strict=True)
    )
    assert changed


def test_metrics_columns_checkpoints_and_completions(policy, prompts):
    result = train(
        policy,
        prompts,
        config(steps=4, checkpoint_every=2, log_completions_every=2),
        progress=False,
    )
    expected = {
        "step",
        "reward_mean",
        "reward_std",
        "accuracy",
        "frac_reward_zero_std",
        "loss",
        "divergence_estimate",
        "kl_to_ref",
        "completion_length",
        *TIMING,
    }
    assert expected <= set(result.metrics.columns)
    assert result.metrics["step"].tolist() == [1, 2, 3, 4]
    assert result.metrics["kl_to_ref"].iloc[0] == pytest.approx(0.0, abs=1e-4)  # starts at π_ref
    assert sorted(result.checkpoints) == [2, 4]
    assert set(result.completions["step"]) == {2, 4}
    assert len(result.completions) == 2 * 4 * 4
    assert set(result.completions["side"]) <= {"aligned", "unaligned", "neutral"}
    aligned = result.completions["side"] == "aligned"
    assert (result.completions.loc[aligned, "advantage"] > 0).all()


@pytest.mark.parametrize("loss", ["f_grpo", "grpo", "fdo", "dpo", "f_hal"])
def test_every_loss_trains(policy, prompts, loss):
    prefs = PreferenceData(["1+1="], ["2"], ["1+1=", "2+2="], ["3", "5"])
    result = train(policy, prompts, config(loss=loss, lam=0.5), preferences=prefs, progress=False)
    assert torch.isfinite(torch.tensor(result.metrics["loss"].to_numpy())).all()
    assert (result.metrics["grad_norm"] > 0).any()
    assert result.metrics["skipped_steps"].iloc[-1] == 0


@pytest.mark.parametrize(
    "options",
    [
        {"loss": "f_grpo"},
        {"loss": "grpo", "aggregation": "dapo", "kl_coef": 0.05},
        {"loss": "f_hal", "lam": 0.5, "divergence": "jensen_shannon"},
        {"loss": "dpo"},
    ],
    ids=lambda o: o["loss"],
)
def test_micro_batches_accumulate_exactly_the_whole_batch_gradient(policy, prompts, options):
    prefs = PreferenceData(["1+1="], ["2"], ["1+1=", "2+2="], ["3", "5"])
    runs = [
        train(
            policy,
            prompts,
            config(micro_batch_size=size, learning_rate=1e-2, **options),
            preferences=prefs,
            progress=False,
        )
        for size in (0, 3)  # 3 does not divide the 16 sequences: a ragged last micro-batch
    ]
    whole, micro = (r.policy.model.state_dict() for r in runs)
    assert any(not torch.equal(whole[k], policy.model.state_dict()[k]) for k in whole)
    # Adam divides by the gradient's size, so float noise on near-zero gradients can move a
    # weight by up to lr per step: equal to that, and the gradients exactly (test below).
    for key in whole:
        torch.testing.assert_close(micro[key], whole[key], atol=3e-2 * 3, rtol=0)
    # the prompts shared per micro-batch round differently from the whole batch's (~1e-6)
    assert runs[1].metrics["loss"].tolist() == pytest.approx(
        runs[0].metrics["loss"].tolist(), abs=1e-6
    )
    assert runs[1].metrics["reward_mean"].tolist() == runs[0].metrics["reward_mean"].tolist()


@pytest.mark.parametrize("size", [1, 3, 5])
def test_backward_in_micro_batches_gives_the_whole_batch_gradient(policy, prompts, size):
    from fgrpo_pipeline.rollout import HFEngine, SamplingConfig, batch_logprobs
    from fgrpo_pipeline.training.step import backward_in_micro_batches

    model = policy.model
    batch = HFEngine().generate(
        policy, prompts["prompt"].tolist()[:4], 4, SamplingConfig(max_new_tokens=3)
    )
    weights = torch.linspace(-1, 1, batch.completion_mask.numel()).reshape_as(batch.completion_mask)

    def loss_of(logps):  # any function of the log-probs
        return (weights * logps).sum() + (logps.sum(dim=1) ** 2).mean()

    model.zero_grad()
    loss_of(batch_logprobs(model, batch, 1.0)).backward()
    whole = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    with torch.no_grad():
        leaf = batch_logprobs(model, batch, 1.0, micro_batch_size=size)
    leaf.requires_grad_(True)
    loss_of(leaf).backward()
    backward_in_micro_batches(model, batch, leaf.grad, size, 1.0)
    for got, want in zip((p.grad for p in model.parameters()), whole, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    model.zero_grad()


def test_f_hal_without_preferences_is_an_error(policy, prompts):
    with pytest.raises(ValueError, match="needs preference data"):
        train(policy, prompts, config(loss="f_hal", lam=0.5), progress=False)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"loss": "ppo"}, "unknown loss 'ppo'"),
        ({"divergence": "chi2"}, "unknown divergence 'chi2'.*kl, reverse_kl"),
        ({"group_size": 1}, "'group_size' must be ≥ 2"),
        ({"lam": 1.5}, r"lam \(λ\) must lie in \[0, 1\]"),
        ({"beta": -1.0}, "beta must be a finite number > 0"),
        ({"engine": "sglang"}, "unknown rollout engine 'sglang'"),
        ({"rewards": {"exact": 1.0}}, "unknown reward 'exact'"),
        ({"stepz": 3}, r"unknown training parameter\(s\) \['stepz'\]"),
        ({"sampling": {"max_new_tokens": 4, "temperature": 0.0}}, "temperature must be > 0"),
        ({"learning_rate": 0.0}, "'learning_rate' must be > 0"),
        ({"score_reference": "no"}, "'score_reference' must be true or false"),
        ({"score_reference": False}, "'score_reference' false needs a loss .*'f_grpo' does"),
        (
            {"score_reference": False, "loss": "grpo", "kl_coef": 0.05},
            "'score_reference' false .*'grpo' with kl_coef=0.05 does",
        ),
    ],
)
def test_bad_training_parameters(overrides, message):
    with pytest.raises(ValueError, match=message):
        config(**overrides)


def test_a_redirected_progress_bar_writes_a_line_a_second_not_one_per_step(policy, prompts, capsys):
    # the per-step postfix must not force a redraw: a log file would get every step
    train(policy, prompts, config(steps=40), progress=True)
    drawn = capsys.readouterr().err.count("train f_grpo")
    assert 1 <= drawn < 10, drawn


@pytest.mark.parametrize(("processes", "expected"), [(1, 4), (2, 1), (4, 1)])
def test_the_policy_passes_are_bucketed_in_one_process_only(processes, expected):
    """Under DDP or FSDP every rank must make the same forward calls through the prepared
    model (buffers are synced, shards gathered, at each), but bucket counts follow each
    rank's own completion lengths: the policy's passes then run unbucketed."""
    from types import SimpleNamespace

    from fgrpo_pipeline.training.loop import TrainingRun

    run = SimpleNamespace(
        runtime=SimpleNamespace(num_processes=processes),
        config=SimpleNamespace(length_buckets=4),
    )
    assert TrainingRun.policy_length_buckets.fget(run) == expected


def test_the_optimiser_steps_all_tensors_in_one_fused_kernel(policy, prompts):
    """torch's AdamW defaults to a per-tensor loop on the CPU (4-5× slower here)."""
    from fgrpo_pipeline.training.loop import setup

    run = setup(policy, prompts, config(), preferences=None, reward_fn=None,
                correctness_fn=None, monitors=(), resume_dir=None)  # fmt: skip
    assert run.optimizer.defaults["fused"] is True


def test_grpo_without_its_kl_skips_the_reference_and_trains_the_same(policy, prompts, monkeypatch):
    """GRPO at kl_coef 0 never reads π_ref: without ``score_reference`` no reference copy is
    made (so no reference pass can run), and the run trains exactly the weights the run with
    one trains; only the KL-to-reference columns become NaN."""
    from fgrpo_pipeline.training import loop

    made = []
    make = loop.make_reference
    monkeypatch.setattr(loop, "make_reference", lambda p: made.append(make(p)) or made[-1])
    options = {"loss": "grpo", "seed": 3, "log_completions_every": 1}
    full = train(policy, prompts, config(**options), progress=False)
    assert len(made) == 1
    lean = train(policy, prompts, config(**options, score_reference=False), progress=False)
    assert len(made) == 1
    for a, b in zip(full.policy.model.parameters(), lean.policy.model.parameters(), strict=True):
        assert torch.equal(a, b)
    pd.testing.assert_frame_equal(
        full.metrics.drop(columns=[*TIMING, "kl_to_ref", "kl_k3"]),
        lean.metrics.drop(columns=[*TIMING, "kl_to_ref"]),
    )
    assert full.metrics["kl_to_ref"].notna().all() and lean.metrics["kl_to_ref"].isna().all()
    assert full.completions["implicit_reward"].notna().all()
    assert lean.completions["implicit_reward"].isna().all()
