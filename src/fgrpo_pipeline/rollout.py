"""Rollout engines: sample G completions per prompt and record what the RL losses need.

A :class:`RolloutBatch` is laid out group after group (the G completions of prompt 0, then
those of prompt 1, ...), as ``advantages`` expects. ``old_logps`` are the per-token log-probs
of the sampled tokens under the sampling policy, ``log_softmax(logits / temperature)``; like
TRL, they do not account for top-p truncation. :func:`token_logprobs` recomputes the same
quantity by teacher forcing, for the policy (with grad) and the reference (without).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor
from transformers import GenerationConfig, PreTrainedModel

from fgrpo_pipeline.modeling import Policy
from fgrpo_pipeline.registry import Registry


@dataclass
class SamplingConfig:
    """How completions are sampled; ``do_sample=False`` is greedy decoding."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 8
    seed: int = 0
    do_sample: bool = True

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if (
            not isinstance(self.max_new_tokens, int)
            or isinstance(self.max_new_tokens, bool)
            or self.max_new_tokens < 1
        ):
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")


@dataclass
class RolloutBatch:
    """N = P·G sampled sequences, the G of each prompt consecutive.

    ``prompt_ids`` are left-padded, ``completion_ids`` right-padded with the pad id.
    ``completion_mask`` is 1 on real completion tokens up to and including the first EOS.
    ``old_logps`` is 0 where ``completion_mask`` is 0. ``truncated`` marks completions that
    produced no EOS within ``max_new_tokens``.
    """

    prompts: list[str]
    completions: list[str]
    prompt_ids: Tensor
    prompt_mask: Tensor
    completion_ids: Tensor
    completion_mask: Tensor
    old_logps: Tensor
    lengths: Tensor
    truncated: Tensor
    group_size: int

    def __len__(self) -> int:
        return len(self.prompts)


class RolloutEngine(Protocol):
    def generate(
        self, policy: Policy, prompts: list[str], group_size: int, sampling: SamplingConfig
    ) -> RolloutBatch: ...


ENGINES: Registry[type[RolloutEngine]] = Registry("rollout engine")


def get_engine(name: str, **kwargs: object) -> RolloutEngine:
    """An instance of the engine registered as ``name``."""
    return ENGINES.get(name)(**kwargs)


def _eos_ids(policy: Policy) -> list[int]:
    eos = policy.model.generation_config.eos_token_id
    if eos is None:
        eos = policy.tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the policy has no EOS token: set tokenizer.eos_token_id")
    return [eos] if isinstance(eos, int) else list(eos)


