"""The ``hf`` engine's own decoding loop: sampling from a causal LM with a KV cache, lean.

``transformers``' ``generate`` is general (beam search, a dozen logits processors, stopping
criteria, streamers) and pays for it on every decoding step; RL rollouts need one thing
from it, and at CPU sizes its overhead and its growing cache are most of the step. This
loop samples exactly as ``generate`` does with the knobs the engine sets (temperature, then
top-p, top-k off; or greedy), and does less work per token:

* **each distinct prompt is prefilled once**, and its keys and values are **held once**
  for its G rows (``cascade_attention``, :class:`SharedPrefix`; prompts of at least
  ``CASCADE_MIN_PROMPT_TOKENS``): a decoding step reads each prompt's cache once, not G
  times (else the cache is repeated to the rows);
* **the KV cache is allocated once** for the longest sequence (:class:`PreallocatedLayer`):
  a step writes one position in place, where ``DynamicCache`` concatenates, i.e. copies
  the whole cache, every step;
* **finished rows leave the batch** (``drop_finished``): once a quarter of the running rows
  have produced EOS, their cache rows are dropped, so long and short completions do not
  cost the same;
* the step's log-probs of the sampled tokens are taken from the logits it sampled from
  (``old_logps``), without keeping a [N, T, V] stack;
* **a Llama-family model's steps run on its modules** (``direct_step``,
  :class:`~fgrpo_pipeline.rollout.direct_step.DirectStep`): the same arithmetic without
  ``transformers``' per-forward machinery, which costs as much as a small model's step.

The random numbers of every row are those ``generate``'s multinomial draws for it
(:func:`_sample`), dropped rows or not, so the same seed gives ``generate``'s samples (the
logits agree up to float rounding: a draw could only differ by landing within rounding of
a category boundary). ``sampler="inverse_cdf"`` draws one uniform per row instead of an
exponential per vocabulary entry: other samples for a seed, the same distribution, and
much less work at real vocabularies on a CPU.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import AttentionInterface, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from fgrpo_pipeline.rollout.direct_step import DirectStep, padded_attention
from fgrpo_pipeline.rollout.engine import SamplingConfig
from fgrpo_pipeline.rollout.logprobs import nucleus_mask, prompt_pass

# Finished rows leave the running batch once they are this share of it: dropping copies the
# cache's rows, so it is done in a few large cuts rather than at every EOS.
DROP_FINISHED_SHARE = 0.25
# Prompts shorter than this are repeated to their rows rather than held once: the two-part
# attention's extra operations cost more than re-reading a short prompt saves (the default
# run's 7-token prompts: generation 1-2 ms slower with it; the realistic benchmark's ~65-token
# prompts: 8 % faster).
CASCADE_MIN_PROMPT_TOKENS = 32
# How the hf engine's loop draws a sampled token (``engine_options.sampler``): ``multinomial``
# is generate's draw, an Exp(1) number per vocabulary entry (the same samples for a seed as
# generate); ``inverse_cdf`` one uniform per row (other samples, the same distribution; at a
# 152k-token vocabulary on a CPU the noise alone costs more than a small model's step).
SAMPLERS = ("multinomial", "inverse_cdf")
# Tokens per block of the two-level inverse CDF: the second level sums one block per row.
INVERSE_CDF_BLOCK = 1024


@dataclass
class Decoded:
    """``completion_ids`` [N, T] (``pad_id`` after a row's first EOS; T = the steps run, at
    most ``max_new_tokens``) and ``logps`` [N, T], the log-probs of the sampled tokens under
    the distribution sampled from (0 after the first EOS)."""

    completion_ids: Tensor
    logps: Tensor


class PreallocatedLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values live in buffers sized for the whole decode.

    ``update`` writes the new positions in place and returns views of the filled part, so a
    decoding step costs O(1) cache traffic instead of a copy of the whole cache."""

    def __init__(self, keys: Tensor, values: Tensor, capacity: int) -> None:
        super().__init__()
        self.device, self.is_initialized = keys.device, True
        self.length = keys.shape[-2]
        self._keys = _buffer(keys, capacity)
        self._values = _buffer(values, capacity)
        self._views()

    @classmethod
    def of(cls, layer: DynamicLayer, capacity: int) -> PreallocatedLayer:
        return cls(layer.keys, layer.values, capacity)

    def _views(self) -> None:
        self.keys = self._keys[:, :, : self.length]
        self.values = self._values[:, :, : self.length]

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        if end > self._keys.shape[-2]:
            raise ValueError(
                f"the preallocated KV cache holds {self._keys.shape[-2]} positions; "
                f"{end} were asked for"
            )
        self._keys[:, :, self.length : end] = key_states
        self._values[:, :, self.length : end] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: Tensor) -> None:
        self._keys = _buffer(self.keys[indices], self._keys.shape[-2])
        self._values = _buffer(self.values[indices], self._values.shape[-2])
        self._views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._keys = _buffer(self.keys.repeat_interleave(repeats, 0), self._keys.shape[-2])
        self._values = _buffer(self.values.repeat_interleave(repeats, 0), self._values.shape[-2])
        self._views()


