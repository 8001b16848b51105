"""One step of the online loop as named functions, in the order :func:`~.loop.train` calls
them: sample prompts → generate → score → reference → update → metrics → completions →
checkpoint. Each takes the :class:`~.loop.TrainingRun` (what setup built, and the state the
steps add to) and can be called, tested and timed on its own (``benchmarks/breakdown.py``).

Plain torch (no Kedro, no MLflow). Distributed, LoRA, micro-batch and engine specifics are
behind the run's runtime, scorer and engine objects, so the functions read the same for all.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import pandas as pd
import torch
from torch import Tensor

from fgrpo_pipeline.algorithms.advantages import frac_reward_zero_std
from fgrpo_pipeline.algorithms.labeling import ScoredRollouts, score_rollouts, side_labels
from fgrpo_pipeline.algorithms.losses import (
    LossInputs,
    LossOutput,
    PreferenceInputs,
    truncated_importance_weights,
)
from fgrpo_pipeline.models.policy import Policy
from fgrpo_pipeline.rollout import (
    RolloutBatch,
    SamplingConfig,
    batch_logprobs,
    micro_batches,
    repeat_each,
    rows_logprobs,
)
from fgrpo_pipeline.training import resume
from fgrpo_pipeline.training.distributed import disable_gradient_checkpointing, strip_autocast
from fgrpo_pipeline.training.preferences import offline_minibatch

if TYPE_CHECKING:
    from fgrpo_pipeline.training.loop import TrainingRun

COMPLETION_COLUMNS = (
    "step",
    "source",
    "pair",
    "prompt",
    "completion",
    "reward",
    "advantage",
    "side",
    "implicit_reward",
)


# --------------------------------------------------------------------------- sample, generate


def sample_prompts(run: TrainingRun, step: int) -> pd.DataFrame:
    """This rank's share of the step's P prompts. Every rank draws all P indices (the
    generator stays in step) and keeps its slice."""
    run.runtime.seed_step(run.config.seed, step)
    pick = torch.randint(len(run.prompts), (run.config.prompts_per_step,), generator=run.gen)
    return run.prompts.iloc[pick.tolist()[run.share]]


def generate(run: TrainingRun, chosen: pd.DataFrame, step: int) -> RolloutBatch:
    """G completions of each chosen prompt from the rollout copy of the policy, with a
    sampling seed of its own per step and rank."""
    runtime, config = run.runtime, run.config
    seed = (config.seed * 100_003 + step) * runtime.num_processes + runtime.process_index
    sampling = SamplingConfig(**{**asdict(config.sampling), "seed": seed})
    return run.engine.generate(run.rollout, chosen["prompt"].tolist(), config.group_size, sampling)


def score(run: TrainingRun, batch: RolloutBatch, chosen: pd.DataFrame) -> ScoredRollouts:
    """Rewards, correctness and group advantages of the batch, on the batch's device."""
    scored = score_rollouts(
        batch.completions,
        batch.prompts,
        repeat_each(chosen["ground_truth"].tolist(), run.config.group_size),
        reward_fn=run.reward_fn,
        correctness_fn=run.correctness_fn,
        group_size=run.config.group_size,
        advantage_scale=run.config.advantage_scale,
    )
    device = batch.completion_mask.device  # a no-op on the CPU
    return ScoredRollouts(scored.rewards.to(device), scored.correct, scored.advantages.to(device))


def reference_logprobs(run: TrainingRun, batch: RolloutBatch) -> Tensor | None:
    """Per-token log-probs [N, T] of the batch under π_ref, without grad; None when the run
    has no reference (``score_reference: false``, a loss that does not read it)."""
    if run.reference is None:
        return None
    with torch.no_grad(), run.runtime.autocast():
        return batch_logprobs(
            run.reference,
            batch,
            run.config.sampling.temperature,
            run.scorer.micro_batch_size,
            share_prompts=run.config.share_prompts,
            length_buckets=run.config.length_buckets,
        )


# --------------------------------------------------------------------------- update


