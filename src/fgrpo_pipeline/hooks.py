"""Project hooks: validate every parameter file, and every table a run reads from disk,
before any node runs."""

from __future__ import annotations

import logging

from kedro.framework.hooks import hook_impl

from fgrpo_pipeline.algorithms.labeling import LabelingConfig
from fgrpo_pipeline.experiments.divergence_sweep import DivergenceSweepParams
from fgrpo_pipeline.experiments.safety_sweep import SafetySweepParams
from fgrpo_pipeline.heldout.evaluate import EvaluationConfig
from fgrpo_pipeline.pipelines.arms import remember_session_params
from fgrpo_pipeline.pipelines.base_policy.params import BasePolicyConfig
from fgrpo_pipeline.pipelines.parameters import read_params
from fgrpo_pipeline.pipelines.rollout_generation.nodes import RolloutGenerationConfig
from fgrpo_pipeline.pipelines.safety_base_policy.nodes import SafetyBasePolicyConfig
from fgrpo_pipeline.pipelines.safety_training.params import (
    SafetyEvaluationParams,
    SafetyTrainingParams,
)
from fgrpo_pipeline.pipelines.training.params import TrainingParams
from fgrpo_pipeline.safety.data import (
    SafetyDataConfig,
    validate_pairs,
    validate_records,
    validate_safety_prompts,
)
from fgrpo_pipeline.safety.reward_model import RewardModelConfig
from fgrpo_pipeline.tasks.checks import (
    validate_aligned,
    validate_rollouts,
    validate_sides,
    validate_unaligned,
)
from fgrpo_pipeline.tasks.sources import DataPreparationConfig, validate_prompts

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

# Parameter block -> its class; ``from_params`` builds (and so checks) the block.
PARAMETER_CLASSES = {
    "data_preparation": DataPreparationConfig,
    "base_policy": BasePolicyConfig,
    "rollout_generation": RolloutGenerationConfig,
    "reward_labeling": LabelingConfig,
    "training": TrainingParams,
    "evaluation": EvaluationConfig,
    "safety_data": SafetyDataConfig,
    "reward_model": RewardModelConfig,
    "safety_base_policy": SafetyBasePolicyConfig,
    "safety_training": SafetyTrainingParams,
    "safety_evaluation": SafetyEvaluationParams,
    "comparison": DivergenceSweepParams,
    "safety_comparison": SafetySweepParams,
}


class SweepLayoutHook:
    """Hands the session's parameters to the sweeps' pipelines (their arms are nodes, built
    from the sweep blocks when the pipelines are registered, which follows this hook)."""

    @hook_impl(tryfirst=True)
    def after_context_created(self, context) -> None:
        # the loader's (runtime --params merged in): ``context.params`` would register the
        # pipelines first, to validate the parameters against them
        remember_session_params(context.config_loader["parameters"])


class ParameterValidationHook:
    """Builds each parameter block the run needs (its class in ``PARAMETER_CLASSES``) up front,
    so a typo stops the run at once."""

    # tryfirst: before kedro-mlflow starts the run, so a refused run leaves no MLflow run
    @hook_impl(tryfirst=True)
    def before_pipeline_run(self, run_params, pipeline, catalog) -> None:
        needed = {
            name.removeprefix("params:").split(".")[0]
            for name in pipeline.inputs() | {i for n in pipeline.nodes for i in n.inputs}
            if name.startswith("params:")
        }
        params = catalog.load("parameters")
        checked = sorted(needed & PARAMETER_CLASSES.keys())
        for key in checked:
            if key not in params:
                raise ValueError(f"parameters_{key}.yml: the '{key}' block is missing")
            read_params(PARAMETER_CLASSES[key], params[key])
        logger.info("parameters checked: %s", ", ".join(checked))
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
