"""MLflow tracking (the Kedro layer, never imported by the core): artifacts, per-step
metrics and tags of every run (:mod:`.artifacts`), and the trained policy as a registered
MLflow Model with the run's name, description and dataset inputs (:mod:`.models`)."""

from fgrpo_pipeline.tracking.artifacts import (
    COMPLETIONS_DATASETS,
    METRICS_DATASETS,
    MlflowArtifactHook,
    MlflowAvailabilityHook,
    UnavailableTrackingWarning,
    artifact_dir,
    flatten_params,
    git_commit,
    local_path,
    log_completion_tables,
    log_step_metrics,
    metric_name,
    store_problem,
)
from fgrpo_pipeline.tracking.models import MlflowModelHook, run_name

__all__ = [
    "COMPLETIONS_DATASETS",
    "METRICS_DATASETS",
    "MlflowArtifactHook",
    "MlflowAvailabilityHook",
    "MlflowModelHook",
    "UnavailableTrackingWarning",
    "artifact_dir",
    "flatten_params",
    "git_commit",
    "local_path",
    "log_completion_tables",
    "log_step_metrics",
    "metric_name",
    "run_name",
    "store_problem",
]
