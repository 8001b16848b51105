"""Kedro settings: hooks and configuration loading."""

from fgrpo_pipeline.hooks import ParameterValidationHook
from fgrpo_pipeline.mlflow_tracking import MlflowArtifactHook

HOOKS = (ParameterValidationHook(), MlflowArtifactHook())

CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
}
