"""The character tokenizer, the tiny Qwen2 policy and the supervised warm-up."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, Qwen2ForCausalLM

from fgrpo_pipeline.models.policy import (
    Policy,
    build_char_tokenizer,
    build_tiny_policy,
    set_seed,
)
from fgrpo_pipeline.rollout import SamplingConfig, get_engine, token_logprobs
from fgrpo_pipeline.training.warmup import supervised_warmup

TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1}
TINY["intermediate_size"] = 64
QUIET = {"seed": 0, "progress": False}


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def test_every_encoding_starts_with_bos_and_has_one_token_per_character(tokenizer):
    for text in ["12+7=", "3*14=", "5-9=", "Natalia sold 48 clips.\n#### 72"]:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        assert len(ids) == len(text) + 1
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_answers_encode_without_bos(tokenizer):
    ids = tokenizer("-42", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["-", "4", "2"]


def test_special_tokens_are_distinct_and_unknown_characters_map_to_unk(tokenizer):
    specials = {
        tokenizer.pad_token_id,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.unk_token_id,
    }
    assert len(specials) == 4
    assert None not in specials
    ids = tokenizer("1é2")["input_ids"]
    assert ids[2] == tokenizer.unk_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "12"


def test_batches_are_left_padded_with_bos_first_after_the_padding(tokenizer):
    batch = tokenizer(["1+2=", "12*13="], padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == (2, 7)
    assert mask[0].tolist() == [0, 0, 1, 1, 1, 1, 1]
    assert ids[0, :2].tolist() == [tokenizer.pad_token_id] * 2
    assert ids[0, 2].item() == tokenizer.bos_token_id
    assert ids[1, 0].item() == tokenizer.bos_token_id


def test_tokenizer_round_trips_through_save_pretrained_offline(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    texts = ["1+2=", "Janet has 3 ducks, 16 eggs.\nAnswer: 9", "x\ty"]
    assert loaded(texts)["input_ids"] == tokenizer(texts)["input_ids"]
    assert loaded.padding_side == "left"
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == ("<s>", "</s>", "<pad>")


def test_set_seed_seeds_python_numpy_and_torch():
    def draw():
        return random.random(), np.random.rand(), torch.rand(1).item()  # noqa: NPY002

    set_seed(7)
    first = draw()
    set_seed(7)
    assert draw() == first
    set_seed(8)
    assert draw() != first


def test_default_policy_is_a_small_qwen2_with_the_tokenizer_ids(tokenizer):
    policy = build_tiny_policy(tokenizer)
    model = policy.model
    assert isinstance(policy, Policy)
    assert isinstance(model, Qwen2ForCausalLM)
    n_params = sum(p.numel() for p in model.parameters())
    assert 50_000 < n_params < 2_000_000
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.config.bos_token_id == tokenizer.bos_token_id
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    # The library default top_k=50 would truncate sampling over a 100-token vocabulary.
    assert model.generation_config.top_k == 0


def test_policy_init_is_deterministic_per_seed_and_leaves_global_rng_alone(tokenizer):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = build_tiny_policy(tokenizer, seed=1, **TINY).model.state_dict()
    assert torch.equal(torch.rand(3), expected)
    b = build_tiny_policy(tokenizer, seed=1, **TINY).model.state_dict()
    c = build_tiny_policy(tokenizer, seed=2, **TINY).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def _addition(n: int) -> tuple[list[str], list[str]]:
    rng = random.Random(0)
    pairs = [(rng.randrange(10), rng.randrange(10)) for _ in range(n)]
    return [f"{a}+{b}=" for a, b in pairs], [str(a + b) for a, b in pairs]


def test_warmup_loss_is_the_mean_nll_of_answer_and_eos_tokens_only(tokenizer):
    policy = build_tiny_policy(tokenizer, **TINY)
    prompts, answers = ["1+2=", "12*13=", "5-9="], ["3", "156", "-4"]
    prompt_batch = tokenizer(prompts, padding=True, return_tensors="pt")
    completion_ids = torch.full((3, 4), tokenizer.pad_token_id)
    completion_mask = torch.zeros(3, 4)
    for i, answer in enumerate(answers):
        row = [*tokenizer(answer, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
        completion_ids[i, : len(row)] = torch.tensor(row)
        completion_mask[i, : len(row)] = 1
    with torch.no_grad():
        logps = token_logprobs(
            policy.model,
            prompt_batch["input_ids"],
            prompt_batch["attention_mask"].float(),
            completion_ids,
            completion_mask,
        )
    expected = -(logps.sum() / completion_mask.sum()).item()

    history = supervised_warmup(
        policy, prompts, answers, steps=1, batch_size=3, learning_rate=1e-3, **QUIET
    )
    assert history[0]["loss"] == pytest.approx(expected, rel=1e-5)


def test_warmup_lowers_the_loss(tokenizer):
    policy = build_tiny_policy(tokenizer, **TINY)
    prompts, answers = _addition(64)
    history = supervised_warmup(
        policy, prompts, answers, steps=80, batch_size=16, learning_rate=1e-2, **QUIET
    )
    assert [h["step"] for h in history] == list(range(80))
    # Learning-rate schedule: ramp to the peak over 5% of the steps, decay to 10% of it.
    lrs = [h["lr"] for h in history]
    assert lrs[0] == pytest.approx(1e-2 / 4)
    assert max(lrs) == pytest.approx(1e-2)
    assert lrs[-1] == pytest.approx(1e-3, rel=0.01)
    first = np.mean([h["loss"] for h in history[:10]])
    last = np.mean([h["loss"] for h in history[-10:]])
    assert last < 0.6 * first


def test_warmup_is_deterministic_per_seed(tokenizer):
    prompts, answers = _addition(32)

    def run(seed: int) -> tuple[list[float], dict[str, torch.Tensor]]:
        policy = build_tiny_policy(tokenizer, **TINY)
        history = supervised_warmup(
            policy,
            prompts,
            answers,
            steps=15,
            batch_size=8,
            learning_rate=3e-3,
            seed=seed,
            weight_decay=0.01,
            progress=False,
        )
        return [h["loss"] for h in history], policy.model.state_dict()

    losses_a, params_a = run(0)
    losses_b, params_b = run(0)
    losses_c, _ = run(1)
    assert losses_a == losses_b
    assert all(torch.equal(params_a[k], params_b[k]) for k in params_a)
    assert losses_a != losses_c


def test_warmup_teaches_answers_followed_by_eos(tokenizer):
    policy = build_tiny_policy(tokenizer, **TINY)
    prompts, answers = ["1+1=", "2+3=", "4*4=", "9-7="], ["2", "5", "16", "2"]
    supervised_warmup(
        policy, prompts, answers, steps=150, batch_size=4, learning_rate=1e-2, **QUIET
    )
    batch = get_engine("hf").generate(
        policy, prompts, 1, SamplingConfig(do_sample=False, max_new_tokens=4)
    )
    assert batch.completions == answers
    assert not batch.truncated.any()


def test_warmup_restores_the_model_mode(tokenizer):
    policy = build_tiny_policy(tokenizer, **TINY)
    policy.model.eval()
    supervised_warmup(policy, ["1+1="], ["2"], steps=2, batch_size=1, learning_rate=1e-3, **QUIET)
    assert not policy.model.training


@pytest.mark.parametrize(
    ("prompts", "answers", "kwargs", "message"),
    [
        (["1+1="], ["2", "3"], {}, "answers"),
        ([], [], {}, "empty"),
        (["1+1="], ["2"], {"batch_size": 0}, "batch_size"),
        (["1+1="], ["2"], {"learning_rate": 0.0}, "learning_rate"),
    ],
)
def test_warmup_rejects_bad_arguments(tokenizer, prompts, answers, kwargs, message):
    policy = build_tiny_policy(tokenizer, **TINY)
    args = {"steps": 1, "batch_size": 1, "learning_rate": 1e-3, "seed": 0, "progress": False}
    with pytest.raises(ValueError, match=message):
        supervised_warmup(policy, prompts, answers, **{**args, **kwargs})
