"""The HF rollout engine and teacher-forced log-probs."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import TopPLogitsWarper

from fgrpo_pipeline.models.policy import build_char_tokenizer, build_tiny_policy
from fgrpo_pipeline.rollout import (
    ENGINES,
    HFEngine,
    RolloutBatch,
    SamplingConfig,
    get_engine,
    nucleus_mask,
    token_logprobs,
)
from fgrpo_pipeline.rollout.logprobs import sampled_logps
from tests.conftest import ENGINE_PROMPTS as PROMPTS
from tests.conftest import TINY_MODEL as TINY
from tests.conftest import briefly_warmed_policy


@pytest.fixture(scope="module")
def policy():
    return briefly_warmed_policy()


def _generate(policy, prompts=PROMPTS, group_size=3, **sampling) -> RolloutBatch:
    return get_engine("hf").generate(policy, prompts, group_size, SamplingConfig(**sampling))


def _recompute(
    policy, batch: RolloutBatch, temperature: float = 1.0, top_p: float = 1.0
) -> torch.Tensor:
    with torch.no_grad():
        return token_logprobs(
            policy.model,
            batch.prompt_ids,
            batch.prompt_mask,
            batch.completion_ids,
            batch.completion_mask,
            temperature=temperature,
            top_p=top_p,
        )


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 2.5}, "max_new_tokens"),
    ],
)
def test_sampling_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**kwargs)


def test_engine_registry():
    assert "hf" in ENGINES
    assert isinstance(get_engine("hf"), HFEngine)
    with pytest.raises(ValueError, match="hf"):
        get_engine("no-such-engine")


def test_generate_rejects_bad_arguments(policy):
    with pytest.raises(ValueError, match="prompts"):
        _generate(policy, prompts=[])
    with pytest.raises(ValueError, match="group_size"):
        _generate(policy, group_size=0)


def test_batch_shapes_and_group_layout(policy):
    g = 3
    batch = _generate(policy, group_size=g, max_new_tokens=5)
    n = len(PROMPTS) * g
    t_prompt = max(len(p) for p in PROMPTS) + 1
    assert len(batch) == n
    assert batch.group_size == g
    assert batch.prompt_ids.shape == batch.prompt_mask.shape == (n, t_prompt)
    t_completion = batch.completion_ids.shape[1]
    assert 1 <= t_completion <= 5
    for name in ("completion_mask", "old_logps"):
        assert getattr(batch, name).shape == (n, t_completion)
    assert batch.lengths.shape == batch.truncated.shape == (n,)
    assert batch.prompt_mask.dtype == batch.completion_mask.dtype == torch.float32
    assert batch.truncated.dtype == torch.bool
    assert len(batch.completions) == n
    # Rows i*G .. i*G+G-1 belong to prompt i.
    assert batch.prompts == [p for p in PROMPTS for _ in range(g)]
    decoded = policy.tokenizer.batch_decode(batch.prompt_ids, skip_special_tokens=True)
    assert decoded == batch.prompts


def test_prompts_are_left_padded_with_bos_at_the_first_real_position(policy):
    tok = policy.tokenizer
    batch = _generate(policy, group_size=2)
    for row, mask in zip(batch.prompt_ids, batch.prompt_mask, strict=True):
        n_pad = int((mask == 0).sum())
        assert mask[n_pad:].eq(1).all()
        assert row[:n_pad].eq(tok.pad_token_id).all()
        assert row[n_pad].item() == tok.bos_token_id


def test_completion_mask_lengths_and_truncation_follow_the_first_eos(policy):
    tok = policy.tokenizer
    # Sums of two operands < 30 have 1-2 digits: with 2 new tokens some rows cannot fit EOS.
    batch = _generate(policy, group_size=8, max_new_tokens=2)
    assert batch.truncated.any()
    assert (~batch.truncated).any()
    t_completion = batch.completion_ids.shape[1]
    for i in range(len(batch)):
        ids, mask, n = batch.completion_ids[i], batch.completion_mask[i], int(batch.lengths[i])
        assert mask.tolist() == [1.0] * n + [0.0] * (t_completion - n)
        assert ids[n:].eq(tok.pad_token_id).all()
        eos_at = (ids[:n] == tok.eos_token_id).nonzero().flatten().tolist()
        if batch.truncated[i]:
            assert eos_at == []
            assert n == t_completion == 2
        else:
            assert eos_at == [n - 1]
        assert batch.completions[i] == tok.decode(ids[:n], skip_special_tokens=True)
        assert (batch.old_logps[i, n:] == 0).all()
        assert (batch.old_logps[i, :n] < 0).all()


def test_same_seed_same_samples_different_seed_different_samples(policy):
    a = _generate(policy, seed=0, temperature=1.5, max_new_tokens=6)
    b = _generate(policy, seed=0, temperature=1.5, max_new_tokens=6)
    c = _generate(policy, seed=1, temperature=1.5, max_new_tokens=6)
    assert a.completions == b.completions
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.old_logps, b.old_logps)
    assert a.completions != c.completions


def test_sampling_ignores_knobs_in_the_model_generation_config(policy):
    """Knobs of a checkpoint's generation_config would make old_logps lie about the sampler."""
    saved = policy.model.generation_config
    digits = [[policy.tokenizer.convert_tokens_to_ids(d)] for d in "0123456789"]
    config = saved.__class__.from_dict({**saved.to_dict(), "bad_words_ids": digits})
    policy.model.generation_config = config
    try:
        batch = _generate(policy, group_size=4)
        assert policy.model.generation_config is config
    finally:
        policy.model.generation_config = saved
    assert any(c.isdigit() for c in "".join(batch.completions))


