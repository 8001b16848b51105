"""The ``training`` block (parameters_training.yml): TrainerConfig's keys, with the run keys
``progress`` and ``resume_dir`` beside them.

The run keys belong on ``TrainerConfig`` itself (training/config.py); until they move there,
:class:`TrainingParams` is the one place that separates them from the trainer's keys.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from fgrpo_pipeline.algorithms.losses import LossConfig
from fgrpo_pipeline.pipelines.parameters import RunParams
from fgrpo_pipeline.training.config import RUN_KEYS as TRAINER_RUN_KEYS
from fgrpo_pipeline.training.config import TrainerConfig, check_run_params


@dataclass
class TrainingParams(RunParams):
    """``training``: the trainer's configuration (``config``), and how the run is shown
    (``progress``) and where its full state is saved to resume from (``resume_dir``).

    Also checked against the processes the run is launched in (``prompts_per_step`` divisible
    across them, mixed precision), so a multi-process run (``python -m fgrpo_pipeline.launch
    kedro``) fails before any node runs."""

    BLOCK = "training"
    CONFIG = TrainerConfig
    RUN_KEYS = TRAINER_RUN_KEYS  # the fields below `config`

    config: TrainerConfig
    progress: bool = True
    resume_dir: str | None = None

    @classmethod
    def config_keys(cls) -> tuple[str, ...]:
        # the loss's options sit beside the trainer's keys (``loss`` names it)
        loss_options = [f.name for f in fields(LossConfig) if f.name != "name"]
        return (*[f.name for f in fields(TrainerConfig)], *loss_options)

    @classmethod
    def build_config(cls, params: dict[str, Any], where: str) -> TrainerConfig:
        return TrainerConfig.from_params(params)

    def check(self) -> None:
        check_run_params(
            {"resume_dir": self.resume_dir, "checkpoint_every": self.config.checkpoint_every}
        )
        self.config.check_launch()
