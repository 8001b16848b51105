"""The configuration of the online loop (``training`` in parameters_training.yml).

Plain Python (no Kedro, no MLflow): :class:`TrainerConfig` validates every value when built,
so a bad parameter stops a run before any work, with one message naming it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from fgrpo_pipeline.algorithms.advantages import ADVANTAGE_SCALES
from fgrpo_pipeline.algorithms.losses import LossConfig
from fgrpo_pipeline.algorithms.rewards import REWARDS, combine_rewards
from fgrpo_pipeline.models.lora import LoraSettings
from fgrpo_pipeline.rollout import ENGINES, SamplingConfig, checked_engine_options
from fgrpo_pipeline.training.distributed import MIXED_PRECISIONS, check_launch


@dataclass
class TrainerConfig:
    """Parameters of the online loop (``training`` in parameters_training.yml)."""

    steps: int = 200
    prompts_per_step: int = 16
    group_size: int = 8
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    advantage_scale: str = "group"
    rewards: dict[str, float] = field(default_factory=lambda: {"exact_number": 1.0})
    correctness_reward: str = "exact_number"
    engine: str = "hf"
    engine_options: dict[str, Any] = field(default_factory=dict)
    lora: dict[str, Any] | None = None
    offline_batch_size: int = 16
    micro_batch_size: int = 0
    checkpoint_every: int = 0
    log_completions_every: int = 0
    num_threads: int = 0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    share_prompts: bool = True
    score_reference: bool = True
    length_buckets: int = 4
    keep_freed_memory: bool = True
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    engine_is_correction: bool | str = "auto"
    engine_is_cap: float = 2.0
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    def __post_init__(self) -> None:
        self._check_numbers()
        self._check_choices()
        self._check_components()
        self._check_top_p()

    def _check_numbers(self) -> None:
        for name in _INT_FIELDS:
            value = getattr(self, name)
            _require(
                isinstance(value, int) and not isinstance(value, bool), name, "must be an integer"
            )
        for name in ("steps", "prompts_per_step", "offline_batch_size", "length_buckets"):
            _require(getattr(self, name) >= 1, name, "must be ≥ 1")
        _require(self.group_size >= 2, "group_size", "must be ≥ 2 (advantages compare G ≥ 2)")
        _require(
            math.isfinite(self.learning_rate) and self.learning_rate > 0,
            "learning_rate",
            "must be > 0",
        )
        _require(self.max_grad_norm > 0, "max_grad_norm", "must be > 0")
        for name in (
            "checkpoint_every",
            "log_completions_every",
            "num_threads",
            "weight_decay",
            "micro_batch_size",
        ):
            _require(getattr(self, name) >= 0, name, "must be ≥ 0")
        _require(
            0 <= self.warmup_steps <= self.steps,
            "warmup_steps",
            f"must lie in [0, steps={self.steps}]",
        )
        _require(
            isinstance(self.engine_is_cap, (int, float))
            and not isinstance(self.engine_is_cap, bool)
            and 1 <= self.engine_is_cap < math.inf,
            "engine_is_cap",
            "must be a finite number ≥ 1",
        )

    def _check_choices(self) -> None:
        if self.mixed_precision is False:  # YAML 1.1 reads an unquoted `no` as false
            self.mixed_precision = "no"
        _require(
            self.mixed_precision in MIXED_PRECISIONS,
            "mixed_precision",
            f"must be one of {', '.join(MIXED_PRECISIONS)}",
        )
        for name in (
            "gradient_checkpointing",
            "share_prompts",
            "keep_freed_memory",
            "score_reference",
        ):
            _require(isinstance(getattr(self, name), bool), name, "must be true or false")
        _require(
            self.score_reference or not self.loss_uses_reference(),
            "score_reference",
            f"false needs a loss that does not use π_ref; loss {self.loss.name!r}"
            f"{f' with kl_coef={self.loss.kl_coef}' if self.loss.name == 'grpo' else ''} "
            "does (only grpo with kl_coef: 0 can skip it)",
        )
        _require(
            self.advantage_scale in ADVANTAGE_SCALES,
            "advantage_scale",
            f"must be one of {', '.join(ADVANTAGE_SCALES)}",
        )
        _require(
            self.lr_schedule in LR_SCHEDULES,
            "lr_schedule",
            f"must be one of {', '.join(LR_SCHEDULES)}",
        )
        _require(
            self.engine_is_correction in (True, False, "auto"),
            "engine_is_correction",
            "must be auto, true or false",
        )

    def _check_components(self) -> None:
        """The engine, LoRA and rewards named: each registry or settings class checks its own."""
        ENGINES.check(self.engine, "training.engine")
        self.engine_options = checked_engine_options(
            self.engine, self.engine_options, "training parameter 'engine_options'"
        )
        if self.lora is not None:
            self.lora = dict(self.lora)
            LoraSettings.from_params(self.lora)
        REWARDS.check(self.correctness_reward, "training.correctness_reward")
        combine_rewards(self.rewards)  # validates names and weights

    def _check_top_p(self) -> None:
        if self.sampling.top_p < 1 and self.sampling.do_sample and self._needs_old_logps():
            _require(
                self.corrects_engine(),
                "sampling.top_p",
                f"= {self.sampling.top_p} < 1 samples from the nucleus-truncated distribution, "
                f"which the policy's log-probs (π_old of loss {self.loss.name!r}"
                f"{' with snis weights' if self.loss.weights == 'snis' else ''}) do not "
                "describe: set top_p: 1.0, or engine_is_correction: true to weight by "
                "π_old/π_sampled",
            )

    def loss_uses_reference(self) -> bool:
        """Whether the loss reads π_ref: every loss but GRPO without its KL term."""
        return self.loss.name != "grpo" or self.loss.kl_coef > 0

    def uses_offline_data(self) -> bool:
        """FDO and DPO train on preference data when given; f-HAL needs it when λ > 0."""
        return self.loss.name in ("fdo", "dpo") or (self.loss.name == "f_hal" and self.loss.lam > 0)

    def _needs_old_logps(self) -> bool:
        """Whether the loss uses π_old: GRPO's ratio, f-GRPO's snis weights."""
        uses_online = self.loss.name in ("grpo", "f_grpo") or (
            self.loss.name == "f_hal" and self.loss.lam < 1
        )
        return uses_online and (self.loss.name == "grpo" or self.loss.weights == "snis")

    def corrects_engine(self) -> bool:
        """Whether rollouts are importance-weighted by π_old/π_engine (``auto``: for every
        engine but ``hf``, whose log-probs are the trainer's own up to rounding)."""
        if self.engine_is_correction == "auto":
            return self.engine != "hf"
        return bool(self.engine_is_correction)

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> TrainerConfig:
        """Build from the flat ``training`` parameters; unknown keys are an error.

        The loss is chosen by ``loss`` (a name) with its options beside it at top level
        (``divergence``, ``beta``, ``lam``, …), so one ``--params training.x=y`` switches it.
        """
        loss_keys = {f.name for f in fields(LossConfig)} - {"name"}
        known = {f.name for f in fields(cls)} | loss_keys
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(
                f"unknown training parameter(s) {unknown}; valid: {', '.join(sorted(known))}"
            )
        values = {k: v for k, v in params.items() if k not in loss_keys and k != "loss"}
        values["sampling"] = SamplingConfig(**dict(params.get("sampling") or {}))
        values["loss"] = LossConfig(
            name=params.get("loss", "f_grpo"), **{k: params[k] for k in loss_keys if k in params}
        )
        if "rewards" in values:
            values["rewards"] = dict(values["rewards"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check_launch(self) -> int:
        """:func:`~fgrpo_pipeline.training.distributed.check_launch` for this config: the processes
        the run was launched in (returned) must split its batches evenly."""
        return check_launch(
            self.prompts_per_step,
            self.group_size,
            self.mixed_precision,
            offline_batch_size=self.offline_batch_size if self.uses_offline_data() else None,
        )


# Keys of the ``training`` parameters that say how a run is shown, not what it trains.
RUN_KEYS = ("progress", "resume_dir")


def check_run_params(params: Mapping[str, Any]) -> None:
    """The run keys beside the configuration: a ``resume_dir`` needs checkpoints to resume."""
    if params.get("resume_dir") and not params.get("checkpoint_every"):
        raise ValueError(
            "training parameter 'resume_dir' needs 'checkpoint_every' ≥ 1 (how often the "
            "full state is saved there)"
        )


LR_SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(schedule: str, step: int, warmup_steps: int, total_steps: int) -> float:
    """The learning rate of optimiser step ``step`` (1-based) as a share of the peak: a
    linear warm-up over the first ``warmup_steps`` steps (step k of them at k/warmup), then
    constant, linear to 0 or cosine to 0 over the rest (reached just after the last step)."""
    if step <= warmup_steps:
        return step / warmup_steps
    progress = (step - 1 - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


_INT_FIELDS = (
    "steps",
    "length_buckets",
    "warmup_steps",
    "prompts_per_step",
    "group_size",
    "seed",
    "offline_batch_size",
    "micro_batch_size",
    "checkpoint_every",
    "log_completions_every",
    "num_threads",
)


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"training parameter {name!r} {message}")


# Called with a step's metrics row; returns more columns for it (e.g. a reward-hacking flag).
StepMonitor = Callable[[Mapping[str, float]], Mapping[str, float]]
