"""Kedro settings: hooks and configuration loading."""

from fgrpo_pipeline.hooks import ParameterValidationHook

HOOKS = (ParameterValidationHook(),)

CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
}
