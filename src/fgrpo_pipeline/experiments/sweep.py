"""One arm × seed sweep engine, shared by the divergence and the safety (λ) comparisons.

Plain Python/torch (no Kedro, no MLflow). An :class:`Arm` is a label and the training
parameters it sets over the shared ones (``{"loss": "f_grpo", "divergence": "kl"}``,
``{"loss": "f_hal", "lam": 0.5}``). :func:`plan_sweep` builds and validates every (arm, seed)
configuration before anything runs; :func:`run_sweep` evaluates the base policy, then, arm by
arm and seed by seed, trains a copy of it with :func:`fgrpo_pipeline.training.loop.train`,
evaluates the trained policy with the caller's ``evaluate`` and reports the finished run
through ``on_arm(arm, seed, result)`` — where a tracking layer logs it (MLflow child runs
in the Kedro layer), so nothing here knows about tracking.

Runs are sequential in one process: every run gets the sweep's ``num_threads`` torch threads
(0: the training parameters' own, or torch's default), set once before the base evaluation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

import pandas as pd
import torch
from tqdm.auto import tqdm

from fgrpo_pipeline.algorithms.losses import LOSS_OPTIONS, LossConfig
from fgrpo_pipeline.algorithms.params import Params, mapping_of
from fgrpo_pipeline.algorithms.rewards import RewardFn
from fgrpo_pipeline.models.policy import Policy
from fgrpo_pipeline.training.config import RUN_KEYS, StepMonitor, TrainerConfig
from fgrpo_pipeline.training.loop import train
from fgrpo_pipeline.training.preferences import PreferenceData

logger = logging.getLogger(__name__)

E = TypeVar("E")  # what the caller's evaluate returns
SWEEP_KEYS = ("training_overrides", "num_threads", "progress")  # in every sweep's block
FINAL_FRACTION = 0.1  # final_mean: the mean over the last 10% of steps


@dataclass(frozen=True)
class Arm:
    """One arm of a sweep: its label (tables, progress, logs) and the training parameters
    it sets over the shared ones."""

    label: str
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def params(self, training_params: Mapping[str, Any], seed: int) -> dict[str, Any]:
        """The flat training parameters of one run: ``training_params`` without run keys
        (``progress``, ``resume_dir``), with this arm's overrides and ``seed``. Loss options
        the arm's loss ignores are dropped (a sweep's shared training block holds the
        options of its f-GRPO arms; the GRPO arm takes no divergence)."""
        params = {k: v for k, v in training_params.items() if k not in RUN_KEYS}
        params.update(self.overrides, seed=seed)
        loss = params.get("loss", LossConfig.name)
        for option, losses in LOSS_OPTIONS.items():
            if loss not in losses and option not in self.overrides:
                params.pop(option, None)
        return params


@dataclass(frozen=True)
class SweepRun:
    """One planned run: an arm, a seed and its validated trainer configuration."""

    arm: Arm
    seed: int
    config: TrainerConfig


@dataclass(frozen=True)
class SweepPlan:
    """Every run of a sweep, arm by arm and seed by seed, all validated."""

    runs: tuple[SweepRun, ...]
    num_threads: int  # torch threads for every run (0: leave torch's setting)
    train_progress: bool  # the training parameters' ``progress``: a bar per run


@dataclass
class ArmResult(Generic[E]):
    """One finished (arm, seed): its configuration, per-step training metrics, what
    ``evaluate`` returned for the trained policy, the table row ``row`` made of them, and
    its timings (seconds; ``started`` is the wall-clock start, epoch seconds)."""

    arm: Arm
    seed: int
    config: TrainerConfig
    metrics: pd.DataFrame
    evaluation: E
    train_time: float
    eval_time: float
    started: float
    row: dict[str, Any] = field(default_factory=dict)
    # the trained policy, for ``on_arm`` alone (e.g. to log it as a model); dropped after it
    policy: Policy | None = field(default=None, repr=False, compare=False)

    @property
    def wall_time(self) -> float:
        return self.train_time + self.eval_time


@dataclass
class SweepResult(Generic[E]):
    """The base policy's evaluation and every finished run, in plan order."""

    base: E
    arms: list[ArmResult[E]]

    @property
    def metrics(self) -> dict[tuple[str, int], pd.DataFrame]:
        """Per-step training metrics by (arm label, seed)."""
        return {(r.arm.label, r.seed): r.metrics for r in self.arms}

    def table(self, columns: Sequence[str]) -> pd.DataFrame:
        """One row per run (its ``row``), with ``columns``."""
        return pd.DataFrame([r.row for r in self.arms], columns=list(columns))


