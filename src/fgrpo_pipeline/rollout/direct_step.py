"""A decoding step run on a Llama-family model's own modules, without its ``forward``.

A decoding step feeds one token per running row through the model. ``transformers`` wraps
every forward in per-call machinery (output capturing, merging config defaults, building
the attention mask, dispatching the attention function, output dataclasses) that costs
about as much as a small model's arithmetic: 0.7 ms of the 1.1 ms forward of the default
run's 2-layer model, and ~50 ms of a ~0.6 s generation at the benchmarks' realistic shape.
:class:`DirectStep` calls the same modules (norms, projections, MLPs, the rotary table, the
head) in the same order, so the arithmetic is the forward's, and attends over the decoding
loop's own cache with the function the loop passes it. Calling the modules rather than
their weights keeps LoRA adapters and other wrapped layers working.

It applies where the decoder layer is Llama's (pre-norm attention, then a pre-norm MLP,
each with a residual; separate q/k/v projections; the model's ``apply_rotary_pos_emb``):
the ``llama`` and ``qwen2`` model types, with full attention in every layer and a rotary
embedding that does not depend on the sequence length, and a forward that is the class's
own: one replaced on the instance (accelerate's autocast wrapper, device-map hooks) or with
hooks registered on it does more than its modules, so the step would skip that.
:meth:`DirectStep.of` returns None for any other model, which the loop then steps through
its forward.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

# Model types whose decoder layers have exactly the structure the step runs.
DIRECT_MODEL_TYPES = frozenset({"llama", "qwen2"})
# Rotary embeddings recomputed from the sequence length (transformers' dynamic_rope_update):
# a table computed once would not match them.
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")

# attend(layer index, query [B, H, 1, D], key and value [B, H_kv, 1, D] of the new position,
# scale) → the attention output [B, 1, H·D]; it also stores the new key and value.
Attend = Callable[[int, Tensor, Tensor, Tensor, float], Tensor]


@dataclass
class DirectStep:
    """One decoding step of a Llama-family model (see the module's docstring)."""

    model: nn.Module  # the *ForCausalLM (inside any DDP or peft wrapper)
    apply_rotary: Callable
    cos: Tensor  # [positions, D], the rotary table of every position a step can ask for
    sin: Tensor

    @classmethod
    def of(cls, model: nn.Module, positions: int) -> DirectStep | None:
        """The step for ``model`` (positions 0 … ``positions`` − 1), or None if the model's
        layers are not the structure it runs."""
        chain = _unwrapped(model)
        causal_lm = chain[-1]
        inner = getattr(causal_lm, "model", None)
        if any(_forward_is_extended(m) for m in (*chain, inner) if isinstance(m, nn.Module)):
            return None
        config = getattr(causal_lm, "config", None)
        if getattr(config, "model_type", None) not in DIRECT_MODEL_TYPES:
            return None
        if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
            return None
        rotary = getattr(inner, "rotary_emb", None)
        if rotary is None or not hasattr(causal_lm, "lm_head"):
            return None
        if any(kind in getattr(rotary, "rope_type", "default") for kind in _LENGTH_DEPENDENT_ROPE):
            return None
        modeling = sys.modules[type(causal_lm).__module__]
        apply_rotary = getattr(modeling, "apply_rotary_pos_emb", None)
        if apply_rotary is None:
            return None
        embed = inner.embed_tokens.weight
        position_ids = torch.arange(positions, device=embed.device).unsqueeze(0)
        cos, sin = rotary(embed[:1].unsqueeze(0), position_ids)
        return cls(causal_lm, apply_rotary, cos[0], sin[0])

    def __call__(self, tokens: Tensor, positions: Tensor, attend: Attend) -> Tensor:
        """The next-token logits [B, V] of ``tokens`` [B] at ``positions`` [B]."""
        inner = self.model.model
        hidden = inner.embed_tokens(tokens.unsqueeze(1))  # [B, 1, hidden]
        cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)
        for index, layer in enumerate(inner.layers):
            hidden = self._layer(layer, index, hidden, cos, sin, attend)
        return self.model.lm_head(inner.norm(hidden))[:, -1]

    def _layer(self, layer, index: int, hidden: Tensor, cos, sin, attend: Attend) -> Tensor:
        attention = layer.self_attn
        x = layer.input_layernorm(hidden)
        shape = (x.shape[0], 1, -1, attention.head_dim)
        query = attention.q_proj(x).view(shape).transpose(1, 2)
        key = attention.k_proj(x).view(shape).transpose(1, 2)
        value = attention.v_proj(x).view(shape).transpose(1, 2)
        query, key = self.apply_rotary(query, key, cos, sin)
        hidden = hidden + attention.o_proj(attend(index, query, key, value, attention.scaling))
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def padded_attention(layers: list, mask: Tensor) -> Attend:
    """Attention over each row's own cached positions (``layers``' buffers, the new one
    appended) with its padding (``mask`` [B, L] == 0) left out: what the forward's SDPA
    attention computes for one new token, with the query heads grouped by key/value head
    as transformers does."""
    keep = mask.bool()[:, None, None, :]

    def attend(index: int, query: Tensor, key: Tensor, value: Tensor, scale: float) -> Tensor:
        keys, values = layers[index].update(key, value)
        b, h, _, d = query.shape
        grouped = query.reshape(b, key.shape[1], h // key.shape[1], d)
        out = nn.functional.scaled_dot_product_attention(
            grouped, keys, values, attn_mask=keep, scale=scale
        )
        return out.reshape(b, 1, h * values.shape[-1])

    return attend


def _unwrapped(model: nn.Module) -> list[nn.Module]:
    """``model`` and the modules inside its DDP (``.module``) and peft
    (``get_base_model()``) wrappers, the causal LM last."""
    chain = [model]
    while isinstance(getattr(chain[-1], "module", None), nn.Module):
        chain.append(chain[-1].module)
    if hasattr(chain[-1], "get_base_model"):
        chain.append(chain[-1].get_base_model())
    return chain


def _forward_is_extended(module: nn.Module) -> bool:
    """Whether calling ``module`` does more than its class's forward."""
    return "forward" in vars(module) or bool(module._forward_hooks or module._forward_pre_hooks)
