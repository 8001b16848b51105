"""Held-out evaluation of a policy: greedy and sampled accuracy, reward, KL, length.

Uses the same rollout engine and reward functions as training, in batches.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import pandas as pd
import torch

from fgrpo_pipeline.algorithms.labeling import score_rollouts
from fgrpo_pipeline.algorithms.params import Params, require, require_choice
from fgrpo_pipeline.algorithms.rewards import RewardFn, combine_rewards, get_reward
from fgrpo_pipeline.models.policy import Policy
from fgrpo_pipeline.rollout import (
    ENGINES,
    SamplingConfig,
    batch_logprobs,
    get_engine,
    repeat_each,
)

SPLITS = ("train", "test")  # of the prompts table


@dataclass
class EvaluationConfig(Params):
    """Parameters of ``evaluation`` (parameters_evaluation.yml; also the held-out part of
    parameters_safety_evaluation.yml)."""

    BLOCK = "evaluation"
    # Read by the caller (which prompts to evaluate), not by evaluate_policy.
    RUN_KEYS = ("split",)

    split: str = "test"
    k_samples: int = 4
    batch_prompts: int = 64
    max_prompts: int = 0
    engine: str = "hf"
    rewards: dict[str, float] | None = None
    correctness_reward: str = "exact_number"
    sampling: SamplingConfig | None = None

    def check(self) -> None:
        require_choice(self.split, SPLITS, "split")
        for name in ("k_samples", "batch_prompts"):
            require(getattr(self, name) >= 1, name, f"must be ≥ 1, got {getattr(self, name)}")
        require(self.max_prompts >= 0, "max_prompts", "must be ≥ 0 (0 = all)")
        self.rewards = dict(self.rewards or {"exact_number": 1.0})
        if self.sampling is None:
            self.sampling = SamplingConfig()
        ENGINES.check(self.engine, "evaluation.engine")
        get_reward(self.correctness_reward)
        combine_rewards(self.rewards)


def _evaluate_batch(policy, reference, prompts, truths, k, sampling, engine, reward_fn, correct_fn):
    batch = engine.generate(policy, prompts, k, sampling)
    scored = score_rollouts(
        batch.completions,
        batch.prompts,
        repeat_each(truths, k),
        reward_fn=reward_fn,
        correctness_fn=correct_fn,
        group_size=k,
    )
    with torch.no_grad():
        ref = batch_logprobs(reference, batch, sampling.temperature)
    kl = ((batch.old_logps - ref) * batch.completion_mask).sum(dim=1)
    return batch, scored, kl


def evaluate_policy(
    policy: Policy,
    reference: Policy,
    prompts: pd.DataFrame,
    config: EvaluationConfig,
    *,
    reward_fn: RewardFn | None = None,
    correctness_fn: RewardFn | None = None,
) -> tuple[dict[str, float], pd.DataFrame]:
    """Metrics of ``policy`` on ``prompts`` and one row per sampled completion.

    ``reward_fn`` / ``correctness_fn`` replace the named rewards of ``config`` when given.

    ``sampled_accuracy`` is pass@1 averaged over ``k_samples`` samples per prompt;
    ``greedy_accuracy`` decodes once without sampling; ``kl_to_ref`` is the mean over samples
    of Σ_t log π(y_t)/π_ref(y_t), an unbiased estimate of KL(π‖π_ref) of the policy as
    sampled: π is the distribution the samples were drawn from (the engine's ``old_logps``,
    temperature-scaled and, with ``top_p < 1``, renormalised over the nucleus: KL(π_top-p ‖
    π_ref)), π_ref the reference's full temperature-scaled softmax. So with ``top_p < 1`` the
    untrained policy's value is not 0 but the expected Σ_t −log(nucleus mass at t) > 0.
    """
    if config.max_prompts:
        prompts = prompts.iloc[: config.max_prompts]
    engine = get_engine(config.engine)
    reward_fn = reward_fn or combine_rewards(config.rewards)
    correct_fn = correctness_fn or get_reward(config.correctness_reward)
    greedy = SamplingConfig(**{**asdict(config.sampling), "do_sample": False})
    sampled_rows, greedy_correct = [], []
    for start in range(0, len(prompts), config.batch_prompts):
        chunk = prompts.iloc[start : start + config.batch_prompts]
        texts, truths = chunk["prompt"].tolist(), chunk["ground_truth"].tolist()
        batch, scored, kl = _evaluate_batch(
            policy,
            reference.model,
            texts,
            truths,
            config.k_samples,
            config.sampling,
            engine,
            reward_fn,
            correct_fn,
        )
        sampled_rows.append(
            pd.DataFrame(
                {
                    "prompt_id": repeat_each(chunk["id"].tolist(), config.k_samples),
                    "prompt": batch.prompts,
                    "ground_truth": repeat_each(truths, config.k_samples),
                    "completion": batch.completions,
                    "reward": scored.rewards.tolist(),
                    "correct": scored.correct.tolist(),
                    "length": batch.lengths.tolist(),
                    "log_ratio_to_ref": kl.tolist(),
                }
            )
        )
        g_batch = engine.generate(policy, texts, 1, greedy)
        g_scores = score_rollouts(
            g_batch.completions,
            g_batch.prompts,
            truths,
            reward_fn=reward_fn,
            correctness_fn=correct_fn,
            group_size=1,
        )
        greedy_correct.extend(g_scores.correct.tolist())
    samples = pd.concat(sampled_rows, ignore_index=True)
    metrics = {
        "n_prompts": len(prompts),
        "k_samples": config.k_samples,
        "sampled_accuracy": float(samples["correct"].mean()),
        "greedy_accuracy": float(sum(greedy_correct) / len(greedy_correct)),
        "mean_reward": float(samples["reward"].mean()),
        "kl_to_ref": float(samples["log_ratio_to_ref"].mean()),
        "completion_length": float(samples["length"].mean()),
    }
    return metrics, samples
