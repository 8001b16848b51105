"""The paper's central comparison at our scale: every f-GRPO divergence against GRPO, S seeds.

Plain Python/torch (no Kedro, no MLflow). Each (method, seed) trains a copy of the same base
policy with :func:`fgrpo_pipeline.training.loop.train` and is evaluated on the held-out prompts
with :func:`fgrpo_pipeline.heldout.evaluate.evaluate_policy`; the base policy is evaluated once
and is the 0 of the **Relative Overall** score (paper): per benchmark, method means are
min–max normalised with the base at 0 and the best method at 100, then averaged over the
benchmarks. Our two "benchmarks" are held-out sampled accuracy (pass@1) and greedy accuracy.

A method is a divergence name (loss ``f_grpo`` with that divergence) or ``grpo``. The seed
is the training seed (prompt order, sampling); the base policy is the same for every run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from fgrpo_pipeline.algorithms.divergences import divergence_names
from fgrpo_pipeline.heldout.evaluate import EvaluationConfig, evaluate_policy
from fgrpo_pipeline.models.policy import Policy
from fgrpo_pipeline.training.config import RUN_KEYS, TrainerConfig
from fgrpo_pipeline.training.loop import train
from fgrpo_pipeline.training.preferences import PreferenceData

logger = logging.getLogger(__name__)

BASELINE = "grpo"
SWEPT_KEYS = ("loss", "divergence", "seed")  # set per run by the sweep
# summary column -> key of the evaluation metrics: the "benchmarks" of Relative Overall
BENCHMARKS = {"accuracy_mean": "sampled_accuracy", "greedy_accuracy_mean": "greedy_accuracy"}
RUN_COLUMNS = (
    "method",
    "loss",
    "divergence",
    "seed",
    "sampled_accuracy",
    "greedy_accuracy",
    "mean_reward",
    "kl_to_ref",
    "completion_length",
    "train_reward_final",
    "train_accuracy_final",
    "steps",
    "train_time",
    "eval_time",
    "wall_time",
)
CURVE_COLUMNS = ("method", "seed", "step", "reward_mean", "accuracy", "kl_to_ref")
TIE_DECIMALS = 9  # method means equal to this many decimals tie in avg_rank
FINAL_FRACTION = 0.1  # train_*_final: mean over the last 10% of steps

OnRunStart = Callable[[str, int], None]
OnRunEnd = Callable[[str, int, dict[str, Any], pd.DataFrame], None]


def method_names() -> list[str]:
    """Every valid method: the divergences (f-GRPO with that f) and ``grpo``."""
    return [*divergence_names(), BASELINE]


def method_loss(method: str) -> tuple[str, str | None]:
    """``(loss, divergence)`` of a method; the divergence is None for GRPO."""
    if method == BASELINE:
        return "grpo", None
    if method in divergence_names():
        return "f_grpo", method
    raise ValueError(f"unknown method {method!r}; valid: {', '.join(method_names())}")


def check_methods_and_seeds(methods: Sequence[str], seeds: Sequence[int]) -> None:
    """Non-empty, known, distinct methods; non-empty, distinct integer seeds."""
    if isinstance(methods, str) or not isinstance(methods, Sequence) or not methods:
        raise ValueError(f"methods must be a non-empty list of names, got {methods!r}")
    for method in methods:
        method_loss(method)
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods has duplicates: {list(methods)}")
    check_seeds(seeds)


def check_seeds(seeds: Sequence[int]) -> None:
    """A non-empty list of distinct integer seeds."""
    if isinstance(seeds, str) or not isinstance(seeds, Sequence) or not seeds:
        raise ValueError(f"seeds must be a non-empty list of integers, got {seeds!r}")
    for seed in seeds:
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seeds must be integers, got {seed!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds has duplicates: {list(seeds)}")


def run_params(training_params: Mapping[str, Any], method: str, seed: int) -> dict[str, Any]:
    """The flat training parameters of one run: ``training_params`` with the sweep's loss,
    divergence and seed, without run keys (``progress``). Valid input of
    :meth:`TrainerConfig.from_params`."""
    loss, divergence = method_loss(method)
    params = {k: v for k, v in training_params.items() if k not in RUN_KEYS}
    params.update(loss=loss, seed=seed)
    if divergence is not None:
        params["divergence"] = divergence
    return params


def sweep_plan(
    arms: Sequence[Any], seeds: Sequence[int], params_of: Callable[[Any, int], Mapping[str, Any]]
) -> list[tuple[Any, int, TrainerConfig]]:
    """Every (arm, seed) with its validated trainer configuration, arm by arm, so a bad one
    fails before the first run; sets the runs' torch thread count."""
    plan = [
        (arm, seed, TrainerConfig.from_params(params_of(arm, seed)))
        for arm in arms
        for seed in seeds
    ]
    if plan[0][2].num_threads:
        torch.set_num_threads(plan[0][2].num_threads)
    return plan


