"""Scoring rollouts with each prompt run once per group, and generating from a shared prefill.

:func:`rows_logprobs` (and :func:`batch_logprobs` through it) runs the distinct prompts of a
slice once and the completions on top of their KV cache; :class:`HFEngine` prefills each
distinct prompt once. Both must give what the plain paths give, for real tiny models.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import pytest
import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutput

from fgrpo_pipeline.models.lora import make_reference
from fgrpo_pipeline.rollout import (
    RolloutBatch,
    SamplingConfig,
    batch_logprobs,
    get_engine,
    rows_logprobs,
    token_logprobs,
)
from fgrpo_pipeline.rollout import logprobs as logprobs_module
from fgrpo_pipeline.rollout.logprobs import bucket_rows
from tests.conftest import ENGINE_PROMPTS, briefly_warmed_policy, trained_lora

G = 4
TEMPERATURE = 0.7  # scoring temperature ≠ 1 (and ≠ the sampling one)
ATOL = 1e-5


@pytest.fixture(scope="module")
def policy():
    return briefly_warmed_policy()


def _generate(policy, group_size=G, **sampling) -> RolloutBatch:
    sampling = {"temperature": 1.3, "max_new_tokens": 4, "seed": 2, **sampling}
    return get_engine("hf").generate(policy, ENGINE_PROMPTS, group_size, SamplingConfig(**sampling))


@pytest.fixture(scope="module")
def batch(policy) -> RolloutBatch:
    batch = _generate(policy)
    # What the checks need: prompts of different lengths (different left padding) and
    # completions ending at different places, some at an EOS, some cut at max_new_tokens.
    assert len(set(batch.prompt_mask.sum(dim=1).tolist())) > 1
    assert len(set(batch.lengths.tolist())) > 1
    assert batch.truncated.any() and (~batch.truncated).any()
    assert batch.completion_mask.eq(0).any()
    return batch


def _unshared(model, batch, temperature=TEMPERATURE) -> torch.Tensor:
    return token_logprobs(
        model,
        batch.prompt_ids,
        batch.prompt_mask,
        batch.completion_ids,
        batch.completion_mask,
        temperature,
    )


@contextmanager
def counting_positions(model: nn.Module):
    """Counts the token positions the model's embedding layer looks up."""
    seen = []
    handle = model.get_input_embeddings().register_forward_hook(
        lambda _module, inputs, _output: seen.append(inputs[0].numel())
    )
    try:
        yield seen
    finally:
        handle.remove()


def _sizes(batch: RolloutBatch) -> tuple[int, int, int, int]:
    """P, N, L_prompt, T_completion."""
    n, lp = batch.prompt_ids.shape
    return n // batch.group_size, n, lp, batch.completion_ids.shape[1]


def _weights(batch: RolloutBatch) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch.completion_ids.shape, generator=gen)


