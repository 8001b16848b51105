"""MLflow child runs of the sweeps (Kedro layer), shared by ``comparison`` and
``safety_comparison``; the sweep engine (:mod:`fgrpo_pipeline.experiments.sweep`) never
imports MLflow, it reports each finished run to the ``on_arm`` callback made here.

With an active MLflow run (kedro-mlflow's), every (arm, seed) becomes a nested child run
of it, created once the run is evaluated but dated from the start of its training to the
end of its evaluation: its tags and parameters, its per-step training metrics
(``train/…``, with ``step=``), its final values, and its trained policy as an MLflow Model
(logged, not registered). Without an active run nothing here
touches MLflow.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from fgrpo_pipeline.datasets import MlflowPolicyDataset
from fgrpo_pipeline.experiments.sweep import Arm, ArmResult, OnArm
from fgrpo_pipeline.tracking import flatten_params, log_step_metrics, metric_name

# MLflow's limits per log_batch call
MAX_PARAMS, MAX_METRICS = 100, 1000
# how each arm's policy is logged (as the training pipeline's catalog entry, unregistered)
ARM_MODEL_ARGS = {
    "name": "trained_policy",
    "task": "text-generation",
    "pip_requirements": ["torch", "transformers", "accelerate"],
    "model_config": {"do_sample": False, "return_full_text": False},
}


@dataclass(frozen=True)
class ChildRun:
    """What a sweep logs of one finished run: its name, tags, parameters (nested ones are
    flattened to ``a.b``) and final values (metrics without a step)."""

    name: str
    tags: Mapping[str, str]
    params: Mapping[str, Any]
    values: Mapping[str, Any]


Describe = Callable[[Arm, int, ArmResult], ChildRun]


def child_runs(describe: Describe) -> OnArm | None:
    """An ``on_arm`` callback that logs each finished run, as ``describe`` says, as a child
    of the active MLflow run; None when no run is active (nothing is tracked)."""
    parent = mlflow.active_run()
    if parent is None:
        return None

    def on_arm(arm: Arm, seed: int, result: ArmResult) -> None:
        log_child_run(parent.info, describe(arm, seed, result), result)

    return on_arm


def log_arm_model(run_id: str, result: ArmResult) -> None:
    """The arm's trained policy as an MLflow Model of its child run (the transformers
    flavour, as the training pipeline logs its policy), not registered: a sweep's A × S
    policies are for comparing, the registry holds the policies a run trains for use."""
    with mlflow.start_run(run_id=run_id, nested=True):
        MlflowPolicyDataset(save_args=ARM_MODEL_ARGS).save(result.policy)


def log_child_run(parent: Any, child: ChildRun, result: ArmResult) -> str:
    """One finished run as a FINISHED child of ``parent`` (a run's info), dated by the
    run's start and wall time; FAILED if logging breaks off. Returns its run id."""
    client = MlflowClient()
    tags = {**resolve_tags(dict(child.tags)), MLFLOW_PARENT_RUN_ID: parent.run_id}
    start = int(result.started * 1000)
    run_id = client.create_run(
        parent.experiment_id, start_time=start, tags=tags, run_name=child.name
    ).info.run_id
    try:
        params = [Param(k, str(v)) for k, v in flatten_params(child.params).items()]
        for i in range(0, len(params), MAX_PARAMS):
            client.log_batch(run_id, params=params[i : i + MAX_PARAMS])
        log_step_metrics(result.metrics, run_id=run_id)
        now = int(time.time() * 1000)
        values = [
            Metric(metric_name(k), float(v), now, 0) for k, v in child.values.items() if finite(v)
        ]
        for i in range(0, len(values), MAX_METRICS):
            client.log_batch(run_id, metrics=values[i : i + MAX_METRICS])
        if result.policy is not None:
            log_arm_model(run_id, result)
    except BaseException:
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    end = start + int(result.wall_time * 1000)
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED), end_time=end)
    return run_id


def log_parent_metrics(values: Mapping[str, Any]) -> None:
    """The finite ``values`` as metrics of the active run (the sweep's summary); nothing
    without an active run."""
    if mlflow.active_run() is not None:
        mlflow.log_metrics({k: float(v) for k, v in values.items() if finite(v)})


def finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
