"""The hf engine's own decoding loop (:mod:`fgrpo_pipeline.rollout.decoding`) against
``transformers``' ``generate`` and against teacher forcing, on a real tiny model."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache

from fgrpo_pipeline.rollout import SamplingConfig, decoding, get_engine, token_logprobs
from fgrpo_pipeline.rollout.decoding import (
    INVERSE_CDF_BLOCK,
    SAMPLERS,
    SHARED_PREFIX_ATTENTION,
    PreallocatedLayer,
    SharedPrefix,
    SharedPrefixLayer,
    _sample,
    _two_part_attention,
    inverse_cdf_draw,
    preallocate,
)
from tests.conftest import ENGINE_PROMPTS, briefly_warmed_policy, trained_lora
from tests.test_shared_prompt_scoring import _assert_same_rollouts, counting_positions

G = 4


@pytest.fixture(scope="module")
def policy():
    return briefly_warmed_policy()


@pytest.fixture(autouse=True)
def cascade_for_short_prompts(monkeypatch):
    """The test prompts are a few tokens long: hold them once all the same, so that every
    test here runs the two-part attention (test_short_prompts_are_repeated sets it back)."""
    monkeypatch.setattr(decoding, "CASCADE_MIN_PROMPT_TOKENS", 0)


SAMPLINGS = [
    (G, {"temperature": 1.3, "max_new_tokens": 6, "seed": 0}),
    (G, {"temperature": 1.3, "max_new_tokens": 6, "seed": 7}),
    (8, {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 4, "seed": 3}),
    (3, {"do_sample": False, "max_new_tokens": 5}),
    (1, {"temperature": 1.0, "max_new_tokens": 4, "seed": 1}),
]


@pytest.mark.parametrize(("group_size", "sampling"), SAMPLINGS)
@pytest.mark.parametrize("share_prompts", [True, False])
@pytest.mark.parametrize("drop_finished", [True, False])
def test_the_loop_samples_what_generate_samples(
    policy, group_size, sampling, share_prompts, drop_finished
):
    """generate's samples for the same seed, its log-probs up to float rounding, whether
    finished rows leave the batch or not (each row's random draws are generate's)."""
    config = SamplingConfig(**sampling)
    ours = get_engine("hf", drop_finished=drop_finished, share_prompts=share_prompts)
    theirs = get_engine("hf", use_generate=True, share_prompts=share_prompts)
    prompts = ENGINE_PROMPTS * 2
    _assert_same_rollouts(
        ours.generate(policy, prompts, group_size, config),
        theirs.generate(policy, prompts, group_size, config),
    )


@pytest.mark.parametrize(
    "options",
    [
        {"drop_finished": False},
        {"share_prompts": False},
        {"cascade_attention": False},
        {"direct_step": False},
    ],
)
def test_the_inverse_cdf_sampler_gives_each_seed_its_samples_whatever_the_options(policy, options):
    """With ``sampler="inverse_cdf"`` a row's uniform is its own (dropped rows or not, the
    prompts held once or not): the options change no sample. The samples differ from the
    multinomial's (another random stream), and each row's recorded log-probs are its
    tokens' under teacher forcing."""
    config = SamplingConfig(temperature=1.3, top_p=0.95, max_new_tokens=6, seed=3)
    prompts = ENGINE_PROMPTS * 2
    batch = get_engine("hf", sampler="inverse_cdf").generate(policy, prompts, G, config)
    other = get_engine("hf", sampler="inverse_cdf", **options).generate(policy, prompts, G, config)
    _assert_same_rollouts(batch, other)
    multinomial = get_engine("hf").generate(policy, prompts, G, config)
    assert batch.completions != multinomial.completions
    with torch.no_grad():
        forced = token_logprobs(
            policy.model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
            batch.completion_mask, config.temperature, top_p=config.top_p,
        )  # fmt: skip
    torch.testing.assert_close(batch.old_logps, forced, atol=1e-5, rtol=0)


def test_a_lora_policy_samples_what_generate_samples(policy):
    lora = trained_lora(policy)  # a copy: the module's other tests keep the plain policy
    config = SamplingConfig(temperature=1.3, max_new_tokens=6, seed=5)
    _assert_same_rollouts(
        get_engine("hf").generate(lora, ENGINE_PROMPTS, G, config),
        get_engine("hf", use_generate=True).generate(lora, ENGINE_PROMPTS, G, config),
    )


