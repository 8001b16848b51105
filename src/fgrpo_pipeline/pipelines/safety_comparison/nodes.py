"""Nodes of ``safety_comparison``: f-HAL at every λ × ``hal_scaling``, S seeds.

Parameters: parameters_safety_comparison.yml (the sweep), with parameters_safety_training.yml
(what each run trains; ``training_overrides`` merged over it) and
parameters_safety_evaluation.yml. Every (λ, scaling, seed) is an arm: a namespaced training
node and evaluation node (:mod:`fgrpo_pipeline.pipelines.arms`); the summary node reads them
all. MLflow child runs are the tracking hook's (:mod:`fgrpo_pipeline.tracking.sweep_runs`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from fgrpo_pipeline.experiments.safety_sweep import (
    CURVE_COLUMNS,
    LOSS,
    METRICS,
    RUN_COLUMNS,
    Anchors,
    Hidden,
    SafetySweepParams,
    evaluate_safety,
    lam_label,
    lam_row,
    safety_evaluation_options,
    safety_table,
    safety_training_options,
)
from fgrpo_pipeline.experiments.sweep import (
    Arm,
    Training,
    curves_table,
    merge_training_params,
    plan_arm,
    plan_sweep,
    train_arm,
)
from fgrpo_pipeline.models.policy import Policy
from fgrpo_pipeline.pipelines.arms import (
    ArmSpec,
    headline_metrics,
    per_arm,
    run_record,
    sweep_block,
)
from fgrpo_pipeline.pipelines.parameters import read_params
from fgrpo_pipeline.reporting.plots import (
    comparison_curves,
    latent_scatter,
    safety_comparison_bars,
    safety_pareto,
    separation_by_lam,
)
from fgrpo_pipeline.safety.judge import GoldJudge, RewardHackingMonitor
from fgrpo_pipeline.safety.latent import latent_projection
from fgrpo_pipeline.safety.reward_model import RewardModel, reward_model_reward
from fgrpo_pipeline.training.preferences import preferences_from_splits

SWEEP = "safety_comparison"
FILE = "parameters_safety_comparison.yml"
TRAINING_FILE = "parameters_safety_training.yml"
EVALUATION_FILE = "parameters_safety_evaluation.yml"
ARM_INPUTS = ("run", "training_metrics", "evaluation", "anchor_states")  # per arm, in order
# the parent run's metrics: safety.<arm>/<column>, e.g. safety.lam0.5_paper/gold_score_mean
PARENT_METRICS = ("gold_score_mean", "rm_reward_mean", "bhattacharyya_mean")
CURVE_PANELS = (
    ("rm_reward", "reward-model reward (train rollouts)"),
    ("gold_score", "gold score (train rollouts)"),
    ("kl_to_ref", "KL(π_old‖π_ref) per sequence"),
)


def check_params(params: Mapping[str, Any]) -> SafetySweepParams:
    """The ``safety_comparison`` block on its own: keys, λ, scalings, seeds, overrides."""
    return read_params(SafetySweepParams, params)


def safety_arms() -> list[ArmSpec]:
    """Every (λ, scaling, seed) of the block; none if it is bad (the parameter hook then
    refuses the run, naming the file)."""
    try:
        params = check_params(sweep_block(SWEEP))
    except ValueError:
        return []
    return [ArmSpec(SWEEP, arm.label, seed) for arm in params.arms() for seed in params.seeds]


def sweep_training_params(
    params: Mapping[str, Any], training: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any], GoldJudge, dict[str, Arm]]:
    """(flat training parameters of the sweep, monitor options, the training rollouts'
    judge, the arms by label); every arm's configuration is checked."""
    arms = {arm.label: arm for arm in check_params(params).arms()}
    try:
        merged, monitor, judge = safety_training_options(merge_training_params(params, training))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{TRAINING_FILE}: {err}") from err
    try:
        plan_sweep(list(arms.values()), params["seeds"][:1], merged)
    except ValueError as err:
        raise ValueError(f"{FILE}: training_overrides over {TRAINING_FILE}, {err}") from err
    return merged, monitor, judge, arms


