"""The ``hf`` rollout engine: batched sampling from a ``transformers`` causal LM."""

from __future__ import annotations

import contextlib

import torch
from transformers import GenerationConfig, PreTrainedModel

from fgrpo_pipeline.models.policy import Policy
from fgrpo_pipeline.rollout.decoding import SAMPLERS, Decoded, decode
from fgrpo_pipeline.rollout.engine import (
    ENGINES,
    RolloutBatch,
    SamplingConfig,
    decode_texts,
    policy_eos_ids,
    repeat_each,
    through_first_eos,
)
from fgrpo_pipeline.rollout.logprobs import prompt_pass, sampled_logps


@ENGINES.register("hf")
class HFEngine:
    """Batched sampling from a ``transformers`` causal LM: all P·G sequences at once.

    By default the engine runs its own decoding loop (:mod:`.decoding`): each distinct
    prompt prefilled once, its keys and values held once for its G rows
    (``cascade_attention``), a KV cache allocated once, finished rows dropped from the batch
    (``drop_finished``), a Llama-family model's decoding steps run on its modules without
    its forward's per-call machinery (``direct_step``), the sampling rule that of
    ``generate`` with the engine's knobs (``sampler="multinomial"``, its very draws; or
    ``"inverse_cdf"``: one uniform per row, the same distribution, other samples for a
    seed, far less work per step at real vocabularies on a CPU).
    ``use_generate=True`` calls ``model.generate`` instead (also the fall-back for a model
    whose forward returns no cache the loop can drive); there, with ``share_prompts`` (the
    default), all but the last token of each distinct prompt run once and ``generate``
    starts from that cache repeated G times. Either way the logits agree with a full
    prefill's up to float rounding and every row gets the random draws ``generate`` gives
    it, so the same seed gives the same samples on every path, whatever the options (a draw
    could only differ by landing within rounding of a category boundary). vLLM has its own
    engine and prefix caching; it is unaffected.
    """

    def __init__(
        self,
        share_prompts: bool = True,
        drop_finished: bool = True,
        cascade_attention: bool = True,
        use_generate: bool = False,
        direct_step: bool = True,
        sampler: str = "multinomial",
    ) -> None:
        options = {
            "share_prompts": share_prompts,
            "drop_finished": drop_finished,
            "cascade_attention": cascade_attention,
            "use_generate": use_generate,
            "direct_step": direct_step,
        }
        for name, value in options.items():
            if not isinstance(value, bool):
                raise ValueError(f"hf engine option {name!r} must be true or false, got {value!r}")
        if sampler not in SAMPLERS:
            raise ValueError(
                f"hf engine option 'sampler' must be one of {SAMPLERS}, got {sampler!r}"
            )
        if use_generate and sampler != "multinomial":
            raise ValueError(
                f"hf engine option 'sampler' is {sampler!r}, but use_generate: true samples with "
                "generate's own multinomial draw; drop one of the two"
            )
        self.sampler = sampler
        self.share_prompts = share_prompts
        self.drop_finished = drop_finished
        self.cascade_attention = cascade_attention
        self.use_generate = use_generate
        self.direct_step = direct_step

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
        eos_ids = policy_eos_ids(policy)

        # Decoder-only batched generation needs left padding: new tokens must follow the prompt.
        encoded = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
        encoded = {key: encoded[key].to(model.device) for key in ("input_ids", "attention_mask")}
        prompt_ids = encoded["input_ids"].repeat_interleave(group_size, dim=0)
        prompt_mask = encoded["attention_mask"].repeat_interleave(group_size, dim=0)
        config = _generation_config(sampling, pad_id, eos_ids)
        rng_devices = [model.device.index or 0] if model.device.type == "cuda" else []
        # Forked RNG: same seed → same samples, and the caller's RNG stream is untouched.
        with (
            _sampling_mode(model, config),
            torch.no_grad(),
            torch.random.fork_rng(devices=rng_devices),
        ):
            decoded = None
            if not self.use_generate:
                torch.manual_seed(sampling.seed)
                decoded = decode(
                    model,
                    encoded["input_ids"],
                    encoded["attention_mask"],
                    group_size,
                    sampling,
                    eos_ids,
                    pad_id,
                    share_prompts=self.share_prompts,
                    drop_finished=self.drop_finished,
                    cascade_attention=self.cascade_attention,
                    direct_step=self.direct_step,
                    sampler=self.sampler,
                )
            if decoded is None:
                decoded = self._generate(model, encoded, prompt_ids, prompt_mask, config, sampling)
        return _to_batch(decoded, prompts, prompt_ids, prompt_mask, group_size, policy)

    def _generate(self, model, encoded, prompt_ids, prompt_mask, config, sampling) -> Decoded:
        """``model.generate``'s samples and their log-probs."""
        group_size = prompt_ids.shape[0] // encoded["input_ids"].shape[0]
        prefilled = (
            _prefill_shared(model, encoded, group_size, prompt_ids.device)
            if self.share_prompts
            else {}
        )
        torch.manual_seed(sampling.seed)
        out = model.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            generation_config=config,
            **prefilled,
        )
        completion_ids = out.sequences[:, prompt_ids.shape[1] :]
        # output_logits are the raw logits, before the temperature/top-p processors: apply
        # them here, a step at a time (no [N, T, V] stack, and each step's [N, V] is the very
        # tensor the processors saw, so the nucleus is the one sampled from).
        top_p = sampling.top_p if sampling.do_sample else 1.0
        logps = torch.stack(
            [
                sampled_logps(step_logits, step_ids, sampling.temperature, top_p)
                for step_logits, step_ids in zip(out.logits, completion_ids.unbind(1), strict=True)
            ],
            dim=1,
        )
        return Decoded(completion_ids, logps)