def test_greedy_decoding_ignores_the_seed(policy):
    a = _generate(policy, do_sample=False, seed=0)
    b = _generate(policy, do_sample=False, seed=1)
    assert a.completions == b.completions
    # Greedy: all G copies of a prompt are identical.
    assert all(len(set(a.completions[i : i + 3])) == 1 for i in range(0, len(a), 3))


def test_generate_leaves_global_rng_and_train_mode_untouched(policy):
    policy.model.train()
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    _generate(policy)
    assert torch.equal(torch.rand(4), expected)
    assert policy.model.training
    policy.model.eval()
    _generate(policy)
    assert not policy.model.training


@pytest.mark.parametrize(
    "sampling",
    [
        {"temperature": 1.0, "max_new_tokens": 6},
        {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 6, "seed": 3},
        {"temperature": 1.3, "max_new_tokens": 3, "seed": 4},
    ],
)
def test_old_logps_equal_teacher_forced_logprobs(policy, sampling):
    batch = _generate(policy, group_size=4, **sampling)
    assert batch.prompt_mask.eq(0).any(), "the check needs left-padded prompts"
    recomputed = _recompute(
        policy, batch, temperature=sampling["temperature"], top_p=sampling.get("top_p", 1.0)
    )
    torch.testing.assert_close(recomputed, batch.old_logps, atol=1e-4, rtol=0)


def test_old_logps_match_for_an_untrained_high_entropy_policy():
    fresh = build_tiny_policy(build_char_tokenizer(), seed=5, **TINY)
    batch = _generate(fresh, group_size=2, max_new_tokens=8)
    torch.testing.assert_close(_recompute(fresh, batch), batch.old_logps, atol=1e-4, rtol=0)


# --- top-p: old_logps of the nucleus actually sampled from ----------------------------------


def _teacher_forced_logits(policy, batch: RolloutBatch) -> torch.Tensor:
    """[N, T, V] logits predicting each completion token, from one plain forward pass."""
    input_ids = torch.cat([batch.prompt_ids, batch.completion_ids], dim=1)
    mask = torch.cat([batch.prompt_mask, batch.completion_mask], dim=1).long()
    with torch.no_grad():
        logits = policy.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(dim=1) - 1).clamp(min=0),
            use_cache=False,
        ).logits
    n_prompt, n_completion = batch.prompt_ids.shape[1], batch.completion_ids.shape[1]
    return logits[:, n_prompt - 1 : n_prompt - 1 + n_completion]