@pytest.mark.parametrize(("group_size", "sampling"), SAMPLINGS)
def test_dropped_rows_keep_their_log_probs(policy, group_size, sampling):
    """With finished rows dropped from the running batch, each row's recorded log-probs are
    still those of its own tokens under the distribution sampled from (teacher forcing),
    so no row was fed another row's token or cache."""
    config = SamplingConfig(**sampling)
    batch = get_engine("hf").generate(policy, ENGINE_PROMPTS * 2, group_size, config)
    # Rows end at different steps: the early ones were dropped while the others ran on.
    assert len(set(batch.lengths.tolist())) > 1
    with torch.no_grad():
        forced = token_logprobs(
            policy.model,
            batch.prompt_ids,
            batch.prompt_mask,
            batch.completion_ids,
            batch.completion_mask,
            config.temperature,
            top_p=config.top_p if config.do_sample else 1.0,
        )
    torch.testing.assert_close(batch.old_logps, forced, atol=1e-5, rtol=0)


def test_finished_rows_leave_the_batch(policy):
    """Once a quarter of the running rows have ended, they leave: later steps run only the
    others."""
    prompts = ENGINE_PROMPTS * 4
    config = SamplingConfig(temperature=1.3, max_new_tokens=8, seed=4)
    with counting_positions(policy.model) as seen:
        batch = get_engine("hf").generate(policy, prompts, G, config)
    steps = seen[1:]  # after the prefill, the forward feeding token t runs steps[t] rows
    n = len(prompts) * G
    assert len(steps) == batch.completion_ids.shape[1] - 1  # the last token is never fed
    ended = [int(((batch.lengths <= t + 1) & ~batch.truncated).sum()) for t in range(len(steps))]
    running = n
    for t, rows in enumerate(steps):
        if rows != running:  # a drop: every ended row leaves, and they were ≥ 1/4 of the batch
            assert rows == n - ended[t]
            assert running - rows >= 0.25 * running
        running = rows
    assert min(steps) < n
    with counting_positions(policy.model) as seen:
        get_engine("hf", drop_finished=False).generate(policy, prompts, G, config)
    assert set(seen[1:]) == {n}


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampling_follows_temperature_and_nucleus(sampler):
    """The sampling rule itself, with either sampler: 40,000 draws from logits / T
    restricted to the top-p nucleus; frequencies within 5 standard errors, nothing outside
    the nucleus."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    config = SamplingConfig(temperature=0.8, top_p=0.9)
    scaled = logits / config.temperature
    probs = scaled.softmax(-1)
    order = probs.argsort(descending=True)
    cumulative = probs[order].cumsum(0)
    nucleus = order[: int((cumulative < config.top_p).sum()) + 1]
    expected = torch.zeros_like(probs)
    expected[nucleus] = probs[nucleus] / probs[nucleus].sum()
    n = 40_000
    torch.manual_seed(0)
    tokens, logps = _sample(logits.expand(n, -1), config, sampler=sampler)
    freq = torch.bincount(tokens, minlength=len(logits)).float() / n
    stderr = (expected * (1 - expected) / n).sqrt()
    assert torch.all((freq - expected).abs() <= 5 * stderr + 1e-9)
    torch.testing.assert_close(logps, expected[tokens].log())


@pytest.mark.parametrize(("vocab", "block"), [(50, 16), (50, 50), (2500, INVERSE_CDF_BLOCK)])
def test_the_inverse_cdf_gives_each_token_its_probability(vocab, block):
    """A grid of K evenly spaced u in [0, 1) lands on each token in proportion to its
    probability (up to the grid's 1/K), blocks of tokens padded or not, in order of the
    cumulative probability, never on a token outside the nucleus (−inf); the log-normaliser
    is the logsumexp."""
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(vocab, generator=gen) * 3
    scores[torch.randperm(vocab, generator=gen)[: vocab // 3]] = float("-inf")
    k = 20_000
    u = ((torch.arange(k, dtype=torch.float64) + 0.5) / k).unsqueeze(1)
    tokens, log_norm = inverse_cdf_draw(scores.expand(k, -1), u, block)
    share = torch.bincount(tokens, minlength=vocab).double() / k
    probs = scores.double().softmax(-1)
    assert torch.all((share - probs).abs() <= 1.0 / k + 1e-9)
    assert share[probs == 0].sum() == 0
    # u increasing → token order follows the cumulative probability: ranks never go back
    rank = torch.empty(vocab, dtype=torch.long)
    rank[probs.nonzero().squeeze(1)] = torch.arange(int((probs > 0).sum()))
    assert torch.all(rank[tokens].diff() >= 0)
    torch.testing.assert_close(log_norm, torch.logsumexp(scores, -1).expand(k))


def test_the_inverse_cdf_at_the_ends_of_u_stays_on_tokens_with_mass():
    scores = torch.tensor([[float("-inf"), 0.0, float("-inf"), 1.0, float("-inf")]])
    u = torch.tensor([[0.0], [1.0 - 2**-53], [1.0]], dtype=torch.float64)
    tokens, _ = inverse_cdf_draw(scores.expand(3, -1), u, block=2)
    assert tokens.tolist() == [1, 3, 3]


def test_greedy_takes_the_argmax():
    logits = torch.tensor([[0.1, 3.0, 2.9], [5.0, -1.0, 4.0]])
    tokens, logps = _sample(logits, SamplingConfig(do_sample=False, temperature=2.0))
    assert tokens.tolist() == [1, 0]
    torch.testing.assert_close(logps, (logits / 2.0).log_softmax(-1)[[0, 1], [1, 0]])


def _filled_cache(batch: int = 3, length: int = 5) -> DynamicCache:
    cache = DynamicCache()
    gen = torch.Generator().manual_seed(0)
    for layer in range(2):
        k = torch.randn(batch, 2, length, 4, generator=gen)
        cache.update(k, k + 1, layer)
    return cache


def test_the_preallocated_cache_writes_in_place_and_matches_concatenation():
    dynamic, preallocated = _filled_cache(), _filled_cache()
    preallocate(preallocated, capacity=8)
    assert all(isinstance(layer, PreallocatedLayer) for layer in preallocated.layers)
    storage = preallocated.layers[0]._keys.data_ptr()
    for step in range(3):
        new = torch.full((3, 2, 1, 4), float(step))
        for layer in range(2):
            expected = dynamic.update(new, new, layer)
            got = preallocated.update(new, new, layer)
            assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert preallocated.layers[0]._keys.data_ptr() == storage  # no copy while decoding
    assert preallocated.get_seq_length() == dynamic.get_seq_length() == 8
    keep = torch.tensor([2, 0])
    dynamic.batch_select_indices(keep)
    preallocated.batch_select_indices(keep)
    for ours, theirs in zip(preallocated.layers, dynamic.layers, strict=True):
        assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)
    with pytest.raises(ValueError, match="holds 8 positions"):
        preallocated.update(new[:2], new[:2], 0)


# Each prompt's keys and values held once (cascade attention) ------------------------------------


def test_two_part_attention_equals_attention_over_the_whole_row():
    """Rows of unequal groups (as after drops), left-padded prompts, grouped-query heads:
    the prompt part and the row's own part merged by log-sum-exp give full attention."""
    gen = torch.Generator().manual_seed(0)
    n_prompts, l_prompt, kv_heads, rep, d, own = 3, 6, 2, 2, 8, 4
    groups = torch.tensor([0, 0, 0, 1, 2, 2])
    padding = torch.zeros(n_prompts, l_prompt, dtype=torch.bool)
    padding[1, :2] = True  # prompt 1 is two tokens shorter (left padding)
    prefix_k = torch.randn(n_prompts, kv_heads, l_prompt, d, generator=gen)
    prefix_v = torch.randn(n_prompts, kv_heads, l_prompt, d, generator=gen)
    key = torch.randn(len(groups), kv_heads, own, d, generator=gen)
    value = torch.randn(len(groups), kv_heads, own, d, generator=gen)
    query = torch.randn(len(groups), kv_heads * rep, 1, d, generator=gen)

    shared = SharedPrefix.__new__(SharedPrefix)
    shared.prefix_padding = padding
    shared._select(groups)
    layer = SimpleNamespace(prefix_keys=prefix_k, prefix_values=prefix_v)
    got = _two_part_attention(query, key, value, layer, shared, d**-0.5)

    full_k = torch.cat([prefix_k[groups], key], dim=2).repeat_interleave(rep, dim=1)
    full_v = torch.cat([prefix_v[groups], value], dim=2).repeat_interleave(rep, dim=1)
    keep = torch.cat([~padding[groups], torch.ones(len(groups), own, dtype=torch.bool)], dim=1)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, full_k, full_v, attn_mask=keep[:, None, None, :]
    )
    torch.testing.assert_close(got, expected.transpose(1, 2), atol=1e-5, rtol=1e-5)


