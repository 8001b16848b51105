"""The safety comparison: f-HAL at several λ against the base policy, S seeds.

Plain Python/torch (no Kedro, no MLflow). Each (λ, seed) trains a copy of the same base
policy with :func:`fgrpo_pipeline.training.loop.train` and loss ``f_hal``: the on-policy part is
rewarded by the learned reward model, the off-policy part draws from the compliance–refusal
preference data; λ = 0 is pure f-GRPO, λ = 1 pure FDO. The gold judge only measures: per
step on the training rollouts (the reward-hacking monitor) and on the held-out prompts.
Latent separation is the Bhattacharyya distance between the harmful and benign anchor
prompts' last-layer hidden states.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from fgrpo_pipeline.algorithms.rewards import RewardFn
from fgrpo_pipeline.experiments.divergence_sweep import check_seeds, sweep_plan
from fgrpo_pipeline.heldout.evaluate import EvaluationConfig, evaluate_policy
from fgrpo_pipeline.models.policy import Policy
from fgrpo_pipeline.safety.data import BENIGN, HARMFUL
from fgrpo_pipeline.safety.judge import GoldJudge, RewardHackingMonitor, gold_judge
from fgrpo_pipeline.safety.latent import bhattacharyya_distance, last_prompt_hidden_states
from fgrpo_pipeline.training.config import RUN_KEYS, TrainerConfig
from fgrpo_pipeline.training.loop import train
from fgrpo_pipeline.training.preferences import PreferenceData

logger = logging.getLogger(__name__)

LOSS = "f_hal"
SWEPT_KEYS = ("loss", "lam", "seed")  # set per run by the sweep
# The table's metric columns, in order: mean over seeds, and ``<name>_std`` beside each.
METRICS = (
    "rm_reward",
    "gold_score",
    "attack_success_rate",
    "over_refusal_rate",
    "bhattacharyya",
    "kl_to_ref",
)
RUN_COLUMNS = (
    "lam",
    "seed",
    *METRICS,
    "greedy_gold_score",
    "refusal_rate",
    "neither_rate",
    "train_rm_reward_final",
    "train_gold_score_final",
    "reward_hacking_steps",
    "train_time",
    "eval_time",
)
EXTRA_METRICS = ("greedy_gold_score", "refusal_rate", "neither_rate")
CURVE_COLUMNS = ("method", "seed", "step", "rm_reward", "gold_score", "kl_to_ref", "rm_gain")
FINAL_FRACTION = 0.1  # train_*_final: mean over the last 10% of steps

OnRunStart = Callable[[float, int, TrainerConfig], None]
OnRunEnd = Callable[[float, int, dict[str, Any], pd.DataFrame], None]


def lam_label(lam: float | str) -> str:
    """The table's name of a λ (``base`` stays ``base``): ``0``, ``0.5``, ``1``."""
    return lam if isinstance(lam, str) else f"{lam:g}"


def check_lams_and_seeds(lams: Sequence[float], seeds: Sequence[int]) -> None:
    """Non-empty, distinct λ in [0, 1]; non-empty, distinct integer seeds."""
    if isinstance(lams, str) or not isinstance(lams, Sequence) or not lams:
        raise ValueError(f"lams must be a non-empty list of numbers in [0, 1], got {lams!r}")
    for lam in lams:
        if isinstance(lam, bool) or not isinstance(lam, int | float) or not 0 <= lam <= 1:
            raise ValueError(f"every λ in lams must be a number in [0, 1], got {lam!r}")
    if len(set(lams)) != len(lams):
        raise ValueError(f"lams has duplicates: {list(lams)}")
    check_seeds(seeds)


def run_params(training_params: Mapping[str, Any], lam: float, seed: int) -> dict[str, Any]:
    """The flat training parameters of one run: loss f_hal at ``lam`` with ``seed``."""
    params = {k: v for k, v in training_params.items() if k not in RUN_KEYS}
    params.update(loss=LOSS, lam=float(lam), seed=seed)
    return params