class PolicyScorer:
    """The policy's log-probs of a batch with grad, and the backward pass through them: the
    whole batch in one pass, or (``micro_batch_size`` > 0) as a leaf whose gradient is pushed
    back one micro-batch at a time (exact for any loss of the log-probs, at the cost of one
    extra no-grad forward; only one micro-batch's activations are alive at once)."""

    def __init__(self, run: TrainingRun, micro_batch_size: int) -> None:
        self.run, self.micro_batch_size = run, micro_batch_size

    def logprobs(self, batch: RolloutBatch) -> Tensor:
        run = self.run
        temperature = run.config.sampling.temperature
        options = {
            "share_prompts": run.config.share_prompts,
            "length_buckets": run.policy_length_buckets,
        }
        if not self.micro_batch_size:
            return batch_logprobs(run.wrapped, batch, temperature, **options)
        with torch.no_grad():
            logps = batch_logprobs(
                run.rollout.model, batch, temperature, self.micro_batch_size, **options
            )
        return logps.requires_grad_(True)

    def backward(self, loss: Tensor, logps: Tensor, batch: RolloutBatch) -> None:
        run = self.run
        run.runtime.backward(loss)
        if self.micro_batch_size and logps.grad is not None:  # None: the loss ignores rollouts
            backward_in_micro_batches(
                run.wrapped,
                batch,
                logps.grad,
                self.micro_batch_size,
                run.config.sampling.temperature,
                no_sync=run.runtime.no_sync(run.wrapped),
                share_prompts=run.config.share_prompts,
                length_buckets=run.policy_length_buckets,
            )


def backward_in_micro_batches(
    model,
    batch,
    logps_grad: Tensor,
    micro_batch_size: int,
    temperature: float,
    *,
    no_sync: Callable[[], AbstractContextManager] | None = None,
    share_prompts: bool = True,
    length_buckets: int = 1,
) -> None:
    """Accumulate into ``model``'s gradients ``∂L/∂θ = Σ ∂L/∂logps · ∂logps/∂θ``, given
    ``logps_grad`` = ∂L/∂logps [N, T] of a rollout batch, one micro-batch of sequences at a
    time.

    ``no_sync`` (a DDP model's ``no_sync``): every micro-batch but the last runs under it, so
    the gradients are all-reduced once, after the last one. The log-probs are recomputed as
    :func:`~fgrpo_pipeline.rollout.batch_logprobs` computed them (``share_prompts``: each
    distinct prompt of a micro-batch run once; ``length_buckets``: its completions in passes
    of similar lengths)."""
    chunks = micro_batches(len(batch), micro_batch_size)
    for i, chunk in enumerate(chunks):
        last = i == len(chunks) - 1
        with contextlib.nullcontext() if no_sync is None or last else no_sync():
            part = rows_logprobs(
                model,
                batch,
                chunk,
                temperature,
                share_prompts=share_prompts,
                length_buckets=length_buckets,
            )
            part.backward(logps_grad[chunk])


@dataclass
class Update:
    """What :func:`update` did: the loss's output, the offline minibatch it saw, whether the
    optimiser step was applied, the gradient norms and the importance-weight diagnostics."""

    out: LossOutput
    offline: PreferenceInputs | None
    applied: bool
    grad_norm: float
    term_norms: dict[str, float] = field(default_factory=dict)
    is_metrics: dict[str, float] = field(default_factory=dict)


def update(
    run: TrainingRun,
    batch: RolloutBatch,
    scored: ScoredRollouts,
    ref_logps: Tensor | None,
    step: int,
) -> Update:
    """The loss of the batch (and of an offline minibatch, for the losses that use one) and
    one optimiser step on it; skipped on every rank when a loss or gradient is not finite."""
    inputs, is_metrics = loss_inputs(run, batch, scored, ref_logps)
    out = run.loss_fn(inputs, run.config.loss)
    run.optimizer.zero_grad(set_to_none=True)
    for group in run.optimizer.param_groups:
        group["lr"] = run.learning_rate(step)
    # all ranks apply a step or none does (a rank alone in backward would hang DDP)
    applied = run.runtime.all_true(torch.isfinite(out.loss).item())
    grad_norm, term_norms = math.nan, {}
    if applied:
        terms = TermGradients(out.terms, run.params) if run.log_terms and out.terms else None
        run.scorer.backward(out.loss, inputs.logps, batch)
        term_norms = terms.norms(run.runtime) if terms is not None else {}
        grad_norm = run.runtime.clip_grad_norm_(run.wrapped, run.config.max_grad_norm)
        applied = run.runtime.all_true(torch.isfinite(grad_norm).item())
        if applied:
            run.optimizer.step()
            run.runtime.refresh_rollout(run.wrapped, run.rollout)
            run.sync_weights(run.rollout)
    run.skipped += not applied
    return Update(out, inputs.offline, applied, float(grad_norm), term_norms, is_metrics)


