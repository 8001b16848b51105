"""The safety comparison: f-HAL at several λ and ``hal_scaling`` forms, S seeds.

Plain Python/torch (no Kedro, no MLflow). A λ is an arm of the sweep engine
(:mod:`fgrpo_pipeline.experiments.sweep`): each (λ, seed) trains a copy of the same base
policy with loss ``f_hal`` and λ set, evaluated by :func:`evaluate_safety`. The on-policy part is
rewarded by the learned reward model, the off-policy part draws from the compliance–refusal
preference data; λ = 0 is pure f-GRPO, λ = 1 pure FDO. The gold judge only measures: per
step on the training rollouts (the reward-hacking monitor) and on the held-out prompts.
Latent separation is the Bhattacharyya distance between the harmful and benign anchor
prompts' last-layer hidden states.

An arm is a (λ, scaling) pair; λ = 1 has no on-policy term, so the scaling does not apply and
it runs once, under the first scaling listed. Every metric is summarised over seeds with a
95 % bootstrap interval and paired by seed against λ = 0 of the same scaling
(:mod:`fgrpo_pipeline.experiments.statistics`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pandas as pd
import torch

from fgrpo_pipeline.algorithms.losses import HAL_SCALINGS
from fgrpo_pipeline.algorithms.rewards import RewardFn
from fgrpo_pipeline.experiments.statistics import summarise_arms
from fgrpo_pipeline.experiments.sweep import (
    Arm,
    ArmResult,
    OnArm,
    SweepParams,
    Training,
    check_distinct,
    check_prompts,
    check_seeds,
    curves_table,
    final_mean,
    finished_run,
    plan_sweep,
    run_sweep,
)
from fgrpo_pipeline.heldout.evaluate import EvaluationConfig, evaluate_policy
from fgrpo_pipeline.models.policy import Policy
from fgrpo_pipeline.safety.data import BENIGN, HARMFUL
from fgrpo_pipeline.safety.judge import GoldJudge, RewardHackingMonitor, gold_judge
from fgrpo_pipeline.safety.latent import bhattacharyya_distance, last_prompt_hidden_states
from fgrpo_pipeline.training.config import RUN_KEYS, TrainerConfig, check_run_params
from fgrpo_pipeline.training.preferences import PreferenceData

logger = logging.getLogger(__name__)

LOSS = "f_hal"
SWEPT_KEYS = ("loss", "lam", "hal_scaling", "seed")  # set per run by the sweep
DIFF_METRIC = "gold_score"  # diff_vs_lam0_* is the paired difference of this metric
MONITOR_KEY, JUDGE_KEY = "monitor", "judge"  # beside the trainer's keys, not its own
# The table's metric columns, in order: mean over seeds, and ``<name>_std`` beside each.
METRICS = (
    "rm_reward",
    "gold_score",
    "attack_success_rate",
    "over_refusal_rate",
    "bhattacharyya",
    "kl_to_ref",
)
EXTRA_METRICS = ("greedy_gold_score", "refusal_rate", "neither_rate")
RUN_COLUMNS = (
    "arm",
    "lam",
    "hal_scaling",
    "seed",
    *METRICS,
    *EXTRA_METRICS,
    "train_rm_reward_final",
    "train_gold_score_final",
    "reward_hacking_steps",
    "train_time",
    "eval_time",
)
CURVE_COLUMNS = ("method", "seed", "step", "rm_reward", "gold_score", "kl_to_ref", "rm_gain")

OnRunStart = Callable[[float, int, TrainerConfig], None]
OnRunEnd = Callable[[float, int, dict[str, Any], pd.DataFrame], None]
Hidden = tuple[torch.Tensor, torch.Tensor]  # harmful and benign anchors' hidden states


def lam_label(lam: float | str) -> str:
    """The table's name of a λ (``base`` stays ``base``): ``0``, ``0.5``, ``1``."""
    return lam if isinstance(lam, str) else f"{lam:g}"


def _check_lam(lam: Any) -> None:
    if isinstance(lam, bool) or not isinstance(lam, int | float) or not 0 <= lam <= 1:
        raise ValueError(f"every λ in lams must be a number in [0, 1], got {lam!r}")