def _recording_attach(monkeypatch) -> list:
    attached = []
    original = SharedPrefix.attach.__func__

    def attach(cls, *args):
        shared = original(cls, *args)
        attached.append(shared)
        return shared

    monkeypatch.setattr(SharedPrefix, "attach", classmethod(attach))
    return attached


@pytest.mark.parametrize("direct_step", [True, False])
def test_decoding_holds_each_prompt_once(policy, monkeypatch, direct_step):
    attached = _recording_attach(monkeypatch)
    engine = get_engine("hf", direct_step=direct_step)
    engine.generate(policy, ENGINE_PROMPTS, G, SamplingConfig(max_new_tokens=6))
    (shared,) = attached
    layers = shared.cache.layers
    assert all(isinstance(layer, SharedPrefixLayer) for layer in layers)
    assert {layer.prefix_keys.shape[0] for layer in layers} == {len(ENGINE_PROMPTS)}
    if not direct_step:  # every layer of the last step attended through the interface
        assert shared.calls == len(layers)
    assert policy.model.config._attn_implementation != SHARED_PREFIX_ATTENTION  # restored


def test_a_model_whose_attention_ignores_the_interface_falls_back(policy, monkeypatch):
    """If the model's attention never reaches the shared-prefix function (here: the switch
    of attention implementation does nothing, so sdpa sees only each row's own positions),
    the step is run again on per-row layers: generate's samples all the same."""
    attached = _recording_attach(monkeypatch)
    monkeypatch.setattr(SharedPrefix, "attending", lambda self, model: contextlib.nullcontext())
    config = SamplingConfig(temperature=1.3, max_new_tokens=6, seed=0)
    ours = get_engine("hf", direct_step=False).generate(policy, ENGINE_PROMPTS, G, config)
    theirs = get_engine("hf", use_generate=True).generate(policy, ENGINE_PROMPTS, G, config)
    _assert_same_rollouts(ours, theirs)
    assert attached[0].calls == 0
    assert not any(isinstance(layer, SharedPrefixLayer) for layer in attached[0].cache.layers)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"drop_finished": "no"}, "'drop_finished' must be true or false"),
        ({"cascade_attention": 1}, "'cascade_attention' must be true or false"),
        ({"direct_step": "yes"}, "'direct_step' must be true or false"),
        ({"sampler": "gumbel"}, "'sampler' must be one of"),
        ({"sampler": "inverse_cdf", "use_generate": True}, "'sampler' is 'inverse_cdf', but"),
        ({"beam_width": 2}, "unexpected keyword argument 'beam_width'"),
    ],
)
def test_bad_engine_options_are_refused_naming_the_option(options, message):
    from fgrpo_pipeline.training.config import TrainerConfig

    with pytest.raises(ValueError, match=f"engine_options.*{message}"):
        TrainerConfig(engine_options=options)


@pytest.mark.parametrize("cascade_attention", [True, False])
def test_cascade_attention_can_be_switched_off(policy, monkeypatch, cascade_attention):
    attached = _recording_attach(monkeypatch)
    config = SamplingConfig(temperature=1.3, max_new_tokens=6, seed=0)
    engine = get_engine("hf", cascade_attention=cascade_attention)
    ours = engine.generate(policy, ENGINE_PROMPTS, G, config)
    theirs = get_engine("hf", use_generate=True).generate(policy, ENGINE_PROMPTS, G, config)
    _assert_same_rollouts(ours, theirs)
    assert len(attached) == int(cascade_attention)


def test_short_prompts_are_repeated_to_their_rows(policy, monkeypatch):
    monkeypatch.setattr(decoding, "CASCADE_MIN_PROMPT_TOKENS", 32)
    attached = _recording_attach(monkeypatch)
    get_engine("hf").generate(policy, ENGINE_PROMPTS, G, SamplingConfig(max_new_tokens=3))
    assert attached == []
    long_prompt = "1+2=" * 8  # 33 tokens with BOS
    get_engine("hf").generate(policy, [long_prompt], G, SamplingConfig(max_new_tokens=3))
    assert len(attached) == 1