OnStart = Callable[[Arm, int, TrainerConfig], None]
OnArm = Callable[[Arm, int, ArmResult], None]
# the sweeps' plain-valued callback: (arm's value, seed, its table row, per-step metrics)
OnRunEnd = Callable[[Any, int, dict[str, Any], pd.DataFrame], None]


def check_distinct(
    values: Any, name: str, what: str, check: Callable[[Any], None] | None = None
) -> None:
    """A non-empty list (not a string) of distinct ``values``, each passing ``check``."""
    if isinstance(values, str) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"{name} must be a non-empty list of {what}, got {values!r}")
    for value in values:
        if check is not None:
            check(value)
    if len(set(values)) != len(values):
        raise ValueError(f"{name} has duplicates: {list(values)}")


def _check_seed(seed: Any) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seeds must be integers, got {seed!r}")


def check_seeds(seeds: Sequence[int]) -> None:
    """A non-empty list of distinct integer seeds."""
    check_distinct(seeds, "seeds", "integers", _check_seed)


def check_sweep_options(
    params: Mapping[str, Any],
    *,
    block: str,
    keys: tuple[str, ...],
    swept: tuple[str, ...],
    swept_by: str,
) -> None:
    """What every sweep's parameter block shares: known ``keys``, ``training_overrides`` (a
    mapping that sets none of the ``swept`` keys: ``swept_by`` says what sets them),
    ``num_threads`` ≥ 0 and a boolean ``progress``."""
    unknown = sorted(set(params) - set(keys))
    if unknown:
        raise ValueError(f"unknown {block} key(s) {unknown}; valid: {', '.join(keys)}")
    overrides = params.get("training_overrides") or {}
    if not isinstance(overrides, Mapping):
        raise ValueError(f"training_overrides must be a mapping, got {overrides!r}")
    if clash := sorted(set(overrides) & set(swept)):
        raise ValueError(f"training_overrides may not set {clash}: {swept_by}")
    threads = params.get("num_threads", 0)
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 0:
        raise ValueError(f"num_threads must be an integer ≥ 0, got {threads!r}")
    if not isinstance(params.get("progress", True), bool):
        raise ValueError(f"progress must be true or false, got {params['progress']!r}")


@dataclass
class SweepParams(Params):
    """Base of a sweep's parameter block: the training seeds, the overrides every run's
    training parameters get, torch threads and progress bars. The subclass adds its arms
    field, ``SWEPT`` (the training keys the sweep sets per run) and ``SWEPT_BY`` (what sets
    them); :func:`check_sweep_options` checks what every sweep shares, the subclass's
    ``check`` its arms and seeds."""

    SWEPT: ClassVar[tuple[str, ...]] = ()
    SWEPT_BY: ClassVar[str] = ""

    seeds: list = field(default_factory=list)
    training_overrides: dict = field(default_factory=dict)
    num_threads: int = 0
    progress: bool = True

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None, *, where: str = ""):
        values = mapping_of(params, where or cls.BLOCK)
        check_sweep_options(
            values, block=cls.BLOCK, keys=cls.param_names(), swept=cls.SWEPT, swept_by=cls.SWEPT_BY
        )
        return super().from_params(values, where=where)


def merge_training_params(params: Mapping[str, Any], training: Mapping[str, Any]) -> dict[str, Any]:
    """The flat training parameters of a sweep: ``training`` with the block's
    ``training_overrides`` over it, its ``num_threads`` (when > 0) and ``progress``."""
    merged = {**training, **(params.get("training_overrides") or {})}
    if params.get("num_threads"):
        merged["num_threads"] = params["num_threads"]
    merged["progress"] = params.get("progress", True)
    return merged


