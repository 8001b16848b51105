"""MLflow tracking of every persisted catalog artifact (Kedro layer, not the core).

kedro-mlflow owns the run's lifecycle (one run per ``kedro run``, FAILED on error) and logs
every ``params:`` input. This hook adds what it does not do:

* every dataset a run saves to a local file or folder becomes an artifact under
  ``<data layer folder>/<dataset name>/`` (e.g. ``05_model_input/aligned/aligned.parquet``);
* ``training_metrics`` and ``safety_training_metrics`` are logged as per-step metrics (``step=``);
* ``training_completions`` is also logged as one ``mlflow.log_table`` per logging step,
  beside its parquet file (``07_model_output/training_completions/step_000050.json``);
* tags: the pipelines run, the git commit, and the training loss, divergence, λ and seed.

Everything is skipped when no MLflow run is active (tracking switched off in mlflow.yml).

``MlflowAvailabilityHook`` runs first: when the tracking store cannot be reached, the run goes
on untracked (a warning says so) instead of failing, so its outputs still reach the catalog.
A logging call that fails later in the run is a warning too, never a lost output.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
import warnings
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import mlflow
import pandas as pd
from kedro.framework.hooks import hook_impl
from kedro.framework.project import pipelines
from kedro.io import AbstractVersionedDataset
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from fgrpo_pipeline.pipelines.arms import is_arm_dataset

logger = logging.getLogger(__name__)

# Per-step tables logged as MLflow metrics, and completions tables logged as MLflow tables.
METRICS_DATASETS = ("training_metrics", "safety_training_metrics")
COMPLETIONS_DATASETS = ("training_completions", "safety_training_completions")
MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch call
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. :/]")
_LAYER = re.compile(r"^\d\d_\w+$")


def metric_name(name: str) -> str:
    """``name`` with characters MLflow rejects replaced by ``_``."""
    return _UNSAFE.sub("_", str(name))


def local_path(dataset: Any) -> Path | None:
    """The local file or folder a dataset saved to (its latest version), or None (also for
    kedro-mlflow's datasets, which log to MLflow themselves)."""
    if any(cls.__module__.startswith("kedro_mlflow.") for cls in type(dataset).__mro__):
        return None
    if isinstance(dataset, AbstractVersionedDataset):
        path = dataset._get_load_path()  # after a save: the version just written
    else:
        path = getattr(dataset, "_path", None) or getattr(dataset, "_filepath", None)
    if path is None or getattr(dataset, "_protocol", "file") not in ("file", None):
        return None
    path = Path(str(path))
    return path if path.exists() else None


def artifact_dir(dataset_name: str, path: Path) -> str:
    """``<layer folder>/<dataset name>``: the data layer comes from the path (``08_reporting``)."""
    layer = next((part for part in path.parts if _LAYER.match(part)), "other")
    return str(PurePosixPath(layer, dataset_name))


def git_commit(project_path: str | Path) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=project_path,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def log_step_metrics(metrics: pd.DataFrame, *, run_id: str, prefix: str = "train/") -> int:
    """Every numeric column of a per-step table as a metric with ``step=``; returns the count."""
    client = MlflowClient()
    now = int(time.time() * 1000)
    columns = [
        c for c in metrics.columns if c != "step" and pd.api.types.is_numeric_dtype(metrics[c])
    ]
    entries = [
        Metric(metric_name(prefix + column), float(value), now, int(step))
        for step, row in zip(metrics["step"], metrics[columns].itertuples(index=False), strict=True)
        for column, value in zip(columns, row, strict=True)
        if value is not None and math.isfinite(float(value))
    ]
    for start in range(0, len(entries), MAX_BATCH):
        client.log_batch(run_id, metrics=entries[start : start + MAX_BATCH])
    return len(entries)


def flatten_params(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested parameters as ``{"a.b": value}``."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def log_completion_tables(completions: pd.DataFrame, directory: str) -> int:
    """One MLflow table per logging step, ``<directory>/step_000050.json``; returns the count."""
    steps = sorted(completions["step"].unique()) if len(completions) else []
    for step in steps:
        table = completions[completions["step"] == step].drop(columns="step")
        mlflow.log_table(
            table.reset_index(drop=True), artifact_file=f"{directory}/step_{step:06d}.json"
        )
    return len(steps)


# Switched on for the probe only: MLflow retries an unreachable server for minutes by default.
_PROBE_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def store_problem(uri: str) -> str | None:
    """Why the tracking store at ``uri`` cannot be used, or None when it answers."""
    saved = {k: os.environ.get(k) for k in _PROBE_ENV}
    os.environ.update(_PROBE_ENV)
    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        return None
    except Exception as err:  # any store error: the point is not to fail the run on it
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class UnavailableTrackingWarning(UserWarning):
    """The MLflow tracking store did not answer: the run goes on untracked."""


class MlflowAvailabilityHook:
    """Before kedro-mlflow sets up tracking, check that the store answers; if it does not,
    run untracked with a warning: every pipeline's tracking is switched off and kedro-mlflow
    is pointed at a throwaway local store, so the catalog outputs are still written."""

    @hook_impl(tryfirst=True)
    def after_context_created(self, context) -> None:
        loader = context.config_loader
        if "mlflow" not in loader.config_patterns:
            loader.config_patterns.update({"mlflow": ["mlflow*", "mlflow*/**", "**/mlflow*"]})
        try:
            conf = dict(loader["mlflow"])
        except Exception:  # no mlflow.yml: kedro-mlflow's defaults, nothing to probe here
            return
        server = dict(conf.get("server") or {})
        uri = server.get("mlflow_tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri or "://" not in str(uri):
            return  # a plain path: kedro-mlflow makes it a local file store under the project
        problem = store_problem(str(uri))
        if problem is None:
            return
        # A warning (shown by Kedro as a log line) rather than a log record: it also reaches
        # whoever drives the session from Python.
        warnings.warn(
            f"MLflow tracking store {uri} is unavailable ({problem}): this run is NOT "
            "tracked; its outputs are still saved to the catalog. Fix mlflow.yml's "
            "mlflow_tracking_uri or start the server, then rerun to track.",
            UnavailableTrackingWarning,
            stacklevel=2,
        )
        fallback = Path(tempfile.mkdtemp(prefix="fgrpo-untracked-")) / "mlflow.db"
        atexit.register(shutil.rmtree, fallback.parent, ignore_errors=True)
        tracking = dict(conf.get("tracking") or {})
        disable = dict(tracking.get("disable_tracking") or {})
        disable["pipelines"] = sorted(pipelines.keys() | {"__default__"})
        tracking["disable_tracking"] = disable
        server.update(mlflow_tracking_uri=f"sqlite:///{fallback}", mlflow_registry_uri=None)
        loader["mlflow"] = {**conf, "server": server, "tracking": tracking}


def _warn_on_failure(action):
    """Run a logging ``action``; a failing store costs a warning, not the run."""
    try:
        action()
    except Exception as err:
        logger.warning(
            "MLflow logging failed (%s: %s); the catalog output is saved", type(err).__name__, err
        )


class MlflowArtifactHook:
    """Logs saved datasets, per-step metrics, completions tables and run tags to MLflow."""

    def __init__(self) -> None:
        self._catalog = None

    @hook_impl
    def after_catalog_created(self, catalog) -> None:
        self._catalog = catalog

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        # kedro-mlflow's own before_pipeline_run (registered later, so called first) has
        # started the run by now.
        if mlflow.active_run() is None:
            return
        self._catalog = catalog
        names = run_params.get("pipeline_names") or ["__default__"]
        block = "safety_training" if any(n.startswith("safety") for n in names) else "training"
        training = catalog.load("parameters").get(block, {})
        tags = {
            "pipelines": ",".join(names),
            "git_commit": git_commit(run_params.get("project_path") or "."),
            "loss": training.get("loss", ""),
            "divergence": training.get("divergence", ""),
            "lam": training.get("lam", ""),
            "seed": training.get("seed", ""),
        }
        if "comparison" in names:  # a sweep: each child run carries its own method and seed
            tags.update(loss="sweep", divergence="sweep", seed="sweep")
        if "safety_comparison" in names:  # each child run carries its own λ and seed
            tags.update(lam="sweep", seed="sweep")
        mlflow.set_tags(tags)

    @hook_impl
    def after_dataset_saved(self, dataset_name: str, data: Any, node) -> None:
        run = mlflow.active_run()
        if run is None or self._catalog is None or is_arm_dataset(dataset_name):
            return  # an arm's outputs belong to its child run (tracking.sweep_runs)
        path = local_path(self._catalog.get(dataset_name))
        if path is None:
            return  # in memory, or on a remote store that MLflow can point at instead
        _warn_on_failure(lambda: self._log_dataset(dataset_name, data, path, run.info.run_id))

    @staticmethod
    def _log_dataset(dataset_name: str, data: Any, path: Path, run_id: str) -> None:
        destination = artifact_dir(dataset_name, path)
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=destination)
        else:
            mlflow.log_artifact(str(path), artifact_path=destination)
        if dataset_name in METRICS_DATASETS and isinstance(data, pd.DataFrame) and len(data):
            log_step_metrics(data, run_id=run_id)
        if dataset_name in COMPLETIONS_DATASETS and isinstance(data, pd.DataFrame):
            log_completion_tables(data, destination)
