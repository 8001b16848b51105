"""The Bradley–Terry reward model: scoring, training, the reward function and its dataset."""

from __future__ import annotations

import time

import pandas as pd
import pytest
import torch
from kedro.io import DataCatalog, DatasetError, Version

from fgrpo_pipeline.datasets import PolicyDataset, RewardModelDataset
from fgrpo_pipeline.models.policy import build_char_tokenizer, build_tiny_policy
from fgrpo_pipeline.safety.reward_model import (
    RewardModel,
    build_reward_model,
    pairwise_accuracy,
    reward_model_reward,
    reward_scores,
    train_reward_model,
)

TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1}
TINY["intermediate_size"] = 64
FIT = {"steps": 100, "batch_size": 32, "learning_rate": 3e-3, "seed": 0, "progress": False}

# Whether to comply depends only on the prompt's verb; the held-out prompts pair the same verbs
# with nouns never seen in training. Half the prompts are benign and half harmful, and the two
# answers are the same strings throughout, so a model that ignores the prompt scores exactly 0.5.
BENIGN = ["bake", "cook", "paint", "clean", "fix"]
HARMFUL = ["hack", "steal", "poison", "forge", "smash"]
TRAIN_NOUNS = ["cake", "lock", "car", "house", "letter", "garden", "bike", "phone", "door", "pie"]
HELD_OUT_NOUNS = ["boat", "fence", "wallet", "shed"]
COMPLY, REFUSE = "Sure, here is how.", "Sorry, I can't."


def _pairs(nouns: list[str]) -> pd.DataFrame:
    rows = []
    for verb in BENIGN + HARMFUL:
        for noun in nouns:
            prompt = f"how to {verb} a {noun}?"
            chosen, rejected = (COMPLY, REFUSE) if verb in BENIGN else (REFUSE, COMPLY)
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pd.DataFrame(rows)


TRAIN, HELD_OUT = _pairs(TRAIN_NOUNS), _pairs(HELD_OUT_NOUNS)


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def trained(tokenizer):
    """A tiny reward model fitted to TRAIN, with its history and training time (seconds)."""
    rm = build_reward_model(tokenizer, **TINY)
    start = time.perf_counter()
    history = train_reward_model(rm, TRAIN, **FIT)
    return rm, history, time.perf_counter() - start


def test_the_preference_set_is_balanced_and_held_out_prompts_are_unseen():
    assert (len(TRAIN), len(HELD_OUT)) == (100, 40)
    assert not set(TRAIN["prompt"]) & set(HELD_OUT["prompt"])
    assert (HELD_OUT["chosen"] == COMPLY).mean() == 0.5


def test_training_learns_the_preference_and_generalises_to_held_out_prompts(trained):
    rm, history, seconds = trained
    assert [row["step"] for row in history] == list(range(FIT["steps"]))
    assert set(history[0]) == {"step", "loss", "accuracy"}
    # A fresh model scores every pair about equally: loss log 2.
    assert history[0]["loss"] == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=0.05)
    first, last = history[:10], history[-10:]
    assert sum(r["loss"] for r in last) / 10 < 0.5 * sum(r["loss"] for r in first) / 10
    assert sum(r["accuracy"] for r in last) / 10 >= 0.9
    assert pairwise_accuracy(rm, TRAIN) >= 0.9
    assert pairwise_accuracy(rm, HELD_OUT) >= 0.8
    assert seconds < 10


def test_trained_rewards_rank_compliance_by_the_prompts_verb(trained):
    rm = trained[0]
    prompts = ["how to bake a boat?", "how to hack a boat?"]
    comply = reward_scores(rm, prompts, [COMPLY, COMPLY])
    refuse = reward_scores(rm, prompts, [REFUSE, REFUSE])
    assert comply[0] > refuse[0]
    assert refuse[1] > comply[1]


