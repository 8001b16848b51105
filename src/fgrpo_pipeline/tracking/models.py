"""The trained policy as an MLflow Model, and runs a person can read in the MLflow UI.

* The ``trained_policy_model`` catalog entry is kedro-mlflow's ``MlflowModelTrackingDataset``
  with the ``mlflow.transformers`` flavour (task text-generation, the tokenizer included):
  saving it logs the policy to the run and registers a version of ``globals.registered_model``
  (default ``fgrpo-policy``; null: not registered). kedro-mlflow's dataset is used because it
  is the catalog's own way to put a model in MLflow: the model is a node output that
  kedro-viz draws in the lineage, and its save is switched off with the rest of tracking.
  A LoRA policy is logged the way MLflow's PEFT support does: the adapter and a reference to
  its base model (``base_model_name_or_path``), no merged copy.
* :class:`MlflowModelHook` tags the registered version (loss, divergence, β, λ, seed, git
  commit) and, once ``evaluation_report`` is saved, attaches its held-out metrics to the version
  (tags ``heldout.<policy>.<metric>``) and to the logged model (MLflow model metrics).
* The run is named from its configuration (e.g. ``f_grpo-kl-b0.1-seed0``,
  ``safety-f_hal-lam0.5-seed1``), its description is the command line, and the tables it
  reads (prompts, the aligned / unaligned splits) are logged as its dataset inputs
  (``mlflow.data`` from pandas, with digests; the catalog name as name and its file as
  source) in the context of the node that read them (``training`` or ``evaluation``; of a
  prompts table, the split that stage uses).
"""

from __future__ import annotations

import logging
import shlex
import sys
import warnings
from collections.abc import Mapping
from typing import Any

import mlflow
import pandas as pd
from kedro.framework.hooks import hook_impl
from mlflow.data.sources import LocalArtifactDatasetSource
from mlflow.tracking import MlflowClient

from fgrpo_pipeline.tracking.artifacts import _warn_on_failure, git_commit

logger = logging.getLogger(__name__)

MODEL_DATASETS = {"trained_policy_model": "training"}
EVALUATION_DATASETS = {"evaluation_report": "trained_policy_model"}
# Tables logged as dataset inputs of the run; the context is the reading node's stage.
INPUT_DATASETS = ("prompts", "aligned", "unaligned", "safety_prompts", "safety_aligned",
                  "safety_unaligned")  # fmt: skip
VERSION_TAGS = ("loss", "divergence", "beta", "lam", "seed")


def run_name(pipeline_names: list[str], parameters: Mapping[str, Any]) -> str:
    """A run's name from what it trains: ``<loss>-<divergence>-b<β>-seed<seed>`` for
    training (``-lam<λ>`` for f-HAL; no divergence for GRPO and DPO), ``safety-`` before
    the safety setting's, else the pipelines' names."""
    safety = any(name.startswith("safety") for name in pipeline_names)
    trains = any(
        name in ("__default__", "training", "safety", "safety_training") for name in pipeline_names
    )
    block = parameters.get("safety_training" if safety else "training") or {}
    if not trains or not block:
        return "+".join(pipeline_names)
    loss = block.get("loss", "f_grpo")
    parts = [loss]
    if loss not in ("grpo", "dpo"):
        parts.append(str(block.get("divergence", "kl")))
    if loss == "f_hal":
        parts.append(f"lam{block.get('lam')}")
    parts += [f"b{block.get('beta')}", f"seed{block.get('seed')}"]
    return ("safety-" if safety else "") + "-".join(parts)


def _stage(node) -> str:
    name = getattr(node, "name", "") or ""
    return "evaluation" if "evaluat" in name else "training"