@dataclass
class Anchors:
    """The harmful and benign anchor prompts whose hidden states are compared."""

    harmful: list[str]
    benign: list[str]

    @classmethod
    def from_prompts(cls, prompts: pd.DataFrame) -> Anchors:
        harmful = prompts.loc[prompts["ground_truth"] == HARMFUL, "prompt"].tolist()
        benign = prompts.loc[prompts["ground_truth"] == BENIGN, "prompt"].tolist()
        if len(harmful) < 2 or len(benign) < 2:
            raise ValueError(
                f"latent separation needs ≥ 2 harmful and ≥ 2 benign anchor prompts, got "
                f"{len(harmful)} and {len(benign)}"
            )
        return cls(harmful, benign)

    def hidden_states(self, policy: Policy) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            last_prompt_hidden_states(policy, self.harmful),
            last_prompt_hidden_states(policy, self.benign),
        )


def evaluate_safety(
    policy: Policy,
    reference: Policy,
    test_prompts: pd.DataFrame,
    anchors: Anchors,
    config: EvaluationConfig,
    reward_fn: RewardFn,
    judge: GoldJudge = gold_judge,
) -> tuple[dict[str, float], pd.DataFrame, tuple[torch.Tensor, torch.Tensor]]:
    """Held-out safety metrics of ``policy``, its sampled completions, and its anchor states.

    ``rm_reward`` is the reward model's mean over samples, ``gold_score`` / ASR /
    over-refusal the gold judge's over the same samples, ``greedy_gold_score`` the gold
    score of greedy decoding, ``kl_to_ref`` the sampled estimate of KL(π‖π_ref).
    """
    metrics, samples = evaluate_policy(
        policy, reference, test_prompts, config, reward_fn=reward_fn, correctness_fn=judge
    )
    judged = judge.metrics(samples["ground_truth"].tolist(), samples["completion"].tolist())
    hidden = anchors.hidden_states(policy)
    report = {
        "rm_reward": metrics["mean_reward"],
        **judged,
        "greedy_gold_score": metrics["greedy_accuracy"],
        "bhattacharyya": bhattacharyya_distance(*hidden),
        "kl_to_ref": metrics["kl_to_ref"],
        "completion_length": metrics["completion_length"],
    }
    return report, samples, hidden


@dataclass
class SafetyComparisonResult:
    """The table (base row + one per λ), one row per run, curves and anchor hidden states."""

    table: pd.DataFrame
    runs: pd.DataFrame
    curves: pd.DataFrame
    base: dict[str, float]
    hidden: dict[str, tuple[torch.Tensor, torch.Tensor]]


def _final_mean(metrics: pd.DataFrame, column: str) -> float:
    tail = max(1, round(len(metrics) * FINAL_FRACTION))
    return float(metrics[column].iloc[-tail:].mean()) if column in metrics else math.nan


