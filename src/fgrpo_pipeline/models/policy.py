"""The tiny locally built policy: a character tokenizer and a small Qwen2 causal LM.

Everything is built in-process (no hub download), so tests and the toy pipeline run offline.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from fgrpo_pipeline.algorithms.params import Params, require, require_choice

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
DEFAULT_ALPHABET = string.digits + string.ascii_letters + string.punctuation + " \n"


@dataclass
class Policy:
    """A causal LM and the tokenizer it was trained with."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerFast


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - code under the seed may use numpy's global RNG
    torch.manual_seed(seed)


# Float attributes through which transformers' attention and MLP blocks apply dropout
# in train mode (e.g. Qwen2Attention.attention_dropout); nn.Dropout modules besides.
_DROPOUT_ATTRIBUTES = ("attention_dropout", "dropout", "hidden_dropout", "activation_dropout")


def disable_dropout(model: torch.nn.Module) -> int:
    """Set every dropout of ``model`` to 0 in place (its ``nn.Dropout`` modules, LoRA's
    included, and the dropout rates attention blocks read); the number changed.

    The RL losses compare the policy's log-probs with those of generation and of the
    reference, which run in eval mode; with dropout the policy would score another function
    (r_θ ≠ 0 at θ = θ_ref). With it off, train mode differs from eval mode only where it must
    (activation checkpointing). TRL's trainers do the same (``disable_dropout``)."""
    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            module.p = 0.0
            changed += 1
        for name in _DROPOUT_ATTRIBUTES:
            value = getattr(module, name, None)
            if isinstance(value, float) and value > 0:
                setattr(module, name, 0.0)
                changed += 1
    return changed


def build_char_tokenizer(alphabet: str = DEFAULT_ALPHABET) -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one token per character, BOS prepended, left padding.

    Characters outside ``alphabet`` map to ``<unk>``. Ids 0..3 are pad, bos, eos, unk.
    """
    chars = [c for c in dict.fromkeys(alphabet) if c not in SPECIAL_TOKENS]
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *chars])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # [\s\S] rather than "." so that newlines are split off as characters too.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    # Position 0 must be BOS: without it the warm-up stalls (measured loss 0.9 vs 0.2).
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
    )


def tiny_qwen2_config(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
    max_position_embeddings: int,
    **extra: object,
) -> Qwen2Config:
    """A small Qwen2 configuration over ``tokenizer``'s vocabulary and special tokens."""
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **extra,
    )


@dataclass
class TinyModelConfig(Params):
    """The size of a locally built Qwen2 (``model`` in parameters_base_policy.yml and the
    safety files): the options of :func:`build_tiny_policy` and ``build_reward_model``."""

    BLOCK = "model"

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    max_position_embeddings: int = 64

    def check(self) -> None:
        for name in self.param_names():
            require(getattr(self, name) >= 1, name, f"must be ≥ 1, got {getattr(self, name)}")
        require(
            self.hidden_size % self.num_heads == 0,
            "hidden_size",
            f"({self.hidden_size}) must be a multiple of num_heads ({self.num_heads})",
        )
        require(
            self.num_heads % self.num_kv_heads == 0,
            "num_heads",
            f"({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})",
        )


def build_tiny_policy(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 256,
    max_position_embeddings: int = 64,
    seed: int = 0,
) -> Policy:
    """A freshly initialised ``Qwen2ForCausalLM``, deterministic for ``seed``.

    The defaults (about 0.13M parameters with the default alphabet) learn the arithmetic
    warm-up within the time budget better than a 1M-parameter model does; input and output
    embeddings are tied.
    """
    config = tiny_qwen2_config(
        tokenizer,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    # A policy samples by default; top_k=0 because the library default of 50 would silently
    # truncate sampling over this small vocabulary.
    model.generation_config = GenerationConfig(
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        do_sample=True,
        top_k=0,
    )
    return Policy(model=model, tokenizer=tokenizer)


TOKENIZER_LOADERS = ("auto", "fast")


@dataclass
class PretrainedConfig(Params):
    """A pretrained model (``base_policy.pretrained``): the options of
    :func:`load_pretrained_policy`."""

    BLOCK = "pretrained"

    model: str | None = None
    revision: str | None = None
    dtype: str = "auto"
    local_files_only: bool = False
    tokenizer: str = "auto"
    gradient_checkpointing: bool = False

    def check(self) -> None:
        require_choice(self.tokenizer, TOKENIZER_LOADERS, "tokenizer")
        require(
            self.dtype == "auto" or isinstance(getattr(torch, self.dtype, None), torch.dtype),
            "dtype",
            f"must be 'auto' or a torch dtype name (bfloat16, …), got {self.dtype!r}",
        )

    def load(self) -> Policy:
        return load_pretrained_policy(**self.as_kwargs())


def load_pretrained_policy(
    model: str,
    *,
    revision: str | None = None,
    dtype: str = "auto",
    local_files_only: bool = False,
    tokenizer: str = "auto",
    gradient_checkpointing: bool = False,
) -> Policy:
    """A pretrained causal LM and its tokenizer from a hub id or a ``save_pretrained`` dir.

    ``tokenizer="fast"`` reads ``tokenizer.json`` with ``PreTrainedTokenizerFast`` (needed
    for this project's character tokenizer, which ``AutoTokenizer`` would rebuild as BPE);
    ``"auto"`` is right for hub models. Padding is set to the left for batched generation,
    and a tokenizer without a pad token pads with EOS.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if tokenizer not in TOKENIZER_LOADERS:
        raise ValueError(
            f"tokenizer must be one of {', '.join(TOKENIZER_LOADERS)}, got {tokenizer!r}"
        )
    if dtype != "auto" and not isinstance(getattr(torch, str(dtype), None), torch.dtype):
        raise ValueError(f"dtype must be 'auto' or a torch dtype name (bfloat16, …), got {dtype!r}")
    where = {"revision": revision, "local_files_only": local_files_only}
    loader = AutoTokenizer if tokenizer == "auto" else PreTrainedTokenizerFast
    tok = loader.from_pretrained(model, **where)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    lm = AutoModelForCausalLM.from_pretrained(
        model, dtype=dtype if dtype == "auto" else getattr(torch, dtype), **where
    )
    if lm.generation_config.pad_token_id is None:
        lm.generation_config.pad_token_id = tok.pad_token_id
    if gradient_checkpointing:
        lm.gradient_checkpointing_enable()
        lm.config.use_cache = False  # generate() passes use_cache=True itself
    return Policy(model=lm, tokenizer=tok)
