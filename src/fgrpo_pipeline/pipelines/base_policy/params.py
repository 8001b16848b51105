"""The ``base_policy`` block (parameters_base_policy.yml) and its supervised warm-up.

:class:`WarmupConfig` holds the options of ``training.warmup.supervised_warmup``; it belongs
in that core module and is kept here, in the Kedro layer, until it moves there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fgrpo_pipeline.algorithms.params import Params, require, require_choice
from fgrpo_pipeline.models.policy import PretrainedConfig, TinyModelConfig


@dataclass
class WarmupConfig(Params):
    """Supervised warm-up on the answers (``warmup``): AdamW with a linear ramp over the
    first 5 % of steps, then cosine decay to 10 % of ``learning_rate``."""

    BLOCK = "warmup"

    steps: int = 450
    batch_size: int = 64
    learning_rate: float = 0.002
    weight_decay: float = 0.0

    def check(self) -> None:
        require(self.steps >= 0, "steps", f"must be ≥ 0, got {self.steps}")
        require(self.batch_size >= 1, "batch_size", f"must be ≥ 1, got {self.batch_size}")
        require(
            math.isfinite(self.learning_rate) and self.learning_rate > 0,
            "learning_rate",
            f"must be a finite number > 0, got {self.learning_rate}",
        )
        require(self.weight_decay >= 0, "weight_decay", f"must be ≥ 0, got {self.weight_decay}")


@dataclass
class BasePolicyConfig(Params):
    """``base_policy``: a tiny policy built locally and warmed up (``source: tiny``: ``model``,
    ``warmup``) or a pretrained model as it is (``source: pretrained``: ``pretrained``)."""

    BLOCK = "base_policy"
    RUN_KEYS = ("progress",)
    SOURCES = ("tiny", "pretrained")

    source: str = "tiny"
    pretrained: PretrainedConfig = field(default_factory=PretrainedConfig)
    seed: int = 0
    num_threads: int = 0
    progress: bool = True
    model: TinyModelConfig = field(default_factory=TinyModelConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)

    def check(self) -> None:
        require_choice(self.source, self.SOURCES, "source")
        require(self.num_threads >= 0, "num_threads", f"must be ≥ 0, got {self.num_threads}")
        if self.source == "pretrained":
            require(
                bool(self.pretrained.model),
                "pretrained.model",
                "(a hub id or a save_pretrained directory) is not set",
            )
