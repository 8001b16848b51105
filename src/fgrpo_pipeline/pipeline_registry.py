"""The project's pipelines, registered by name; ``__default__`` runs them in order."""

from __future__ import annotations

from kedro.pipeline import Pipeline

from fgrpo_pipeline.pipelines import (
    base_policy,
    comparison,
    data_preparation,
    evaluation,
    reward_labeling,
    rollout_generation,
    training,
)

# Order matters for __default__: each stage reads what the previous ones saved.
STAGES = {
    "data_preparation": data_preparation,
    "base_policy": base_policy,
    "rollout_generation": rollout_generation,
    "reward_labeling": reward_labeling,
    "training": training,
    "evaluation": evaluation,
}


def register_pipelines() -> dict[str, Pipeline]:
    pipelines = {name: module.create_pipeline() for name, module in STAGES.items()}
    pipelines["__default__"] = sum(pipelines.values(), Pipeline([]))
    # Not a stage: the divergence sweep, run on its own after the stages it reads from.
    pipelines["comparison"] = comparison.create_pipeline()
    return pipelines
