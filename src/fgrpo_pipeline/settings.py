"""Kedro settings: hooks and configuration loading.

Also the one place third-party warnings are filtered, before anything below imports MLflow,
kedro-mlflow or transformers: Kedro imports this module while bootstrapping the project,
before any plugin command, hook or session runs. See docs/testing.md, "Warnings".
"""

import logging
import sys
import warnings

from kedro import KedroDeprecationWarning

# Warnings about third-party code, not about this project: deprecations inside the libraries
# (FutureWarning, DeprecationWarning and its subclasses such as pandas' Pandas4Warning and
# SQLAlchemy's SADeprecationWarning) attributed to a module of one of these packages. A
# warning about how *our* code calls a library is attributed to our module (stacklevel) and
# still shows, as do fgrpo_pipeline's own warnings (e.g. UnavailableTrackingWarning).
THIRD_PARTY = (
    "accelerate",
    "alembic",
    "click",
    "datasets",
    "huggingface_hub",
    "kedro",
    "kedro_datasets",
    "kedro_mlflow",
    "kedro_telemetry",
    "kedro_viz",
    "matplotlib",
    "mlflow",
    "omegaconf",
    "pandas",
    "peft",
    "pluggy",
    "pyarrow",
    "pydantic",
    "sqlalchemy",
    "torch",
    "transformers",
)
_THIRD_PARTY_MODULE = rf"({'|'.join(THIRD_PARTY)})(\.|$)"

# omegaconf deprecates register_new_resolver(), which Kedro's config loader and kedro-mlflow's
# hook still call: three UserWarnings per run, about their code.
THIRD_PARTY_USER_WARNINGS = (
    (r"register_new_resolver\(\) is deprecated", r"(kedro|kedro_mlflow)(\.|$)"),
    # the sweep summary nodes read their arms' outputs by namespaced name on purpose
    # (comparison.kl_seed0.evaluation: pipelines/arms.py); Kedro points at the caller
    (r"One or more dataset names contain '\.' characters", r"fgrpo_pipeline\.pipelines\."),
)
# MLflow asks for type hints on the `predict` of every PythonModel subclass, and kedro-mlflow
# defines one (KedroPipelineModel) when its CLI plugin is imported. MLflow raises it under its
# own `simplefilter("once", UserWarning)` (mlflow.utils.annotations.filter_user_warnings_once),
# which outranks any warnings filter, so it is dropped where Kedro logs warnings instead: the
# `py.warnings` logger (Kedro's RichHandler turns logging.captureWarnings on).
DROPPED_WARNING_LOGS = ("Add type hints to the `predict` method",)


class _DropWarningLogs(logging.Filter):
    """Drops the `py.warnings` records whose text holds one of ``fragments``."""

    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(fragment in text for fragment in self.fragments)


def filter_third_party_warnings() -> None:
    """Hide the warnings above; a run started with ``-W``, ``PYTHONWARNINGS`` or ``-X dev``
    (e.g. ``PYTHONWARNINGS=default kedro run``, to see what an upgrade would break) keeps its
    own filters instead."""
    if sys.warnoptions:
        return
    for category in (FutureWarning, DeprecationWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=_THIRD_PARTY_MODULE)
    for message, module in THIRD_PARTY_USER_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=UserWarning, module=module)
    # Kedro's own deprecation notices are about how this project uses Kedro: they stay shown,
    # once per location, as Kedro itself sets them up (kedro/__init__.py).
    warnings.filterwarnings("default", category=KedroDeprecationWarning)
    logging.getLogger("py.warnings").addFilter(_DropWarningLogs(DROPPED_WARNING_LOGS))


filter_third_party_warnings()

# Imported after the filters on purpose: these imports load MLflow and kedro-mlflow.
from fgrpo_pipeline.hooks import ParameterValidationHook, SweepLayoutHook  # noqa: E402
from fgrpo_pipeline.tracking import (  # noqa: E402
    MlflowArtifactHook,
    MlflowAvailabilityHook,
    MlflowModelHook,
)
from fgrpo_pipeline.tracking.sweep_runs import SweepRunHook  # noqa: E402

HOOKS = (
    SweepLayoutHook(),
    MlflowAvailabilityHook(),
    ParameterValidationHook(),
    MlflowArtifactHook(),
    MlflowModelHook(),
    SweepRunHook(),
)

CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # An environment's parameters (e.g. conf/qwen_math) override base key by key, so they state
    # only what differs; its globals.yml replaces base's whole (reward weights must not merge).
    "merge_strategy": {"parameters": "soft"},
}
