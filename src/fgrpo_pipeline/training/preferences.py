"""Offline preference data (aligned / unaligned responses) and the minibatches FDO, f-HAL
and DPO draw from it each step, scored under the policy and the reference."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from fgrpo_pipeline.algorithms.losses import PreferenceInputs
from fgrpo_pipeline.models.policy import Policy
from fgrpo_pipeline.rollout import token_logprobs


@dataclass
class PreferenceData:
    """Offline aligned / unaligned samples for FDO and f-HAL: prompt and completion texts."""

    chosen_prompts: list[str]
    chosen_completions: list[str]
    rejected_prompts: list[str]
    rejected_completions: list[str]

    def __post_init__(self) -> None:
        if not self.chosen_prompts or not self.rejected_prompts:
            raise ValueError(
                "preference data needs at least one aligned and one unaligned sample, got "
                f"{len(self.chosen_prompts)} aligned and {len(self.rejected_prompts)} unaligned"
            )
        sides: dict[str, tuple[list[int], list[int]]] = {}
        for i, prompt in enumerate(self.chosen_prompts):
            sides.setdefault(prompt, ([], []))[0].append(i)
        for i, prompt in enumerate(self.rejected_prompts):
            sides.setdefault(prompt, ([], []))[1].append(i)
        # Prompts with an aligned and an unaligned response: what DPO's pairs are drawn from.
        self.paired = [(c, r) for c, r in sides.values() if c and r]
        self.unpaired_prompts = len(sides) - len(self.paired)


def preferences_from_splits(
    aligned: pd.DataFrame, unaligned: pd.DataFrame
) -> PreferenceData | None:
    """Offline preference data from the reward_labeling splits; None if a side is empty."""
    if not len(aligned) or not len(unaligned):
        return None
    return PreferenceData(
        aligned["prompt"].tolist(),
        aligned["completion"].tolist(),
        unaligned["prompt"].tolist(),
        unaligned["completion"].tolist(),
    )


def encode_completions(
    tokenizer, prompts: list[str], completions: list[str]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt ids/mask (left-padded, BOS first) and completion ids/mask (EOS appended)."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    completion_tokens = [
        tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        for c in completions
    ]
    width = max(len(ids) for ids in completion_tokens)
    completion_ids = torch.full((len(completions), width), tokenizer.pad_token_id)
    completion_mask = torch.zeros(len(completions), width)
    for row, ids in enumerate(completion_tokens):
        completion_ids[row, : len(ids)] = torch.tensor(ids)
        completion_mask[row, : len(ids)] = 1.0
    return enc["input_ids"], enc["attention_mask"].float(), completion_ids, completion_mask


def sequence_logps(model, tokenizer, prompts, completions, *, temperature, grad):
    prompt_ids, prompt_mask, completion_ids, completion_mask = encode_completions(
        tokenizer, prompts, completions
    )
    with torch.set_grad_enabled(grad):
        per_token = token_logprobs(
            model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature
        )
    return (per_token * completion_mask).sum(dim=1)


def offline_minibatch(
    data: PreferenceData,
    policy: Policy,
    reference,
    size: int,
    gen: torch.Generator,
    temperature: float,
    share: slice = slice(None),
    *,
    paired: bool = False,
) -> PreferenceInputs:
    """``size`` aligned and ``size`` unaligned samples drawn with ``gen``, of which this rank
    scores its ``share`` (every rank draws all, so the generator stays in step).

    ``paired`` (DPO): pair i is an aligned and an unaligned response to one prompt, drawn
    uniformly among the prompts that have both, then within each side of that prompt.
    Otherwise (FDO, f-HAL) the two sides are drawn independently."""
    if paired:
        which = torch.randint(len(data.paired), (size,), generator=gen).tolist()
        u_chosen, u_rejected = torch.rand(size, generator=gen), torch.rand(size, generator=gen)
        chosen_idx = [
            data.paired[p][0][int(u * len(data.paired[p][0]))]
            for p, u in zip(which, u_chosen.tolist(), strict=True)
        ]
        rejected_idx = [
            data.paired[p][1][int(u * len(data.paired[p][1]))]
            for p, u in zip(which, u_rejected.tolist(), strict=True)
        ]
    else:
        chosen_idx = torch.randint(len(data.chosen_prompts), (size,), generator=gen).tolist()
        rejected_idx = torch.randint(len(data.rejected_prompts), (size,), generator=gen).tolist()

    def score(idx: list[int], prompts: list[str], completions: list[str]):
        ps, cs = [prompts[i] for i in idx[share]], [completions[i] for i in idx[share]]
        logps = sequence_logps(
            policy.model, policy.tokenizer, ps, cs, temperature=temperature, grad=True
        )
        ref = sequence_logps(
            reference, policy.tokenizer, ps, cs, temperature=temperature, grad=False
        )
        return logps, ref, (ps, cs)

    chosen, chosen_ref, chosen_texts = score(
        chosen_idx, data.chosen_prompts, data.chosen_completions
    )
    rejected, rejected_ref, rejected_texts = score(
        rejected_idx, data.rejected_prompts, data.rejected_completions
    )
    return PreferenceInputs(
        chosen, chosen_ref, rejected, rejected_ref, chosen_texts, rejected_texts
    )