class SharedPrefixLayer(PreallocatedLayer):
    """A layer's cache for the G completions of each of P prompts: the prompts' keys and
    values held once ([P, H_kv, L_prompt, D], ``prefix_*``), and each running row's own
    completion positions in a buffer allocated once (what ``update`` fills and returns).

    Only :func:`shared_prefix_attention` can attend over it: it combines the row's prompt
    (its group's prefix) with the row's own positions. The sequence length it reports is
    the whole one, prompt included, as the model's position bookkeeping expects."""

    def __init__(self, layer: DynamicLayer, rows: int, capacity: int) -> None:
        self.prefix_keys, self.prefix_values = layer.keys, layer.values
        _, h, _, d = layer.keys.shape
        empty = layer.keys.new_empty(rows, h, 0, d)
        super().__init__(
            empty, layer.values.new_empty(rows, h, 0, layer.values.shape[-1]), capacity
        )

    def get_seq_length(self) -> int:
        return self.prefix_keys.shape[-2] + self.length

    def unshared(self, groups: Tensor, capacity: int) -> PreallocatedLayer:
        """The plain layer of the same rows: each row's prompt prefix, then its positions."""
        keys = torch.cat([self.prefix_keys[groups], self.keys], dim=2)
        values = torch.cat([self.prefix_values[groups], self.values], dim=2)
        return PreallocatedLayer(keys, values, capacity)


def _buffer(filled: Tensor, capacity: int) -> Tensor:
    """A [B, H, capacity, D] buffer whose first positions hold ``filled`` [B, H, L, D]."""
    b, h, n, d = filled.shape
    buffer = filled.new_empty(b, h, capacity, d)
    buffer[:, :, :n] = filled
    return buffer


def preallocate(cache: object, capacity: int) -> None:
    """Swap every plain ``DynamicLayer`` of ``cache`` for a :class:`PreallocatedLayer` of
    ``capacity`` positions. Other layer kinds (sliding windows, linear attention) stay as
    they are: they keep their own update rules."""
    layers = getattr(cache, "layers", [])
    for i, layer in enumerate(layers):
        if type(layer) is DynamicLayer and layer.is_initialized and layer.keys.numel():
            layers[i] = PreallocatedLayer.of(layer, capacity)


# The attention over a SharedPrefixLayer, registered with transformers under this name; the
# decoding loop names it in the model's config for its decoding steps only.
SHARED_PREFIX_ATTENTION = "fgrpo_shared_prefix"
_ACTIVE: ContextVar[SharedPrefix | None] = ContextVar(SHARED_PREFIX_ATTENTION, default=None)