def _grads(model: nn.Module, logps: torch.Tensor, weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of Σ weights·logps for every parameter that requires grad."""
    model.zero_grad(set_to_none=True)
    (logps * weights).sum().backward()
    grads = {
        name: None if p.grad is None else p.grad.clone()
        for name, p in model.named_parameters()
        if p.requires_grad
    }
    model.zero_grad(set_to_none=True)
    assert all(g is not None for g in grads.values())
    return grads


def _assert_same_grads(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    assert any(g.abs().sum() > 0 for g in expected.values())
    for name, ref in expected.items():
        # Float rounding differs (other batch shapes), scaled to the gradient's size.
        scale = float(ref.abs().max().clamp(min=1e-6))
        torch.testing.assert_close(got[name], ref, atol=1e-5 * scale, rtol=1e-4, msg=name)


@pytest.mark.parametrize("temperature", [TEMPERATURE, 1.3])
def test_shared_values_equal_the_unshared_path(policy, batch, temperature):
    with torch.no_grad():
        expected = _unshared(policy.model, batch, temperature)
        shared = batch_logprobs(policy.model, batch, temperature)
    torch.testing.assert_close(shared, expected, atol=ATOL, rtol=0)
    assert (shared[batch.completion_mask == 0] == 0).all()
    assert (shared[batch.completion_mask == 1] < 0).all()


def test_shared_values_equal_the_sampling_log_probs(policy, batch):
    with torch.no_grad():
        shared = batch_logprobs(policy.model, batch, 1.3)
    torch.testing.assert_close(shared, batch.old_logps, atol=1e-4, rtol=0)


def test_shared_gradients_equal_the_unshared_path(policy, batch):
    model, weights = policy.model, _weights(batch)
    expected = _grads(model, _unshared(model, batch), weights)
    shared = batch_logprobs(model, batch, TEMPERATURE)
    assert shared.requires_grad
    _assert_same_grads(_grads(model, shared, weights), expected)


def test_sharing_runs_each_prompt_once(policy, batch):
    """P·L_prompt + N·(T − 1) positions, not N·(L_prompt + T): the completions' last token
    predicts nothing that is scored, so it is never fed."""
    p, n, lp, t = _sizes(batch)
    with torch.no_grad(), counting_positions(policy.model) as seen:
        batch_logprobs(policy.model, batch, TEMPERATURE, length_buckets=1)
    assert seen == [p * lp, n * (t - 1)]
    with torch.no_grad(), counting_positions(policy.model) as seen:
        batch_logprobs(policy.model, batch, TEMPERATURE, share_prompts=False)
    assert seen == [n * (lp + t)]


@pytest.mark.parametrize("micro", [1, 3, G, 5, 4 * G])
def test_micro_batches_that_cut_groups_give_the_same_values_and_gradients(policy, batch, micro):
    model, weights = policy.model, _weights(batch)
    expected = _unshared(model, batch)
    reference = _grads(model, expected, weights)
    logps = batch_logprobs(model, batch, TEMPERATURE, micro)
    torch.testing.assert_close(logps, expected.detach(), atol=ATOL, rtol=0)
    _assert_same_grads(_grads(model, logps, weights), reference)


def test_micro_batch_positions_count_each_slice_s_prompts_once(policy, batch):
    p, n, lp, t = _sizes(batch)
    assert (p, n) == (4, 16)
    with torch.no_grad(), counting_positions(policy.model) as seen:
        batch_logprobs(policy.model, batch, TEMPERATURE, 3, length_buckets=1)
    # Slices 0-2 | 3-5 | 6-8 | 9-11 | 12-14 | 15 hold groups 0 | 0,1 | 1,2 | 2 | 3 | 3; the
    # last is a single row, scored the plain way. A slice's completions run as far as its
    # longest one needs (a row of length m feeds m - 1 tokens).
    prompts_per_slice = [1, 2, 2, 1, 1]
    widths = [int(batch.lengths[i : i + 3].max()) - 1 for i in range(0, 15, 3)]
    expected = [x for k, w in zip(prompts_per_slice, widths, strict=True) for x in (k * lp, 3 * w)]
    assert seen == [*expected, lp + t]


@pytest.mark.parametrize("rows", [slice(2, 7), slice(5, 6), slice(0, 16), slice(13, 16)])
def test_any_slice_of_rows_scores_like_the_same_rows_unshared(policy, batch, rows):
    with torch.no_grad():
        expected = _unshared(policy.model, batch)[rows]
        got = rows_logprobs(policy.model, batch, rows, TEMPERATURE)
        plain = rows_logprobs(policy.model, batch, rows, TEMPERATURE, share_prompts=False)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(plain, expected, atol=0, rtol=0)


def test_group_size_one_falls_back_to_the_plain_path(policy):
    batch = _generate(policy, group_size=1)
    _, n, lp, t = _sizes(batch)
    with torch.no_grad(), counting_positions(policy.model) as seen:
        got = batch_logprobs(policy.model, batch, TEMPERATURE)
        expected = _unshared(policy.model, batch)
    assert seen == [n * (lp + t)] * 2
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_share_prompts_false_is_the_plain_path(policy, batch):
    with torch.no_grad():
        got = batch_logprobs(policy.model, batch, TEMPERATURE, share_prompts=False)
        expected = _unshared(policy.model, batch)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_one_token_completions_need_only_the_prompt_pass(policy):
    batch = _generate(policy, max_new_tokens=1)
    p, _, lp, t = _sizes(batch)
    assert t == 1
    with torch.no_grad(), counting_positions(policy.model) as seen:
        got = batch_logprobs(policy.model, batch, TEMPERATURE)
    assert seen == [p * lp]
    with torch.no_grad():
        torch.testing.assert_close(got, _unshared(policy.model, batch), atol=ATOL, rtol=0)


def test_gradient_checkpointing_under_grad_falls_back_with_the_same_results(policy, batch):
    model = copy.deepcopy(policy.model).train()
    weights = _weights(batch)
    expected_logps = _unshared(model, batch)
    expected = _grads(model, expected_logps, weights)
    # activation_checkpointing_enable from transformers 5 on, the older name before.
    enable = getattr(model, "activation_checkpointing_enable", None)
    (enable or model.gradient_checkpointing_enable)({"use_reentrant": False})
    _, n, lp, t = _sizes(batch)
    with counting_positions(model) as seen:
        logps = batch_logprobs(model, batch, TEMPERATURE)
    assert seen == [n * (lp + t)]  # the plain path: checkpointed layers drop the cache
    torch.testing.assert_close(logps, expected_logps.detach(), atol=0, rtol=0)
    _assert_same_grads(_grads(model, logps, weights), expected)
    # Without grad nothing is checkpointed and the cache works: sharing is used.
    p = n // G
    with torch.no_grad(), counting_positions(model) as seen:
        logps = batch_logprobs(model, batch, TEMPERATURE)
    assert seen == [p * lp, n * (t - 1)]
    torch.testing.assert_close(logps, expected_logps.detach(), atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def lora_policy(policy):
    return trained_lora(policy)


def test_lora_policy_values_and_adapter_gradients_equal_the_unshared_path(lora_policy, batch):
    model, weights = lora_policy.model, _weights(batch)
    p, n, lp, t = _sizes(batch)
    expected_logps = _unshared(model, batch)
    expected = _grads(model, expected_logps, weights)
    assert all("lora_" in name for name in expected)
    with counting_positions(model) as seen:
        logps = batch_logprobs(model, batch, TEMPERATURE)
    assert seen == [p * lp, n * (t - 1)]
    torch.testing.assert_close(logps, expected_logps.detach(), atol=ATOL, rtol=0)
    _assert_same_grads(_grads(model, logps, weights), expected)


def test_lora_reference_shares_prompts_and_matches(lora_policy, policy, batch):
    """The adapter-disabled reference (called like a model) is the base policy."""
    reference = make_reference(lora_policy)
    p, n, lp, t = _sizes(batch)
    with counting_positions(lora_policy.model) as seen:
        got = batch_logprobs(reference, batch, TEMPERATURE, 5)
    assert len(seen) == 2 * 3 + 1  # slices of 5, 5, 5 and 1 rows: the last scored plainly
    assert not got.requires_grad
    with torch.no_grad():
        expected = _unshared(policy.model, batch)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


class LogitsOnly(nn.Module):
    """A model whose forward returns its logits and no cache."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = model

    def get_input_embeddings(self) -> nn.Module:
        return self.inner.get_input_embeddings()

    def forward(self, **kwargs) -> CausalLMOutput:
        return CausalLMOutput(logits=self.inner(**kwargs).logits)


def test_a_forward_without_a_cache_falls_back(policy, batch):
    model = LogitsOnly(policy.model)
    p, n, lp, t = _sizes(batch)
    with torch.no_grad(), counting_positions(model) as seen:
        got = batch_logprobs(model, batch, TEMPERATURE)
    assert seen == [p * lp, n * (lp + t)]  # the prompt pass, then the plain path
    with torch.no_grad():
        expected = _unshared(policy.model, batch)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_a_ddp_wrapped_policy_shares_prompts_with_the_same_results(policy, batch, tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        model = copy.deepcopy(policy.model).train()
        weights = _weights(batch)
        expected_logps = _unshared(model, batch)
        expected = _grads(model, expected_logps, weights)
        wrapped = DistributedDataParallel(model)
        p, n, lp, t = _sizes(batch)
        with counting_positions(model) as seen:
            logps = batch_logprobs(wrapped, batch, TEMPERATURE)
        assert seen == [p * lp, n * (t - 1)]
        torch.testing.assert_close(logps, expected_logps.detach(), atol=ATOL, rtol=0)
        _assert_same_grads(_grads(model, logps, weights), expected)
    finally:
        dist.destroy_process_group()


def test_a_batch_whose_groups_mix_prompts_is_refused(policy):
    batch = _generate(policy, group_size=1)
    batch.group_size = 2  # rows 0 and 1 hold different prompts
    with pytest.raises(ValueError, match="group_size=2"), torch.no_grad():
        batch_logprobs(policy.model, batch, TEMPERATURE)


def test_bad_temperature_is_refused(policy, batch):
    with pytest.raises(ValueError, match="temperature"):
        rows_logprobs(policy.model, batch, slice(0, 4), 0.0)


# Generation from a shared prefill ------------------------------------------------------------


@pytest.mark.parametrize(
    ("group_size", "sampling"),
    [
        (G, {"temperature": 1.3, "max_new_tokens": 6, "seed": 0}),
        (G, {"temperature": 1.3, "max_new_tokens": 6, "seed": 7}),
        (8, {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 4, "seed": 3}),
        (3, {"do_sample": False, "max_new_tokens": 4}),
        (1, {"temperature": 1.0, "max_new_tokens": 4, "seed": 1}),
    ],
)
def test_shared_prefill_generates_the_same_samples(policy, group_size, sampling):
    config = SamplingConfig(**sampling)
    shared = get_engine("hf").generate(policy, ENGINE_PROMPTS, group_size, config)
    plain = get_engine("hf", share_prompts=False).generate(
        policy, ENGINE_PROMPTS, group_size, config
    )
    _assert_same_rollouts(shared, plain)


def _assert_same_rollouts(shared: RolloutBatch, plain: RolloutBatch) -> None:
    assert shared.completions == plain.completions
    for name in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "lengths"):
        assert torch.equal(getattr(shared, name), getattr(plain, name)), name
    assert torch.equal(shared.truncated, plain.truncated)
    torch.testing.assert_close(shared.old_logps, plain.old_logps, atol=ATOL, rtol=0)


@pytest.mark.parametrize("use_generate", [False, True])
def test_shared_prefill_runs_each_prompt_once(policy, use_generate):
    model = policy.model
    n_prompt = max(len(p) for p in ENGINE_PROMPTS) + 1  # + BOS
    engine = get_engine("hf", use_generate=use_generate)
    with counting_positions(model) as seen:
        engine.generate(policy, ENGINE_PROMPTS, G, SamplingConfig(max_new_tokens=3, seed=2))
    # The own loop: the P prompts whole, then one token per row. generate: the P prompts
    # without their last token, then generate's first step runs it, one token per row.
    prefill = n_prompt if not use_generate else n_prompt - 1
    assert seen[:2] == [len(ENGINE_PROMPTS) * prefill, len(ENGINE_PROMPTS) * G]
    with counting_positions(model) as seen:
        get_engine("hf", share_prompts=False, use_generate=use_generate).generate(
            policy, ENGINE_PROMPTS, G, SamplingConfig(max_new_tokens=3)
        )
    assert seen[0] == len(ENGINE_PROMPTS) * G * n_prompt


def test_shared_prefill_with_a_lora_policy_generates_the_same_samples(lora_policy):
    config = SamplingConfig(temperature=1.3, max_new_tokens=6, seed=5)
    shared = get_engine("hf").generate(lora_policy, ENGINE_PROMPTS, G, config)
    plain = get_engine("hf", share_prompts=False).generate(lora_policy, ENGINE_PROMPTS, G, config)
    _assert_same_rollouts(shared, plain)


def test_shared_prefill_leaves_rng_mode_and_generation_config_as_they_were(policy):
    model = policy.model
    saved = model.generation_config
    model.train()
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    _generate(policy)
    assert torch.equal(torch.rand(4), expected)
    assert model.training
    assert model.generation_config is saved


# Completions in passes of similar lengths ----------------------------------------------------


def _bucket_cost(groups, widths, overhead):
    return sum(len(g) * max(widths[r] for r in g) + overhead for g in groups)


@pytest.mark.parametrize("seed", range(20))
def test_length_buckets_are_the_cheapest_split_of_the_sorted_widths(seed):
    """Against every split of the sorted distinct widths into at most B ranges."""
    import itertools
    import random

    rng = random.Random(seed)
    widths = [rng.choice([0, 1, 2, 5, 9, 10, 17, 30]) for _ in range(rng.randint(1, 40))]
    max_buckets, overhead = rng.randint(1, 4), rng.choice([0, 8, 64])
    groups = bucket_rows(widths, max_buckets, overhead)
    assert sorted(r for g in groups for r in g) == list(range(len(widths)))
    assert all(g == sorted(g) for g in groups) and len(groups) <= max_buckets
    values = sorted(set(widths))
    best = _bucket_cost([list(range(len(widths)))], widths, overhead)
    for k in range(1, min(max_buckets, len(values))):
        for cuts in itertools.combinations(range(1, len(values)), k):
            ranges = zip((0, *cuts), (*cuts, len(values)), strict=True)
            split = [
                [r for r, w in enumerate(widths) if values[i] <= w <= values[j - 1]]
                for i, j in ranges
            ]
            best = min(best, _bucket_cost(split, widths, overhead))
    assert _bucket_cost(groups, widths, overhead) == best


def test_one_bucket_keeps_the_rows_in_order():
    assert bucket_rows([3, 1, 2], 1) == [[0, 1, 2]]
    assert bucket_rows([3, 1, 30, 30], 4, overhead=1000) == [[0, 1, 2, 3]]
    assert bucket_rows([3, 1, 30, 30], 4, overhead=0) == [[1], [0], [2, 3]]


@pytest.fixture
def split_by_length(monkeypatch):
    """Every width its own pass: the test model's short completions would not split."""
    monkeypatch.setattr(logprobs_module, "BUCKET_OVERHEAD_POSITIONS", 0)


def test_length_buckets_run_each_row_as_far_as_it_needs(policy, batch, split_by_length):
    p, n, lp, _ = _sizes(batch)
    widths = (batch.lengths - 1).clamp(min=0).tolist()
    groups = bucket_rows(widths, 4)
    assert len(groups) > 1
    with torch.no_grad(), counting_positions(policy.model) as seen:
        batch_logprobs(policy.model, batch, TEMPERATURE, length_buckets=4)
    passes = [len(g) * max(widths[r] for r in g) for g in groups]
    assert seen == [p * lp, *[x for x in passes if x]]
    assert sum(seen[1:]) < n * (max(widths))


@pytest.mark.parametrize("micro", [0, 5])
def test_length_buckets_give_the_same_values_and_gradients(policy, batch, split_by_length, micro):
    model, weights = policy.model, _weights(batch)
    expected = _unshared(model, batch)
    reference = _grads(model, expected, weights)
    logps = batch_logprobs(model, batch, TEMPERATURE, micro, length_buckets=4)
    torch.testing.assert_close(logps, expected.detach(), atol=ATOL, rtol=0)
    _assert_same_grads(_grads(model, logps, weights), reference)


def test_a_pass_s_overhead_scales_with_the_parameters_per_layer(policy, lora_policy):
    """The realistic benchmark's 0.98M-parameter layers keep the measured 64 positions; the
    test model's small layers make a pass worth far more positions, so its short completions
    run in one pass; tied embeddings count once; the adapter-disabled LoRA reference and a
    callable holder see the model inside."""
    from fgrpo_pipeline.models.policy import build_tiny_policy

    overhead = logprobs_module.bucket_overhead
    realistic = build_tiny_policy(
        policy.tokenizer,
        hidden_size=256,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=1024,
    ).model
    assert overhead(realistic) == logprobs_module.BUCKET_OVERHEAD_POSITIONS == 64
    model = policy.model
    assert model.config.tie_word_embeddings
    layers = sum(p.numel() for p in model.parameters()) - model.lm_head.weight.numel()
    per_layer = layers // model.config.num_hidden_layers
    assert overhead(model) == round(64 * logprobs_module.BUCKET_REFERENCE_LAYER / per_layer)
    assert overhead(model) > 500
    assert overhead(make_reference(policy)) == overhead(model)
    assert overhead(make_reference(lora_policy)) > 500
    assert overhead(object()) == logprobs_module.BUCKET_OVERHEAD_POSITIONS


def test_a_small_model_s_completions_run_in_one_pass(policy, batch, monkeypatch):
    """At a pass overhead of 4 positions (for a model of the reference layer size) these
    widths would split; the test model's layers are ~16× smaller, a pass worth ~16× more."""
    monkeypatch.setattr(logprobs_module, "BUCKET_OVERHEAD_POSITIONS", 4)
    widths = (batch.lengths - 1).clamp(min=0).tolist()
    assert len(bucket_rows(widths, 4)) > 1
    with torch.no_grad(), counting_positions(policy.model) as seen:
        batch_logprobs(policy.model, batch, TEMPERATURE, length_buckets=4)
    assert len(seen) == 2  # the prompt pass, one completion pass
