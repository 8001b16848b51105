"""Kedro settings: hooks and configuration loading."""

from fgrpo_pipeline.hooks import ParameterValidationHook
from fgrpo_pipeline.mlflow_tracking import MlflowArtifactHook, MlflowAvailabilityHook

HOOKS = (MlflowAvailabilityHook(), ParameterValidationHook(), MlflowArtifactHook())

CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # An environment's parameters (e.g. conf/qwen_math) override base key by key, so they state
    # only what differs; its globals.yml replaces base's whole (reward weights must not merge).
    "merge_strategy": {"parameters": "soft"},
}