class SharedPrefix:
    """Decoding with each prompt's keys and values held once for its G rows (cascade
    attention): the cache's layers become :class:`SharedPrefixLayer`, and while a step runs
    under :meth:`attending` the model's attention is :func:`shared_prefix_attention`.

    The G rows of a prompt would otherwise each hold, and each step read, a copy of the
    prompt's keys and values: G times the memory traffic over positions that are the same.
    Running rows are kept in group order; ``slot`` is a row's place within its group."""

    def __init__(self, cache: object, prompt_mask: Tensor, group_size: int, capacity: int):
        self.cache = cache
        self.prefix_padding = prompt_mask == 0  # [P, L_prompt]
        self.plain_capacity = prompt_mask.shape[1] + capacity
        rows = prompt_mask.shape[0] * group_size
        for i, layer in enumerate(cache.layers):
            cache.layers[i] = SharedPrefixLayer(layer, rows, capacity)
        groups = torch.arange(prompt_mask.shape[0], device=prompt_mask.device)
        self._select(groups.repeat_interleave(group_size))
        self.calls = 0

    @classmethod
    def attach(
        cls, cache: object, prompt_mask: Tensor, group_size: int, capacity: int
    ) -> SharedPrefix | None:
        """Hold ``cache``'s prompts once, if every layer is a plain full-attention one."""
        layers = getattr(cache, "layers", None)
        if not layers or any(
            type(layer) is not DynamicLayer or not layer.is_initialized for layer in layers
        ):
            return None
        return cls(cache, prompt_mask, group_size, capacity)

    def _select(self, groups: Tensor) -> None:
        self.groups = groups
        self.slot = torch.arange(len(groups), device=groups.device) - torch.searchsorted(
            groups, groups
        )
        self.max_group = int(self.slot.max()) + 1

    def drop(self, keep: Tensor) -> None:
        """Keep only the running rows ``keep``."""
        self.cache.batch_select_indices(keep)
        self._select(self.groups[keep])

    @contextlib.contextmanager
    def attending(self, model: PreTrainedModel):
        """The model's attention is :func:`shared_prefix_attention` within the block."""
        config = model.config
        saved = config._attn_implementation
        token = _ACTIVE.set(self)
        config._attn_implementation = SHARED_PREFIX_ATTENTION
        self.calls = 0
        try:
            yield
        finally:
            config._attn_implementation = saved
            _ACTIVE.reset(token)

    def attend(self, index: int, query: Tensor, key: Tensor, value: Tensor, scale: float):
        """:class:`~fgrpo_pipeline.rollout.direct_step.DirectStep`'s attention: layer
        ``index``'s new key and value stored, then the two-part attention ([B, 1, H·D])."""
        layer = self.cache.layers[index]
        keys, values = layer.update(key, value)
        out = _two_part_attention(query, keys, values, layer, self, scale)
        return out.reshape(out.shape[0], 1, -1)

    def routed(self) -> bool:
        """Whether every layer's attention of the last step went through this class."""
        return self.calls == len(self.cache.layers)

    def unshare(self, length: int) -> None:
        """Back to plain per-row layers holding the first ``length`` completion positions."""
        for i, layer in enumerate(self.cache.layers):
            layer.length = length
            layer._views()
            self.cache.layers[i] = layer.unshared(self.groups, self.plain_capacity)


def shared_prefix_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs
):
    """transformers' attention-function signature, for one new token per row: the softmax
    over the row's prompt (its group's prefix, padding masked) and its own positions
    (``key`` / ``value``), computed as two parts merged by their log-sum-exp (exact up to
    float rounding). Returns ([B, 1, H, D], None)."""
    shared = _ACTIVE.get()
    if shared is None:
        raise RuntimeError(f"{SHARED_PREFIX_ATTENTION} attention outside a shared-prefix decode")
    layer = shared.cache.layers[module.layer_idx]
    shared.calls += 1
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    return _two_part_attention(query, key, value, layer, shared, scale), None