def loss_inputs(
    run: TrainingRun, batch: RolloutBatch, scored: ScoredRollouts, ref_logps: Tensor | None
) -> tuple[LossInputs, dict[str, float]]:
    """The loss's inputs: the policy's log-probs with grad, π_old (the policy itself: one
    optimiser step per batch, ratio exactly 1), the engine-numerics correction, the offline
    minibatch; and the correction's diagnostics."""
    config = run.config
    logps = run.scorer.logprobs(batch)
    old_logps = logps.detach()
    is_weights, is_metrics = None, {}
    if run.corrects_engine:
        is_weights, is_metrics = truncated_importance_weights(
            old_logps, batch.old_logps, batch.completion_mask, config.engine_is_cap
        )
    offline = None
    if run.preferences is not None and config.uses_offline_data():
        with run.runtime.autocast():
            offline = offline_minibatch(
                run.preferences,
                run.grad_policy,
                run.reference,
                config.offline_batch_size,
                run.gen,
                config.sampling.temperature,
                run.offline_share,
                paired=run.paired,
            )
    inputs = LossInputs(
        logps=logps,
        ref_logps=ref_logps,
        old_logps=old_logps,
        mask=batch.completion_mask,
        advantages=scored.advantages,
        rewards=scored.rewards,
        group_size=config.group_size,
        offline=offline,
        rank_mean=run.runtime.mean,
        max_completion_length=config.sampling.max_new_tokens,
        is_weights=is_weights,
    )
    return inputs, is_metrics


class TermGradients:
    """The gradient norm of each part of a loss whose ``terms`` sum to it.

    Built before the backward pass: every term but the first is differentiated on its own
    (``autograd.grad``: no ``.grad`` is touched); after the full backward (and any
    micro-batch accumulation) the first term's gradient is the total minus the others, so
    one extra backward pass over the smaller parts (f-HAL: the offline minibatch) is all
    it costs. Under DDP the parts' gradients are averaged over the ranks like the total."""

    def __init__(self, terms: Mapping[str, Tensor], params: list[torch.nn.Parameter]):
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
            flat = runtime.mean(flat)  # the ranks' average, as DDP averages the total
            total = total - flat
            norms[name] = flat.norm().item()
        norms[self.first] = total.norm().item()
        return norms


def _flat(grads, params) -> Tensor:
    return torch.cat(
        [
            (torch.zeros_like(p) if g is None else g).detach().reshape(-1).float()
            for g, p in zip(grads, params, strict=True)
        ]
    )


# --------------------------------------------------------------------------- metrics


def metrics_row(
    run: TrainingRun,
    step: int,
    batch: RolloutBatch,
    scored: ScoredRollouts,
    ref_logps: Tensor | None,
    result: Update,
    times: tuple[float, float, float, float],
) -> dict[str, float]:
    """The step's metrics row, computed from every rank's rollouts; the loss's own metrics
    are means over the ranks, the times the slowest rank's. Monitors add their columns."""
    mask, g = batch.completion_mask, run.config.group_size
    seqs = run.runtime.gather(
        {
            "rewards": scored.rewards,
            "correct": scored.correct,
            "lengths": batch.lengths,
            "truncated": batch.truncated,
            "log_ratio_ref": sequence_log_ratio(batch, ref_logps),
            "tokens": mask.sum(dim=1),
        }
    )
    loss_metrics = {"loss": result.out.loss.item(), **result.out.metrics, **result.is_metrics}
    scalars, times = combine_reports(run.runtime.gather_objects((loss_metrics, times)))
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
        "grad_norm": result.grad_norm,
        "skipped_steps": run.skipped,
        "time_generation": times[0],
        "time_scoring": times[1],
        "time_update": times[2],
        "time_step": times[3],
        "tokens_per_second": int(seqs["tokens"].sum().item()) / max(times[3], 1e-9),
        "learning_rate": run.learning_rate(step),
    }
    if run.paired:
        row["offline_prompts_skipped"] = run.preferences.unpaired_prompts
    row.update({f"grad_norm_{name}": value for name, value in result.term_norms.items()})
    row.update(scalars)
    for monitor in run.monitors:
        row.update(monitor(row))
    return row


