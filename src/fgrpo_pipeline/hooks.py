"""Project hooks: validate every parameter file, and every table a run reads from disk,
before any node runs."""

from __future__ import annotations

import logging

from kedro.framework.hooks import hook_impl

from fgrpo_pipeline.pipelines.base_policy.nodes import check_params as check_base_policy
from fgrpo_pipeline.pipelines.comparison.nodes import check_params as check_comparison
from fgrpo_pipeline.pipelines.data_preparation.nodes import check_params as check_data
from fgrpo_pipeline.pipelines.evaluation.nodes import check_params as check_evaluation
from fgrpo_pipeline.pipelines.reward_labeling.nodes import check_params as check_labeling
from fgrpo_pipeline.pipelines.reward_model.nodes import check_params as check_reward_model
from fgrpo_pipeline.pipelines.rollout_generation.nodes import check_params as check_rollouts
from fgrpo_pipeline.pipelines.safety_base_policy.nodes import check_params as check_safety_base
from fgrpo_pipeline.pipelines.safety_comparison.nodes import check_params as check_safety_sweep
from fgrpo_pipeline.pipelines.safety_data.nodes import check_params as check_safety_data
from fgrpo_pipeline.pipelines.safety_training.nodes import check_evaluation_params
from fgrpo_pipeline.pipelines.safety_training.nodes import check_params as check_safety_training
from fgrpo_pipeline.pipelines.training.nodes import check_params as check_training
from fgrpo_pipeline.safety.data import validate_records
from fgrpo_pipeline.tasks.checks import (
    validate_aligned,
    validate_pairs,
    validate_rollouts,
    validate_safety_prompts,
    validate_sides,
    validate_unaligned,
)
from fgrpo_pipeline.tasks.sources import validate_prompts

logger = logging.getLogger(__name__)

# Tables a run may read from disk (written by an earlier run, or replaced by a user), checked
# before the first node: dataset name -> check(table, source).
INPUT_CHECKS = {
    "prompts": validate_prompts,
    "rollouts": validate_rollouts,
    "aligned": validate_aligned,
    "unaligned": validate_unaligned,
    "safety_records": validate_records,
    "safety_prompts": validate_safety_prompts,
    "safety_aligned": validate_sides,
    "safety_unaligned": validate_sides,
    "reward_pairs_train": validate_pairs,
    "reward_pairs_test": validate_pairs,
}

CHECKS = {
    "data_preparation": check_data,
    "base_policy": check_base_policy,
    "rollout_generation": check_rollouts,
    "reward_labeling": check_labeling,
    "training": check_training,
    "evaluation": check_evaluation,
    "comparison": check_comparison,
    "safety_data": check_safety_data,
    "reward_model": check_reward_model,
    "safety_base_policy": check_safety_base,
    "safety_training": check_safety_training,
    "safety_evaluation": check_evaluation_params,
    "safety_comparison": check_safety_sweep,
}


class ParameterValidationHook:
    """Runs each pipeline's parameter check up front, so a typo stops the run at once."""

    @hook_impl
    def before_pipeline_run(self, run_params, pipeline, catalog) -> None:
        needed = {
            name.removeprefix("params:").split(".")[0]
            for name in pipeline.inputs() | {i for n in pipeline.nodes for i in n.inputs}
            if name.startswith("params:")
        }
        params = catalog.load("parameters")
        for key in sorted(needed & CHECKS.keys()):
            if key not in params:
                raise ValueError(f"parameters_{key}.yml: the '{key}' block is missing")
            CHECKS[key](params[key])
        logger.info("parameters checked: %s", ", ".join(sorted(needed & CHECKS.keys())))
        check_inputs(pipeline, catalog)


def _writers(dataset: str) -> list[str]:
    from kedro.framework.project import pipelines

    return sorted(
        name
        for name, pipe in pipelines.items()
        if name != "__default__" and dataset in pipe.all_outputs()
    )


def check_inputs(pipeline, catalog) -> None:
    """Load and check each table the run reads but does not write, naming its file."""
    for name in sorted(pipeline.inputs() & INPUT_CHECKS.keys()):
        dataset = catalog.get(name)
        where = getattr(dataset, "_filepath", None)
        source = f"{name} ({where})" if where else name
        if not catalog.exists(name):
            raise ValueError(
                f"{source}: no saved data; run a pipeline that writes it first "
                f"({', '.join(_writers(name)) or 'none registered'})"
            )
        INPUT_CHECKS[name](catalog.load(name), source)