def _brute_force_nucleus(logits: list[float], temperature: float, top_p: float):
    """Per the TopPLogitsWarper rule, in plain Python floats: (kept token ids, their
    renormalised probabilities, the smallest distance of a cumulative probability from the
    cut 1 − top_p)."""
    scaled = [x / temperature for x in logits]
    top = max(scaled)
    weights = [math.exp(x - top) for x in scaled]
    total = sum(weights)
    probs = [w / total for w in weights]
    ascending = sorted(range(len(probs)), key=lambda i: probs[i])
    kept, cumulative, margin = [], 0.0, math.inf
    for rank, token in enumerate(ascending):
        cumulative += probs[token]
        margin = min(margin, abs(cumulative - (1 - top_p)))
        if cumulative > 1 - top_p or rank == len(ascending) - 1:
            kept.append(token)
    mass = sum(probs[t] for t in kept)
    return set(kept), {t: probs[t] / mass for t in kept}, margin


@pytest.fixture(scope="module")
def untrained():
    """High entropy: its nuclei hold many tokens and cut off a good part of the mass."""
    return build_tiny_policy(build_char_tokenizer(), seed=5, **TINY)


@pytest.mark.parametrize("which", ["warmed", "untrained"])
def test_top_p_old_logps_are_log_probs_of_the_nucleus_sampled_from(policy, untrained, which):
    model = policy if which == "warmed" else untrained
    temperature, top_p = 0.9, 0.7
    batch = _generate(model, group_size=4, temperature=temperature, top_p=top_p, seed=0)
    logits = _teacher_forced_logits(model, batch)
    cut_off = 0
    for r in range(len(batch)):
        for t in range(int(batch.lengths[r])):
            token = int(batch.completion_ids[r, t])
            kept, renormalised, margin = _brute_force_nucleus(
                logits[r, t].double().tolist(), temperature, top_p
            )
            assert margin > 1e-5, "a cumulative probability on the cut: rounding could decide"
            assert token in kept, (r, t)
            assert batch.old_logps[r, t].item() == pytest.approx(
                math.log(renormalised[token]), abs=1e-4
            )
            full = torch.log_softmax(logits[r, t].double() / temperature, dim=-1)[token]
            cut_off += math.log(renormalised[token]) - full.item() > 1e-3
    # the nucleus did cut: these are not the full-vocabulary log-probs
    assert cut_off > 0
    assert (batch.old_logps[batch.completion_mask == 0] == 0).all()

    # with top_p = 1 nothing is cut: the plain log_softmax(logits / T)
    plain = _generate(model, group_size=4, temperature=temperature, seed=0)
    logits = _teacher_forced_logits(model, plain)
    expected = torch.log_softmax(logits.double() / temperature, dim=-1)
    expected = expected.gather(-1, plain.completion_ids.unsqueeze(-1)).squeeze(-1)
    expected = torch.where(plain.completion_mask.bool(), expected, torch.zeros_like(expected))
    torch.testing.assert_close(plain.old_logps.double(), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("top_p", [0.5, 0.7, 0.95])
def test_the_truncated_distribution_sums_to_one_over_the_nucleus(untrained, temperature, top_p):
    """Each step's distribution: probability 1 in total on the nucleus transformers keeps,
    0 outside it, and the nucleus the smallest set of top tokens holding ≥ top_p."""
    encoded = untrained.tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        logits = untrained.model(**encoded).logits[:, -3:].reshape(-1, len(untrained.tokenizer))
    n, v = logits.shape
    # every token of the vocabulary as the "sampled" one, at each of the n steps
    probs = sampled_logps(
        logits.unsqueeze(1).expand(n, v, v), torch.arange(v).expand(n, v), temperature, top_p
    ).exp()
    scaled = logits.float() / temperature
    kept = nucleus_mask(scaled, top_p)
    # the very nucleus transformers' warper keeps (it leaves kept logits finite)
    assert torch.equal(kept, TopPLogitsWarper(top_p)(None, scaled.clone()).isfinite())
    assert (kept.sum(dim=-1) < v).all()  # something is cut at every step
    torch.testing.assert_close(
        (probs * kept).sum(dim=-1), torch.ones(len(probs)), atol=1e-5, rtol=0
    )
    assert (probs[~kept] == 0).all()
    full = scaled.softmax(dim=-1)
    for row, mask in zip(full, kept, strict=True):
        inside = row[mask]
        assert inside.sum() >= top_p - 1e-6
        assert inside.min() >= row[~mask].max()  # the most probable tokens
        assert inside.sum() - inside.min() < top_p  # and no more of them than needed


def test_token_logprobs_do_not_depend_on_left_padding(policy):
    """A row's log-probs are the same alone and left-padded next to a longer prompt."""
    batch = _generate(policy, prompts=["1+2=", "12*13="], group_size=1, max_new_tokens=4)
    batched = _recompute(policy, batch)
    alone = get_engine("hf").generate(policy, ["1+2="], 1, SamplingConfig(max_new_tokens=4))
    n = int(batch.lengths[0])
    assert batch.prompt_mask[0].eq(0).sum() == 2
    with torch.no_grad():
        single = token_logprobs(
            policy.model,
            alone.prompt_ids[:1],
            alone.prompt_mask[:1],
            batch.completion_ids[:1, :n],
            batch.completion_mask[:1, :n],
        )
    torch.testing.assert_close(single, batched[:1, :n], atol=1e-5, rtol=0)


def test_token_logprobs_carry_gradients_only_through_real_tokens(policy):
    batch = _generate(policy, group_size=2, max_new_tokens=3)
    policy.model.zero_grad()
    logps = token_logprobs(
        policy.model,
        batch.prompt_ids,
        batch.prompt_mask,
        batch.completion_ids,
        batch.completion_mask,
    )
    assert logps.requires_grad
    assert (logps[batch.completion_mask == 0] == 0).all()
    logps.sum().backward()
    grads = [p.grad for p in policy.model.parameters() if p.grad is not None]
    assert grads
    assert all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    policy.model.zero_grad()


def test_token_logprobs_temperature_scales_logits(policy):
    batch = _generate(policy, group_size=1, max_new_tokens=3)
    cold = _recompute(policy, batch, temperature=0.5)
    warm = _recompute(policy, batch, temperature=1.0)
    mask = batch.completion_mask.bool()
    assert not torch.allclose(cold[mask], warm[mask])
    with pytest.raises(ValueError, match="temperature"):
        _recompute(policy, batch, temperature=0.0)


def _trained_tokenizer(kind: str, clean_up: bool):
    """A small tokenizer trained here: byte-level BPE (as Qwen's) or WordPiece (as BERT's,
    whose decoding joins with spaces that transformers' clean-up then edits)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = ["The sum of 12 and 30 is 42 , isn't it ?", "Answer: 7 . Then 3 + 4 = 7 !"] * 20
    special = ["<pad>", "<eos>", "[UNK]"]
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=special)
    else:
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=120, special_tokens=special)
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="[UNK]",
        clean_up_tokenization_spaces=clean_up,
    )


@pytest.mark.parametrize(
    ("kind", "clean_up"),
    [("char", False), ("bpe", False), ("wordpiece", False), ("wordpiece", True)],
)
def test_decoded_texts_are_those_of_batch_decode(kind, clean_up, monkeypatch):
    """Through the Rust tokenizer where that is the same, else through batch_decode (the
    WordPiece clean-up removes the spaces before punctuation, so the two paths differ)."""
    from fgrpo_pipeline.rollout.engine import decode_texts

    tokenizer = build_char_tokenizer() if kind == "char" else _trained_tokenizer(kind, clean_up)
    generator = torch.Generator().manual_seed(0)
    rows = [
        torch.randint(0, len(tokenizer), (n,), generator=generator).tolist()
        for n in (0, 1, 5, 12, 30)
    ]
    rows.append(tokenizer("isn't it ? 3 + 4 = 7 !")["input_ids"] + [tokenizer.eos_token_id])
    expected = tokenizer.batch_decode(rows, skip_special_tokens=True)
    if not clean_up:  # the fast path is taken
        monkeypatch.setattr(tokenizer, "batch_decode", None)
    assert decode_texts(tokenizer, rows) == expected
    if clean_up:  # the clean-up changed something, and the fast path is not taken
        raw = tokenizer.backend_tokenizer.decode_batch(rows, skip_special_tokens=True)
        assert raw != expected
