"""Held-out evaluation of a policy: greedy and sampled accuracy, reward, KL, length.

Uses the same rollout engine and reward functions as training, in batches.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

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
    checked_engine_options,
    get_engine,
    repeat_each,
)
from fgrpo_pipeline.tasks.sources import DIFFICULTY, SPLITS  # of the prompts table


@dataclass
class EvaluationConfig(Params):
    """Parameters of ``evaluation`` (parameters_evaluation.yml; also the held-out part of
    parameters_safety_evaluation.yml)."""

    BLOCK = "evaluation"
    # Read by evaluate_splits (which prompts to evaluate, how to slice the primary split's
    # samples), not by evaluate_policy.
    RUN_KEYS = ("split", "extra_splits", "strata")

    split: str = "test"
    extra_splits: list[str] = field(default_factory=list)
    strata: str | None = None
    k_samples: int = 4
    batch_prompts: int = 64
    max_prompts: int = 0
    engine: str = "hf"
    engine_options: dict[str, Any] = field(default_factory=dict)
    rewards: dict[str, float] | None = None
    correctness_reward: str = "exact_number"
    sampling: SamplingConfig | None = None

    def check(self) -> None:
        require_choice(self.split, SPLITS, "split")
        for extra in self.extra_splits:
            require_choice(extra, SPLITS, "extra_splits")
        require(
            len(set(self.extra_splits)) == len(self.extra_splits),
            "extra_splits",
            f"has duplicates: {self.extra_splits!r}",
        )
        require(
            self.split not in self.extra_splits,
            "extra_splits",
            f"repeats split {self.split!r} (it is always evaluated): {self.extra_splits!r}",
        )
        require(
            self.strata is None or bool(self.strata.strip()),
            "strata",
            f"must name a column of the prompts table, or be null; got {self.strata!r}",
        )
        for name in ("k_samples", "batch_prompts"):
            require(getattr(self, name) >= 1, name, f"must be ≥ 1, got {getattr(self, name)}")
        require(self.max_prompts >= 0, "max_prompts", "must be ≥ 0 (0 = all)")
        self.rewards = dict(self.rewards or {"exact_number": 1.0})
        if self.sampling is None:
            self.sampling = SamplingConfig()
        ENGINES.check(self.engine, "evaluation.engine")
        self.engine_options = checked_engine_options(self.engine, self.engine_options)
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


def _greedy_correct(policy, prompts, truths, greedy, engine, reward_fn, correct_fn) -> list[bool]:
    """Whether each prompt's one greedy decode is correct."""
    batch = engine.generate(policy, prompts, 1, greedy)
    scored = score_rollouts(
        batch.completions,
        batch.prompts,
        truths,
        reward_fn=reward_fn,
        correctness_fn=correct_fn,
        group_size=1,
    )
    return scored.correct.tolist()