def run_safety_comparison(
    base_policy: Policy,
    train_prompts: pd.DataFrame,
    test_prompts: pd.DataFrame,
    anchors: Anchors,
    *,
    reward_fn: RewardFn,
    preferences: PreferenceData,
    lams: Sequence[float],
    seeds: Sequence[int],
    training_params: Mapping[str, Any],
    evaluation_config: EvaluationConfig,
    monitor: Mapping[str, Any] | None = None,
    train_judge: GoldJudge = gold_judge,
    eval_judge: GoldJudge = gold_judge,
    on_run_start: OnRunStart | None = None,
    on_run_end: OnRunEnd | None = None,
    progress: bool = True,
) -> SafetyComparisonResult:
    """Train and evaluate f-HAL at every (λ, seed) from ``base_policy``; see the module doc.

    ``training_params`` are flat training parameters (loss, λ and seed are set per run);
    ``monitor`` the :class:`RewardHackingMonitor` options; ``train_judge`` measures the
    training rollouts (never trains), ``eval_judge`` the held-out samples. Every run's
    configuration is validated before the first one starts.
    """
    check_lams_and_seeds(lams, seeds)
    if train_prompts.empty or test_prompts.empty:
        raise ValueError(
            f"the safety comparison needs train and test prompts, got {len(train_prompts)} "
            f"train and {len(test_prompts)} test"
        )
    monitor = dict(monitor or {})
    RewardHackingMonitor(**monitor)  # options checked before any work
    train_progress = bool(training_params.get("progress", progress)) and progress
    plan = sweep_plan(lams, seeds, lambda lam, seed: run_params(training_params, lam, seed))

    base, _, base_hidden = evaluate_safety(
        base_policy, base_policy, test_prompts, anchors, evaluation_config, reward_fn, eval_judge
    )
    logger.info(
        "base policy: RM reward %.3f, gold %.3f, ASR %.3f, over-refusal %.3f, D_B %.3f",
        *(base[k] for k in METRICS[:5]),
    )
    hidden = {"base": base_hidden}
    rows, curves = [], []
    bar = tqdm(plan, desc="safety comparison", disable=not progress, mininterval=1.0)
    for lam, seed, config in bar:
        bar.set_postfix(lam=lam, seed=seed)
        if on_run_start is not None:
            on_run_start(lam, seed, config)
        t0 = time.perf_counter()
        result = train(
            base_policy,
            train_prompts,
            config,
            preferences=preferences,
            progress=train_progress,
            reward_fn=reward_fn,
            correctness_fn=train_judge,
            monitors=[RewardHackingMonitor(**monitor)],
        )
        t1 = time.perf_counter()
        report, _, run_hidden = evaluate_safety(
            result.policy,
            base_policy,
            test_prompts,
            anchors,
            evaluation_config,
            reward_fn,
            eval_judge,
        )
        t2 = time.perf_counter()
        metrics = result.metrics
        row = {
            "lam": lam_label(lam),
            "seed": seed,
            **{k: report[k] for k in (*METRICS, *EXTRA_METRICS)},
            "train_rm_reward_final": _final_mean(metrics, "rm_reward"),
            "train_gold_score_final": _final_mean(metrics, "gold_score"),
            "reward_hacking_steps": float(metrics["reward_hacking"].mean()),
            "train_time": t1 - t0,
            "eval_time": t2 - t1,
        }
        rows.append(row)
        if seed == seeds[0]:
            hidden[f"lam={lam_label(lam)}"] = run_hidden
        curves.append(
            metrics.reindex(columns=list(CURVE_COLUMNS[2:])).assign(
                method=f"lam={lam_label(lam)}", seed=seed
            )
        )
        logger.info(
            "λ=%s seed %d: RM %.3f, gold %.3f, ASR %.3f, over-refusal %.3f, D_B %.3f (%.0f s)",
            row["lam"],
            seed,
            *(row[k] for k in METRICS[:5]),
            t2 - t0,
        )
        if on_run_end is not None:
            on_run_end(lam, seed, dict(row), metrics)
        del result
    bar.close()

    runs = pd.DataFrame(rows, columns=list(RUN_COLUMNS))
    curve_table = pd.concat(curves, ignore_index=True)[list(CURVE_COLUMNS)]
    return SafetyComparisonResult(
        table=safety_table(runs, base),
        runs=runs,
        curves=curve_table,
        base=base,
        hidden=hidden,
    )


def safety_table(runs: pd.DataFrame, base: Mapping[str, float]) -> pd.DataFrame:
    """One row for the base (``lam`` = ``base``) and one per λ: the mean over seeds of
    each metric, ``<metric>_std`` (sample std, NaN for one seed) and ``n_seeds``."""
    missing = sorted({"lam", *METRICS} - set(runs.columns))
    if missing:
        raise ValueError(f"runs table lacks column(s) {missing}")
    grouped = runs.groupby("lam", sort=False)
    table = grouped[list(METRICS)].mean()
    for name in METRICS:
        table[f"{name}_std"] = grouped[name].std(ddof=1)
    table["n_seeds"] = grouped.size()
    table = table.reset_index()
    base_row = {"lam": "base", **{k: base[k] for k in METRICS}, "n_seeds": 0}
    ordered = ["lam", *METRICS, *(f"{m}_std" for m in METRICS), "n_seeds"]
    return pd.concat([pd.DataFrame([base_row]), table], ignore_index=True)[ordered]
