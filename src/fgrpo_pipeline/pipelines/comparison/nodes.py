"""Nodes of ``comparison``: every f-GRPO divergence against GRPO over several seeds.

Parameters: parameters_comparison.yml (the sweep), with parameters_training.yml (what each
run trains, ``comparison.training_overrides`` merged over it) and parameters_evaluation.yml
(the held-out evaluation). When an MLflow run is active (kedro-mlflow), every (method, seed)
becomes a nested child run with its parameters, per-step metrics (``train/…``), held-out
metrics (``eval/…``) and tags; the parent run gets the per-method summary
(``comparison/<method>/…``). Without an active run MLflow is not touched.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import mlflow
import pandas as pd
from matplotlib.figure import Figure

from fgrpo_pipeline.experiments.divergence_sweep import (
    SWEPT_KEYS,
    check_methods_and_seeds,
    method_loss,
    method_names,
    run_comparison,
    run_params,
)
from fgrpo_pipeline.models.policy import Policy
from fgrpo_pipeline.pipelines.evaluation.nodes import check_params as check_evaluation
from fgrpo_pipeline.reporting.plots import comparison_curves
from fgrpo_pipeline.tracking import ChildRuns
from fgrpo_pipeline.training.config import TrainerConfig
from fgrpo_pipeline.training.preferences import preferences_from_splits

FILE = "parameters_comparison.yml"
KEYS = ("methods", "seeds", "training_overrides", "num_threads", "progress")
HELD_OUT = ("sampled_accuracy", "greedy_accuracy", "mean_reward", "kl_to_ref", "completion_length")
TIMES = ("train_time", "eval_time", "wall_time")
SUMMARY = ("relative_overall", "avg_rank", "accuracy_mean", "greedy_accuracy_mean")


def check_sweep_options(
    params: Mapping[str, Any],
    *,
    block: str,
    keys: tuple[str, ...],
    swept: tuple[str, ...],
    swept_by: str,
) -> None:
    """What every sweep's block shares: known keys, training_overrides that leave the swept
    keys alone, num_threads and progress."""
    unknown = sorted(set(params) - set(keys))
    if unknown:
        raise ValueError(f"unknown {block} key(s) {unknown}; valid: {', '.join(keys)}")
    overrides = params.get("training_overrides") or {}
    if not isinstance(overrides, Mapping):
        raise ValueError(f"training_overrides must be a mapping, got {overrides!r}")
    if clash := sorted(set(overrides) & set(swept)):
        raise ValueError(f"training_overrides may not set {clash}: {swept_by}")
    threads = params.get("num_threads", 0)
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 0:
        raise ValueError(f"num_threads must be an integer ≥ 0, got {threads!r}")
    if not isinstance(params.get("progress", True), bool):
        raise ValueError(f"progress must be true or false, got {params['progress']!r}")


def check_params(params: Mapping[str, Any]) -> None:
    """The ``comparison`` block on its own: keys, methods, seeds, overrides, threads."""
    try:
        check_sweep_options(
            params,
            block="comparison",
            keys=KEYS,
            swept=SWEPT_KEYS,
            swept_by="the sweep sets loss and divergence from `methods` and the seed from `seeds`",
        )
        check_methods_and_seeds(params.get("methods"), params.get("seeds"))
    except ValueError as err:
        raise ValueError(f"{FILE}: {err} (methods: {', '.join(method_names())})") from err


def sweep_training_params(params: Mapping[str, Any], training: Mapping[str, Any]) -> dict[str, Any]:
    """``training`` with ``training_overrides``, ``num_threads`` and ``progress`` over it;
    every run's configuration is checked here, naming the file."""
    check_params(params)
    merged = {**training, **(params.get("training_overrides") or {})}
    if params.get("num_threads"):
        merged["num_threads"] = params["num_threads"]
    merged["progress"] = params.get("progress", True)
    for method in params["methods"]:
        try:
            TrainerConfig.from_params(run_params(merged, method, params["seeds"][0]))
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"{FILE}: training_overrides over parameters_training.yml, method {method!r}: {err}"
            ) from err
    return merged


class MethodRuns(ChildRuns):
    """A nested MLflow run per (method, seed), tagged and parametrised as the run trains."""

    def __init__(self, training_params: Mapping[str, Any], sweep: str = "divergences") -> None:
        super().__init__()
        self.training_params = dict(training_params)
        self.sweep = sweep

    def start_method(self, method: str, seed: int) -> None:
        loss, divergence = method_loss(method)
        tags = {
            "comparison": self.sweep,
            "method": method,
            "loss": loss,
            "divergence": divergence or "none",
            "seed": str(seed),
        }
        config = TrainerConfig.from_params(run_params(self.training_params, method, seed))
        params = {**config.to_dict(), "method": method, "loss": loss}
        params["divergence"] = divergence or "none"
        self.start((method, seed), f"{method}-seed{seed}", tags, params)

    def end_method(
        self, method: str, seed: int, summary: dict[str, Any], metrics: pd.DataFrame
    ) -> None:
        values = {f"eval/{k}": summary[k] for k in HELD_OUT} | {k: summary[k] for k in TIMES}
        values |= {k: summary[k] for k in ("train_reward_final", "train_accuracy_final")}
        self.end((method, seed), metrics, values)


def _log_summary(summary: pd.DataFrame, base: Mapping[str, Any]) -> None:
    values = {
        f"comparison/{row['method']}/{column}": row[column]
        for _, row in summary.iterrows()
        for column in SUMMARY
    }
    values |= {f"comparison/base/{k}": base[k] for k in ("sampled_accuracy", "greedy_accuracy")}
    mlflow.log_metrics({k: float(v) for k, v in values.items() if math.isfinite(float(v))})


def compare_divergences(
    base_policy: Policy,
    prompts: pd.DataFrame,
    aligned: pd.DataFrame,
    unaligned: pd.DataFrame,
    params: dict[str, Any],
    training: dict[str, Any],
    evaluation: dict[str, Any],
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """(per-method summary, one row per method × seed, per-step curves, base policy report)."""
    training_params = sweep_training_params(params, training)
    evaluation_config = check_evaluation(evaluation)
    train_prompts = prompts[prompts["split"] == "train"]
    test_prompts = prompts[prompts["split"] == evaluation.get("split", "test")]
    preferences = preferences_from_splits(aligned, unaligned)
    tracking = mlflow.active_run() is not None
    children = MethodRuns(training_params) if tracking else None
    try:
        result = run_comparison(
            base_policy,
            train_prompts,
            test_prompts,
            methods=list(params["methods"]),
            seeds=list(params["seeds"]),
            training_params=training_params,
            evaluation_config=evaluation_config,
            preferences=preferences,
            on_run_start=children.start_method if children else None,
            on_run_end=children.end_method if children else None,
            progress=params.get("progress", True),
        )
    except BaseException:
        if children is not None:
            children.fail()
        raise
    if tracking:
        _log_summary(result.summary, result.base)
    base = {"policy": "base", **result.base, "relative_overall": 0.0}
    return result.summary, result.runs, result.curves, base


def plot_comparison_curves(curves: pd.DataFrame) -> Figure:
    return comparison_curves(curves)
