"""Log-probabilities of completions by teacher forcing, with each group's prompt run once.

A :class:`RolloutBatch` is laid out group after group (the G completions of prompt 0, then
those of prompt 1, ...), as ``advantages`` expects. ``old_logps`` are the per-token log-probs
of the sampled tokens under the distribution they were sampled from: ``log_softmax(logits /
temperature)``, and with ``top_p < 1`` that softmax renormalised over the nucleus
transformers' ``TopPLogitsWarper`` keeps (:func:`nucleus_mask`), as vLLM's
``processed_logprobs`` are (TRL instead keeps the full-vocabulary log-softmax). Greedy
decoding ignores ``top_p``. :func:`token_logprobs` recomputes the full-vocabulary quantity
(the same at ``top_p = 1``) by teacher forcing, for the policy (with grad) and the reference
(without); with ``top_p < 1`` the nucleus log-probs are not the policy's full distribution,
so a ratio of the two compares different supports.

The G rows of a group share their prompt, and prompts are usually longer than completions,
so most of a plain teacher-forced pass (and of a plain prefill) repeats work G times.
:func:`batch_logprobs` / :func:`rows_logprobs` and :class:`HFEngine` therefore run each
distinct prompt once and reuse its KV cache for the G completions; the numbers are those of
the plain paths up to float rounding (about 1e-6 in a log-prob: matrix products over other
shapes round differently), and they fall back to the plain paths where a cache cannot be
shared.
"""

from __future__ import annotations

import copy
import weakref

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from fgrpo_pipeline.rollout.engine import RolloutBatch