@dataclass
class SafetySweepParams(SweepParams):
    """The ``safety_comparison`` block (parameters_safety_comparison.yml): the λ values ×
    ``seeds`` of f-HAL, the training overrides of every run, threads, progress."""

    BLOCK: ClassVar[str] = "safety_comparison"
    SWEPT: ClassVar[tuple[str, ...]] = SWEPT_KEYS
    SWEPT_BY: ClassVar[str] = (
        "the sweep sets the loss (f_hal), λ from `lams` and the seed from `seeds`"
    )

    lams: list = field(default_factory=list)
    hal_scalings: list = field(default_factory=lambda: ["paper"])

    def check(self) -> None:
        check_lams_and_seeds(self.lams, self.seeds)
        check_distinct(self.hal_scalings, "hal_scalings", "names", _check_scaling)

    def arms(self) -> list[Arm]:
        """Every (λ, scaling) arm, scaling by scaling; λ = 1 only under the first scaling."""
        return [
            lam_arm(lam, scaling)
            for i, scaling in enumerate(self.hal_scalings)
            for lam in self.lams
            if not (lam == 1 and i > 0)
        ]


def _check_scaling(scaling: Any) -> None:
    if scaling not in HAL_SCALINGS:
        raise ValueError(f"hal_scalings: {scaling!r} is unknown; valid: {', '.join(HAL_SCALINGS)}")


def check_lams_and_seeds(lams: Sequence[float], seeds: Sequence[int]) -> None:
    """Non-empty, distinct λ in [0, 1]; non-empty, distinct integer seeds."""
    check_distinct(lams, "lams", "numbers in [0, 1]", _check_lam)
    check_seeds(seeds)


def lam_arm(lam: float, scaling: str = "paper") -> Arm:
    """The arm of a λ and scaling: loss f_hal at that λ, labelled ``lam=<λ>,<scaling>``."""
    overrides = {"loss": LOSS, "lam": float(lam), "hal_scaling": scaling}
    return Arm(f"lam={lam_label(lam)},{scaling}", overrides)


def safety_training_options(
    params: Mapping[str, Any],
) -> tuple[dict[str, Any], dict[str, Any], GoldJudge]:
    """The safety training block (parameters_safety_training.yml) checked: (its trainer and
    run parameters, the reward-hacking monitor's options, the gold judge)."""
    check_run_params(params)
    monitor = dict(params.get(MONITOR_KEY) or {})
    RewardHackingMonitor(**monitor)
    judge = GoldJudge.from_params(params.get(JUDGE_KEY))
    training = {k: v for k, v in params.items() if k not in (MONITOR_KEY, JUDGE_KEY)}
    TrainerConfig.from_params({k: v for k, v in training.items() if k not in RUN_KEYS})
    return training, monitor, judge


def safety_evaluation_options(params: Mapping[str, Any]) -> tuple[EvaluationConfig, GoldJudge]:
    """The safety evaluation block (parameters_safety_evaluation.yml) checked."""
    judge = GoldJudge.from_params(params.get(JUDGE_KEY))
    config = EvaluationConfig(**{k: v for k, v in params.items() if k != JUDGE_KEY})
    return config, judge


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

    def hidden_states(self, policy: Policy) -> Hidden:
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
) -> tuple[dict[str, float], pd.DataFrame, Hidden]:
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
    hidden: dict[str, Hidden]


def lam_row(
    arm: Arm,
    seed: int,
    report: Mapping[str, float],
    metrics: pd.DataFrame,
    *,
    train_time: float,
    eval_time: float,
) -> dict[str, Any]:
    """One (λ, scaling, seed)'s row of the runs table (``RUN_COLUMNS``)."""
    return {
        "arm": arm.label,
        "lam": arm.overrides["lam"],
        "hal_scaling": arm.overrides["hal_scaling"],
        "seed": seed,
        **{k: report[k] for k in (*METRICS, *EXTRA_METRICS)},
        "train_rm_reward_final": final_mean(metrics, "rm_reward"),
        "train_gold_score_final": final_mean(metrics, "gold_score"),
        "reward_hacking_steps": float(metrics["reward_hacking"].mean()),
        "train_time": train_time,
        "eval_time": eval_time,
    }


def run_row(result: ArmResult[tuple[dict[str, float], Hidden]]) -> dict[str, Any]:
    """A finished run's row of the runs table (:func:`lam_row`)."""
    return lam_row(
        result.arm,
        result.seed,
        result.evaluation[0],
        result.metrics,
        train_time=result.train_time,
        eval_time=result.eval_time,
    )