@dataclass
class ComparisonResult:
    """Runs (one row per method × seed), the per-method summary, curves and the base."""

    runs: pd.DataFrame
    summary: pd.DataFrame
    curves: pd.DataFrame
    base: dict[str, Any]
    metrics: dict[tuple[str, int], pd.DataFrame] = field(default_factory=dict)


def _final_mean(metrics: pd.DataFrame, column: str) -> float:
    if column not in metrics or metrics.empty:
        return float("nan")
    tail = max(1, round(len(metrics) * FINAL_FRACTION))
    return float(metrics[column].iloc[-tail:].mean())


def run_comparison(
    base_policy: Policy,
    train_prompts: pd.DataFrame,
    test_prompts: pd.DataFrame,
    *,
    methods: Sequence[str],
    seeds: Sequence[int],
    training_params: Mapping[str, Any],
    evaluation_config: EvaluationConfig,
    preferences: PreferenceData | None = None,
    on_run_start: OnRunStart | None = None,
    on_run_end: OnRunEnd | None = None,
    progress: bool = True,
) -> ComparisonResult:
    """Train and evaluate every (method, seed) from ``base_policy``; see the module doc.

    ``training_params`` are the flat ``training`` parameters (loss, divergence and seed are
    set per run; a ``progress`` key switches the per-run training bar, ``progress`` the outer
    bar over runs). Every run's configuration is validated before the first one starts.
    ``on_run_start(method, seed)`` is called before a run trains, ``on_run_end(method, seed,
    summary, metrics)`` after it is evaluated, with its row of ``runs`` and per-step metrics.
    """
    check_methods_and_seeds(methods, seeds)
    if train_prompts.empty or test_prompts.empty:
        raise ValueError(
            f"the comparison needs train and test prompts, got {len(train_prompts)} train and "
            f"{len(test_prompts)} test"
        )
    train_progress = bool(training_params.get("progress", progress)) and progress
    plan = sweep_plan(methods, seeds, lambda m, seed: run_params(training_params, m, seed))

    base, _ = evaluate_policy(base_policy, base_policy, test_prompts, evaluation_config)
    logger.info(
        "base policy: sampled accuracy %.3f, greedy %.3f",
        base["sampled_accuracy"],
        base["greedy_accuracy"],
    )

    rows: list[dict[str, Any]] = []
    metrics_by_run: dict[tuple[str, int], pd.DataFrame] = {}
    bar = tqdm(plan, desc="comparison", disable=not progress, mininterval=1.0)
    for method, seed, config in bar:
        bar.set_postfix(method=method, seed=seed)
        if on_run_start is not None:
            on_run_start(method, seed)
        t0 = time.perf_counter()
        result = train(
            base_policy,
            train_prompts,
            config,
            preferences=preferences,
            progress=train_progress,
        )
        t1 = time.perf_counter()
        held_out, _ = evaluate_policy(result.policy, base_policy, test_prompts, evaluation_config)
        t2 = time.perf_counter()
        loss, divergence = method_loss(method)
        row = {
            "method": method,
            "loss": loss,
            "divergence": divergence,
            "seed": seed,
            "sampled_accuracy": held_out["sampled_accuracy"],
            "greedy_accuracy": held_out["greedy_accuracy"],
            "mean_reward": held_out["mean_reward"],
            "kl_to_ref": held_out["kl_to_ref"],
            "completion_length": held_out["completion_length"],
            "train_reward_final": _final_mean(result.metrics, "reward_mean"),
            "train_accuracy_final": _final_mean(result.metrics, "accuracy"),
            "steps": config.steps,
            "train_time": t1 - t0,
            "eval_time": t2 - t1,
            "wall_time": t2 - t0,
        }
        rows.append(row)
        metrics_by_run[(method, seed)] = result.metrics
        logger.info(
            "%s seed %d: sampled accuracy %.3f, greedy %.3f, KL %.3f (%.0f s)",
            method,
            seed,
            row["sampled_accuracy"],
            row["greedy_accuracy"],
            row["kl_to_ref"],
            row["wall_time"],
        )
        if on_run_end is not None:
            on_run_end(method, seed, dict(row), result.metrics)
        del result  # the trained policy is not kept: 7 × S copies add up
    bar.close()

    runs = pd.DataFrame(rows, columns=list(RUN_COLUMNS))
    return ComparisonResult(
        runs=runs,
        summary=summarise(runs, base),
        curves=curves_table(metrics_by_run),
        base=base,
        metrics=metrics_by_run,
    )