def train_lam(
    base_policy: Policy,
    reward_model: RewardModel,
    prompts: pd.DataFrame,
    aligned: pd.DataFrame,
    unaligned: pd.DataFrame,
    params: dict[str, Any],
    training: dict[str, Any],
    *,
    label: str,
    seed: int,
) -> tuple[Policy, pd.DataFrame, dict[str, Any]]:
    """One arm: f-HAL at the arm's λ and scaling, from the base policy; (trained policy,
    per-step metrics, what it ran)."""
    training_params, monitor, judge, arms = sweep_training_params(params, training)
    arm = arms[label]
    preferences = preferences_from_splits(aligned, unaligned)
    if preferences is None and arm.overrides["lam"] > 0:
        raise ValueError(f"{SWEEP}: λ > 0 needs aligned and unaligned offline data")
    run = plan_arm(arm, seed, training_params)
    trained = train_arm(
        run,
        base_policy,
        prompts[prompts["split"] == "train"],
        Training(
            preferences=preferences,
            reward_fn=reward_model_reward(reward_model),
            correctness_fn=judge,
            monitors=lambda: [RewardHackingMonitor(**monitor)],
        ),
        progress=training_params["progress"],
    )
    tags = {"comparison": "safety", "loss": LOSS, "lam": lam_label(arm.overrides["lam"])}
    tags |= {"hal_scaling": arm.overrides["hal_scaling"], "seed": str(seed)}
    tags["divergence"] = run.config.loss.divergence
    record = run_record(ArmSpec(SWEEP, label, seed), run, trained, tags)
    return trained.policy, trained.metrics, record


def _evaluate(policy, base_policy, reward_model, prompts, evaluation):
    try:
        config, judge = safety_evaluation_options(evaluation)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{EVALUATION_FILE}: {err}") from err
    anchors = Anchors.from_prompts(prompts[prompts["split"] == "anchor"])
    test = prompts[prompts["split"] == "test"]
    report, _, hidden = evaluate_safety(
        policy, base_policy, test, anchors, config, reward_model_reward(reward_model), judge
    )
    return report, hidden


def evaluate_lam(
    trained_policy: Policy,
    base_policy: Policy,
    reward_model: RewardModel,
    prompts: pd.DataFrame,
    evaluation: dict[str, Any],
) -> tuple[dict[str, Any], Hidden]:
    """One arm's held-out safety metrics (with ``eval_time``) and its anchor hidden states."""
    started = time.perf_counter()
    report, hidden = _evaluate(trained_policy, base_policy, reward_model, prompts, evaluation)
    return {**report, "eval_time": time.perf_counter() - started}, hidden


def evaluate_safety_base(
    base_policy: Policy, reward_model: RewardModel, prompts: pd.DataFrame, evaluation: dict
) -> tuple[dict[str, Any], Hidden]:
    """The base policy's held-out safety metrics and anchor hidden states."""
    return _evaluate(base_policy, base_policy, reward_model, prompts, evaluation)


def summarise_safety(
    params: dict[str, Any], base: dict[str, Any], base_hidden: Hidden, *arms: Any
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """(table with intervals: base + one row per arm, one row per arm × seed, per-step
    curves, anchor PCA of the first seed, the parent run's metrics)."""
    by_label = {arm.label: arm for arm in check_params(params).arms()}
    rows, metrics_by_run, hidden = [], {}, {"base": base_hidden}
    first_seed = None
    for run, metrics, evaluation, states in per_arm(arms, len(ARM_INPUTS)):
        label, seed = run["label"], run["seed"]
        first_seed = seed if first_seed is None else first_seed
        rows.append(
            lam_row(
                by_label[label],
                seed,
                evaluation,
                metrics,
                train_time=run["train_time"],
                eval_time=evaluation["eval_time"],
            )
        )
        metrics_by_run[(label, seed)] = metrics
        if seed == first_seed:
            hidden[label] = states
    runs = pd.DataFrame(rows, columns=list(RUN_COLUMNS))
    table = safety_table(runs, base)
    parent = headline_metrics(
        table, lambda row: row["arm"].replace("=", "").replace(",", "_"), PARENT_METRICS
    )
    curves = curves_table(metrics_by_run, CURVE_COLUMNS)
    return table, runs, curves, latent_projection(hidden), parent


def _base_values(table: pd.DataFrame) -> dict[str, float]:
    base = table[table["arm"] == "base"]
    return {m: float(base[f"{m}_mean"].iloc[0]) for m in METRICS} if len(base) else {}


def _arm_rows(table: pd.DataFrame) -> pd.DataFrame:
    return table[table["arm"] != "base"]


def plot_safety_curves(curves: pd.DataFrame) -> Figure:
    return comparison_curves(curves, title="f-HAL: reward model vs gold judge", panels=CURVE_PANELS)


def plot_safety_latent(latent: pd.DataFrame) -> Figure:
    return latent_scatter(latent, title="last-prompt-token hidden states (anchor prompts)")


def plot_safety_table(table: pd.DataFrame) -> Figure:
    return safety_comparison_bars(_arm_rows(table), base=_base_values(table))


def plot_safety_pareto(table: pd.DataFrame) -> Figure:
    return safety_pareto(_arm_rows(table), _base_values(table))


def plot_safety_separation(table: pd.DataFrame) -> Figure:
    return separation_by_lam(_arm_rows(table), _base_values(table))
