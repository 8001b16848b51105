"""Each sweep arm as an MLflow child run, opened and closed by a hook (no node touches MLflow).

An arm (:mod:`fgrpo_pipeline.pipelines.arms`) is a namespaced training node and evaluation
node. Before its training node the hook opens a child run of the pipeline's run (named
``<label>-seed<seed>``, tagged ``sweep_arm=<namespace>``); after it, it logs the arm's tags and
trainer configuration, its per-step metrics (``train/…``), its files and its trained policy
as an MLflow Model (logged, not registered); after the evaluation node, the held-out metrics
(``eval/…``) and times, and closes the run FINISHED. A failing node closes it FAILED.

Under ParallelRunner the nodes run in worker processes, each with a copy of this hook: the
child run is found again by its tag, and the pipeline's run id travels in the environment.
The hook also divides the CPU threads among the workers, and, when arms run one after
another, shows a bar over the arms' trainings and then one over their evaluations, with an
ETA (Kedro runs a sweep's training nodes first: the evaluations depend on them).
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

import mlflow
import torch
from kedro.framework.hooks import hook_impl
from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from tqdm.auto import tqdm

from fgrpo_pipeline.datasets import MlflowPolicyDataset
from fgrpo_pipeline.pipelines.arms import ARM_TAG, EVALUATE_NODE, TRAIN_NODE
from fgrpo_pipeline.tracking.artifacts import flatten_params, log_step_metrics, metric_name

logger = logging.getLogger(__name__)

PARENT_ENV = "FGRPO_SWEEP_PARENT_RUN"  # "<experiment id>:<run id>" of the pipeline's run
THREADS_ENV = "FGRPO_SWEEP_THREADS"  # torch threads of each ParallelRunner worker
ARM_RUN_TAG = "sweep_arm"
MAX_PARAMS, MAX_METRICS = 100, 1000  # MLflow's limits per log_batch call
# how each arm's policy is logged (as the training pipeline's catalog entry, unregistered)
ARM_MODEL_ARGS = {
    "name": "trained_policy",
    "task": "text-generation",
    "pip_requirements": ["torch", "transformers", "accelerate"],
    "model_config": {"do_sample": False, "return_full_text": False},
}


def arm_nodes(pipeline) -> dict[str, list[str]]:
    """Namespace -> names of its nodes, for every arm in ``pipeline``."""
    arms: dict[str, list[str]] = {}
    for node in pipeline.nodes:
        if ARM_TAG in node.tags and node.namespace:
            arms.setdefault(node.namespace, []).append(node.name)
    return arms


def worker_threads(workers: int) -> int:
    """Torch threads per worker when ``workers`` processes share the CPU cores."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