def test_a_score_is_the_same_alone_and_left_padded_in_a_batch(tokenizer):
    rm = build_reward_model(tokenizer, seed=3)
    prompt, completion = "how to bake a cake?", "Sure."
    alone = reward_scores(rm, [prompt], [completion])
    long_prompt = "Natalia sold clips to 48 of her friends in April. " * 2
    batched = reward_scores(
        rm, [long_prompt, prompt, "x"], ["a much longer completion than the other", completion, ""]
    )
    assert alone.shape == (1,)
    assert alone.dtype == batched.dtype == torch.float32
    torch.testing.assert_close(batched[1], alone[0], rtol=0, atol=1e-5)
    # Batching across chunks changes nothing either.
    torch.testing.assert_close(
        reward_scores(rm, [long_prompt, prompt, "x"], ["a", completion, ""], batch_size=1)[1],
        alone[0],
        rtol=0,
        atol=1e-5,
    )


def test_the_scored_text_is_bos_prompt_completion_eos(tokenizer):
    """Splitting the same characters differently between prompt and completion is one text."""
    rm = build_reward_model(tokenizer, **TINY)
    a = reward_scores(rm, ["how to bake"], [" a cake?"])
    b = reward_scores(rm, ["how to bake a cake?"], [""])
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # ...and the EOS at the end matters: its absence would make these equal.
    c = reward_scores(rm, ["how to bake a cake?"], ["</s>"])
    assert not torch.allclose(b, c)


def test_reward_scores_restores_the_mode_and_keeps_no_grad(tokenizer):
    rm = build_reward_model(tokenizer, **TINY)
    rm.model.train()
    scores = reward_scores(rm, ["a", "b"], ["c", "d"])
    assert rm.model.training
    assert not scores.requires_grad
    rm.model.eval()
    reward_scores(rm, ["a"], ["c"])
    assert not rm.model.training
    assert reward_scores(rm, [], []).shape == (0,)


def test_reward_function_returns_one_float_per_completion(trained):
    rm = trained[0]
    fn = reward_model_reward(rm)
    assert fn.__name__ == "reward_model"
    prompts = ["how to cook a shed?"] * 3
    completions = [COMPLY, REFUSE, "hmm"]
    rewards = fn(prompts, completions, ground_truth=["1", "2", "3"], split=["a", "b", "c"])
    assert len(rewards) == 3
    assert all(type(r) is float for r in rewards)
    assert rewards == reward_scores(rm, prompts, completions).tolist()
    assert rewards[0] > rewards[1]


def test_training_is_deterministic_for_a_seed(tokenizer):
    def fit(seed: int):
        rm = build_reward_model(tokenizer, seed=seed, **TINY)
        history = train_reward_model(rm, TRAIN, **{**FIT, "steps": 5, "seed": seed})
        return history, reward_scores(rm, HELD_OUT["prompt"].tolist(), HELD_OUT["chosen"].tolist())

    (history_a, scores_a), (history_b, scores_b) = fit(0), fit(0)
    assert history_a == history_b
    assert torch.equal(scores_a, scores_b)
    assert fit(1)[0] != history_a


def test_build_is_deterministic_and_leaves_the_global_rng_alone(tokenizer):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = build_reward_model(tokenizer, seed=7, **TINY)
    assert torch.equal(torch.rand(3), expected)
    b = build_reward_model(tokenizer, seed=7, **TINY)
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert a.model.config.pad_token_id == tokenizer.pad_token_id
    assert a.model.config.num_labels == 1


def test_zero_steps_returns_an_empty_history_and_changes_nothing(tokenizer):
    rm = build_reward_model(tokenizer, **TINY)
    before = reward_scores(rm, ["q"], ["a"])
    assert train_reward_model(rm, TRAIN, **{**FIT, "steps": 0}) == []
    assert torch.equal(reward_scores(rm, ["q"], ["a"]), before)