def _generation_config(sampling: SamplingConfig, pad_id: int, eos_ids: list[int]):
    """Every knob of ``generate``: nothing is left to the model's own generation config."""
    knobs: dict[str, object] = {"do_sample": sampling.do_sample}
    if sampling.do_sample:
        # top_k=0 disables the library's default top-k of 50. Sampling knobs are left out
        # of greedy decoding, where transformers warns about them.
        knobs |= {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}
    return GenerationConfig(
        **knobs,
        max_new_tokens=sampling.max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=eos_ids,
        use_cache=True,
        return_dict_in_generate=True,
        output_logits=True,
    )


@contextlib.contextmanager
def _sampling_mode(model, config: GenerationConfig):
    """The model in eval mode with ``config`` as its generation config, both restored after.

    generate() fills every knob left unset from model.generation_config (a checkpoint's
    top_k or repetition_penalty, say); swapping it in keeps the sampling distribution the
    one old_logps describe. A peft model copies its config into the base model it wraps:
    both are swapped and restored."""
    holders = [model, *([model.get_base_model()] if hasattr(model, "get_base_model") else [])]
    saved_configs, was_training = [h.generation_config for h in holders], model.training
    for holder in holders:
        holder.generation_config = config
    model.eval()
    try:
        yield
    finally:
        for holder, saved in zip(holders, saved_configs, strict=True):
            holder.generation_config = saved
        model.train(was_training)


def _to_batch(decoded: Decoded, prompts, prompt_ids, prompt_mask, group_size, policy):
    """The decoded samples as a batch: completions through their first EOS, padded after,
    with the log-probs of the distribution sampled from (0 after the first EOS)."""
    pad_id = policy.tokenizer.pad_token_id
    keep, has_eos = through_first_eos(decoded.completion_ids, policy_eos_ids(policy))
    completion_ids = decoded.completion_ids.masked_fill(~keep, pad_id)
    old_logps = torch.where(keep, decoded.logps, torch.zeros_like(decoded.logps))
    lengths = keep.sum(dim=1)
    completions = decode_texts(
        policy.tokenizer,
        [row[:n] for row, n in zip(completion_ids.tolist(), lengths.tolist(), strict=True)],
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


def _prefill_shared(
    model: PreTrainedModel, encoded: dict, group_size: int, device: torch.device
) -> dict[str, object]:
    """``generate``'s cache keyword and a cache of each distinct prompt without its last
    token, repeated ``group_size`` times; {} (a full prefill) when that saves nothing."""
    ids, mask = encoded["input_ids"][:, :-1], encoded["attention_mask"][:, :-1]
    if group_size < 2 or ids.shape[1] == 0:
        return {}
    prompts = prompt_pass(model, ids.to(device), mask.to(device))
    if prompts is None:
        return {}
    _, name, cache = prompts
    cache.batch_repeat_interleave(group_size)
    return {name: cache}
