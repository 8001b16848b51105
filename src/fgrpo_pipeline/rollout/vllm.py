"""The vLLM rollout engine (the optional ``gpu`` extra), behind the :class:`RolloutEngine` API.

Selected by name (``engine: vllm``); ``vllm`` itself is imported only when the engine builds
its ``vllm.LLM`` or generates, never when this module is imported, so the CPU stack (where
vLLM is not installed) registers and validates the engine without it. Selecting it without
the package fails with a :class:`RuntimeError` naming the supported range and the install
command (:func:`import_vllm`).

Supported range: ``vllm>=0.10.2,<0.34`` (``SUPPORTED_VLLM``; the ``gpu`` extra pins the same).

* Lower bound 0.10.2: the first release whose ``LLM(logprobs_mode="processed_logprobs")``
  returns the log-probs *after* temperature (and top-k/top-p). Before, V1 returned
  ``raw_logprobs`` (log-softmax of the unscaled logits, the v0.10.0 sampler docs), and the
  ``processed_logprobs`` of 0.10.0/0.10.1 stopped short of the temperature (prime-rl PR 697
  patched vLLM's sampler for it); neither is the ``old_logps`` the losses need at
  ``temperature != 1``. TRL hit the same (issue 4159, "vLLM not computing correct log probs
  when using GRPO with =/=1 temperature") and fixed it by this mode and a bump to 0.10.2
  (PR 4163).
* Upper bound < 0.34: 0.33.0 is the newest release, and the one whose source the
  version-specific calls below were checked against. vLLM changes these internals between
  minor releases, so the range is widened only after a GPU run on the new release.
* vLLM pins its own torch (0.33.0: ``torch==2.14.0``, ``transformers>=5.16.1,<5.21``), so it
  cannot be installed in this project's CPU environment (torch 2.13 CPU wheel, transformers
  5.24): install it with ``pip install -e '.[gpu]'`` in a separate CUDA environment.

What was checked, and against what
----------------------------------
Read in the vLLM 0.33.0 wheel (``vllm/entrypoints/llm.py``, ``sampling_params.py``,
``config/model.py``, ``v1/sample/sampler.py``, ``v1/core/sched/utils.py``,
``v1/engine/{llm_engine,core,core_client,parallel_sampling}.py``, ``v1/executor/*``,
``lora/request.py``, ``outputs.py``, ``logprobs.py``), and in the docs of 0.10.0 to 0.22.1:

* ``LLM(model, tokenizer=..., tensor_parallel_size, dtype, seed, gpu_memory_utilization,
  enforce_eager, **EngineArgs)`` with ``enable_lora``, ``max_lora_rank`` (0.33.0 allows
  1, 8, 16, 32, 64, 128, 256, 320, 512; 1 is left out here, as older releases may lack it)
  and ``logprobs_mode`` among the engine args. ``VLLM_ENABLE_V1_MULTIPROCESSING`` (default
  1) runs the engine core in a separate process.
* ``LLM.generate(prompts, sampling_params, *, use_tqdm, lora_request)``: prompts may be
  token-id prompts ``{"prompt_token_ids": [...]}`` (``TokensPrompt`` is that TypedDict), and
  ``sampling_params`` one per prompt. Outputs come back in prompt order; with ``n > 1`` the
  ``n`` completions are aggregated by their ``index``.
* ``SamplingParams(n, temperature, top_p, top_k, max_tokens, logprobs, seed,
  stop_token_ids, ignore_eos, detokenize)``. ``top_k=0`` disables top-k (-1 is accepted too).
  ``temperature=0`` is greedy and then requires ``n == 1``; ``0 < temperature < 0.01`` is
  silently raised to 0.01, and 0.33.0 rejects ``temperature > 2``. ``logprobs=0`` returns the
  sampled token's log-prob only. With a ``seed`` and ``n > 1`` the k-th child request gets
  ``seed + k`` (``v1/engine/parallel_sampling.py``).
* ``RequestOutput.outputs[i]``: ``CompletionOutput`` with ``index``, ``token_ids``,
  ``logprobs`` (list, one ``{token_id: Logprob}`` dict per generated token; ``Logprob.logprob``
  is the float), ``finish_reason`` (``"stop"``, ``"length"``, ``"abort"``, ``"error"``,
  ``"repetition"``) and ``stop_reason`` (the stop token id when a ``stop_token_ids`` entry
  stopped it). The scheduler appends a sampled token before checking it for a stop
  (``check_stop``), so in 0.33.0 the EOS is *in* ``token_ids``; :func:`outputs_to_batch` also
  accepts outputs without it. The EOS check comes before the length check, so a completion
  whose last allowed token is the EOS finishes with ``"stop"``.
* ``logprobs_mode="processed_logprobs"``: "the values after applying all processors,
  including temperature and top_k/top_p" (``ModelConfig.logprobs_mode``, 0.33.0), i.e. with
  ``top_p = 1``, top-k off and no penalties exactly ``log_softmax(logits / T)`` at the sampled
  token: the ``old_logps`` of :class:`~fgrpo_pipeline.rollout.RolloutBatch`. With
  ``top_p < 1`` they are renormalised over the nucleus (``apply_top_k_top_p``: ascending
  sort, drop cumulative probability ≤ 1 − p, keep the most probable token, the rule of
  transformers' ``TopPLogitsWarper``), which is the rollout module's convention too
  (:func:`~fgrpo_pipeline.rollout.nucleus_mask`; TRL instead compares them with the
  full-vocabulary log-softmax, different supports, TRL issue 6945): they are kept. Greedy
  requests return them *before* temperature; then :func:`outputs_to_batch` recomputes
  ``old_logps`` by teacher forcing with the policy (one no-grad forward pass).
* Weight sync: TRL's colocated GRPO (``trl/generation/vllm_generation.py``) calls
  ``llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights([(name,
  tensor)])`` with the engine in-process (``distributed_executor_backend="external_launcher"``),
  then ``llm.reset_prefix_cache()``. Here the same ``model_runner.model.load_weights`` runs
  through ``LLM.collective_rpc(fn, args=...)``, which calls ``fn(worker, *args)`` on every
  worker (0.33.0 ``run_method``): in-process for one GPU, cloudpickled to the worker
  processes for tensor parallelism; each rank's ``load_weights`` takes its own shard of the
  full tensors. The engine core is kept in-process by setting
  ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (unless already set) before the ``LLM`` is built:
  with a separate engine-core process, sending a function needs
  ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``. 0.33.0 also has a ``update_weights`` /
  ``init_weight_transfer_engine`` API (NCCL/IPC transfer for a separate trainer), not used
  here. This call is the one isolated in :func:`push_weights`; it is the likeliest to need a
  change for a new vLLM release.
* LoRA: ``LoRARequest(lora_name, lora_int_id, lora_path)`` with ``lora_int_id >= 1``; vLLM
  caches adapters by id, so each sync saves the adapter to a new folder under a new id.

Assumed, not verified (there is no GPU here): that releases between 0.10.2 and 0.33.0 behave
as above where only their docs, not their source, were read (``collective_rpc`` with a
function, the in-process switch); and the generation itself. The engine's code path is
tested on CPU as far as it goes (selection, the missing-package error, request building,
conversion of vLLM-shaped outputs into the rollout batch, and the engine's calls into a
stand-in ``vllm`` module); its generation is tested only on a GPU machine.

Weight sync protocol: the trainer should call ``engine.sync_weights(policy)`` right after
each ``optimizer.step()`` when the engine has that method (the HF engine needs none, it
samples from the live model). As a safety net, :meth:`VLLMEngine.generate` also syncs when
the policy's parameters changed since the last sync (their autograd version counters moved),
so a missing call costs time at the next rollout, not stale samples.

No Kedro or MLflow here.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fgrpo_pipeline.models.policy import Policy
from fgrpo_pipeline.rollout.engine import (
    ENGINES,
    RolloutBatch,
    SamplingConfig,
    decode_texts,
    policy_eos_ids,
    repeat_each,
)
from fgrpo_pipeline.rollout.logprobs import token_logprobs

SUPPORTED_VLLM = ">=0.10.2,<0.34"
INSTALL_HINT = "pip install -e '.[gpu]' on a CUDA machine"
DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
# vLLM silently raises temperatures below this to it (SamplingParams.__post_init__).
MIN_TEMPERATURE = 1e-2
LOGPROBS_MODE = "processed_logprobs"


def import_vllm() -> ModuleType:
    """The ``vllm`` module, or a ``RuntimeError`` saying how to install the supported range."""
    try:
        import vllm
    except ImportError as err:
        raise RuntimeError(
            f"rollout engine 'vllm' needs the optional vllm package (supported: "
            f"vllm{SUPPORTED_VLLM}): {INSTALL_HINT} ({err})"
        ) from err
    return vllm


def _fail(name: str, message: str, value: object) -> None:
    raise ValueError(f"vllm engine setting {name!r} {message}, got {value!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class VLLMSettings:
    """The engine's own settings (``engine_options`` in the training parameters).

    ``gpu_memory_utilization`` is the fraction of each GPU vLLM may take (weights and KV
    cache); when colocated with the trainer it must leave room for the policy, its gradients
    and the optimiser. ``tensor_parallel_size`` is the number of GPUs the engine shards the
    model over. ``enable_lora`` serves a LoRA policy's adapter on top of the base weights
    (synced as adapter files) instead of merged full weights; ``max_lora_rank`` must be at
    least the adapter's rank. ``model_path`` is a local Hugging Face folder (or hub id) with
    the policy's architecture and tokenizer; ``None`` saves the policy to a temporary folder.
    """

    gpu_memory_utilization: float = 0.5
    tensor_parallel_size: int = 1
    dtype: str = "auto"
    enable_lora: bool = False
    max_lora_rank: int = 16
    enforce_eager: bool = False
    model_path: str | None = None

    def __post_init__(self) -> None:
        fraction = self.gpu_memory_utilization
        if not isinstance(fraction, int | float) or isinstance(fraction, bool):
            _fail("gpu_memory_utilization", "must be a number in (0, 1]", fraction)
        if not 0 < fraction <= 1:
            _fail("gpu_memory_utilization", "must be in (0, 1]", fraction)
        if not _is_int(self.tensor_parallel_size) or self.tensor_parallel_size < 1:
            _fail("tensor_parallel_size", "must be an integer >= 1", self.tensor_parallel_size)
        if self.dtype not in DTYPES:
            _fail("dtype", f"must be one of {', '.join(DTYPES)}", self.dtype)
        for name in ("enable_lora", "enforce_eager"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, "must be true or false", getattr(self, name))
        if not _is_int(self.max_lora_rank) or self.max_lora_rank not in LORA_RANKS:
            _fail(
                "max_lora_rank",
                f"must be one of {', '.join(map(str, LORA_RANKS))}",
                self.max_lora_rank,
            )
        if self.model_path is not None:
            if not isinstance(self.model_path, str | os.PathLike) or not str(self.model_path):
                _fail("model_path", "must be a folder or model id, or null", self.model_path)
            self.model_path = str(self.model_path)

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> VLLMSettings:
        """Settings from a parameters mapping; an unknown key is an error listing the valid ones."""
        params = dict(params or {})
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(params) - set(valid))
        if unknown:
            raise ValueError(
                f"unknown vllm engine setting(s) {unknown}; valid settings: {', '.join(valid)}"
            )
        return cls(**params)


def llm_kwargs(settings: VLLMSettings, model_path: str) -> dict[str, Any]:
    """Keyword arguments of ``vllm.LLM`` for a model folder and these settings."""
    kwargs: dict[str, Any] = {
        "model": model_path,
        "tokenizer": model_path,
        "tensor_parallel_size": settings.tensor_parallel_size,
        "gpu_memory_utilization": settings.gpu_memory_utilization,
        "dtype": settings.dtype,
        "enforce_eager": settings.enforce_eager,
        "seed": 0,
        # Log-probs after temperature: the old_logps of the RL losses (see the module doc).
        "logprobs_mode": LOGPROBS_MODE,
    }
    if settings.enable_lora:
        kwargs |= {"enable_lora": True, "max_lora_rank": settings.max_lora_rank}
    return kwargs


def _check_request_args(prompts: Sequence[str], group_size: int) -> None:
    if not prompts:
        raise ValueError("prompts must not be empty")
    if not _is_int(group_size) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")


def build_requests(
    policy: Policy, prompts: Sequence[str], group_size: int, sampling: SamplingConfig
) -> tuple[list[dict[str, list[int]]], dict[str, Any]]:
    """vLLM token-id prompts and the ``SamplingParams`` keyword arguments for one rollout.

    The prompt ids are the policy tokenizer's, with its special tokens (the BOS), exactly as
    :class:`~fgrpo_pipeline.rollout.HFEngine` tokenizes them before left padding. vLLM stops
    on the policy's EOS ids and on nothing else (``ignore_eos`` turns off vLLM's own EOS,
    which comes from the saved tokenizer and could differ; ``stop_token_ids`` still stop and
    stay in ``token_ids``), as ``transformers`` ``generate`` does with the HF engine's
    ``eos_token_id``. Sampling uses temperature and top-p only (``top_k=0``); greedy decoding
    is ``temperature=0`` with ``n=1`` (vLLM refuses ``n > 1`` there):
    :func:`outputs_to_batch` repeats that one completion ``group_size`` times, as the G
    greedy copies of the HF engine are identical. The seed here is the rollout's;
    :func:`per_request_kwargs` derives one per prompt from it.
    """
    _check_request_args(prompts, group_size)
    if sampling.do_sample and sampling.temperature < MIN_TEMPERATURE:
        raise ValueError(
            f"temperature must be >= {MIN_TEMPERATURE} with the vllm engine (vLLM silently "
            f"raises smaller ones to {MIN_TEMPERATURE}), got {sampling.temperature!r}"
        )
    encoded = policy.tokenizer(list(prompts))["input_ids"]
    requests = [{"prompt_token_ids": list(ids)} for ids in encoded]
    kwargs: dict[str, Any] = {
        "max_tokens": sampling.max_new_tokens,
        "logprobs": 0,  # the sampled token's log-prob only
        "stop_token_ids": policy_eos_ids(policy),
        "ignore_eos": True,
        "detokenize": False,  # completions are decoded with the policy's tokenizer
    }
    if sampling.do_sample:
        kwargs |= {
            "n": group_size,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": 0,
            "seed": sampling.seed,
        }
    else:
        kwargs |= {"n": 1, "temperature": 0.0}
    return requests, kwargs


def request_seed(seed: int, index: int) -> int:
    """The vLLM seed of prompt ``index`` in a rollout seeded ``seed``.

    vLLM gives the k-th of the ``n`` samples of a request ``seed + k``; one shared seed would
    give the k-th sample of every prompt the same random stream. Mixing (seed, index) through
    numpy's ``SeedSequence`` gives each prompt its own, reproducibly.
    """
    state = np.random.SeedSequence([seed & 0xFFFFFFFFFFFFFFFF, index]).generate_state(1)
    return int(state[0])


def per_request_kwargs(kwargs: Mapping[str, Any], n_requests: int) -> list[dict[str, Any]]:
    """``SamplingParams`` keyword arguments per request: a seed of its own when seeded."""
    if kwargs.get("seed") is None:
        return [dict(kwargs) for _ in range(n_requests)]
    return [{**kwargs, "seed": request_seed(kwargs["seed"], i)} for i in range(n_requests)]


def _completions_of(request: Any, group_size: int, greedy: bool, i: int) -> list[Any]:
    outs = list(request.outputs)
    # n > 1 outputs are aggregated by index; sort in case a version returns them otherwise.
    outs.sort(key=lambda out: getattr(out, "index", 0))
    if greedy and len(outs) == 1:
        return outs * group_size
    if len(outs) != group_size:
        raise ValueError(
            f"vLLM returned {len(outs)} completions for prompt {i}, expected group_size="
            f"{group_size}" + (" (or 1 for greedy decoding)" if greedy else "")
        )
    return outs


def _completion_tokens(out: Any, eos_ids: list[int]) -> tuple[list[int], list[float], bool]:
    """(token ids through the first EOS, their log-probs (NaN: unknown), has an EOS)."""
    finish = getattr(out, "finish_reason", None)
    if finish not in ("stop", "length"):
        raise RuntimeError(f"a vLLM completion finished with {finish!r}, not 'stop' or 'length'")
    ids = [int(t) for t in out.token_ids]
    if out.logprobs is None:
        raise ValueError("vLLM returned no logprobs: SamplingParams needs logprobs=0")
    entries = list(out.logprobs)
    if len(entries) < len(ids):
        raise ValueError(f"vLLM returned {len(entries)} logprobs for {len(ids)} tokens")

    def logprob(position: int, token: int) -> float:
        if position >= len(entries) or token not in entries[position]:
            return float("nan")
        return float(entries[position][token].logprob)

    eos_at = next((j for j, t in enumerate(ids) if t in eos_ids), None)
    if eos_at is not None:
        ids = ids[: eos_at + 1]
    elif finish == "stop":
        # The stop token was left out of token_ids: put it back, as HF generate keeps it.
        stop = getattr(out, "stop_reason", None)
        ids.append(stop if _is_int(stop) and stop in eos_ids else eos_ids[0])
    logps = [logprob(j, t) for j, t in enumerate(ids)]
    return ids, logps, ids[-1] in eos_ids if ids else False


@torch.no_grad()
def _teacher_forced(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    temperature: float,
    top_p: float = 1.0,
) -> Tensor:
    was_training = model.training
    model.eval()
    try:
        return token_logprobs(
            model,
            prompt_ids,
            prompt_mask,
            completion_ids,
            completion_mask,
            temperature,
            top_p=top_p,
        )
    finally:
        model.train(was_training)


def outputs_to_batch(
    policy: Policy,
    prompts: Sequence[str],
    group_size: int,
    outputs: Sequence[Any],
    sampling: SamplingConfig,
) -> RolloutBatch:
    """A :class:`RolloutBatch` laid out as the HF engine's, from vLLM ``RequestOutput`` s.

    ``outputs`` is anything shaped like vLLM's: one object per prompt, in prompt order, with
    ``.outputs``, a list of completions with ``.token_ids``, ``.logprobs`` (a list of
    ``{token_id: obj}`` dicts, ``obj.logprob`` a float), ``.finish_reason`` and optionally
    ``.index`` and ``.stop_reason``. Prompt ids are the tokenizer's, left-padded and repeated
    per group; completion ids are cut after the first EOS (kept inside the mask, put back if
    vLLM left it out) and right-padded with the pad id; ``truncated`` marks completions
    without an EOS (``finish_reason == "length"``). ``old_logps`` are vLLM's where they are
    ``log_softmax(logits / T)`` (renormalised over the nucleus when sampling with
    ``top_p < 1``) and recomputed by teacher forcing with the policy where they are not or
    are missing: with greedy decoding at ``T != 1`` and for a stop token vLLM returned no
    log-prob for (see the module doc). 0 where masked.
    """
    _check_request_args(prompts, group_size)
    if len(outputs) != len(prompts):
        raise ValueError(f"got {len(outputs)} vLLM outputs for {len(prompts)} prompts")
    model, tokenizer = policy.model, policy.tokenizer
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        raise ValueError("the policy's tokenizer has no pad token")
    eos_ids = policy_eos_ids(policy)
    greedy = not sampling.do_sample

    encoded = tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left")
    rows = _completion_rows(
        tokenizer(list(prompts))["input_ids"], outputs, group_size, greedy, eos_ids
    )
    completion_ids, old_logps, lengths, keep, truncated = _padded(rows, pad_id)

    device = model.device
    prompt_ids = encoded["input_ids"].repeat_interleave(group_size, dim=0).to(device)
    prompt_mask = encoded["attention_mask"].repeat_interleave(group_size, dim=0).to(device)
    prompt_mask = prompt_mask.float()
    completion_ids, keep, old_logps = (
        completion_ids.to(device),
        keep.to(device),
        old_logps.to(device),
    )
    lengths, truncated = lengths.to(device), truncated.to(device)
    completion_mask = keep.float()

    # vLLM's greedy log-probs are before temperature; sampled ones are the ones needed.
    if greedy and sampling.temperature != 1:
        old_logps = torch.full_like(old_logps, float("nan"))
    missing = torch.isnan(old_logps) & keep
    if missing.any():
        recomputed = _teacher_forced(
            model,
            prompt_ids,
            prompt_mask,
            completion_ids,
            completion_mask,
            sampling.temperature,
            1.0 if greedy else sampling.top_p,
        )
        old_logps = torch.where(missing, recomputed.to(old_logps.dtype), old_logps)
    old_logps = torch.where(keep, old_logps, torch.zeros_like(old_logps))

    completions = decode_texts(tokenizer, [ids for ids, _, _ in rows])
    return RolloutBatch(
        prompts=repeat_each(list(prompts), group_size),
        completions=completions,
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        old_logps=old_logps,
        lengths=lengths,
        truncated=truncated,
        group_size=group_size,
    )


def _completion_rows(
    expected: list[list[int]], outputs: Sequence[Any], group_size: int, greedy: bool, eos_ids
) -> list[tuple[list[int], list[float], bool]]:
    """(token ids, log-probs, has EOS) of every completion, group after group; each output
    must be for the prompt at its place (vLLM returns them in request order)."""
    rows: list[tuple[list[int], list[float], bool]] = []
    for i, request in enumerate(outputs):
        returned = getattr(request, "prompt_token_ids", None)
        if returned is not None and list(returned) != list(expected[i]):
            raise ValueError(
                f"vLLM output {i} is for prompt ids {list(returned)}, not {expected[i]} "
                "(outputs must be in prompt order)"
            )
        rows += [
            _completion_tokens(out, eos_ids)
            for out in _completions_of(request, group_size, greedy, i)
        ]
    return rows


def _padded(rows: list[tuple[list[int], list[float], bool]], pad_id: int):
    """The rows as right-padded tensors: (ids, log-probs, lengths, mask, truncated)."""
    width = max(len(ids) for ids, _, _ in rows)
    n = len(rows)
    completion_ids = torch.full((n, width), pad_id, dtype=torch.long)
    old_logps = torch.zeros((n, width), dtype=torch.float32)
    for r, (ids, logps, _) in enumerate(rows):
        completion_ids[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        old_logps[r, : len(ids)] = torch.tensor(logps, dtype=torch.float32)
    lengths = torch.tensor([len(ids) for ids, _, _ in rows], dtype=torch.long)
    keep = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)
    truncated = torch.tensor([not has_eos for _, _, has_eos in rows], dtype=torch.bool)
    return completion_ids, old_logps, lengths, keep, truncated


def _load_weights_on_worker(worker: Any, weights: list[tuple[str, Tensor]]) -> None:
    """Runs inside each vLLM worker (``collective_rpc`` passes the worker first)."""
    worker.model_runner.model.load_weights(weights=weights)


def push_weights(llm: Any, weights: Iterable[tuple[str, Tensor]], to_cpu: bool) -> None:
    """Load full (unsharded) Hugging Face-named weights into a running ``vllm.LLM``.

    The version-specific call (checked against vLLM 0.33.0, the same ``load_weights`` TRL's
    colocated GRPO uses): every worker's model loads the tensors and takes its shard. Worker
    processes (tensor parallelism) receive pickled arguments, hence ``to_cpu``. The prefix
    cache holds KV computed with the old weights, so it is dropped.
    """
    named = [(name, t.detach().cpu() if to_cpu else t.detach()) for name, t in weights]
    llm.collective_rpc(_load_weights_on_worker, args=(named,))
    llm.reset_prefix_cache()


def _version(model: nn.Module) -> tuple[int, int]:
    """Changes whenever a parameter is modified in place (optimiser steps, load_state_dict)."""
    return id(model), sum(p._version for p in model.parameters())


def _is_lora(policy: Policy) -> bool:
    from fgrpo_pipeline.models.lora import is_lora

    return is_lora(policy)


def _full_weights(policy: Policy) -> list[tuple[str, Tensor]]:
    """The policy's weights under Hugging Face names; a LoRA policy's merged into the base."""
    if _is_lora(policy):
        from fgrpo_pipeline.models.lora import merge_for_export

        policy = merge_for_export(policy)
    return list(policy.model.named_parameters())


@ENGINES.register("vllm")
class VLLMEngine:
    """Batched vLLM sampling of G completions per prompt, with log-probs.

    Built with the :class:`VLLMSettings` as keyword arguments; the ``vllm.LLM`` is created on
    the first :meth:`generate`, from ``model_path`` or from the policy saved to a temporary
    folder. Call :meth:`sync_weights` after each optimiser step (``generate`` syncs too if
    the policy's parameters changed since). With ``enable_lora`` the policy must be a peft
    LoRA model: vLLM holds its base weights and each sync hands it the adapter.
    """

    def __init__(self, **settings: Any) -> None:
        self.settings = VLLMSettings.from_params(settings)
        self._llm: Any = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self._synced: tuple[int, int] | None = None
        self._lora_request: Any = None
        self._lora_id = 0

    def __repr__(self) -> str:
        return f"VLLMEngine({self.settings})"

    def generate(
        self, policy: Policy, prompts: list[str], group_size: int, sampling: SamplingConfig
    ) -> RolloutBatch:
        vllm = import_vllm()
        requests, kwargs = build_requests(policy, prompts, group_size, sampling)
        params = [vllm.SamplingParams(**kw) for kw in per_request_kwargs(kwargs, len(requests))]
        llm = self._engine(policy)
        if self._synced != _version(policy.model):
            self.sync_weights(policy)
        outputs = llm.generate(requests, params, use_tqdm=False, lora_request=self._lora_request)
        return outputs_to_batch(policy, prompts, group_size, outputs, sampling)

    def sync_weights(self, policy: Policy) -> None:
        """Push the policy's current weights (or LoRA adapter) into the engine.

        Call after every ``optimizer.step()``. Before the engine exists there is nothing to
        push: it is built from the then-current policy.
        """
        if self._llm is None:
            return
        if self.settings.enable_lora:
            self._new_adapter(policy)
        else:
            to_cpu = self.settings.tensor_parallel_size > 1
            push_weights(self._llm, _full_weights(policy), to_cpu=to_cpu)
        self._synced = _version(policy.model)

    def close(self) -> None:
        """Drop the ``vllm.LLM`` and the temporary model and adapter folders."""
        self._llm = None
        self._lora_request = None
        self._synced = None
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def _dir(self, name: str) -> Path:
        if self._workdir is None:
            self._workdir = tempfile.TemporaryDirectory(prefix="fgrpo-vllm-")
        return Path(self._workdir.name) / name

    def _engine(self, policy: Policy) -> Any:
        if self._llm is not None:
            return self._llm
        vllm = import_vllm()
        lora = _is_lora(policy)
        if self.settings.enable_lora and not lora:
            raise ValueError(
                "vllm engine setting 'enable_lora' is true but the policy has no LoRA "
                "adapter; set training.lora or enable_lora: false"
            )
        if self.settings.model_path is not None:
            path, fresh = self.settings.model_path, False
        else:
            path, fresh = str(self._save_base(policy, lora)), True
        # Keep the engine core in this process: collective_rpc can then hand the weight
        # loader a function (see the module doc).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self._llm = vllm.LLM(**llm_kwargs(self.settings, path))
        if fresh and not self.settings.enable_lora:
            self._synced = _version(policy.model)
        else:
            # A model_path may hold other weights than the policy's (a resumed run);
            # with LoRA, the first adapter goes in here.
            self.sync_weights(policy)
        return self._llm

    def _save_base(self, policy: Policy, lora: bool) -> Path:
        path = self._dir("model")
        if lora and self.settings.enable_lora:
            # The base alone: the adapter's layers unwrapped, nothing merged.
            model = copy.deepcopy(policy.model).unload()
        elif lora:
            from fgrpo_pipeline.models.lora import merge_for_export

            model = merge_for_export(policy).model
        else:
            model = policy.model
        model.save_pretrained(path)
        policy.tokenizer.save_pretrained(path)
        return path

    def _new_adapter(self, policy: Policy) -> None:
        from vllm.lora.request import LoRARequest

        if not _is_lora(policy):
            raise ValueError(
                "vllm engine setting 'enable_lora' is true but the policy has no LoRA adapter"
            )
        model = policy.model
        rank = model.peft_config[model.active_adapter].r
        if rank > self.settings.max_lora_rank:
            _fail(
                "max_lora_rank",
                f"must be at least the adapter's rank r={rank}",
                self.settings.max_lora_rank,
            )
        self._lora_id += 1
        path = self._dir(f"adapter-{self._lora_id}")
        model.save_pretrained(path)
        self._lora_request = LoRARequest(f"policy-{self._lora_id}", self._lora_id, str(path))
        # vLLM reads an adapter folder when a request first uses it; the one before last
        # has been used (or replaced) by now.
        stale = self._dir(f"adapter-{self._lora_id - 2}")
        if stale.exists():
            import shutil

            shutil.rmtree(stale)
