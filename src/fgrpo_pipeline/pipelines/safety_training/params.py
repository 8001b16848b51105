"""The ``safety_training`` and ``safety_evaluation`` blocks (parameters_safety_training.yml,
parameters_safety_evaluation.yml)."""

from __future__ import annotations

from dataclasses import dataclass, field

from fgrpo_pipeline.heldout.evaluate import EvaluationConfig
from fgrpo_pipeline.pipelines.parameters import RunParams
from fgrpo_pipeline.pipelines.training.params import TrainingParams
from fgrpo_pipeline.safety.judge import GoldJudge, MonitorConfig


@dataclass
class SafetyTrainingParams(TrainingParams):
    """``safety_training``: the trainer's keys and run keys as in ``training``, with the
    reward-hacking ``monitor`` and the gold ``judge`` (the trainer's correctness measure)
    beside them."""

    BLOCK = "safety_training"

    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    judge: GoldJudge = field(default_factory=GoldJudge)


@dataclass
class SafetyEvaluationParams(RunParams):
    """``safety_evaluation``: the held-out evaluation (EvaluationConfig's keys but its run keys
    ``split``, ``extra_splits`` and ``strata``: the safety evaluation reads the test split
    whole) and the gold ``judge``."""

    BLOCK = "safety_evaluation"
    CONFIG = EvaluationConfig

    config: EvaluationConfig
    judge: GoldJudge = field(default_factory=GoldJudge)

    @classmethod
    def config_keys(cls) -> tuple[str, ...]:
        return tuple(
            key for key in EvaluationConfig.param_names() if key not in EvaluationConfig.RUN_KEYS
        )
