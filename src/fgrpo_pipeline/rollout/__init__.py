"""Rollouts: engines that sample G completions per prompt (``hf``, ``vllm``, found by name
in :data:`ENGINES`), the batch they return, and log-probabilities by teacher forcing.

Importing the package registers both engines; vLLM itself is imported only when its engine
is used."""

# Registers the engines, "hf" first (its order is the registry's listing order).
from fgrpo_pipeline.rollout import hf, vllm  # noqa: F401
from fgrpo_pipeline.rollout.engine import (
    ENGINES,
    RolloutBatch,
    RolloutEngine,
    SamplingConfig,
    checked_engine_options,
    get_engine,
    repeat_each,
)
from fgrpo_pipeline.rollout.hf import HFEngine
from fgrpo_pipeline.rollout.logprobs import (
    batch_logprobs,
    micro_batches,
    nucleus_mask,
    rows_logprobs,
    token_logprobs,
)

__all__ = [
    "ENGINES",
    "HFEngine",
    "RolloutBatch",
    "RolloutEngine",
    "SamplingConfig",
    "batch_logprobs",
    "checked_engine_options",
    "get_engine",
    "micro_batches",
    "nucleus_mask",
    "repeat_each",
    "rows_logprobs",
    "token_logprobs",
]
