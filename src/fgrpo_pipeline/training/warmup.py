"""Supervised warm-up: teach the fresh policy the answer format before RL.

Each example is ``BOS + prompt`` followed by ``answer + EOS``; the loss is the mean negative
log-likelihood of the answer and EOS tokens only (prompt and padding are masked out).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from tqdm import tqdm

from fgrpo_pipeline.models.policy import Policy, build_char_tokenizer, build_tiny_policy, set_seed
from fgrpo_pipeline.rollout import token_logprobs


def _pad(rows: list[list[int]], pad_id: int, *, left: bool) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width))
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1.0
    return ids, mask


def index_batches(n: int, batch_size: int, steps: int, seed: int) -> list[Tensor]:
    """Index batches drawn epoch by epoch from seeded permutations (no repeats in an epoch)."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    batches = []
    for _ in range(steps):
        while len(order) < batch_size:
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        batches.append(order[:batch_size])
        order = order[batch_size:]
    return batches


def _lr_factor(step: int, steps: int) -> float:
    """Linear ramp over the first 5% of steps, then cosine decay to 10% of the peak.

    Measured on the arithmetic task: a constant rate ends noisier and about 0.1 less accurate.
    """
    ramp = max(1, steps // 20)
    if step < ramp:
        return (step + 1) / ramp
    progress = (step - ramp) / max(1, steps - ramp)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def supervised_warmup(
    policy: Policy,
    prompts: list[str],
    answers: list[str],
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    weight_decay: float = 0.0,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Fine-tune ``policy.model`` in place with AdamW; one ``{"step", "loss", "lr"}`` per step.

    ``learning_rate`` is the peak of the schedule (see :func:`_lr_factor`).

    Deterministic for a given ``seed`` (on the same machine and thread count).
    """
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    if not prompts:
        raise ValueError("prompts must not be empty")
    if steps < 0 or batch_size < 1 or not learning_rate > 0:
        raise ValueError(
            f"need steps >= 0, batch_size >= 1, learning_rate > 0; got {steps}, {batch_size}, "
            f"{learning_rate}"
        )
    model, tokenizer = policy.model, policy.tokenizer
    device = model.device
    prompt_rows = tokenizer(prompts)["input_ids"]
    answer_rows = [
        [*row, tokenizer.eos_token_id]
        for row in tokenizer(answers, add_special_tokens=False)["input_ids"]
    ]

    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: _lr_factor(t, steps))
    was_training = model.training
    model.train()
    history: list[dict[str, float]] = []
    try:
        batches = index_batches(len(prompts), batch_size, steps, seed)
        bar = tqdm(batches, desc="warm-up", disable=not progress, mininterval=1.0)
        for step, index in enumerate(bar):
            prompt_ids, prompt_mask = _pad(
                [prompt_rows[i] for i in index], tokenizer.pad_token_id, left=True
            )
            completion_ids, completion_mask = _pad(
                [answer_rows[i] for i in index], tokenizer.pad_token_id, left=False
            )
            completion_mask = completion_mask.to(device)
            logps = token_logprobs(
                model,
                prompt_ids.to(device),
                prompt_mask.to(device),
                completion_ids.to(device),
                completion_mask,
            )
            loss = -logps.sum() / completion_mask.sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # Clipping keeps the first steps of a fresh model from overshooting.
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            history.append({"step": step, "loss": loss.item(), "lr": schedule.get_last_lr()[0]})
            schedule.step()
            bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", refresh=False)
    finally:
        model.train(was_training)
    return history


def build_warm_policy(
    prompts: list[str],
    answers: list[str],
    *,
    model: dict,
    warmup: dict,
    seed: int,
    progress: bool = True,
) -> tuple[Policy, list[dict[str, float]]]:
    """A locally built tiny policy (``model``: :func:`build_tiny_policy` options), warmed up
    on ``answers`` (``warmup``: :func:`supervised_warmup` options); eval mode on return."""
    set_seed(seed)
    policy = build_tiny_policy(build_char_tokenizer(), seed=seed, **model)
    history = supervised_warmup(policy, prompts, answers, seed=seed, progress=progress, **warmup)
    policy.model.eval()
    return policy, history