def check_prompts(sweep: str, train_prompts: pd.DataFrame, test_prompts: pd.DataFrame) -> None:
    """A sweep trains on ``train_prompts`` and evaluates on ``test_prompts``: neither empty."""
    if train_prompts.empty or test_prompts.empty:
        raise ValueError(
            f"the {sweep} needs train and test prompts, got {len(train_prompts)} train and "
            f"{len(test_prompts)} test"
        )


def plan_sweep(
    arms: Sequence[Arm], seeds: Sequence[int], training_params: Mapping[str, Any]
) -> SweepPlan:
    """Every (arm, seed) with its trainer configuration, so a bad one fails before the first
    run: arms a non-empty list of :class:`Arm` with distinct labels, seeds distinct integers,
    every configuration valid (an error names its arm)."""
    if isinstance(arms, Arm) or not isinstance(arms, Sequence) or not arms:
        raise ValueError(f"arms must be a non-empty list of Arm, got {arms!r}")
    if bad := [arm for arm in arms if not isinstance(arm, Arm)]:
        raise ValueError(f"arms must be Arm instances, got {bad[0]!r}")
    check_distinct([arm.label for arm in arms], "arms", "labels")
    check_seeds(seeds)
    runs = []
    for arm in arms:
        for seed in seeds:
            try:
                config = TrainerConfig.from_params(arm.params(training_params, seed))
            except (TypeError, ValueError) as err:
                raise ValueError(f"arm {arm.label!r}: {err}") from err
            runs.append(SweepRun(arm, seed, config))
    progress = bool(training_params.get("progress", True))
    return SweepPlan(tuple(runs), runs[0].config.num_threads, progress)


def final_mean(metrics: pd.DataFrame, column: str, fraction: float = FINAL_FRACTION) -> float:
    """Mean of ``column`` over the last ``fraction`` of steps (at least one); NaN without it."""
    if column not in metrics or metrics.empty:
        return float("nan")
    tail = max(1, round(len(metrics) * fraction))
    return float(metrics[column].iloc[-tail:].mean())


def curves_table(
    metrics_by_run: Mapping[tuple[str, int], pd.DataFrame], columns: Sequence[str]
) -> pd.DataFrame:
    """Per-step metrics of all runs as one long table with ``columns``: ``method`` (the
    key's label), ``seed``, then metric columns (NaN where a run's metrics lack one)."""
    columns = list(columns)
    tables = [
        metrics.reindex(columns=columns[2:]).assign(method=label, seed=seed)
        for (label, seed), metrics in metrics_by_run.items()
    ]
    if not tables:
        return pd.DataFrame(columns=columns)
    curves = pd.concat(tables, ignore_index=True)[columns]
    return curves.astype({"seed": "int64", "step": "int64"})


@dataclass
class Training:
    """What every run of a sweep trains with besides its configuration (see ``train``);
    ``monitors`` makes fresh step monitors for each run (they keep state)."""

    preferences: PreferenceData | None = None
    reward_fn: RewardFn | None = None
    correctness_fn: RewardFn | None = None
    monitors: Callable[[], Sequence[StepMonitor]] = tuple


