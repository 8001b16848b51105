"""The project's pipelines, registered by name; ``__default__`` runs them in order."""

from __future__ import annotations

from kedro.pipeline import Pipeline

from fgrpo_pipeline.pipelines import (
    base_policy,
    comparison,
    data_preparation,
    evaluation,
    reward_labeling,
    reward_model,
    rollout_generation,
    safety_base_policy,
    safety_comparison,
    safety_data,
    safety_training,
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
# The safety setting (f-HAL with a learned reward model), in order.
SAFETY_STAGES = {
    "safety_data": safety_data,
    "reward_model": reward_model,
    "safety_base_policy": safety_base_policy,
    "safety_training": safety_training,
}


def register_pipelines() -> dict[str, Pipeline]:
    pipelines = {name: module.create_pipeline() for name, module in STAGES.items()}
    pipelines["__default__"] = sum(pipelines.values(), Pipeline([]))
    # Not a stage: the divergence sweep, run on its own after the stages it reads from.
    pipelines["comparison"] = comparison.create_pipeline()

    safety = {name: module.create_pipeline() for name, module in SAFETY_STAGES.items()}
    pipelines.update(safety)
    # One λ from parameters_safety_training.yml, from the data up.
    pipelines["safety"] = sum(safety.values(), Pipeline([]))
    # The λ sweep from the data up, so one command runs it from a fresh clone; rerun one arm
    # with --namespaces=safety_comparison.<arm>, the table with --nodes=compare_safety_node.
    prerequisites = sum(
        (safety[name] for name in ("safety_data", "reward_model", "safety_base_policy")),
        Pipeline([]),
    )
    pipelines["safety_comparison"] = prerequisites + safety_comparison.create_pipeline()
    return pipelines
