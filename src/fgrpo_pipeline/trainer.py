"""The online RL loop: rollout → score → advantages → loss → optimiser step, per batch.

Plain torch (no Kedro, no MLflow). One optimiser step per rollout batch, so the sampling
policy π_old is the policy at the start of the step and its log-probabilities come from
generation itself; the reference π_ref is a frozen copy of the starting policy.

With a ``resume_dir``, the whole training state is written there every ``checkpoint_every``
steps and a rerun continues from the latest one, ending as the uninterrupted run would.

Launched in several processes (``accelerate launch --multi_gpu --num_processes N``, or
torchrun; see :mod:`fgrpo_pipeline.distributed` and :mod:`fgrpo_pipeline.launch`) the loop runs
data-parallel: each rank samples whole groups for its share of the step's prompts, gradients
are averaged by DDP (or FSDP, which also shards weights and optimiser state; rollouts then run
on a full copy of the weights reloaded after every step) and the metrics are computed from all
ranks' values. One process runs the loop exactly as before, without accelerate.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from fgrpo_pipeline import resume
from fgrpo_pipeline.advantages import ADVANTAGE_SCALES, frac_reward_zero_std
from fgrpo_pipeline.distributed import (
    MIXED_PRECISIONS,
    check_launch,
    disable_gradient_checkpointing,
    enable_gradient_checkpointing,
    make_runtime,
    strip_autocast,
)
from fgrpo_pipeline.labeling import score_rollouts, side_labels
from fgrpo_pipeline.lora import LoraSettings, apply_lora, make_reference, trainable_parameters
from fgrpo_pipeline.losses import (
    LossConfig,
    LossInputs,
    PreferenceInputs,
    get_loss,
    truncated_importance_weights,
)
from fgrpo_pipeline.modeling import Policy, disable_dropout, set_seed
from fgrpo_pipeline.rewards import REWARDS, RewardFn, combine_rewards, get_reward
from fgrpo_pipeline.rollout import (
    ENGINES,
    SamplingConfig,
    batch_logprobs,
    get_engine,
    micro_batches,
    repeat_each,
    rows_logprobs,
    token_logprobs,
)


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
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    engine_is_correction: bool | str = "auto"
    engine_is_cap: float = 2.0
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    def __post_init__(self) -> None:
        for name in _INT_FIELDS:
            value = getattr(self, name)
            _require(
                isinstance(value, int) and not isinstance(value, bool), name, "must be an integer"
            )
        for name in ("steps", "prompts_per_step", "offline_batch_size"):
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
        if self.mixed_precision is False:  # YAML 1.1 reads an unquoted `no` as false
            self.mixed_precision = "no"
        _require(
            self.mixed_precision in MIXED_PRECISIONS,
            "mixed_precision",
            f"must be one of {', '.join(MIXED_PRECISIONS)}",
        )
        for name in ("gradient_checkpointing", "share_prompts"):
            _require(isinstance(getattr(self, name), bool), name, "must be true or false")
        _require(
            self.advantage_scale in ADVANTAGE_SCALES,
            "advantage_scale",
            f"must be one of {', '.join(ADVANTAGE_SCALES)}",
        )
        ENGINES.check(self.engine, "training.engine")
        self.engine_options = dict(self.engine_options or {})
        try:
            get_engine(self.engine, **self.engine_options)  # engines import heavy packages lazily
        except TypeError as err:
            raise ValueError(
                f"training parameter 'engine_options' for {self.engine!r}: {err}"
            ) from None
        if self.lora is not None:
            self.lora = dict(self.lora)
            LoraSettings.from_params(self.lora)
        REWARDS.check(self.correctness_reward, "training.correctness_reward")
        combine_rewards(self.rewards)  # validates names and weights
        _require(
            self.lr_schedule in LR_SCHEDULES,
            "lr_schedule",
            f"must be one of {', '.join(LR_SCHEDULES)}",
        )
        _require(
            0 <= self.warmup_steps <= self.steps,
            "warmup_steps",
            f"must lie in [0, steps={self.steps}]",
        )
        _require(
            self.engine_is_correction in (True, False, "auto"),
            "engine_is_correction",
            "must be auto, true or false",
        )
        _require(
            isinstance(self.engine_is_cap, (int, float))
            and not isinstance(self.engine_is_cap, bool)
            and 1 <= self.engine_is_cap < math.inf,
            "engine_is_cap",
            "must be a finite number ≥ 1",
        )
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
        """:func:`~fgrpo_pipeline.distributed.check_launch` for this config: the processes
        the run was launched in (returned) must split its batches evenly."""
        return check_launch(
            self.prompts_per_step,
            self.group_size,
            self.mixed_precision,
            offline_batch_size=self.offline_batch_size if _uses_offline_data(self.loss) else None,
        )


# Keys of the ``training`` parameters that say how a run is shown, not what it trains.
RUN_KEYS = ("progress", "resume_dir")

# Config fields a run may be resumed with other values of: they change how long it runs,
# when it is saved and how many threads it uses, not what a step computes.

logger = logging.getLogger(__name__)


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


@dataclass
class PreferenceData:
    """Offline aligned / unaligned samples for FDO and f-HAL: prompt and completion texts."""

    chosen_prompts: list[str]
    chosen_completions: list[str]
    rejected_prompts: list[str]
    rejected_completions: list[str]

    def __post_init__(self) -> None:
        if not self.chosen_prompts or not self.rejected_prompts:
            raise ValueError(
                "preference data needs at least one aligned and one unaligned sample, got "
                f"{len(self.chosen_prompts)} aligned and {len(self.rejected_prompts)} unaligned"
            )
        sides: dict[str, tuple[list[int], list[int]]] = {}
        for i, prompt in enumerate(self.chosen_prompts):
            sides.setdefault(prompt, ([], []))[0].append(i)
        for i, prompt in enumerate(self.rejected_prompts):
            sides.setdefault(prompt, ([], []))[1].append(i)
        # Prompts with an aligned and an unaligned response: what DPO's pairs are drawn from.
        self.paired = [(c, r) for c, r in sides.values() if c and r]
        self.unpaired_prompts = len(sides) - len(self.paired)


def preferences_from_splits(
    aligned: pd.DataFrame, unaligned: pd.DataFrame
) -> PreferenceData | None:
    """Offline preference data from the reward_labeling splits; None if a side is empty."""
    if not len(aligned) or not len(unaligned):
        return None
    return PreferenceData(
        aligned["prompt"].tolist(),
        aligned["completion"].tolist(),
        unaligned["prompt"].tolist(),
        unaligned["completion"].tolist(),
    )


@dataclass
class TrainingResult:
    """The trained policy, one metrics row per step, checkpoints and logged completions."""

    policy: Policy
    metrics: pd.DataFrame
    checkpoints: dict[int, Policy]
    completions: pd.DataFrame
    resumed_from_step: int = 0  # the resume state's step the run continued from; 0 if none
    # parameter elements this process held while training: all of them unless FSDP sharded
    local_parameters: int = 0


def encode_completions(
    tokenizer, prompts: list[str], completions: list[str]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt ids/mask (left-padded, BOS first) and completion ids/mask (EOS appended)."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    completion_tokens = [
        tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        for c in completions
    ]
    width = max(len(ids) for ids in completion_tokens)
    completion_ids = torch.full((len(completions), width), tokenizer.pad_token_id)
    completion_mask = torch.zeros(len(completions), width)
    for row, ids in enumerate(completion_tokens):
        completion_ids[row, : len(ids)] = torch.tensor(ids)
        completion_mask[row, : len(ids)] = 1.0
    return enc["input_ids"], enc["attention_mask"].float(), completion_ids, completion_mask


def _sequence_logps(model, tokenizer, prompts, completions, *, temperature, grad):
    prompt_ids, prompt_mask, completion_ids, completion_mask = encode_completions(
        tokenizer, prompts, completions
    )
    with torch.set_grad_enabled(grad):
        per_token = token_logprobs(
            model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature
        )
    return (per_token * completion_mask).sum(dim=1)


def _offline_minibatch(
    data: PreferenceData,
    policy: Policy,
    reference,
    size: int,
    gen: torch.Generator,
    temperature: float,
    share: slice = slice(None),
    *,
    paired: bool = False,
) -> PreferenceInputs:
    """``size`` aligned and ``size`` unaligned samples drawn with ``gen``, of which this rank
    scores its ``share`` (every rank draws all, so the generator stays in step).

    ``paired`` (DPO): pair i is an aligned and an unaligned response to one prompt, drawn
    uniformly among the prompts that have both, then within each side of that prompt.
    Otherwise (FDO, f-HAL) the two sides are drawn independently."""
    if paired:
        which = torch.randint(len(data.paired), (size,), generator=gen).tolist()
        u_chosen, u_rejected = torch.rand(size, generator=gen), torch.rand(size, generator=gen)
        chosen_idx = [
            data.paired[p][0][int(u * len(data.paired[p][0]))]
            for p, u in zip(which, u_chosen.tolist(), strict=True)
        ]
        rejected_idx = [
            data.paired[p][1][int(u * len(data.paired[p][1]))]
            for p, u in zip(which, u_rejected.tolist(), strict=True)
        ]
    else:
        chosen_idx = torch.randint(len(data.chosen_prompts), (size,), generator=gen).tolist()
        rejected_idx = torch.randint(len(data.rejected_prompts), (size,), generator=gen).tolist()

    def score(idx: list[int], prompts: list[str], completions: list[str]):
        ps, cs = [prompts[i] for i in idx[share]], [completions[i] for i in idx[share]]
        logps = _sequence_logps(
            policy.model, policy.tokenizer, ps, cs, temperature=temperature, grad=True
        )
        ref = _sequence_logps(
            reference, policy.tokenizer, ps, cs, temperature=temperature, grad=False
        )
        return logps, ref, (ps, cs)

    chosen, chosen_ref, chosen_texts = score(
        chosen_idx, data.chosen_prompts, data.chosen_completions
    )
    rejected, rejected_ref, rejected_texts = score(
        rejected_idx, data.rejected_prompts, data.rejected_completions
    )
    return PreferenceInputs(
        chosen, chosen_ref, rejected, rejected_ref, chosen_texts, rejected_texts
    )


def backward_in_micro_batches(
    model,
    batch,
    logps_grad: torch.Tensor,
    micro_batch_size: int,
    temperature: float,
    *,
    no_sync: Callable[[], AbstractContextManager] | None = None,
    share_prompts: bool = True,
) -> None:
    """Accumulate into ``model``'s gradients ``∂L/∂θ = Σ ∂L/∂logps · ∂logps/∂θ``, given
    ``logps_grad`` = ∂L/∂logps [N, T] of a rollout batch, one micro-batch of sequences at a
    time: only one micro-batch's activations are alive at once.

    ``no_sync`` (a DDP model's ``no_sync``): every micro-batch but the last runs under it, so
    the gradients are all-reduced once, after the last one. The log-probs are recomputed as
    :func:`~fgrpo_pipeline.rollout.batch_logprobs` computed them (``share_prompts``: each
    distinct prompt of a micro-batch run once)."""
    chunks = micro_batches(len(batch), micro_batch_size)
    for i, chunk in enumerate(chunks):
        last = i == len(chunks) - 1
        with contextlib.nullcontext() if no_sync is None or last else no_sync():
            part = rows_logprobs(model, batch, chunk, temperature, share_prompts=share_prompts)
            part.backward(logps_grad[chunk])


COMPLETION_SOURCES = ("online", "offline")


def _add_offline_rows(
    table: dict[str, list], offline: PreferenceInputs, beta: float, paired: bool, rank: int
) -> None:
    """The offline minibatch the loss saw, as completions-table rows (``source`` offline;
    ``pair`` numbers DPO's same-prompt pairs, ``rank:index`` under several processes)."""
    for side, texts, logps, ref in (
        ("aligned", offline.chosen_texts, offline.chosen_logps, offline.chosen_ref_logps),
        ("unaligned", offline.rejected_texts, offline.rejected_logps, offline.rejected_ref_logps),
    ):
        if texts is None:
            continue
        prompts, completions = texts
        k = len(prompts)
        table["source"] += ["offline"] * k
        table["pair"] += [rank * 1_000_000 + i if paired else -1 for i in range(k)]
        table["prompt"] += list(prompts)
        table["completion"] += list(completions)
        table["reward"] += [math.nan] * k
        table["advantage"] += [math.nan] * k
        table["side"] += [side] * k
        table["implicit_reward"] += (beta * (logps.detach() - ref)).tolist()


class _TermGradients:
    """The gradient norm of each part of a loss whose ``terms`` sum to it.

    Built before the backward pass: every term but the first is differentiated on its own
    (``autograd.grad``: no ``.grad`` is touched); after the full backward (and any
    micro-batch accumulation) the first term's gradient is the total minus the others, so
    one extra backward pass over the smaller parts (f-HAL: the offline minibatch) is all
    it costs. Under DDP the parts' gradients are averaged over the ranks like the total."""

    def __init__(self, terms: Mapping[str, torch.Tensor], params: list[torch.nn.Parameter]):
        self.params = params
        names = list(terms)
        self.first, self.rest = names[0], {}
        for name in names[1:]:
            grads = torch.autograd.grad(terms[name], params, retain_graph=True, allow_unused=True)
            self.rest[name] = _flat(grads, params)

    def norms(self, runtime) -> dict[str, float]:
        total = _flat([p.grad for p in self.params], self.params)
        norms = {}
        for name, flat in self.rest.items():
            flat = runtime.mean(flat) if runtime.num_processes > 1 else flat
            total = total - flat
            norms[name] = flat.norm().item()
        norms[self.first] = total.norm().item()
        return norms


def _flat(grads, params) -> torch.Tensor:
    return torch.cat(
        [
            (torch.zeros_like(p) if g is None else g).detach().reshape(-1).float()
            for g, p in zip(grads, params, strict=True)
        ]
    )


def _uses_offline_data(loss: LossConfig) -> bool:
    """FDO and DPO train on preference data when given; f-HAL needs it when λ > 0."""
    return loss.name in ("fdo", "dpo") or (loss.name == "f_hal" and loss.lam > 0)


def _snapshot(
    policy: Policy, *, mixed_precision: str = "no", checkpointing: bool = False
) -> Policy:
    """A frozen copy of the policy as a plain model: without accelerate's autocast forward or
    the activation checkpointing the trainer switched on (the copy would carry both)."""
    model = copy.deepcopy(policy.model).eval()
    if mixed_precision != "no":
        strip_autocast(model)
    if checkpointing:
        disable_gradient_checkpointing(model)
    return Policy(model=model, tokenizer=policy.tokenizer)


def _rank_seed(seed: int, step: int, rank: int) -> int:
    """The global RNGs' seed of a rank's step (several processes): a rank's draws do not
    depend on its history, so a resumed run (which restores rank 0's RNG states on every
    rank) draws what the uninterrupted one did."""
    return (seed * 100_003 + step) * 1_009 + rank + 1


def _combine_reports(
    reports: list[tuple[dict[str, float], tuple[float, ...]]],
) -> tuple[dict[str, float], tuple[float, ...]]:
    """Per-rank (scalars, times) as one: each scalar's mean over the ranks reporting it (a
    loss's metrics may differ in keys between ranks), each time's maximum."""
    if len(reports) == 1:
        return reports[0]
    keys = list(dict.fromkeys(key for scalars, _ in reports for key in scalars))
    scalars = {}
    for key in keys:
        values = [float(s[key]) for s, _ in reports if key in s]
        scalars[key] = sum(values) / len(values)
    times = tuple(max(column) for column in zip(*(t for _, t in reports), strict=True))
    return scalars, times


# Options added after resume states existed, left out of the fingerprint at their
# defaults (which compute what the states' runs computed), so such states still resume.
_LATER_DEFAULTS = {
    "mixed_precision": "no",
    "share_prompts": True,
    "lr_schedule": "constant",
    "warmup_steps": 0,
    "engine_is_correction": "auto",
    "engine_is_cap": 2.0,
}
_LATER_LOSS_DEFAULTS = {"hal_scaling": "paper", "epsilon_high": None, "drop_zero_spread": False}


def _fingerprint_config(fingerprint: dict[str, Any], num_processes: int) -> None:
    """The resume fingerprint's config: ``gradient_checkpointing`` changes memory, not what a
    step computes, so a run may resume with another value; options added later are left out
    at their defaults, as is a single process's ``num_processes``, so states written before
    these existed still resume; a state of N processes resumes only with N."""
    run = fingerprint["config"]
    run.pop("gradient_checkpointing", None)
    for defaults, block in ((_LATER_DEFAULTS, run), (_LATER_LOSS_DEFAULTS, run.get("loss", {}))):
        for key, default in defaults.items():
            if key in block and block[key] == default:
                block.pop(key)
    if num_processes > 1:
        run["num_processes"] = num_processes


def train(
    policy: Policy,
    prompts: pd.DataFrame,
    config: TrainerConfig,
    *,
    preferences: PreferenceData | None = None,
    progress: bool = True,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    reward_fn: RewardFn | None = None,
    correctness_fn: RewardFn | None = None,
    monitors: Sequence[StepMonitor] = (),
    resume_dir: str | Path | None = None,
) -> TrainingResult:
    """Train ``policy`` online on ``prompts`` (columns id, prompt, ground_truth).

    The input policy is not modified: training works on a copy, and the starting weights
    stay as the frozen reference. ``reward_fn`` / ``correctness_fn`` replace the named
    rewards of ``config`` (e.g. a learned reward model, and a gold judge that is only
    measured); each monitor sees a step's metrics row and adds columns to it.

    With ``resume_dir``, every ``checkpoint_every`` steps the training state (weights,
    optimiser, step, metrics and completions so far, skipped-step count, the python / numpy /
    torch RNGs and the trainer's generator) is written atomically to
    ``resume_dir/step_XXXXXX``, replacing the previous one. A run that finds a state there
    continues after its step, and ends with the weights and metrics (all but the ``time_*``
    and ``tokens_per_second`` columns) of the uninterrupted run with the same seed. It must be
    given the same starting policy (still the reference), prompts, preferences, reward
    functions and config (``steps``, ``checkpoint_every``, ``num_threads`` and
    ``gradient_checkpointing`` may change), or a ValueError names the difference. A monitor's
    state is saved and restored only if it has ``state_dict()`` / ``load_state_dict(state)``
    (state of tensors and plain containers); others restart empty, with a warning.
    ``checkpoints`` then holds the snapshots from the resumed step on; ``on_step`` is called
    for the steps run, not the restored ones.

    Several processes (launched by ``accelerate launch`` or torchrun; every rank calls
    ``train`` with the same arguments): ``prompts_per_step`` must divide by their number
    (checked first). Each rank generates the groups of its share of the prompts, with its own
    sampling seed; the model is wrapped in DDP through ``accelerate.prepare``. Every rank
    returns the same trained weights and the same metrics, computed from all ranks' rollouts
    (the ``groups`` column counts the step's groups over all ranks) and holds the completion
    tables of all ranks. Losses that divide by a count (tokens, aligned samples, pairs) divide
    by its mean over the ranks, so the averaged gradient is the whole batch's; the offline
    minibatch (``offline_batch_size``, a multiple of N) is shared out between the ranks.
    ``on_step``, the progress bar, ``checkpoints`` and the writing of
    resume states happen on the main process (rank 0) only; the others return no
    checkpoints. Monitors run on every rank (they see the same rows). A resume state is
    loaded by every rank and resumes only with the same number of processes.
    """
    if config.loss.name == "f_hal" and config.loss.lam > 0 and preferences is None:
        raise ValueError("loss f_hal with lam > 0 needs preference data (aligned/unaligned)")
    paired = config.loss.name == "dpo" and preferences is not None
    if paired:
        if not preferences.paired:
            raise ValueError(
                "loss dpo trains on pairs of an aligned and an unaligned response to one "
                f"prompt: none of the preference data's {preferences.unpaired_prompts} "
                "prompts has both"
            )
        logger.info(
            "dpo: pairs drawn from %d prompts; %d prompts without an aligned and an "
            "unaligned response are skipped",
            len(preferences.paired),
            preferences.unpaired_prompts,
        )
    if len(prompts) < 1:
        raise ValueError("training needs at least one prompt")
    if resume_dir is not None and not config.checkpoint_every:
        raise ValueError(
            "resume_dir needs training parameter 'checkpoint_every' ≥ 1 (how often to save)"
        )
    n_procs = config.check_launch()
    fingerprint: dict[str, Any] = {}
    if resume_dir is not None:
        resume_dir = Path(resume_dir)
        fingerprint = resume.fingerprint(
            config, policy, prompts, preferences, reward_fn, correctness_fn, monitors
        )
        _fingerprint_config(fingerprint, n_procs)
    runtime = make_runtime(config.mixed_precision, micro_batches=config.micro_batch_size > 0)
    if runtime.shards_weights and resume_dir is not None:
        # its optimiser state is saved by parameter name (gathered from the shards)
        fingerprint["config"]["sharded_weights"] = True
    rank, main = runtime.process_index, runtime.is_main
    distributed = runtime.num_processes > 1
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    set_seed(config.seed)

    policy = Policy(model=copy.deepcopy(policy.model), tokenizer=policy.tokenizer)
    if config.lora is not None:
        policy = apply_lora(policy, LoraSettings.from_params(config.lora))
    # Generation and the reference run in eval mode; with dropout on in the scoring pass
    # r_θ ≠ 0 at θ = θ_ref and π_θ ≠ π_old. Off, every pass computes the same function.
    if disabled := disable_dropout(policy.model):
        logger.info("dropout disabled in %d places of the policy (as in generation)", disabled)
    if runtime.device is not None:
        policy.model.to(runtime.device)
    # LoRA: the same base weights with the adapter off (no second copy); else a frozen copy.
    reference = make_reference(policy)
    checkpointing = config.gradient_checkpointing and enable_gradient_checkpointing(policy.model)
    model = policy.model.train()
    optimizer = torch.optim.AdamW(
        trainable_parameters(model), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    engine = get_engine(config.engine, **config.engine_options)
    # Engines that keep their own copy of the weights (vLLM) get them after every update.
    sync_weights = getattr(engine, "sync_weights", None)
    correct_engine = config.corrects_engine()

    def lr_at(step: int) -> float:
        factor = lr_factor(config.lr_schedule, step, config.warmup_steps, config.steps)
        return config.learning_rate * factor

    loss_fn = get_loss(config.loss.name)
    reward_fn = reward_fn or combine_rewards(config.rewards)
    correctness_fn = correctness_fn or get_reward(config.correctness_reward)
    gen = torch.Generator().manual_seed(config.seed)
    temperature = config.sampling.temperature
    g = config.group_size
    per_rank = config.prompts_per_step // runtime.num_processes
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    offline_per_rank = config.offline_batch_size // runtime.num_processes
    offline_share = slice(rank * offline_per_rank, (rank + 1) * offline_per_rank)

    rows: list[dict[str, float]] = []
    checkpoints: dict[int, Policy] = {}
    completion_tables: list[pd.DataFrame] = []
    skipped = 0
    resumed_from = 0
    optimizer_state = None  # a resumed one, loaded once prepared (FSDP shares it out then)
    if resume_dir is not None:
        if main:
            resume.sweep_staging(resume_dir)
        runtime.wait()
        if states := resume.resume_states(resume_dir):
            path = states[-1][1]
            state = resume.load_resume_state(path, fingerprint, model, gen, monitors)
            optimizer_state = state.optimizer_state
            if state.step > config.steps:
                raise ValueError(
                    f"checkpoint {path} is at step {state.step}, past this run's "
                    f"steps={config.steps}: raise steps or use an empty resume_dir"
                )
            resumed_from, skipped = state.step, state.skipped
            rows, completion_tables = state.rows, state.completion_tables
            if main and state.step % config.checkpoint_every == 0:
                checkpoints[state.step] = _snapshot(policy, checkpointing=checkpointing)
            logger.info("resuming training from %s (step %d)", path, state.step)
        runtime.wait()  # every rank has read the state before rank 0 may replace it
    # What rollouts, snapshots and no-grad passes of the policy run on: the model itself, or,
    # when the prepared model holds only a shard of the weights (FSDP), a full copy loaded
    # after every step (the LoRA reference is then that copy with its adapter off).
    rollout = policy
    if runtime.shards_weights:
        rollout = _snapshot(policy, checkpointing=checkpointing)
        if config.lora is not None:
            reference = make_reference(rollout)
    # Forward passes with grad go through the wrapped (DDP) model; rollouts, the reference
    # and no-grad passes use the plain one. A single process: the same model.
    wrapped, optimizer = runtime.prepare(model, optimizer)
    if optimizer_state is not None:
        runtime.load_full_optimizer_state(wrapped, optimizer, optimizer_state)
    local_parameters = sum(
        (p.to_local() if hasattr(p, "to_local") else p).numel() for p in wrapped.parameters()
    )
    params = [p for p in wrapped.parameters() if p.requires_grad]
    # Per-term gradient norms (f-HAL's online and offline parts): not on sharded weights,
    # whose gradients each rank holds only a shard of.
    log_terms = not runtime.shards_weights
    grad_policy = Policy(model=wrapped, tokenizer=policy.tokenizer)
    no_sync = runtime.no_sync(wrapped)
    # mininterval: a redirected log gets a line a second, not one per step
    bar = tqdm(
        range(resumed_from + 1, config.steps + 1),
        desc=f"train {config.loss.name}",
        disable=not (progress and main),
        mininterval=1.0,
        initial=resumed_from,
        total=config.steps,
    )
    for step in bar:
        t0 = time.perf_counter()
        if distributed:
            set_seed(_rank_seed(config.seed, step, rank))
        # Every rank draws all P prompts (the generator stays in step) and keeps its share.
        pick = torch.randint(len(prompts), (config.prompts_per_step,), generator=gen).tolist()
        chosen = prompts.iloc[pick[mine]]
        sample_seed = (config.seed * 100_003 + step) * runtime.num_processes + rank
        sampling = SamplingConfig(**{**asdict(config.sampling), "seed": sample_seed})
        batch = engine.generate(rollout, chosen["prompt"].tolist(), g, sampling)
        t1 = time.perf_counter()

        ground_truths = repeat_each(chosen["ground_truth"].tolist(), g)
        scored = score_rollouts(
            batch.completions,
            batch.prompts,
            ground_truths,
            reward_fn=reward_fn,
            correctness_fn=correctness_fn,
            group_size=g,
            advantage_scale=config.advantage_scale,
        )
        device = batch.completion_mask.device  # a no-op on the CPU
        rewards, advantages = scored.rewards.to(device), scored.advantages.to(device)
        micro = config.micro_batch_size if 0 < config.micro_batch_size < len(batch) else 0
        share = config.share_prompts
        with torch.no_grad(), runtime.autocast():
            ref_logps = batch_logprobs(reference, batch, temperature, micro, share_prompts=share)
        t2 = time.perf_counter()

        if micro:
            # Gradient accumulation: the loss sees the log-probs as a leaf; its gradient is
            # pushed back through the policy one micro-batch at a time (exact for any loss
            # of the log-probs, at the cost of one extra no-grad forward).
            with torch.no_grad():
                logps = batch_logprobs(
                    rollout.model, batch, temperature, micro, share_prompts=share
                )
            logps.requires_grad_(True)
        else:
            logps = batch_logprobs(wrapped, batch, temperature, share_prompts=share)
        # One optimiser step per batch: π_old is the policy itself (ratio exactly 1); the
        # engine's own log-probs only enter the importance correction of its numerics.
        old_logps = logps.detach()
        is_weights, is_metrics = None, {}
        if correct_engine:
            is_weights, is_metrics = truncated_importance_weights(
                old_logps, batch.old_logps, batch.completion_mask, config.engine_is_cap
            )
        offline = None
        if preferences is not None and _uses_offline_data(config.loss):
            with runtime.autocast():
                offline = _offline_minibatch(
                    preferences,
                    grad_policy,
                    reference,
                    config.offline_batch_size,
                    gen,
                    temperature,
                    offline_share,
                    paired=paired,
                )
        inputs = LossInputs(
            logps=logps,
            ref_logps=ref_logps,
            old_logps=old_logps,
            mask=batch.completion_mask,
            advantages=advantages,
            rewards=rewards,
            group_size=g,
            offline=offline,
            rank_mean=runtime.mean,
            max_completion_length=config.sampling.max_new_tokens,
            is_weights=is_weights,
        )
        out = loss_fn(inputs, config.loss)
        optimizer.zero_grad(set_to_none=True)
        # all ranks apply a step or none does (a rank alone in backward would hang DDP)
        applied = runtime.all_true(torch.isfinite(out.loss).item())
        grad_norm = math.nan
        term_norms: dict[str, float] = {}
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        if applied:
            split = _TermGradients(out.terms, params) if log_terms and out.terms else None
            runtime.backward(out.loss)
            if micro and logps.grad is not None:  # None: the loss ignores the rollouts (DPO)
                backward_in_micro_batches(
                    wrapped,
                    batch,
                    logps.grad,
                    micro,
                    temperature,
                    no_sync=no_sync,
                    share_prompts=share,
                )
            if split is not None:
                term_norms = split.norms(runtime)
            grad_norm = runtime.clip_grad_norm_(wrapped, config.max_grad_norm)
            applied = runtime.all_true(torch.isfinite(grad_norm).item())
            if applied:
                optimizer.step()
                if runtime.shards_weights:
                    rollout.model.load_state_dict(runtime.full_state_dict(wrapped))
                if sync_weights is not None:
                    sync_weights(rollout)
        skipped += not applied
        t3 = time.perf_counter()

        mask = batch.completion_mask
        log_ratio_ref = ((batch.old_logps - ref_logps) * mask).sum(dim=1)
        # every rank's sequences (one process: its own), so the row covers all groups
        seqs = runtime.gather(
            {
                "rewards": scored.rewards,
                "correct": scored.correct,
                "lengths": batch.lengths,
                "truncated": batch.truncated,
                "log_ratio_ref": log_ratio_ref,
                "tokens": mask.sum(dim=1),
            }
        )
        # the loss and its metrics: means over the ranks; times: the slowest rank's
        scalars, times = _combine_reports(
            runtime.gather_objects(
                (
                    {"loss": out.loss.item(), **out.metrics, **is_metrics},
                    (t1 - t0, t2 - t1, t3 - t2, t3 - t0),
                )
            )
        )
        generated_tokens = int(seqs["tokens"].sum().item())
        row = {
            "step": step,
            "groups": seqs["rewards"].numel() // g,
            "reward_mean": seqs["rewards"].mean().item(),
            "reward_std": seqs["rewards"].std().item(),
            "accuracy": seqs["correct"].float().mean().item(),
            "frac_reward_zero_std": frac_reward_zero_std(seqs["rewards"], g),
            "loss": scalars.pop("loss"),
            "kl_to_ref": seqs["log_ratio_ref"].mean().item(),
            "completion_length": seqs["lengths"].float().mean().item(),
            "frac_truncated": seqs["truncated"].float().mean().item(),
            "grad_norm": float(grad_norm),
            "skipped_steps": skipped,
            "time_generation": times[0],
            "time_scoring": times[1],
            "time_update": times[2],
            "time_step": times[3],
            "tokens_per_second": generated_tokens / max(times[3], 1e-9),
            "learning_rate": lr_at(step),
        }
        if paired:
            row["offline_prompts_skipped"] = preferences.unpaired_prompts
        row.update({f"grad_norm_{name}": value for name, value in term_norms.items()})
        row.update(scalars)
        for monitor in monitors:
            row.update(monitor(row))
        rows.append(row)
        if on_step is not None and main:
            on_step(step, row)
        # refresh=False: the bar redraws at its own pace (mininterval), not once per step
        bar.set_postfix(
            reward=f"{row['reward_mean']:.2f}", acc=f"{row['accuracy']:.2f}", refresh=False
        )

        if config.log_completions_every and step % config.log_completions_every == 0:
            n = len(batch)
            table = {
                "source": ["online"] * n,
                "pair": [-1] * n,
                "prompt": batch.prompts,
                "completion": batch.completions,
                "reward": scored.rewards.tolist(),
                "advantage": scored.advantages.tolist(),
                "side": side_labels(scored.advantages),
                "implicit_reward": (config.loss.beta * log_ratio_ref).tolist(),
            }
            if offline is not None:
                _add_offline_rows(table, offline, config.loss.beta, paired, rank)
            parts = runtime.gather_objects(table)
            completion_tables.append(
                pd.DataFrame(
                    {"step": step} | {key: sum((p[key] for p in parts), []) for key in parts[0]}
                )
            )
        if config.checkpoint_every and step % config.checkpoint_every == 0:
            saving = resume_dir is not None and (main or runtime.shards_weights)
            # under FSDP every rank takes part in gathering the optimiser state
            state_of_optimizer = runtime.full_optimizer_state(wrapped, optimizer) if saving else {}
            if main:
                checkpoints[step] = _snapshot(
                    rollout, mixed_precision=runtime.mixed_precision, checkpointing=checkpointing
                )
            if main and resume_dir is not None:
                resume.save_resume_state(
                    resume_dir,
                    fingerprint,
                    resume.ResumeState(step, skipped, rows, completion_tables),
                    rollout.model.state_dict(),  # full weights (the model itself unless FSDP)
                    state_of_optimizer,
                    gen,
                    monitors,
                )

    if runtime.shards_weights:
        policy.model = rollout.model  # the full weights, loaded after the last step
    else:
        policy.model = runtime.finish(wrapped)
        if checkpointing:
            disable_gradient_checkpointing(policy.model)
    policy.model.eval()
    completions = (
        pd.concat(completion_tables, ignore_index=True)
        if completion_tables
        else pd.DataFrame(
            columns=[
                "step",
                "source",
                "pair",
                "prompt",
                "completion",
                "reward",
                "advantage",
                "side",
                "implicit_reward",
            ]
        )
    )
    return TrainingResult(
        policy=policy,
        metrics=pd.DataFrame(rows),
        checkpoints=checkpoints,
        completions=completions,
        resumed_from_step=resumed_from,
        local_parameters=local_parameters,
    )