def run_sweep(
    plan: SweepPlan,
    base_policy: Policy,
    train_prompts: pd.DataFrame,
    evaluate: Callable[[Policy], E],
    *,
    training: Training | None = None,
    row: Callable[[ArmResult[E]], dict[str, Any]] | None = None,
    describe: Callable[[E], str] = str,
    on_start: OnStart | None = None,
    on_arm: OnArm | None = None,
    progress: bool = True,
    desc: str = "sweep",
) -> SweepResult[E]:
    """Run ``plan`` from ``base_policy``; see the module doc.

    ``evaluate(policy)`` measures the base policy once, then every trained policy (which is kept
    only until ``on_arm`` has seen it). ``row(result)`` makes a run's table row
    (``result.row``); ``describe`` of an evaluation is logged. ``on_start(arm, seed, config)``
    is called before a run trains, ``on_arm(arm, seed, result)`` once it is evaluated.
    ``progress`` shows a bar over runs (with an ETA) and, if the training parameters'
    ``progress`` allows, one per run.
    """
    if plan.num_threads:
        torch.set_num_threads(plan.num_threads)
    training = training or Training()
    base = evaluate(base_policy)
    logger.info("%s: base policy: %s", desc, describe(base))
    results: list[ArmResult[E]] = []
    bar = tqdm(plan.runs, desc=desc, unit="run", disable=not progress, mininterval=1.0)
    for run in bar:
        bar.set_postfix(arm=run.arm.label, seed=run.seed)
        if on_start is not None:
            on_start(run.arm, run.seed, run.config)
        result = _train_and_evaluate(
            run, base_policy, train_prompts, evaluate, training, plan.train_progress and progress
        )
        result.row = row(result) if row is not None else {}
        results.append(result)
        logger.info(
            "%s: %s seed %d: %s (%.0f s)",
            desc,
            run.arm.label,
            run.seed,
            describe(result.evaluation),
            result.wall_time,
        )
        if on_arm is not None:
            on_arm(run.arm, run.seed, result)
        result.policy = None  # A × S trained copies would add up
    bar.close()
    return SweepResult(base, results)


def finished_run(
    value: Callable[[Arm], Any], on_run_end: OnRunEnd | None, on_arm: OnArm | None
) -> OnArm:
    """One ``on_arm`` for a sweep's two callbacks of a finished run: ``on_run_end(value(arm),
    seed, row, metrics)`` with plain values, then ``on_arm(arm, seed, result)``."""

    def finished(arm: Arm, seed: int, result: ArmResult) -> None:
        if on_run_end is not None:
            on_run_end(value(arm), seed, dict(result.row), result.metrics)
        if on_arm is not None:
            on_arm(arm, seed, result)

    return finished


@dataclass
class TrainedArm:
    """One run's training: the trained policy, its per-step metrics, its training time
    (seconds) and its wall-clock start (epoch seconds)."""

    policy: Policy
    metrics: pd.DataFrame
    train_time: float
    started: float


def train_arm(
    run: SweepRun,
    base_policy: Policy,
    train_prompts: pd.DataFrame,
    training: Training | None = None,
    *,
    progress: bool = True,
) -> TrainedArm:
    """Train a copy of ``base_policy`` as ``run`` says: one arm × seed of a sweep, on its own
    (the Kedro layer runs each as a node) or inside :func:`run_sweep`."""
    training = training or Training()
    started, t0 = time.time(), time.perf_counter()
    trained = train(
        base_policy,
        train_prompts,
        run.config,
        preferences=training.preferences,
        progress=progress,
        reward_fn=training.reward_fn,
        correctness_fn=training.correctness_fn,
        monitors=list(training.monitors()),
    )
    return TrainedArm(trained.policy, trained.metrics, time.perf_counter() - t0, started)


def plan_arm(arm: Arm, seed: int, training_params: Mapping[str, Any]) -> SweepRun:
    """The one run of ``arm`` at ``seed``, validated (:func:`plan_sweep` of one)."""
    return plan_sweep([arm], [seed], training_params).runs[0]


def _train_and_evaluate(
    run: SweepRun,
    base_policy: Policy,
    train_prompts: pd.DataFrame,
    evaluate: Callable[[Policy], E],
    training: Training,
    progress: bool,
) -> ArmResult[E]:
    """One run; its trained policy rides on the result until ``on_arm`` has seen it."""
    trained = train_arm(run, base_policy, train_prompts, training, progress=progress)
    t0 = time.perf_counter()
    evaluation = evaluate(trained.policy)
    return ArmResult(
        run.arm,
        run.seed,
        run.config,
        trained.metrics,
        evaluation,
        trained.train_time,
        time.perf_counter() - t0,
        trained.started,
        policy=trained.policy,
    )
