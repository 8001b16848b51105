"""A Bradley–Terry reward model: a tiny Qwen2 with a scalar head, trained on preference pairs.

The model scores exactly what the policy sees: ``BOS + prompt + completion + EOS`` (prompt and
completion characters concatenated, no separator), left-padded in batches. The score is the
head's output at the final token (EOS). ``Qwen2ForSequenceClassification`` pools the rightmost
non-pad token, which with left padding is that final column; position ids are derived from the
attention mask, as :func:`fgrpo_pipeline.rollout.token_logprobs` does, so a sequence scores the
same alone and in a batch padded to a longer one.

Plain torch/transformers/pandas: no Kedro or MLflow here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import Tensor
from tqdm import tqdm
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2ForSequenceClassification,
)

from fgrpo_pipeline.algorithms.params import Params, require
from fgrpo_pipeline.models.policy import TinyModelConfig, tiny_qwen2_config
from fgrpo_pipeline.training.warmup import index_batches

PAIR_COLUMNS = ("prompt", "chosen", "rejected")


@dataclass
class RewardModel:
    """A sequence-classification model with one label (the reward) and its tokenizer."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerFast


def build_reward_model(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 256,
    max_position_embeddings: int = 96,
    seed: int = 0,
) -> RewardModel:
    """A freshly initialised ``Qwen2ForSequenceClassification`` (``num_labels=1``).

    Deterministic for ``seed``; the caller's RNG stream is left untouched. ``pad_token_id`` is
    set in the config: the head finds the last non-pad token with it.
    """
    config = tiny_qwen2_config(
        tokenizer,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        num_labels=1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForSequenceClassification(config)
    return RewardModel(model=model, tokenizer=tokenizer)


def _encode(tokenizer: PreTrainedTokenizerFast, prompts: Sequence[str], completions: Sequence[str]):
    """Token rows ``BOS + prompt + completion + EOS``, one per (prompt, completion)."""
    prompt_rows = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    completion_rows = tokenizer(list(completions), add_special_tokens=False)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return [[bos, *p, *c, eos] for p, c in zip(prompt_rows, completion_rows, strict=True)]


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids, mask


def _score_rows(model: PreTrainedModel, rows: list[list[int]], pad_id: int) -> Tensor:
    """Scores [N] of token rows (one forward pass; differentiable when grad is enabled)."""
    ids, mask = _left_pad(rows, pad_id)
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
    device = model.device
    logits = model(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=position_ids.to(device),
        use_cache=False,
    ).logits
    return logits[:, 0].float()


def _check_texts(prompts: Sequence[str], completions: Sequence[str]) -> None:
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    for name, values in (("prompts", prompts), ("completions", completions)):
        bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
        if bad is not None:
            raise TypeError(f"{name}[{bad}] is not a string: {values[bad]!r}")


def reward_scores(
    rm: RewardModel,
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    batch_size: int = 256,
) -> Tensor:
    """Rewards [N] (float32, CPU) of each (prompt, completion); no grad, in eval mode.

    The model's train/eval mode is restored afterwards.
    """
    _check_texts(prompts, completions)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    if not prompts:
        return torch.zeros(0, dtype=torch.float32)
    rows = _encode(rm.tokenizer, prompts, completions)
    model = rm.model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            scores = [
                _score_rows(model, rows[i : i + batch_size], rm.tokenizer.pad_token_id)
                for i in range(0, len(rows), batch_size)
            ]
    finally:
        model.train(was_training)
    return torch.cat(scores).cpu()


def _check_pairs(pairs: pd.DataFrame) -> None:
    if not isinstance(pairs, pd.DataFrame):
        raise TypeError(f"pairs must be a pandas DataFrame, got {type(pairs).__name__}")
    missing = [c for c in PAIR_COLUMNS if c not in pairs.columns]
    if missing:
        raise ValueError(
            f"pairs is missing column(s) {missing}; need {list(PAIR_COLUMNS)}, "
            f"got {list(pairs.columns)}"
        )
    if pairs.empty:
        raise ValueError("pairs must not be empty")
    for column in PAIR_COLUMNS:
        values = pairs[column].tolist()
        bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
        if bad is not None:
            raise TypeError(f"pairs column {column!r} row {bad} is not a string: {values[bad]!r}")


def _accuracy(margins: Tensor) -> float:
    """Fraction of positive margins, ties counted ½."""
    return ((margins > 0).float() + 0.5 * (margins == 0).float()).mean().item()


def train_reward_model(
    rm: RewardModel,
    pairs: pd.DataFrame,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    weight_decay: float = 0.0,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Fit ``rm.model`` in place to ``pairs`` (columns ``prompt, chosen, rejected``).

    Bradley–Terry loss ``-log σ(r_chosen - r_rejected)`` averaged over a batch, AdamW at a
    constant ``learning_rate``, gradient norm clipped to 1.0; batches are drawn epoch by epoch
    from permutations seeded by ``seed``. Returns one ``{"step", "loss", "accuracy"}`` per step
    (``accuracy``: the batch's pairwise accuracy before the update, ties ½). Deterministic for
    a given ``seed`` (on the same machine and thread count).
    """
    _check_pairs(pairs)
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate!r}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")

    model, tokenizer = rm.model, rm.tokenizer
    prompts = pairs["prompt"].tolist()
    chosen_rows = _encode(tokenizer, prompts, pairs["chosen"].tolist())
    rejected_rows = _encode(tokenizer, prompts, pairs["rejected"].tolist())
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    was_training = model.training
    model.train()
    history: list[dict[str, float]] = []
    try:
        batches = index_batches(len(pairs), batch_size, steps, seed)
        bar = tqdm(batches, desc="reward model", disable=not progress, mininterval=1.0)
        for step, index in enumerate(bar):
            index = index.tolist()
            n = len(index)
            # Chosen and rejected in one forward pass: [chosen..., rejected...].
            rows = [chosen_rows[i] for i in index] + [rejected_rows[i] for i in index]
            scores = _score_rows(model, rows, tokenizer.pad_token_id)
            margins = scores[:n] - scores[n:]
            loss = -torch.nn.functional.logsigmoid(margins).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            history.append(
                {"step": step, "loss": loss.item(), "accuracy": _accuracy(margins.detach())}
            )
            bar.set_postfix(
                loss=f"{history[-1]['loss']:.3f}",
                acc=f"{history[-1]['accuracy']:.2f}",
                refresh=False,
            )
    finally:
        model.train(was_training)
    return history


@dataclass
class RewardModelTrainingConfig(Params):
    """The Bradley–Terry fit (``reward_model.training``): the options of
    :func:`train_reward_model` but the seed."""

    BLOCK = "training"

    steps: int = 300
    batch_size: int = 64
    learning_rate: float = 0.001
    weight_decay: float = 0.0

    def check(self) -> None:
        require(self.steps >= 0, "steps", f"must be an integer ≥ 0, got {self.steps}")
        require(
            self.batch_size >= 1, "batch_size", f"must be an integer ≥ 1, got {self.batch_size}"
        )
        require(
            math.isfinite(self.learning_rate) and self.learning_rate > 0,
            "learning_rate",
            f"must be > 0, got {self.learning_rate}",
        )
        require(self.weight_decay >= 0, "weight_decay", f"must be ≥ 0, got {self.weight_decay}")


@dataclass
class RewardModelConfig(Params):
    """``reward_model`` (parameters_reward_model.yml): the model's size and its fit."""

    BLOCK = "reward_model"
    RUN_KEYS = ("progress",)

    seed: int = 0
    num_threads: int = 0
    progress: bool = True
    model: TinyModelConfig = field(
        default_factory=lambda: TinyModelConfig(max_position_embeddings=96)
    )
    training: RewardModelTrainingConfig = field(default_factory=RewardModelTrainingConfig)

    def check(self) -> None:
        require(self.num_threads >= 0, "num_threads", f"must be ≥ 0, got {self.num_threads}")


def pairwise_accuracy(rm: RewardModel, pairs: pd.DataFrame) -> float:
    """Fraction of ``pairs`` whose chosen completion scores above the rejected one (ties ½)."""
    _check_pairs(pairs)
    prompts = pairs["prompt"].tolist()
    chosen = reward_scores(rm, prompts, pairs["chosen"].tolist())
    rejected = reward_scores(rm, prompts, pairs["rejected"].tolist())
    return _accuracy(chosen - rejected)


def reward_model_reward(rm: RewardModel) -> Callable[..., list[float]]:
    """``rm`` as a reward function ``fn(prompts, completions, **columns) -> list[float]``.

    Extra dataset columns are ignored; the function's ``__name__`` is ``"reward_model"``.
    """

    def reward_model(prompts: Sequence[str], completions: Sequence[str], **_columns) -> list[float]:
        return reward_scores(rm, list(prompts), list(completions)).tolist()

    reward_model.__name__ = "reward_model"
    return reward_model