# Teacher-forced passes run completions in up to this many passes of similar lengths.
DEFAULT_LENGTH_BUCKETS = 4
# What a forward pass costs beyond its token positions (splitting a batch into length buckets
# pays one pass per bucket), in positions of a model with BUCKET_REFERENCE_LAYER parameters
# per layer: on the realistic benchmark shape (0.98M per layer) 16 to 256 give the same
# split (docs/benchmarks.md). A pass's fixed cost grows with the layers, a position's cost
# with the parameters, so :func:`bucket_overhead` scales it by the reference size over the
# model's parameters per layer: ~1,000 positions for the default run's 62k-parameter layers
# (which then keeps one pass: there a pass costs more than all its positions), ~1 at 1.5B.
BUCKET_OVERHEAD_POSITIONS = 64
BUCKET_REFERENCE_LAYER = 984_000
_PARAMETERS_PER_LAYER: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def nucleus_mask(scaled_logits: Tensor, top_p: float) -> Tensor:
    """Bool [..., V]: the tokens that top-p (nucleus) sampling keeps, True where kept.

    ``scaled_logits`` are the logits already divided by the temperature. The rule is that of
    transformers' ``TopPLogitsWarper`` (min_tokens_to_keep=1), step for step so that ties
    and rounding fall the same way: sort ascending, take the cumulative softmax
    probabilities, drop every token whose cumulative probability is ≤ 1 − ``top_p``, and
    always keep the most probable one. What is kept is the smallest set of most probable
    tokens whose probabilities add up to at least ``top_p``. All True for ``top_p`` ≥ 1
    (the engines pass ``top_k=0``: no top-k cut comes before it).
    """
    if top_p >= 1:
        return torch.ones_like(scaled_logits, dtype=torch.bool)
    sorted_logits, order = torch.sort(scaled_logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= (1 - top_p)
    drop_sorted[..., -1:] = False
    return ~drop_sorted.scatter(-1, order, drop_sorted)


def sampled_logps(
    logits: Tensor, token_ids: Tensor, temperature: float, top_p: float = 1.0
) -> Tensor:
    """Log-probs at ``token_ids`` of the distribution top-p sampling at ``temperature``
    draws from: ``softmax(logits / T)`` renormalised over :func:`nucleus_mask` (the whole
    vocabulary at ``top_p = 1``: plain ``log_softmax(logits / T)``), −inf for a token
    outside the nucleus. No log-softmax [..., V] is materialised."""
    logits = logits.float() / temperature
    if top_p < 1:
        logits = logits.masked_fill(~nucleus_mask(logits, top_p), float("-inf"))
    picked = logits.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def batch_logprobs(
    model: PreTrainedModel,
    batch: RolloutBatch,
    temperature: float,
    micro_batch_size: int = 0,
    *,
    share_prompts: bool = True,
    length_buckets: int = DEFAULT_LENGTH_BUCKETS,
) -> Tensor:
    """:func:`token_logprobs` of a rollout batch's completions under ``model``, computed
    ``micro_batch_size`` sequences at a time (0 = all at once) to bound activation memory.

    Each micro-batch goes through :func:`rows_logprobs`, which runs every distinct prompt
    once rather than once per completion (``share_prompts=False`` forces the plain path),
    and its completions in up to ``length_buckets`` passes of similar lengths.
    """
    return torch.cat(
        [
            rows_logprobs(
                model,
                batch,
                rows,
                temperature,
                share_prompts=share_prompts,
                length_buckets=length_buckets,
            )
            for rows in micro_batches(batch.completion_ids.shape[0], micro_batch_size)
        ]
    )


def rows_logprobs(
    model: PreTrainedModel,
    batch: RolloutBatch,
    rows: slice,
    temperature: float = 1.0,
    *,
    share_prompts: bool = True,
    length_buckets: int = DEFAULT_LENGTH_BUCKETS,
) -> Tensor:
    """:func:`token_logprobs` [len(rows), T] of the completions in ``batch``'s rows ``rows``
    (a consecutive slice, which may cut groups), with each distinct prompt run once.

    The G rows of a group share their prompt, so teacher forcing them one by one runs the
    prompt G times. Here the slice's distinct prompts (row // G) run once, with a KV cache,
    whose rows are then repeated to the completions, which run on top of it: P·L_prompt +
    N·(T − 1) token positions instead of N·(L_prompt + T). With ``length_buckets`` > 1 the
    completions run in up to that many passes of rows of similar length
    (:func:`bucket_rows`), each padded only to its own longest row, so short completions
    do not pay for the longest. The log-probs and their gradients
    are those of :func:`token_logprobs` (same masks, same position ids), up to float
    rounding. That path is used instead when sharing cannot work or gains nothing: when
    ``share_prompts`` is False, every prompt of the slice occurs once, the model checkpoints
    activations under grad (transformers then drops the cache), or its forward returns no
    cache whose rows can be selected.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    rows = slice(*rows.indices(batch.completion_ids.shape[0]))
    if share_prompts and _can_share(model, batch, rows):
        shared = _shared_prompt_logprobs(model, batch, rows, temperature, length_buckets)
        if shared is not None:
            return shared
    return token_logprobs(
        model,
        batch.prompt_ids[rows],
        batch.prompt_mask[rows],
        batch.completion_ids[rows],
        batch.completion_mask[rows],
        temperature,
    )


def _can_share(model: object, batch: RolloutBatch, rows: slice) -> bool:
    """Whether a slice's prompts repeat (cheaply decided from the layout alone, so every
    process of a distributed run takes the same path) and the model can keep a cache.
    A batch-like object without a ``group_size`` has no known layout: nothing is shared."""
    g = getattr(batch, "group_size", None) or 1
    if rows.step != 1 or rows.stop - rows.start < 2 or batch.completion_ids.shape[1] == 0:
        return False
    if (rows.stop - 1) // g - rows.start // g + 1 == rows.stop - rows.start:
        return False  # every prompt of the slice occurs once (G = 1, say)
    module = _underlying_module(model)
    if module is None:
        return False
    # Under grad, transformers switches the cache off in checkpointed modules that train.
    return not torch.is_grad_enabled() or not any(
        getattr(m, "gradient_checkpointing", False) and m.training for m in module.modules()
    )


def _underlying_module(model: object) -> nn.Module | None:
    """The module inside a DDP / DataParallel wrapper (``.module``) or a callable holder such
    as :class:`fgrpo_pipeline.models.lora.Reference` (``.model``); None if there is none."""
    for _ in range(8):
        if isinstance(model, nn.Module):
            inner = getattr(model, "module", None)
            if not isinstance(inner, nn.Module):
                return model
            model = inner
        else:
            model = getattr(model, "model", None)
            if model is None:
                return None
    return None


def output_cache(output: object) -> tuple[str, object] | None:
    """The forward's KV cache and the keyword that takes it back (``cache`` in recent
    transformers, ``past_key_values`` before), if it returned one that can be re-batched."""
    # The keys (fields set) only: asking a recent ModelOutput for the old name logs a warning.
    names = output.keys() if hasattr(output, "keys") else ()
    name = next((n for n in ("cache", "past_key_values") if n in names), None)
    cache = None if name is None else output[name]
    if not all(hasattr(cache, m) for m in ("batch_select_indices", "batch_repeat_interleave")):
        return None
    return name, cache


def prompt_pass(
    model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor
) -> tuple[Tensor, str, object] | None:
    """Left-padded prompts through ``model`` with a cache, the logits of the last position
    only: (those logits [B, V], the cache keyword, the cache); None if the forward returned
    no cache whose rows can be selected. Position ids count the real tokens, as
    ``generate`` derives them."""
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=(attention_mask.cumsum(dim=1) - 1).clamp(min=0),
        use_cache=True,
        logits_to_keep=1,
    )
    found = output_cache(out)
    return None if found is None else (out.logits[:, -1], *found)


def _shared_prompt_logprobs(
    model: PreTrainedModel,
    batch: RolloutBatch,
    rows: slice,
    temperature: float,
    max_buckets: int = 1,
) -> Tensor | None:
    """:func:`rows_logprobs` with each distinct prompt run once; None if the model returned
    no usable cache (the caller then takes the plain path)."""
    prompt_ids, prompt_mask = batch.prompt_ids[rows], batch.prompt_mask[rows]
    completion_ids, completion_mask = batch.completion_ids[rows], batch.completion_mask[rows]
    g = batch.group_size
    n_prompt, n_completion = prompt_ids.shape[1], completion_ids.shape[1]
    device = prompt_ids.device
    # Row r of the slice belongs to the group of batch row rows.start + r; the first row of
    # each group (within the slice) carries the prompt that is run.
    group = torch.arange(rows.start, rows.stop) // g
    group -= int(group[0])
    counts = torch.bincount(group).tolist()
    firsts = torch.tensor([0, *counts[:-1]]).cumsum(0)
    group, firsts = group.to(device), firsts.to(device)
    if not (
        torch.equal(prompt_ids, prompt_ids[firsts][group])
        and torch.equal(prompt_mask, prompt_mask[firsts][group])
    ):
        raise ValueError(
            f"the rollout batch's prompts differ within a group of group_size={g} rows; "
            "the G completions of a prompt must be consecutive"
        )

    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1).long()
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    prompts = prompt_pass(model, prompt_ids[firsts], attention_mask[firsts, :n_prompt])
    if prompts is None:
        return None
    logits, cache_kwarg, cache = prompts
    # The last prompt position predicts completion token 0.
    logps = sampled_logps(logits[group].unsqueeze(1), completion_ids[:, :1], temperature)
    if n_completion > 1:
        # Token t is predicted from position t - 1: a row of length n needs n - 1 inputs.
        widths = (completion_mask.sum(dim=1).long() - 1).clamp(min=0).tolist()
        parts, order = [], []
        overhead = bucket_overhead(model) if max_buckets > 1 else 0
        for rows_b in bucket_rows(widths, max_buckets, overhead):
            width = max(widths[r] for r in rows_b)
            index = torch.tensor(rows_b, device=device)
            if width == 0:
                part = completion_mask.new_zeros(len(rows_b), n_completion - 1)
            else:
                part = _completion_pass(
                    model, (cache_kwarg, cache), group[index], index, width,
                    completion_ids, attention_mask, position_ids, n_prompt, temperature,
                )  # fmt: skip
                part = nn.functional.pad(part, (0, n_completion - 1 - width))
            parts.append(part)
            order.extend(rows_b)
        rest = torch.cat(parts)
        if len(parts) > 1:  # back to the rows' order
            rest = rest[torch.tensor(order, device=device).argsort()]
        logps = torch.cat([logps, rest], dim=1)
    return torch.where(completion_mask.bool(), logps, torch.zeros_like(logps))


def _completion_pass(
    model, cache, groups, index, width, completion_ids, attention_mask, position_ids,
    n_prompt, temperature,
) -> Tensor:  # fmt: skip
    """Log-probs [len(index), width] of completion tokens 1..width of the rows ``index``,
    run on a copy of the prompt cache holding each row's group's entry (``groups``)."""
    cache_kwarg, cache = cache
    logits = model(
        input_ids=completion_ids[index, :width],
        attention_mask=attention_mask[index, : n_prompt + width],
        position_ids=position_ids[index, n_prompt : n_prompt + width],
        use_cache=True,
        logits_to_keep=width,
        **{cache_kwarg: select_cache_rows(cache, groups)},
    ).logits
    return sampled_logps(logits, completion_ids[index, 1 : width + 1], temperature)


def select_cache_rows(cache: object, rows: Tensor) -> object:
    """A new cache holding ``cache``'s batch rows ``rows`` (repeats allowed); ``cache`` is
    left as it was, so several row sets can run on one prompt pass (autograd flows back
    through the selection into the prompt pass)."""
    selected = copy.copy(cache)
    selected.layers = [copy.copy(layer) for layer in cache.layers]
    selected.batch_select_indices(rows)
    return selected


def bucket_rows(
    widths: list[int], max_buckets: int, overhead: int | None = None
) -> list[list[int]]:
    """Rows grouped by how many positions they need (``widths``), at most ``max_buckets``
    groups, each run as one forward pass padded to its widest row.

    The groups are consecutive ranges of the sorted widths that minimise the padded
    positions plus ``overhead`` positions per extra pass (a forward call's fixed cost:
    splitting off a few long rows is not worth a call). One group keeps the rows' order
    (the single padded pass of before); otherwise each group lists its rows in order.
    ``overhead`` defaults to :data:`BUCKET_OVERHEAD_POSITIONS`."""
    overhead = BUCKET_OVERHEAD_POSITIONS if overhead is None else overhead
    n = len(widths)
    values = sorted(set(widths))
    if max_buckets <= 1 or len(values) == 1:
        return [list(range(n))]
    counts = [0] * len(values)
    position = {w: i for i, w in enumerate(values)}
    for w in widths:
        counts[position[w]] += 1
    m = len(values)
    prefix = [0]
    for c in counts:
        prefix.append(prefix[-1] + c)
    # cost[b][j]: the values[:j] in b groups; a group values[i:j] costs its rows × values[j-1].
    inf = float("inf")
    cost = [[0.0] + [inf] * m]
    cut = []
    for _ in range(min(max_buckets, m)):
        prev, row, at = cost[-1], [inf] * (m + 1), [0] * (m + 1)
        for j in range(1, m + 1):
            for i in range(j):
                c = prev[i] + (prefix[j] - prefix[i]) * values[j - 1] + overhead
                if c < row[j]:
                    row[j], at[j] = c, i
        cost.append(row)
        cut.append(at)
    groups = min(range(1, len(cost)), key=lambda b: cost[b][m])
    if groups == 1:
        return [list(range(n))]
    bounds, j = [], m
    for b in range(groups, 0, -1):
        i = cut[b - 1][j]
        bounds.append((values[i], values[j - 1]))
        j = i
    return [[r for r in range(n) if lo <= widths[r] <= hi] for lo, hi in reversed(bounds)]


def bucket_overhead(model: object) -> int:
    """What a forward pass of ``model`` costs beyond its token positions, in positions:
    :data:`BUCKET_OVERHEAD_POSITIONS` × :data:`BUCKET_REFERENCE_LAYER` over its parameters
    per layer (those outside the token embeddings and an untied output head, over
    ``config.num_hidden_layers``); :data:`BUCKET_OVERHEAD_POSITIONS` for a model whose layers
    cannot be counted."""
    module, per_layer = _underlying_module(model), 0
    if module is not None:
        if module not in _PARAMETERS_PER_LAYER:
            _PARAMETERS_PER_LAYER[module] = _parameters_per_layer(module)
        per_layer = _PARAMETERS_PER_LAYER[module]
    per_layer = per_layer or BUCKET_REFERENCE_LAYER
    return round(BUCKET_OVERHEAD_POSITIONS * BUCKET_REFERENCE_LAYER / per_layer)


def _parameters_per_layer(module: nn.Module) -> int:
    layers = getattr(getattr(module, "config", None), "num_hidden_layers", None)
    if not isinstance(layers, int) or layers < 1:
        return 0
    embeddings = {}
    for name in ("get_input_embeddings", "get_output_embeddings"):
        found = getattr(module, name, None)
        weight = getattr(found() if callable(found) else None, "weight", None)
        if isinstance(weight, Tensor):
            embeddings[weight.data_ptr()] = weight.numel()  # tied: counted once
    total = sum(p.numel() for p in module.parameters())
    return max(total - sum(embeddings.values()), 0) // layers


def micro_batches(n: int, size: int) -> list[slice]:
    """Consecutive slices of ``size`` rows covering ``n`` (one slice when ``size`` is 0)."""
    size = size or n
    return [slice(start, min(start + size, n)) for start in range(0, n, size)] or [slice(0, 0)]


def token_logprobs(
    model: PreTrainedModel,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    temperature: float = 1.0,
    *,
    top_p: float = 1.0,
) -> Tensor:
    """Teacher-forced log-probs [N, T_completion] of ``completion_ids``; 0 where masked.

    ``top_p < 1`` renormalises over the nucleus (:func:`nucleus_mask`, −inf outside it), the
    rollout engines' ``old_logps`` convention; the default is the full-vocabulary
    ``log_softmax(logits / T)`` the losses use.

    Differentiable when called with grad enabled. Position ids come from the attention mask,
    as ``generate`` derives them; Qwen2's forward alone would count the left padding. With
    RoPE only relative positions matter, but models with absolute positions need this.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    n_completion = completion_ids.shape[1]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1).long()
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    # Logits at the last T_c + 1 positions predict the completion tokens (the final one is
    # unused): the lm_head never runs over the prompt.
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        logits_to_keep=n_completion + 1,
    ).logits[:, :-1]
    logps = sampled_logps(logits, completion_ids, temperature, top_p)
    return torch.where(completion_mask.bool(), logps, torch.zeros_like(logps))