class SweepRunHook:
    """Opens, fills and closes one MLflow child run per sweep arm; see the module doc."""

    def __init__(self) -> None:
        self._runs: dict[str, str] = {}  # namespace -> child run id (this process)
        self._arms = 0  # arms in a sequential run (0: no bars)
        self._bars: dict[str, Any] = {}  # node kind (train, evaluate) -> its bar

    @hook_impl(trylast=True)  # after kedro-mlflow has started the pipeline's run
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        self._runs, self._arms = {}, 0
        arms = arm_nodes(pipeline)
        os.environ.pop(PARENT_ENV, None)
        os.environ.pop(THREADS_ENV, None)
        if not arms:
            return
        if "ParallelRunner" in str(run_params.get("runner", "")):
            workers = min(os.cpu_count() or 1, len(arms))
            os.environ[THREADS_ENV] = str(worker_threads(workers))
            logger.info(
                "sweep: %d arms, %s torch threads per worker", len(arms), worker_threads(workers)
            )
        else:
            self._arms = len(arms)
        active = mlflow.active_run()
        if active is not None:
            os.environ[PARENT_ENV] = f"{active.info.experiment_id}:{active.info.run_id}"

    @hook_impl
    def before_node_run(self, node, catalog, inputs, is_async, run_id) -> None:
        if ARM_TAG not in node.tags:
            return
        if THREADS_ENV in os.environ:
            torch.set_num_threads(int(os.environ[THREADS_ENV]))
        kind = node.name.rsplit(".", 1)[-1]
        if self._arms and kind not in self._bars:
            what = "trainings" if kind == TRAIN_NODE else "evaluations"
            self._bars[kind] = tqdm(
                total=self._arms, desc=f"sweep {what}", unit="arm", mininterval=1.0
            )
        if PARENT_ENV in os.environ:
            self._child(node.namespace)

    @hook_impl
    def after_node_run(self, node, catalog, inputs, outputs, is_async, run_id) -> None:
        if ARM_TAG not in node.tags:
            return
        short = node.name.rsplit(".", 1)[-1]
        child = self._runs.get(node.namespace) if PARENT_ENV in os.environ else None
        if child is not None and short == TRAIN_NODE:
            record = outputs[f"{node.namespace}.run"]
            self._log_training(child, record, outputs)
        elif child is not None and short == EVALUATE_NODE:
            self._log_evaluation(child, node.namespace, outputs[f"{node.namespace}.evaluation"])
        if (bar := self._bars.get(short)) is not None:
            bar.set_postfix_str(node.namespace.split(".")[-1])
            bar.update()

    @hook_impl
    def on_node_error(self, error, node, catalog, inputs, is_async, run_id) -> None:
        child = self._runs.pop(node.namespace, None) if ARM_TAG in node.tags else None
        if child is not None:
            MlflowClient().set_terminated(child, RunStatus.to_string(RunStatus.FAILED))

    @hook_impl
    def after_pipeline_run(self, run_params, run_result, pipeline, catalog) -> None:
        self._close_bar()

    @hook_impl
    def on_pipeline_error(self, error, run_params, pipeline, catalog) -> None:
        self._close_bar()

    def _close_bar(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars = {}
        os.environ.pop(PARENT_ENV, None)
        os.environ.pop(THREADS_ENV, None)

    def _child(self, namespace: str) -> str:
        """The arm's open child run: this process's, one another worker opened, or a new one."""
        if namespace in self._runs:
            return self._runs[namespace]
        experiment, parent = os.environ[PARENT_ENV].split(":", 1)
        client = MlflowClient()
        found = client.search_runs(
            [experiment],
            filter_string=(
                f"tags.{MLFLOW_PARENT_RUN_ID} = '{parent}' and tags.{ARM_RUN_TAG} = '{namespace}'"
                " and attributes.status = 'RUNNING'"
            ),
            max_results=1,
        )
        if found:
            run_id = found[0].info.run_id
        else:
            tags = resolve_tags({MLFLOW_PARENT_RUN_ID: parent, ARM_RUN_TAG: namespace})
            name = namespace.split(".", 1)[-1]
            run_id = client.create_run(experiment, tags=tags, run_name=name).info.run_id
        self._runs[namespace] = run_id
        return run_id

    @staticmethod
    def _log_training(run_id: str, record: dict[str, Any], outputs: dict[str, Any]) -> None:
        client = MlflowClient()
        client.set_tag(run_id, "mlflow.runName", record["run_name"])
        for key, value in record["tags"].items():
            client.set_tag(run_id, key, str(value))
        params = [Param(k, str(v)) for k, v in flatten_params(record["params"]).items()]
        for i in range(0, len(params), MAX_PARAMS):
            client.log_batch(run_id, params=params[i : i + MAX_PARAMS])
        log_step_metrics(outputs[f"{record['namespace']}.training_metrics"], run_id=run_id)
        client.log_metric(run_id, "train_time", record["train_time"], step=0)
        with mlflow.start_run(run_id=run_id, nested=True):
            MlflowPolicyDataset(save_args=ARM_MODEL_ARGS).save(
                outputs[f"{record['namespace']}.trained_policy"]
            )
            mlflow.log_dict(record, "run.json")
        # leaving the block ended the run; it stays open until the arm is evaluated
        client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))

    def _log_evaluation(self, run_id: str, namespace: str, evaluation: dict) -> None:
        client = MlflowClient()
        now = int(time.time() * 1000)
        values = {f"eval/{k}": v for k, v in evaluation.items() if k != "eval_time"}
        values["eval_time"] = evaluation.get("eval_time")
        metrics = [
            Metric(metric_name(k), float(v), now, 0) for k, v in values.items() if _finite(v)
        ]
        for i in range(0, len(metrics), MAX_METRICS):
            client.log_batch(run_id, metrics=metrics[i : i + MAX_METRICS])
        client.log_dict(run_id, evaluation, "evaluation.json")
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
        self._runs.pop(namespace, None)