def _describe(evaluation: tuple[dict[str, float], Hidden]) -> str:
    values = (evaluation[0][k] for k in METRICS[:5])
    return "RM reward {:.3f}, gold {:.3f}, ASR {:.3f}, over-refusal {:.3f}, D_B {:.3f}".format(
        *values
    )


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
    hal_scalings: Sequence[str] = ("paper",),
    monitor: Mapping[str, Any] | None = None,
    train_judge: GoldJudge = gold_judge,
    eval_judge: GoldJudge = gold_judge,
    on_run_start: OnRunStart | None = None,
    on_run_end: OnRunEnd | None = None,
    on_arm: OnArm | None = None,
    progress: bool = True,
) -> SafetyComparisonResult:
    """Train and evaluate f-HAL at every (λ, seed) from ``base_policy``; see the module doc.

    ``training_params`` are flat training parameters (loss, λ and seed are set per run);
    ``monitor`` the :class:`RewardHackingMonitor` options; ``train_judge`` measures the
    training rollouts (never trains), ``eval_judge`` the held-out samples. Every run's
    configuration is validated before the first one starts. ``on_run_start(λ, seed,
    config)``, ``on_run_end(λ, seed, row, metrics)`` and ``on_arm(arm, seed, result)`` as in
    :func:`~fgrpo_pipeline.experiments.divergence_sweep.run_comparison`.
    """
    check_lams_and_seeds(lams, seeds)
    check_prompts("safety comparison", train_prompts, test_prompts)
    monitor = dict(monitor or {})
    RewardHackingMonitor(**monitor)  # options checked before any work
    arms = SafetySweepParams(seeds=list(seeds), lams=list(lams), hal_scalings=list(hal_scalings))
    plan = plan_sweep(arms.arms(), seeds, training_params)

    def evaluate(policy: Policy) -> tuple[dict[str, float], Hidden]:
        report, _, hidden = evaluate_safety(
            policy, base_policy, test_prompts, anchors, evaluation_config, reward_fn, eval_judge
        )
        return report, hidden

    def started(arm: Arm, seed: int, config: TrainerConfig) -> None:
        if on_run_start is not None:
            on_run_start(arm.overrides["lam"], seed, config)

    result = run_sweep(
        plan,
        base_policy,
        train_prompts,
        evaluate,
        training=Training(
            preferences=preferences,
            reward_fn=reward_fn,
            correctness_fn=train_judge,
            monitors=lambda: [RewardHackingMonitor(**monitor)],
        ),
        row=run_row,
        describe=_describe,
        on_start=started,
        on_arm=finished_run(lambda arm: arm.overrides["lam"], on_run_end, on_arm),
        progress=progress,
        desc="safety comparison",
    )
    runs = result.table(RUN_COLUMNS)
    first_seed = [r for r in result.arms if r.seed == seeds[0]]
    return SafetyComparisonResult(
        table=safety_table(runs, result.base[0]),
        runs=runs,
        curves=curves_table(result.metrics, CURVE_COLUMNS),
        base=result.base[0],
        hidden={"base": result.base[1], **{r.arm.label: r.evaluation[1] for r in first_seed}},
    )


def safety_table(runs: pd.DataFrame, base: Mapping[str, float], **options: Any) -> pd.DataFrame:
    """One row for the base policy (``arm`` = ``base``, no intervals) and one per arm, with
    ``options`` for the bootstrap.

    ``runs`` has one row per arm × seed (columns arm, lam, hal_scaling, seed and ``METRICS``,
    as :func:`lam_row` makes them). Per arm: ``n_seeds``; ``<metric>_mean`` / ``_ci_low`` /
    ``_ci_high`` (95 % bootstrap over seeds); ``<metric>_diff_*``, the paired difference to
    λ = 0 of the same scaling, and ``diff_vs_lam0_*`` that of ``DIFF_METRIC`` (none for a
    scaling without a λ = 0 arm)."""
    missing = sorted({"arm", "lam", "hal_scaling", "seed", *METRICS} - set(runs.columns))
    if missing:
        raise ValueError(f"runs table lacks column(s) {missing}")
    tables = []
    for scaling, rows in runs.groupby("hal_scaling", sort=False):
        zero = rows.loc[rows["lam"] == 0, "arm"]
        table = summarise_arms(
            rows,
            list(METRICS),
            arm="arm",
            baseline=zero.iloc[0] if len(zero) else None,
            diff_metric=DIFF_METRIC,
            **options,
        )
        if len(zero):
            prefix = f"diff_vs_{zero.iloc[0]}_"
            table.columns = [c.replace(prefix, "diff_vs_lam0_") for c in table.columns]
        tables.append(table.assign(hal_scaling=scaling))
    table = pd.concat(tables, ignore_index=True)
    table.insert(1, "lam", table["arm"].map(runs.drop_duplicates("arm").set_index("arm")["lam"]))
    table.insert(2, "hal_scaling", table.pop("hal_scaling"))
    base_row = {"arm": "base", "lam": float("nan"), "hal_scaling": "", "n_seeds": 0}
    base_row |= {f"{k}_mean": base[k] for k in METRICS}
    return pd.concat([pd.DataFrame([base_row]), table], ignore_index=True)[list(table.columns)]