def _through_first_eos(completion_ids: Tensor, eos_ids: list[int]) -> tuple[Tensor, Tensor]:
    """Per row: bool mask up to and including the first EOS (all True if none); has an EOS."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    eos_before = is_eos.long().cumsum(dim=1) - is_eos.long()
    return eos_before == 0, is_eos.any(dim=1)


def _sampled_logps(logits: Tensor, token_ids: Tensor, temperature: float) -> Tensor:
    """log softmax(logits / T) at ``token_ids``, without materialising a second [N, T, V]."""
    logits = logits.float() / temperature
    picked = logits.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


@ENGINES.register("hf")
class HFEngine:
    """Batched ``transformers`` generation: one ``generate`` call over all P·G sequences."""

    def generate(
        self, policy: Policy, prompts: list[str], group_size: int, sampling: SamplingConfig
    ) -> RolloutBatch:
        if not prompts:
            raise ValueError("prompts must not be empty")
        if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
            raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
        model, tokenizer = policy.model, policy.tokenizer
        pad_id = tokenizer.pad_token_id
        if pad_id is None:
            raise ValueError("the policy's tokenizer has no pad token")
        eos_ids = _eos_ids(policy)

        # Decoder-only batched generation needs left padding: new tokens must follow the prompt.
        encoded = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
        prompt_ids = encoded["input_ids"].repeat_interleave(group_size, dim=0).to(model.device)
        prompt_mask = encoded["attention_mask"].repeat_interleave(group_size, dim=0)
        prompt_mask = prompt_mask.to(model.device)

        knobs: dict[str, object] = {"do_sample": sampling.do_sample}
        if sampling.do_sample:
            # top_k=0 disables the library's default top-k of 50. Sampling knobs are left out
            # of greedy decoding, where transformers warns about them.
            knobs |= {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}
        config = GenerationConfig(
            **knobs,
            max_new_tokens=sampling.max_new_tokens,
            pad_token_id=pad_id,
            eos_token_id=eos_ids,
            use_cache=True,
            return_dict_in_generate=True,
            output_logits=True,
        )
        # A peft model copies its config into the base model it wraps: restore both.
        holders = [model, *([model.get_base_model()] if hasattr(model, "get_base_model") else [])]
        saved_configs, was_training = [h.generation_config for h in holders], model.training
        # generate() fills every knob left unset from model.generation_config (a checkpoint's
        # top_k or repetition_penalty, say); swapping it in keeps the sampling distribution the
        # one old_logps describe.
        for holder in holders:
            holder.generation_config = config
        model.eval()
        rng_devices = [model.device.index or 0] if model.device.type == "cuda" else []
        try:
            # Forked RNG: same seed → same samples, and the caller's RNG stream is untouched.
            with torch.no_grad(), torch.random.fork_rng(devices=rng_devices):
                torch.manual_seed(sampling.seed)
                out = model.generate(
                    input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config
                )
        finally:
            for holder, saved in zip(holders, saved_configs, strict=True):
                holder.generation_config = saved
            model.train(was_training)

        completion_ids = out.sequences[:, prompt_ids.shape[1] :]
        keep, has_eos = _through_first_eos(completion_ids, eos_ids)
        completion_ids = completion_ids.masked_fill(~keep, pad_id)
        # output_logits are the raw logits, before temperature/top-p processors.
        logits = torch.stack(out.logits, dim=1)
        old_logps = _sampled_logps(logits, completion_ids, sampling.temperature)
        old_logps = torch.where(keep, old_logps, torch.zeros_like(old_logps))
        lengths = keep.sum(dim=1)
        completions = tokenizer.batch_decode(
            [row[:n] for row, n in zip(completion_ids.tolist(), lengths.tolist(), strict=True)],
            skip_special_tokens=True,
        )
        return RolloutBatch(
            prompts=repeat_each(prompts, group_size),
            completions=completions,
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask.float(),
            completion_ids=completion_ids,
            completion_mask=keep.float(),
            old_logps=old_logps,
            lengths=lengths,
            truncated=~has_eos,
            group_size=group_size,
        )


def repeat_each(values: list, times: int) -> list:
    """``[a, b] → [a, a, b, b]`` for ``times=2``: per-prompt values laid out group after group."""
    return [value for value in values for _ in range(times)]


def batch_logprobs(
    model: PreTrainedModel, batch: RolloutBatch, temperature: float, micro_batch_size: int = 0
) -> Tensor:
    """:func:`token_logprobs` of a rollout batch's completions under ``model``, computed
    ``micro_batch_size`` sequences at a time (0 = all at once) to bound activation memory."""
    return torch.cat(
        [
            token_logprobs(
                model,
                batch.prompt_ids[rows],
                batch.prompt_mask[rows],
                batch.completion_ids[rows],
                batch.completion_mask[rows],
                temperature,
            )
            for rows in micro_batches(batch.completion_ids.shape[0], micro_batch_size)
        ]
    )


def micro_batches(n: int, size: int) -> list[slice]:
    """Consecutive slices of ``size`` rows covering ``n`` (one slice when ``size`` is 0)."""
    size = size or n
    return [slice(start, min(start + size, n)) for start in range(0, n, size)] or [slice(0, 0)]


def token_logprobs(
    model: PreTrainedModel,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    temperature: float = 1.0,
) -> Tensor:
    """Teacher-forced log-probs [N, T_completion] of ``completion_ids``; 0 where masked.

    Differentiable when called with grad enabled. Position ids come from the attention mask,
    as ``generate`` derives them; Qwen2's forward alone would count the left padding. With
    RoPE only relative positions matter, but models with absolute positions need this.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    n_completion = completion_ids.shape[1]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1).long()
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    # Logits at the last T_c + 1 positions predict the completion tokens (the final one is
    # unused): the lm_head never runs over the prompt.
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        logits_to_keep=n_completion + 1,
    ).logits[:, :-1]
    logps = _sampled_logps(logits, completion_ids, temperature)
    return torch.where(completion_mask.bool(), logps, torch.zeros_like(logps))


# Registers the "vllm" engine; vllm itself is imported only when that engine is used.
from fgrpo_pipeline import vllm_engine  # noqa: E402,F401