def _two_part_attention(query, key, value, layer, shared, scale) -> Tensor:
    b, h, _, d = query.shape
    kv_heads = key.shape[1]
    rep = h // kv_heads  # query heads per key/value head (grouped-query attention)
    q = query.reshape(b, kv_heads, rep, d) * scale
    # The prompt part: each prompt's rows' queries packed together (zeros in empty slots), one
    # product with its keys; then back to the rows.
    n_prompts, width = layer.prefix_keys.shape[0], shared.max_group
    packed = q.new_zeros(n_prompts, width, kv_heads, rep, d)
    packed[shared.groups, shared.slot] = q
    packed = packed.permute(0, 2, 1, 3, 4).reshape(n_prompts, kv_heads, width * rep, d)
    scores = packed @ layer.prefix_keys.transpose(-1, -2)
    scores = scores.masked_fill(shared.prefix_padding[:, None, None, :], float("-inf"))
    prompt_max = scores.amax(dim=-1, keepdim=True)
    weights = (scores - prompt_max).exp()
    prompt_sum = weights.sum(dim=-1, keepdim=True)
    prompt_out = weights @ layer.prefix_values

    def rows(x: Tensor) -> Tensor:  # [P, H_kv, width·rep, E] → [B, H_kv, rep, E]
        x = x.reshape(n_prompts, kv_heads, width, rep, x.shape[-1]).permute(0, 2, 1, 3, 4)
        return x[shared.groups, shared.slot]

    prompt_max, prompt_sum, prompt_out = rows(prompt_max), rows(prompt_sum), rows(prompt_out)
    # The row's own positions.
    scores = q @ key.transpose(-1, -2)
    own_max = scores.amax(dim=-1, keepdim=True)
    weights = (scores - own_max).exp()
    own_sum = weights.sum(dim=-1, keepdim=True)
    own_out = weights @ value
    top = torch.maximum(prompt_max, own_max)
    prompt_w, own_w = (prompt_max - top).exp(), (own_max - top).exp()
    out = (prompt_out * prompt_w + own_out * own_w) / (prompt_sum * prompt_w + own_sum * own_w)
    return out.reshape(b, 1, h, value.shape[-1])


AttentionInterface.register(SHARED_PREFIX_ATTENTION, shared_prefix_attention)


def decode(
    model: PreTrainedModel,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    group_size: int,
    sampling: SamplingConfig,
    eos_ids: list[int],
    pad_id: int,
    *,
    share_prompts: bool = True,
    drop_finished: bool = True,
    cascade_attention: bool = True,
    direct_step: bool = True,
    sampler: str = "multinomial",
) -> Decoded | None:
    """Sample ``group_size`` completions of each left-padded prompt row (P rows → N = P·G
    completions, the G of a prompt consecutive). ``share_prompts``: prefill each prompt
    once (else every row); ``cascade_attention``: and hold its keys and values once
    (:class:`SharedPrefix`; else repeated per row); ``direct_step``: decoding steps of a
    Llama-family model run on its modules (:class:`DirectStep`; else through its forward);
    ``sampler``: how a token is drawn (``SAMPLERS``, :func:`_sample`). The caller seeds
    the RNG and sets no-grad and eval mode. None if the model's forward returns no cache
    this loop can drive (the engine then falls back to ``generate``)."""
    n_prompt, max_new = prompt_ids.shape[1], sampling.max_new_tokens
    n = prompt_ids.shape[0] * group_size
    prefilled = _prefill(
        model, prompt_ids, prompt_mask, group_size, max_new, share_prompts, cascade_attention
    )
    if prefilled is None:
        return None
    cache_kwarg, cache, logits, shared = prefilled
    prompt_mask = prompt_mask.repeat_interleave(group_size, dim=0)
    direct = _direct_step(model, cache, n_prompt + max_new) if direct_step else None

    device = prompt_ids.device
    mask = torch.ones(n, n_prompt + max_new, dtype=prompt_mask.dtype, device=device)
    mask[:, :n_prompt] = prompt_mask
    first_position = prompt_mask.sum(dim=1)  # position id of each row's first new token
    tokens = torch.full((n, max_new), pad_id, dtype=torch.long, device=device)
    logps = torch.zeros(n, max_new, device=device)
    eos = torch.tensor(eos_ids, device=device)
    rows = torch.arange(n, device=device)  # output row of each running row
    done = torch.zeros(n, dtype=torch.bool, device=device)
    steps = max_new
    for t in range(max_new):
        token, logp = _sample(logits, sampling, rows, n, sampler)
        live = rows[~done]
        tokens[live, t], logps[live, t] = token[~done], logp[~done]
        done = done | torch.isin(token, eos)
        if t == max_new - 1 or bool(done.all()):
            steps = t + 1
            break
        if drop_finished and int(done.sum()) >= DROP_FINISHED_SHARE * len(done):
            keep = (~done).nonzero().squeeze(1)
            if shared is not None:
                shared.drop(keep)
            else:
                cache.batch_select_indices(keep)
            rows, done, token = rows[keep], done[keep], token[keep]
        positions = first_position[rows] + t
        # The rows' masks (a gather) only where the step reads them: not for held-once prompts.
        if direct is not None:
            if shared is not None:
                logits = direct(token, positions, shared.attend)
            else:
                attend = padded_attention(cache.layers, mask[rows, : n_prompt + t + 1])
                logits = direct(token, positions, attend)
            continue
        out, shared = _step(
            model,
            shared,
            t,
            input_ids=token.unsqueeze(1),
            attention_mask=mask[rows, : n_prompt + t + 1],
            position_ids=positions.unsqueeze(1),
            use_cache=True,
            **{cache_kwarg: cache},
        )
        logits = out.logits[:, -1]
    return Decoded(tokens[:, :steps], logps[:, :steps])