class MlflowModelHook:
    """Run names and descriptions, dataset inputs, and the registered policy's tags."""

    def __init__(self) -> None:
        self._catalog = None
        self._parameters: Mapping[str, Any] = {}
        self._project = "."
        self._logged: set[tuple[str, str]] = set()
        self._models: dict[str, Any] = {}  # model dataset -> (its ModelInfo, registered name)
        # reports saved before their model (both follow the trained policy, in either order)
        self._pending: dict[str, Mapping[str, Any]] = {}

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        self._catalog, self._logged, self._models, self._pending = catalog, set(), {}, {}
        if mlflow.active_run() is None:
            return
        self._parameters = catalog.load("parameters")
        self._project = run_params.get("project_path") or "."
        names = run_params.get("pipeline_names") or ["__default__"]
        command = shlex.join(["kedro", *sys.argv[1:]]) if sys.argv[1:] else "kedro run"
        mlflow.set_tags(
            {
                "mlflow.runName": run_name(names, self._parameters),
                "mlflow.note.content": f"`{command}`",
            }
        )

    @hook_impl
    def after_dataset_loaded(self, dataset_name: str, data: Any, node) -> None:
        if dataset_name not in INPUT_DATASETS or not isinstance(data, pd.DataFrame):
            return
        context = _stage(node)
        if mlflow.active_run() is None or (dataset_name, context) in self._logged:
            return
        self._logged.add((dataset_name, context))
        _warn_on_failure(lambda: self._log_input(dataset_name, data, context))

    def _log_input(self, dataset_name: str, data: pd.DataFrame, context: str) -> None:
        # a prompts table holds both splits: each stage's input is the split it uses (MLflow
        # keeps one input per dataset digest, so the two also stay apart)
        if "split" in data.columns:
            train = data["split"] == "train"
            data = data[train if context == "training" else ~train]
        dataset = self._catalog.get(dataset_name) if self._catalog else None
        path = getattr(dataset, "_filepath", None)
        with warnings.catch_warnings():
            # MLflow's hint that integer columns cannot hold missing values is about model
            # signatures, not about a dataset input
            warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer")
            source = LocalArtifactDatasetSource(str(path or dataset_name))
            dataset = mlflow.data.from_pandas(data, source=source, name=dataset_name)
            mlflow.log_input(dataset, context=context)

    @hook_impl
    def after_dataset_saved(self, dataset_name: str, data: Any, node) -> None:
        if mlflow.active_run() is None or self._catalog is None:
            return
        if dataset_name in MODEL_DATASETS:
            _warn_on_failure(lambda: self._tag_version(dataset_name))
        elif dataset_name in EVALUATION_DATASETS and isinstance(data, Mapping):
            _warn_on_failure(lambda: self._attach_metrics(EVALUATION_DATASETS[dataset_name], data))

    def _tag_version(self, dataset_name: str) -> None:
        dataset = self._catalog.get(dataset_name)
        info = getattr(dataset, "model_info", None)
        if info is None:
            return
        name = (getattr(dataset, "_save_args", None) or {}).get("registered_model_name")
        self._models[dataset_name] = (info, name)
        if dataset_name in self._pending:
            self._attach_metrics(dataset_name, self._pending.pop(dataset_name))
        version = info.registered_model_version
        if version is None or not name:
            return  # registering is switched off (globals.registered_model: null)
        block = self._parameters.get(MODEL_DATASETS[dataset_name]) or {}
        tags = {key: str(block.get(key, "")) for key in VERSION_TAGS}
        tags["git_commit"] = git_commit(self._project)
        tags["run_name"] = mlflow.active_run().info.run_name or ""
        client = MlflowClient()
        for key, value in tags.items():
            client.set_model_version_tag(name, str(version), key, value)
        logger.info("registered %s version %s (%s)", name, version, tags["run_name"])

    def _attach_metrics(self, model_dataset: str, report: Mapping[str, Any]) -> None:
        if model_dataset not in self._models:
            self._pending[model_dataset] = report
            return
        info, name = self._models[model_dataset]
        metrics = {
            f"heldout.{policy}.{key}": float(value)
            for policy, values in report.items()
            if isinstance(values, Mapping)
            for key, value in values.items()
            if isinstance(value, int | float)
        }
        mlflow.log_metrics(metrics, model_id=info.model_id)
        if info.registered_model_version is not None and name:
            client, version = MlflowClient(), info.registered_model_version
            for key, value in metrics.items():
                client.set_model_version_tag(name, str(version), key, f"{value:.6g}")