def curves_table(metrics_by_run: Mapping[tuple[str, int], pd.DataFrame]) -> pd.DataFrame:
    """Per-step curves of all runs as one long table: method, seed, step, reward_mean,
    accuracy, kl_to_ref (a column a run's metrics lack is NaN)."""
    tables = []
    for (method, seed), metrics in metrics_by_run.items():
        table = metrics.reindex(columns=list(CURVE_COLUMNS[2:]))
        tables.append(table.assign(method=method, seed=seed))
    if not tables:
        return pd.DataFrame(columns=list(CURVE_COLUMNS))
    curves = pd.concat(tables, ignore_index=True)[list(CURVE_COLUMNS)]
    return curves.astype({"seed": "int64", "step": "int64"})


def summarise(runs: pd.DataFrame, base: Mapping[str, Any]) -> pd.DataFrame:
    """One row per method, best Relative Overall first.

    ``runs`` needs columns method, seed, sampled_accuracy, greedy_accuracy, mean_reward,
    kl_to_ref, wall_time (loss and divergence are carried over when present); ``base`` the
    base policy's sampled_accuracy and greedy_accuracy.

    * ``*_mean`` / ``*_std``: mean and sample standard deviation (ddof 1, NaN for one seed)
      over seeds; ``accuracy`` is held-out sampled accuracy (pass@1), ``reward_mean`` the
      held-out mean reward, ``wall_time_mean`` seconds per run (training + evaluation).
    * ``relative_overall``: per benchmark (sampled and greedy accuracy), 100 · (method mean −
      base) / (best method mean − base), averaged over benchmarks. A benchmark on which no
      method beats the base cannot be normalised and is left out (NaN if none is left).
    * ``avg_rank``: per benchmark, rank of the method mean (1 = best; means equal to
      ``TIE_DECIMALS`` decimals tie and share the average rank), averaged over benchmarks.
    """
    needed = {"method", "sampled_accuracy", "greedy_accuracy", "mean_reward", "kl_to_ref"}
    missing = sorted((needed | {"wall_time"}) - set(runs.columns))
    if missing:
        raise ValueError(f"runs table lacks column(s) {missing}")
    if runs.empty:
        raise ValueError("runs table is empty")
    for key in BENCHMARKS.values():
        if key not in base:
            raise ValueError(f"base metrics lack {key!r}")

    grouped = runs.groupby("method", sort=False)
    summary = pd.DataFrame(
        {
            "n_seeds": grouped.size(),
            "accuracy_mean": grouped["sampled_accuracy"].mean(),
            "accuracy_std": grouped["sampled_accuracy"].std(ddof=1),
            "greedy_accuracy_mean": grouped["greedy_accuracy"].mean(),
            "greedy_accuracy_std": grouped["greedy_accuracy"].std(ddof=1),
            "reward_mean": grouped["mean_reward"].mean(),
            "kl_to_ref_mean": grouped["kl_to_ref"].mean(),
            "wall_time_mean": grouped["wall_time"].mean(),
        }
    )
    summary["accuracy_change"] = summary["accuracy_mean"] - base["sampled_accuracy"]
    summary["greedy_accuracy_change"] = summary["greedy_accuracy_mean"] - base["greedy_accuracy"]

    scores, ranks = [], []
    for column, key in BENCHMARKS.items():
        span = summary[column].max() - float(base[key])
        if span > 0:
            scores.append(100.0 * (summary[column] - float(base[key])) / span)
        else:
            logger.warning("no method beats the base on %s: left out of relative_overall", key)
        # rounded: means of equal counts can differ in the last bit and must still tie
        ranks.append(summary[column].round(TIE_DECIMALS).rank(ascending=False, method="average"))
    summary["relative_overall"] = pd.concat(scores, axis=1).mean(axis=1) if scores else float("nan")
    summary["avg_rank"] = pd.concat(ranks, axis=1).mean(axis=1)

    summary = summary.reset_index()
    if {"loss", "divergence"} <= set(runs.columns):
        labels = runs.drop_duplicates("method")[["method", "loss", "divergence"]]
    else:
        labels = pd.DataFrame(
            [(m, *_method_loss_or_none(m)) for m in summary["method"]],
            columns=["method", "loss", "divergence"],
        )
    summary = labels.merge(summary, on="method", how="right")
    summary = summary.sort_values(
        ["relative_overall", "avg_rank"], ascending=[False, True], kind="stable"
    )
    return summary.reset_index(drop=True)


def _method_loss_or_none(method: str) -> tuple[str | None, str | None]:
    try:
        return method_loss(method)
    except ValueError:
        return None, None