def _direct_step(model: PreTrainedModel, cache: object, positions: int) -> DirectStep | None:
    """:class:`DirectStep` for ``model``, if it has one and every layer of ``cache`` is one
    of this loop's (the step writes the new positions through their ``update``)."""
    layers = getattr(cache, "layers", None)
    if not layers or any(not isinstance(layer, PreallocatedLayer) for layer in layers):
        return None
    return DirectStep.of(model, positions)


def _prefill(model, prompt_ids, prompt_mask, group_size, max_new, share_prompts, cascade):
    """The prompts' forward pass and the cache the decoding steps run on: (cache keyword,
    cache, the next-token logits of every row, the :class:`SharedPrefix` or None); None if
    the forward returns no cache this loop can drive."""
    if not share_prompts:
        prompt_ids = prompt_ids.repeat_interleave(group_size, dim=0)
        prompt_mask = prompt_mask.repeat_interleave(group_size, dim=0)
    prompts = prompt_pass(model, prompt_ids, prompt_mask)
    if prompts is None:
        return None
    logits, cache_kwarg, cache = prompts
    shared = None
    if share_prompts and group_size > 1:
        logits = logits.repeat_interleave(group_size, dim=0)
        # The last sampled token is never fed back: max_new - 1 positions per row.
        if cascade and prompt_ids.shape[1] >= CASCADE_MIN_PROMPT_TOKENS:
            shared = SharedPrefix.attach(cache, prompt_mask, group_size, max_new - 1)
        if shared is None:
            cache.batch_repeat_interleave(group_size)
    if shared is None:
        preallocate(cache, prompt_ids.shape[1] + max_new - 1)
    return cache_kwarg, cache, logits, shared


def _step(model, shared: SharedPrefix | None, t: int, **inputs):
    """One decoding forward; with ``shared``, under its attention. A model whose attention
    does not go through transformers' attention interface never reaches the shared one (it
    fails on the shapes, or computes over each row's own positions only): its cache goes
    back to plain per-row layers and the step runs again. Returns (output, the shared state
    still in use or None)."""
    if shared is None:
        return model(**inputs), None
    try:
        with shared.attending(model):
            out = model(**inputs)
        if shared.routed():
            return out, shared
    except RuntimeError:
        pass
    shared.unshare(length=t)
    return model(**inputs), None