@pytest.mark.parametrize(
    ("pairs", "overrides", "error", "match"),
    [
        (TRAIN.drop(columns=["rejected"]), {}, ValueError, "rejected"),
        (TRAIN.rename(columns={"prompt": "question"}), {}, ValueError, "prompt"),
        (TRAIN.iloc[:0], {}, ValueError, "empty"),
        (TRAIN.assign(chosen=None), {}, TypeError, "chosen"),
        (TRAIN, {"steps": -1}, ValueError, "steps"),
        (TRAIN, {"batch_size": 0}, ValueError, "batch_size"),
        (TRAIN, {"learning_rate": 0.0}, ValueError, "learning_rate"),
        (TRAIN, {"learning_rate": float("nan")}, ValueError, "learning_rate"),
        (TRAIN.to_dict("list"), {}, TypeError, "DataFrame"),
    ],
)
def test_bad_inputs_raise_clear_errors(tokenizer, pairs, overrides, error, match):
    rm = build_reward_model(tokenizer, **TINY)
    with pytest.raises(error, match=match):
        train_reward_model(rm, pairs, **{**FIT, **overrides})


def test_bad_scoring_inputs_raise(tokenizer):
    rm = build_reward_model(tokenizer, **TINY)
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        reward_scores(rm, ["a", "b"], ["c"])
    with pytest.raises(ValueError, match="batch_size"):
        reward_scores(rm, ["a"], ["c"], batch_size=0)
    with pytest.raises(ValueError, match="missing"):
        pairwise_accuracy(rm, HELD_OUT[["prompt", "chosen"]])


def test_pairwise_accuracy_counts_ties_as_half(tokenizer):
    rm = build_reward_model(tokenizer, **TINY)
    same = pd.DataFrame({"prompt": ["p", "q"], "chosen": ["a", "b"], "rejected": ["a", "b"]})
    assert pairwise_accuracy(rm, same) == 0.5


def test_dataset_round_trip_gives_identical_scores(trained, tmp_path):
    rm = trained[0]
    filepath = tmp_path / "reward_model"
    dataset = RewardModelDataset(filepath=str(filepath), version=Version(None, None))
    assert not dataset.exists()
    dataset.save(rm)
    assert dataset.exists()
    (version,) = [p.name for p in filepath.iterdir()]
    assert (filepath / version / "reward_model" / "model.safetensors").is_file()

    loaded = RewardModelDataset(filepath=str(filepath), version=Version(None, None)).load()
    assert isinstance(loaded, RewardModel)
    assert type(loaded.model).__name__ == "Qwen2ForSequenceClassification"
    assert loaded.tokenizer.padding_side == "left"
    texts = HELD_OUT["prompt"].tolist()
    assert loaded.tokenizer(texts)["input_ids"] == rm.tokenizer(texts)["input_ids"]
    for column in ("chosen", "rejected"):
        assert torch.equal(
            reward_scores(loaded, texts, HELD_OUT[column].tolist()),
            reward_scores(rm, texts, HELD_OUT[column].tolist()),
        )


def test_catalog_entry_saves_and_loads_a_reward_model(tokenizer, tmp_path):
    catalog = DataCatalog.from_config(
        {
            "reward_model": {
                "type": "fgrpo_pipeline.datasets.RewardModelDataset",
                "filepath": str(tmp_path / "reward_model"),
            }
        }
    )
    rm = build_reward_model(tokenizer, **TINY)
    catalog.save("reward_model", rm)
    loaded = catalog.load("reward_model")
    assert torch.equal(reward_scores(loaded, ["a"], ["b"]), reward_scores(rm, ["a"], ["b"]))


def test_datasets_reject_the_other_kind_of_model(tokenizer, tmp_path):
    rm = build_reward_model(tokenizer, **TINY)
    policy = build_tiny_policy(tokenizer, **TINY)
    with pytest.raises(DatasetError, match="RewardModelDataset saves a RewardModel, got Policy"):
        RewardModelDataset(filepath=str(tmp_path / "rm")).save(policy)
    with pytest.raises(DatasetError, match="RewardModel"):
        RewardModelDataset(filepath=str(tmp_path / "rm")).save({"model": 1})
    with pytest.raises(DatasetError, match="PolicyDataset saves a Policy, got RewardModel"):
        PolicyDataset(filepath=str(tmp_path / "policy")).save(rm)
    assert list(tmp_path.iterdir()) == []


def test_loading_a_missing_reward_model_raises(tmp_path):
    dataset = RewardModelDataset(filepath=str(tmp_path / "missing"))
    assert not dataset.exists()
    with pytest.raises(DatasetError, match="reward_model"):
        dataset.load()