def evaluate_policy(
    policy: Policy,
    reference: Policy,
    prompts: pd.DataFrame,
    config: EvaluationConfig,
    *,
    reward_fn: RewardFn | None = None,
    correctness_fn: RewardFn | None = None,
) -> tuple[dict[str, float], pd.DataFrame]:
    """Metrics of ``policy`` on ``prompts`` and one row per sampled completion (its
    ``greedy_correct`` is whether its prompt's greedy decode was correct, the same on all
    ``k_samples`` rows of a prompt).

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
    engine = get_engine(config.engine, **config.engine_options)
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
        g_correct = _greedy_correct(policy, texts, truths, greedy, engine, reward_fn, correct_fn)
        greedy_correct.extend(g_correct)
        # kept per row so that strata of the split can be scored without decoding again
        sampled_rows[-1]["greedy_correct"] = repeat_each(g_correct, config.k_samples)
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


def _split_rows(prompts: pd.DataFrame, config: EvaluationConfig) -> dict[str, pd.DataFrame]:
    """Each split to evaluate (``split`` first) and its rows; a split without rows is an
    error naming its parameter."""
    chosen = {}
    for split in (config.split, *config.extra_splits):
        rows = prompts[prompts["split"] == split]
        if rows.empty and split == config.split:
            raise ValueError(f"evaluation.split: split {split!r} has no prompts")
        if rows.empty:
            # only the synthetic task makes ood rows, and only with n_ood > 0
            hint = "set data_preparation.arithmetic.n_ood > 0, or " if split == "ood" else ""
            raise ValueError(
                f"evaluation.extra_splits: split {split!r} has no prompts "
                f"({hint}drop it from extra_splits)"
            )
        chosen[split] = rows
    return chosen


def _check_strata(rows: pd.DataFrame, config: EvaluationConfig) -> None:
    """``config.strata`` is a column of the primary split's ``rows`` with a value on every row,
    and no value whose keys would be an extra split's (``ood_sampled_accuracy``)."""
    column = config.strata
    if column not in rows.columns:
        # GSM8K tables have no difficulty; an arithmetic one may predate the column
        hint = " (or re-run data_preparation)" if column == DIFFICULTY else ""
        raise ValueError(
            f"evaluation.strata: the prompts table has no column {column!r} (columns: "
            f"{list(rows.columns)}); name one of them, or set evaluation.strata: null{hint}"
        )
    missing = rows[column].isna()
    if missing.any():
        raise ValueError(
            f"evaluation.strata: column {column!r}, row {missing.idxmax()!r}: no value "
            f"(every prompt of split {config.split!r} needs a stratum)"
        )
    clash = sorted(set(map(str, rows[column])) & set(config.extra_splits))
    if clash:
        raise ValueError(
            f"evaluation.strata: column {column!r} has value(s) {clash} that are also "
            "extra_splits: their metric keys would be the same"
        )


def strata_metrics(rows: pd.DataFrame, samples: pd.DataFrame, column: str) -> dict[str, float]:
    """Per value ``v`` of ``rows[column]``: ``v_n_prompts``, ``v_sampled_accuracy`` and
    ``v_greedy_accuracy``, from the ``samples`` :func:`evaluate_policy` drew for ``rows``
    (matched by ``prompt_id``; prompts it did not evaluate, past ``max_prompts``, count in no
    stratum), so the strata's prompt-weighted mean is the split's accuracy."""
    values = samples["prompt_id"].map(rows.set_index("id")[column])
    metrics: dict[str, float] = {}
    for value in sorted(values.unique(), key=str):
        part = samples[values == value]
        # each prompt's k rows repeat its one greedy result
        greedy = part.drop_duplicates("prompt_id")["greedy_correct"]
        metrics |= {
            f"{value}_n_prompts": len(greedy),
            f"{value}_sampled_accuracy": float(part["correct"].mean()),
            f"{value}_greedy_accuracy": float(greedy.sum() / len(greedy)),
        }
    return metrics


def evaluate_splits(
    policy: Policy,
    reference: Policy,
    prompts: pd.DataFrame,
    config: EvaluationConfig,
    *,
    reward_fn: RewardFn | None = None,
    correctness_fn: RewardFn | None = None,
) -> tuple[dict[str, float], pd.DataFrame]:
    """:func:`evaluate_policy` on ``config.split``'s rows of ``prompts`` (its metrics under
    their own names), then on each of ``config.extra_splits`` (metrics prefixed by the split:
    ``ood_sampled_accuracy``, ``ood_greedy_accuracy``, ...); the samples table gains a
    ``split`` column.

    With ``config.strata`` (a column, e.g. ``difficulty``), the primary split's metrics also
    hold :func:`strata_metrics` of its samples (``carry_sampled_accuracy``, ...): no extra
    generation, and the split's own numbers are unchanged.

    ``max_prompts`` caps each split. Sampling is seeded per generate call, so the primary
    split's numbers are those :func:`evaluate_policy` gives on its rows alone.
    """
    chosen = _split_rows(prompts, config)
    if config.strata:
        _check_strata(chosen[config.split], config)
    metrics: dict[str, float] = {}
    samples = []
    for split, rows in chosen.items():
        values, table = evaluate_policy(
            policy, reference, rows, config, reward_fn=reward_fn, correctness_fn=correctness_fn
        )
        if split == config.split and config.strata:
            values |= strata_metrics(rows, table, config.strata)
        prefix = "" if split == config.split else f"{split}_"
        metrics |= {f"{prefix}{key}": value for key, value in values.items()}
        samples.append(table.assign(split=split))
    return metrics, pd.concat(samples, ignore_index=True)
