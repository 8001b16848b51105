"""The ``hf`` engine's own decoding loop: sampling from a causal LM with a KV cache, lean.

``transformers``' ``generate`` is general (beam search, a dozen logits processors, stopping
criteria, streamers) and pays for it on every decoding step; RL rollouts need one thing
from it, and at CPU sizes its overhead and its growing cache are most of the step. This
loop samples exactly as ``generate`` does with the knobs the engine sets (temperature, then
top-p, top-k off; or greedy), and does less work per token:

* **each distinct prompt is prefilled once** and its cache repeated to its G rows;
* **the KV cache is allocated once** for the longest sequence (:class:`PreallocatedLayer`):
  a step writes one position in place, where ``DynamicCache`` concatenates, i.e. copies
  the whole cache, every step;
* **finished rows leave the batch** (``drop_finished``): once a quarter of the running rows
  have produced EOS, their cache rows are dropped, so long and short completions do not
  cost the same;
* the step's log-probs of the sampled tokens are taken from the logits it sampled from
  (``old_logps``), without keeping a [N, T, V] stack.

With ``drop_finished=False`` every row is sampled at every step, as in ``generate``, and the
same seed gives ``generate``'s samples (the logits agree up to float rounding). Dropping
rows changes which random numbers fall to which row, not the distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicLayer

from fgrpo_pipeline.rollout.engine import SamplingConfig
from fgrpo_pipeline.rollout.logprobs import nucleus_mask, output_cache

# Finished rows leave the running batch once they are this share of it: dropping copies the
# cache's rows, so it is done in a few large cuts rather than at every EOS.
DROP_FINISHED_SHARE = 0.25


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

    def __init__(self, layer: DynamicLayer, capacity: int) -> None:
        super().__init__()
        self.device, self.is_initialized = layer.device, True
        self.length = layer.keys.shape[-2]
        self._keys = _buffer(layer.keys, capacity)
        self._values = _buffer(layer.values, capacity)
        self._views()

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
            layers[i] = PreallocatedLayer(layer, capacity)


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
) -> Decoded | None:
    """Sample ``group_size`` completions of each left-padded prompt row (P rows → N = P·G
    completions, the G of a prompt consecutive). The caller seeds the RNG and sets no-grad
    and eval mode. None if the model's forward returns no cache this loop can drive (the
    engine then falls back to ``generate``)."""
    n_prompt = prompt_ids.shape[1]
    n = prompt_ids.shape[0] * group_size
    if not share_prompts:
        prompt_ids = prompt_ids.repeat_interleave(group_size, dim=0)
        prompt_mask = prompt_mask.repeat_interleave(group_size, dim=0)
    out = model(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=(prompt_mask.cumsum(dim=1) - 1).clamp(min=0),
        use_cache=True,
        logits_to_keep=1,
    )
    found = output_cache(out)
    if found is None:
        return None
    cache_kwarg, cache = found
    logits = out.logits[:, -1]
    if share_prompts and group_size > 1:
        cache.batch_repeat_interleave(group_size)
        logits = logits.repeat_interleave(group_size, dim=0)
        prompt_mask = prompt_mask.repeat_interleave(group_size, dim=0)
    max_new = sampling.max_new_tokens
    preallocate(cache, n_prompt + max_new - 1)  # the last sampled token is never fed back

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
        token, logp = _sample(logits, sampling)
        live = rows[~done]
        tokens[live, t], logps[live, t] = token[~done], logp[~done]
        done = done | torch.isin(token, eos)
        if t == max_new - 1 or bool(done.all()):
            steps = t + 1
            break
        if drop_finished and int(done.sum()) >= DROP_FINISHED_SHARE * len(done):
            keep = (~done).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            rows, done, token = rows[keep], done[keep], token[keep]
        out = model(
            input_ids=token.unsqueeze(1),
            attention_mask=mask[rows, : n_prompt + t + 1],
            position_ids=(first_position[rows] + t).unsqueeze(1),
            use_cache=True,
            **{cache_kwarg: cache},
        )
        logits = out.logits[:, -1]
    return Decoded(tokens[:, :steps], logps[:, :steps])


def _sample(logits: Tensor, sampling: SamplingConfig) -> tuple[Tensor, Tensor]:
    """One token per row and its log-prob, as ``generate`` samples with the engine's knobs:
    logits / temperature, then the top-p nucleus (−inf outside), then a multinomial draw
    from the softmax; greedy takes the argmax of the raw logits. The log-prob is that of the
    distribution sampled from (greedy: of ``softmax(logits / T)``, as the engines report)."""
    scores = logits.float() / sampling.temperature
    top_p = sampling.top_p if sampling.do_sample else 1.0
    if top_p < 1:
        scores = scores.masked_fill(~nucleus_mask(scores, top_p), float("-inf"))
    if sampling.do_sample:
        token = torch.multinomial(scores.softmax(dim=-1), num_samples=1).squeeze(1)
    else:
        token = logits.argmax(dim=-1)
    logp = scores.gather(1, token.unsqueeze(1)).squeeze(1) - torch.logsumexp(scores, dim=-1)
    return token, logp
