"""The hf engine's direct decoding step (:mod:`fgrpo_pipeline.rollout.direct_step`): the
samples and log-probs of the model's own forward, on real tiny Qwen2 and Llama models (with
and without a trained LoRA adapter), and the forward for the models it does not fit."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from fgrpo_pipeline.models.policy import Policy
from fgrpo_pipeline.rollout import SamplingConfig, decoding, get_engine
from fgrpo_pipeline.rollout.direct_step import DirectStep
from tests.conftest import ENGINE_PROMPTS, briefly_warmed_policy, trained_lora
from tests.test_shared_prompt_scoring import _assert_same_rollouts

G = 4
SAMPLING = SamplingConfig(temperature=1.3, max_new_tokens=6, seed=3)
# The random Llama- and Qwen2-family models' sizes: grouped-query attention (4 heads, 2 kv).
SIZES = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


@pytest.fixture(scope="module")
def qwen2():
    return briefly_warmed_policy()


def _tokens(tokenizer) -> dict[str, int]:
    return {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def _random_policy(tokenizer, model_class, config) -> Policy:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = model_class(config)
    return Policy(model.eval(), tokenizer)


def _llama(tokenizer, **extra) -> Policy:
    """A random tiny Llama with grouped-query attention and biased projections, initialised
    wide enough that its next-token distributions are far from uniform."""
    config = LlamaConfig(
        **SIZES,
        attention_bias=True,
        initializer_range=0.3,
        **_tokens(tokenizer),
        **extra,
    )
    return _random_policy(tokenizer, LlamaForCausalLM, config)


def _counting_steps(monkeypatch) -> list[int]:
    """Spy on DirectStep.__call__: the number of rows of every direct step."""
    rows: list[int] = []
    original = DirectStep.__call__

    def call(self, tokens, positions, attend):
        rows.append(len(tokens))
        return original(self, tokens, positions, attend)

    monkeypatch.setattr(DirectStep, "__call__", call)
    return rows


@pytest.mark.parametrize("model", ["qwen2", "qwen2 with LoRA", "llama", "llama with LoRA"])
@pytest.mark.parametrize("cascade", [True, False])
@pytest.mark.parametrize("share_prompts", [True, False])
def test_direct_steps_sample_what_the_forward_samples(
    qwen2, monkeypatch, model, cascade, share_prompts
):
    """The same tokens and log-probs (up to float rounding) as the model's forward at every
    step, with each prompt's keys and values held once or per row, finished rows dropped."""
    policy = qwen2 if model.startswith("qwen2") else _llama(qwen2.tokenizer)
    if model.endswith("LoRA"):
        policy = trained_lora(policy)
    monkeypatch.setattr(decoding, "CASCADE_MIN_PROMPT_TOKENS", 0 if cascade else 10**6)
    options = {"share_prompts": share_prompts}
    steps = _counting_steps(monkeypatch)
    direct = get_engine("hf", **options).generate(policy, ENGINE_PROMPTS * 2, G, SAMPLING)
    assert steps and steps[0] == len(ENGINE_PROMPTS) * 2 * G
    forward = get_engine("hf", direct_step=False, **options)
    _assert_same_rollouts(direct, forward.generate(policy, ENGINE_PROMPTS * 2, G, SAMPLING))


def test_a_llama_samples_what_generate_samples(qwen2):
    llama = _llama(qwen2.tokenizer)
    _assert_same_rollouts(
        get_engine("hf").generate(llama, ENGINE_PROMPTS, G, SAMPLING),
        get_engine("hf", use_generate=True).generate(llama, ENGINE_PROMPTS, G, SAMPLING),
    )


def _unfit_models(tokenizer) -> dict[str, Policy]:
    sliding = Qwen2Config(
        **SIZES,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=1,
        **_tokens(tokenizer),
    )
    gpt2 = GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, **_tokens(tokenizer))
    dynamic = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    return {
        "another architecture (GPT-2)": _random_policy(tokenizer, GPT2LMHeadModel, gpt2),
        "a sliding-window layer": _random_policy(tokenizer, Qwen2ForCausalLM, sliding),
        "a length-dependent rotary embedding": _llama(tokenizer, rope_parameters=dynamic),
    }


def test_models_it_does_not_fit_are_stepped_through_their_forward(qwen2, monkeypatch):
    """No direct step for another architecture, a sliding-window layer or a rotary
    embedding recomputed from the length; the loop steps them through their forward and
    samples what generate samples."""
    assert DirectStep.of(qwen2.model, 16) is not None
    steps = _counting_steps(monkeypatch)
    for name, policy in _unfit_models(qwen2.tokenizer).items():
        assert DirectStep.of(policy.model, 16) is None, name
        config = SamplingConfig(temperature=1.3, max_new_tokens=4, seed=1)
        ours = get_engine("hf").generate(policy, ENGINE_PROMPTS, G, config)
        theirs = get_engine("hf", use_generate=True).generate(policy, ENGINE_PROMPTS, G, config)
        _assert_same_rollouts(ours, theirs)
    assert steps == []


def test_a_forward_that_does_more_than_the_modules_is_kept(qwen2):
    """A forward replaced on the instance (accelerate's autocast wrapper does this) or a
    hook on the model: the step would skip what they add, so the loop keeps the forward."""
    model = copy.deepcopy(qwen2.model)
    assert DirectStep.of(model, 16) is not None
    handle = model.model.register_forward_pre_hook(lambda module, args: None)
    assert DirectStep.of(model, 16) is None
    handle.remove()
    model.forward = torch.autocast("cpu", dtype=torch.bfloat16)(model.forward)
    assert DirectStep.of(model, 16) is None