def sequence_log_ratio(batch: RolloutBatch, ref_logps: Tensor | None) -> Tensor:
    """log π_old(y|x) − log π_ref(y|x) of every completion [N]: the per-sequence KL sample
    (NaN without a reference: the metrics keep their columns, MLflow skips the values)."""
    if ref_logps is None:
        return torch.full((len(batch),), math.nan, device=batch.old_logps.device)
    return ((batch.old_logps - ref_logps) * batch.completion_mask).sum(dim=1)


def combine_reports(
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


# --------------------------------------------------------------- completions, checkpoint


def completions_table(
    run: TrainingRun,
    step: int,
    batch: RolloutBatch,
    scored: ScoredRollouts,
    ref_logps: Tensor | None,
    offline: PreferenceInputs | None,
) -> pd.DataFrame:
    """The step's completions of every rank (``source`` online), and the offline minibatch
    the loss saw (``source`` offline; ``pair`` numbers DPO's same-prompt pairs)."""
    beta, n = run.config.loss.beta, len(batch)
    log_ratio_ref = sequence_log_ratio(batch, ref_logps)
    table = {
        "source": ["online"] * n,
        "pair": [-1] * n,
        "prompt": batch.prompts,
        "completion": batch.completions,
        "reward": scored.rewards.tolist(),
        "advantage": scored.advantages.tolist(),
        "side": side_labels(scored.advantages),
        "implicit_reward": (beta * log_ratio_ref).tolist(),
    }
    if offline is not None:
        _add_offline_rows(table, offline, beta, run.paired, run.runtime.process_index)
    parts = run.runtime.gather_objects(table)
    return pd.DataFrame({"step": step} | {key: sum((p[key] for p in parts), []) for key in table})


def _add_offline_rows(
    table: dict[str, list], offline: PreferenceInputs, beta: float, paired: bool, rank: int
) -> None:
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


def checkpoint(run: TrainingRun, step: int) -> None:
    """Every ``checkpoint_every`` steps: a snapshot of the policy (main process) and, with a
    ``resume_dir``, the whole training state written atomically (under FSDP every rank takes
    part in gathering the optimiser state)."""
    config, runtime = run.config, run.runtime
    if not config.checkpoint_every or step % config.checkpoint_every:
        return
    saving = run.resume_dir is not None and (runtime.is_main or runtime.shards_weights)
    optimizer_state = runtime.full_optimizer_state(run.wrapped, run.optimizer) if saving else {}
    if runtime.is_main:
        run.checkpoints[step] = snapshot(
            run.rollout, mixed_precision=runtime.mixed_precision, checkpointing=run.checkpointing
        )
    if runtime.is_main and run.resume_dir is not None:
        resume.save_resume_state(
            run.resume_dir,
            run.fingerprint,
            resume.ResumeState(step, run.skipped, run.rows, run.completion_tables),
            run.rollout.model.state_dict(),  # full weights (the model itself unless FSDP)
            optimizer_state,
            run.gen,
            run.monitors,
        )


def snapshot(policy: Policy, *, mixed_precision: str = "no", checkpointing: bool = False) -> Policy:
    """A frozen copy of the policy as a plain model: without accelerate's autocast forward or
    the activation checkpointing the trainer switched on (the copy would carry both)."""
    model = copy.deepcopy(policy.model).eval()
    if mixed_precision != "no":
        strip_autocast(model)
    if checkpointing:
        disable_gradient_checkpointing(model)
    return Policy(model=model, tokenizer=policy.tokenizer)


def empty_completions() -> pd.DataFrame:
    return pd.DataFrame(columns=list(COMPLETION_COLUMNS))
