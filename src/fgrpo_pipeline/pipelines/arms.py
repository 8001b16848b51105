"""Sweep arms as namespaced Kedro pipelines, shared by ``comparison`` and ``safety_comparison``.

Each arm × seed of a sweep is one namespaced copy of a training node and an evaluation node
(namespace ``<sweep>.<arm>_seed<seed>``, e.g. ``comparison.kl_seed0``), whose outputs the
dataset factories of ``catalog_09_sweeps.yml`` save under that name; one summary node reads
every arm's outputs. So kedro-viz draws every arm, ``kedro run --namespaces
comparison.kl_seed0`` runs one alone, and ``--runner=ParallelRunner`` runs arms side by side.

The arms are part of the pipeline's shape, so the sweep's parameter block is read when the
pipelines are registered: from the session's parameters (``--params`` included), which
:class:`fgrpo_pipeline.hooks.SweepLayoutHook` hands over when the context is created, or,
outside a session (``kedro registry``), from the configuration files.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from kedro.pipeline import Node, Pipeline

ARM_TAG = "sweep_arm"  # every node of an arm: the tracking hook opens one MLflow run per arm
TRAIN_NODE, EVALUATE_NODE = "train", "evaluate"
ARM_OUTPUTS = ("trained_policy", "training_metrics", "run")  # the training node's
SUMMARY_INPUTS = ("run", "training_metrics", "evaluation")  # per arm, in this order

_session: dict[str, dict[str, Any]] = {}  # "params": the session's, once handed over


@dataclass(frozen=True)
class ArmSpec:
    """One arm × seed of a sweep: the sweep (its pipeline's name), the arm's label as tables
    show it (``kl``, ``lam=0.5,paper``) and the seed."""

    sweep: str
    label: str
    seed: int

    @property
    def name(self) -> str:
        """The namespace's last part: the label made a Python name (``.`` reads ``p``)."""
        slug = re.sub(r"[^0-9A-Za-z]+", "_", self.label.replace(".", "p")).strip("_")
        return f"{slug}_seed{self.seed}"

    @property
    def namespace(self) -> str:
        return f"{self.sweep}.{self.name}"

    @property
    def run_name(self) -> str:
        """The arm's MLflow child run name."""
        return f"{self.label}-seed{self.seed}"

    def dataset(self, name: str) -> str:
        return f"{self.namespace}.{name}"


class ArmFunction:
    """``func`` with one arm's keyword arguments bound: named as ``func`` (Kedro and kedro-viz
    show it) and picklable by reference (ParallelRunner sends nodes to workers, where a
    ``functools.partial`` arrives without its name)."""

    def __init__(self, func: Callable[..., Any], **kwargs: Any) -> None:
        self.func, self.kwargs = func, kwargs
        self.__name__ = self.__qualname__ = func.__name__
        self.__module__, self.__doc__ = func.__module__, func.__doc__
        # typing.get_type_hints (Kedro's parameter validation) reads these
        self.__annotations__, self.__wrapped__ = func.__annotations__, func

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(functools.partial(self.func, **self.kwargs))

    def __call__(self, *args: Any) -> Any:
        return self.func(*args, **self.kwargs)


def arm_pipeline(
    spec: ArmSpec,
    *,
    train: Callable[..., Any],
    evaluate: Callable[..., Any],
    train_inputs: Sequence[str],
    evaluate_inputs: Sequence[str],
    evaluate_outputs: Sequence[str] = ("evaluation",),
) -> Pipeline:
    """One arm's namespaced training and evaluation nodes. ``train(*train_inputs, label=,
    seed=)`` returns ``ARM_OUTPUTS``; ``evaluate(trained_policy, *evaluate_inputs)`` returns
    ``evaluate_outputs``. The inputs are shared by every arm (not namespaced)."""
    arm = {"label": spec.label, "seed": spec.seed}
    nodes = [
        Node(
            ArmFunction(train, **arm),
            inputs=list(train_inputs),
            outputs=list(ARM_OUTPUTS),
            name=TRAIN_NODE,
            tags=[ARM_TAG],
        ),
        Node(
            evaluate,
            inputs=["trained_policy", *evaluate_inputs],
            outputs=evaluate_outputs[0] if len(evaluate_outputs) == 1 else list(evaluate_outputs),
            name=EVALUATE_NODE,
            tags=[ARM_TAG],
        ),
    ]
    shared = {*train_inputs, *evaluate_inputs}
    return Pipeline(
        nodes,
        namespace=spec.namespace,
        inputs={name for name in shared if not name.startswith("params:")},
        parameters={name for name in shared if name.startswith("params:")},
    )


def headline_metrics(
    table: pd.DataFrame, key: Callable[[Any], str], columns: Sequence[str]
) -> dict[str, dict[str, float]]:
    """The summary table's ``columns`` as the pipeline run's metrics (kedro-mlflow's metrics
    dataset: ``{"<key(row)>/<column>": {"value": v, "step": 0}}``), the non-missing ones."""
    return {
        f"{key(row)}/{column}": {"value": float(row[column]), "step": 0}
        for _, row in table.iterrows()
        for column in columns
        if pd.notna(row[column])
    }


def summary_inputs(specs: Iterable[ArmSpec], names: Sequence[str] = SUMMARY_INPUTS) -> list[str]:
    """Every arm's ``names`` datasets, arm by arm: the summary node's arm inputs."""
    return [spec.dataset(name) for spec in specs for name in names]


def per_arm(values: Sequence[Any], width: int = len(SUMMARY_INPUTS)) -> list[tuple[Any, ...]]:
    """The summary node's arm inputs back in groups of ``width`` (one group per arm)."""
    if len(values) % width:
        raise ValueError(f"expected {width} inputs per arm, got {len(values)} in all")
    return [tuple(values[i : i + width]) for i in range(0, len(values), width)]


def remember_session_params(params: Mapping[str, Any] | None) -> None:
    """The session's parameters, for the pipelines registered after (None forgets them)."""
    _session.pop("params", None)
    if params is not None:
        _session["params"] = dict(params)


def sweep_block(block: str) -> dict[str, Any]:
    """The ``block`` parameters the sweep's arms are built from: the session's, else those of
    the configuration files (``conf/base`` under ``$KEDRO_ENV`` or ``local``)."""
    params = _session["params"] if "params" in _session else _configured_params()
    value = params.get(block)
    if not isinstance(value, Mapping):
        raise ValueError(f"parameters_{block}.yml: the '{block}' block is missing")
    return dict(value)


def _configured_params() -> dict[str, Any]:
    from kedro.config import OmegaConfigLoader
    from kedro.framework.project import settings
    from kedro.utils import find_kedro_project

    project = find_kedro_project(Path.cwd()) or Path.cwd()
    loader = OmegaConfigLoader(
        conf_source=str(project / settings.CONF_SOURCE),
        env=os.environ.get("KEDRO_ENV"),
        **settings.CONFIG_LOADER_ARGS,
    )
    return dict(loader["parameters"])


def run_record(spec: ArmSpec, run: Any, trained: Any, tags: Mapping[str, str]) -> dict[str, Any]:
    """What an arm's training node saves beside the policy (``<arm>.run``, JSON): the arm,
    its MLflow child run's name, tags and parameters (the trainer configuration), its
    steps and times. ``run`` a :class:`~fgrpo_pipeline.experiments.sweep.SweepRun`,
    ``trained`` a :class:`~fgrpo_pipeline.experiments.sweep.TrainedArm`."""
    return {
        "sweep": spec.sweep,
        "label": spec.label,
        "seed": spec.seed,
        "namespace": spec.namespace,
        "run_name": spec.run_name,
        "tags": {**tags, "sweep": spec.sweep},
        "params": run.config.to_dict(),
        "steps": run.config.steps,
        "train_time": trained.train_time,
        "started": trained.started,
    }


SWEEPS = ("comparison", "safety_comparison")  # the pipelines whose arms are namespaced


def is_arm_dataset(name: str) -> bool:
    """Whether ``name`` is one of an arm's datasets (``<sweep>.<arm>.<name>``)."""
    parts = name.split(".")
    return len(parts) == 3 and parts[0] in SWEEPS