def _sample(
    logits: Tensor,
    sampling: SamplingConfig,
    rows: Tensor | None = None,
    n: int | None = None,
    sampler: str = "multinomial",
) -> tuple[Tensor, Tensor]:
    """One token per running row and its log-prob, as ``generate`` samples with the engine's
    knobs: logits / temperature, then the top-p nucleus (−inf outside), then a draw from the
    softmax; greedy takes the argmax of the raw logits. The log-prob is that of the
    distribution sampled from (greedy: of ``softmax(logits / T)``, as the engines report).

    The random numbers are drawn for all ``n`` rows of the batch at every step, as
    ``generate``'s multinomial over its full batch draws them, and the running rows
    (``rows``, their places in the batch) take theirs: a row's draws do not depend on which
    rows have left, so dropping finished rows changes no sample. ``sampler`` (``SAMPLERS``)
    says how the draw is made."""
    scores = logits.float()
    if sampling.temperature != 1:  # (a division by 1 would only copy the [rows, V] logits)
        scores = scores / sampling.temperature
    top_p = sampling.top_p if sampling.do_sample else 1.0
    if top_p < 1:
        scores = scores.masked_fill(~nucleus_mask(scores, top_p), float("-inf"))
    n = scores.shape[0] if n is None else n
    if not sampling.do_sample:
        token, log_norm = logits.argmax(dim=-1), torch.logsumexp(scores, dim=-1)
    elif sampler == "inverse_cdf":
        u = torch.rand(n, 1, dtype=torch.float64, device=scores.device)
        token, log_norm = inverse_cdf_draw(scores, u if rows is None else u[rows])
    else:
        # torch.multinomial(probs, 1), generate's draw, is argmax(probs / q) with q ~ Exp(1)
        # drawn for the whole [rows, V] tensor.
        probs = scores.softmax(dim=-1)
        noise = probs.new_empty(n, probs.shape[-1]).exponential_(1)
        token = (probs / (noise if rows is None else noise[rows])).argmax(dim=-1)
        log_norm = torch.logsumexp(scores, dim=-1)
    return token, scores.gather(1, token.unsqueeze(1)).squeeze(1) - log_norm


def inverse_cdf_draw(
    scores: Tensor, u: Tensor, block: int = INVERSE_CDF_BLOCK
) -> tuple[Tensor, Tensor]:
    """The token of each row of ``softmax(scores)`` [R, V] (−inf: never drawn) at which its
    cumulative probability passes the row's ``u`` [R, 1] (float64 in [0, 1): a draw, for
    uniform u), and the rows' log-normalisers ``logsumexp(scores)``.

    Inverse-CDF in two levels, so that the only passes over the vocabulary are a max, an
    ``exp`` and a sum (no random number per entry): the uniform picks a block of ``block``
    tokens by the blocks' cumulative masses, then, rescaled to that block, a token by the
    block's own cumulative masses. A block's mass is summed in float32 (as softmax sums),
    the cumulative masses in float64."""
    r, v = scores.shape
    top = scores.amax(dim=-1, keepdim=True)
    weights = (scores - top).exp_()
    block = min(block, v)
    full = v // block * block
    # The blocks' masses: the whole blocks as a view, the remainder (if any) as the last one.
    masses = weights[:, :full].unflatten(1, (-1, block)).sum(dim=-1)
    if full < v:
        masses = torch.cat([masses, weights[:, full:].sum(dim=-1, keepdim=True)], dim=1)
    cdf = masses.double().cumsum(dim=-1)  # [R, blocks]
    total = cdf[:, -1:]
    x = u * total
    # The first block whose cumulative mass exceeds x; never past the last with mass (x
    # rounding up to the total would point there).
    b = torch.minimum(torch.searchsorted(cdf, x, right=True), (cdf < total).sum(-1, True))
    below = torch.where(b > 0, cdf.gather(1, (b - 1).clamp(min=0)), 0.0)
    mass = cdf.gather(1, b) - below
    # The chosen block's weights; past the vocabulary (the last block's remainder) none.
    start = b * block  # the chosen block's first token
    index = start + torch.arange(block, device=b.device)
    inner = weights.gather(1, index.clamp(max=v - 1)).masked_fill_(index >= v, 0)
    inner = inner.cumsum(-1, dtype=torch.float64)
    y = (x - below) / mass * inner[:, -1:]  # uniform on [0, the block's mass)
    j = torch.minimum(
        torch.searchsorted(inner, y, right=True), (inner < inner[:, -1:]).sum(-1, True)
    )
    token = (start + j).squeeze(1)
    return token, (top.squeeze(1).double() + total.squeeze(1).log()).float()
