"""LoRA through peft: adapters on a frozen base, whose adapter-disabled self is the reference.

:func:`apply_lora` wraps a policy's model in a peft ``PeftModel``: only the ``lora_A`` /
``lora_B`` matrices train, the base weights stay frozen and untouched. The reference policy
π_ref of the RL losses is then the *same* base weights with the adapter disabled, so a LoRA
run keeps one copy of the base model in memory instead of two. :func:`make_reference` builds
that reference for any policy: the adapter-disabled base for a LoRA policy, a frozen deep copy
for a plain one. :func:`merge_for_export` folds the adapter into a copy of the base weights,
giving a plain ``transformers`` model for export.

Switching the trainer over is one line. In ``trainer.train`` replace::

    reference = copy.deepcopy(policy.model).eval().requires_grad_(False)

by, *after* the line that makes the trainer's working copy
(``policy = Policy(model=copy.deepcopy(policy.model), ...)``)::

    reference = make_reference(policy)

(with ``from fgrpo_pipeline.models.lora import make_reference``). The :class:`Reference` it returns
is called like a model (``reference(input_ids=..., ...)`` returns the model's output) without
grad and in eval mode, so ``batch_logprobs(reference, ...)`` and ``token_logprobs(reference,
...)`` work unchanged. It must wrap the working copy:
the adapter it disables is the one being trained. The optimiser may keep
``model.parameters()`` (frozen base weights get no gradient, AdamW skips them), but
:func:`trainable_parameters` avoids allocating clip/optimiser bookkeeping for them.

No Kedro or MLflow here; the catalog side is :class:`fgrpo_pipeline.datasets.AdapterDataset`.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from torch import Tensor, nn
from transformers import PreTrainedModel

from fgrpo_pipeline.models.policy import Policy

LORA_BIASES = ("none", "all", "lora_only")
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


def _fail(name: str, message: str, value: object) -> None:
    raise ValueError(f"LoRA parameter {name!r} {message}, got {value!r}")


@dataclass
class LoraSettings:
    """The LoRA adapter: rank ``r``, scale ``alpha / r``, dropout on the adapter input, the
    modules it wraps (names matched against the ends of module paths, as peft does; a single
    string is passed to peft as is: a regex, or ``"all-linear"``) and which biases train.

    ``bias`` other than ``"none"`` trains base biases in place, so the adapter-disabled model
    is no longer the starting policy and :func:`make_reference` refuses it.
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str = DEFAULT_TARGET_MODULES
    bias: str = "none"

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            _fail("r", "must be an integer ≥ 1", self.r)
        if (
            not isinstance(self.alpha, int | float)
            or isinstance(self.alpha, bool)
            or not math.isfinite(self.alpha)
            or self.alpha <= 0
        ):
            _fail("alpha", "must be a number > 0", self.alpha)
        if (
            not isinstance(self.dropout, int | float)
            or isinstance(self.dropout, bool)
            or not 0 <= self.dropout < 1
        ):
            _fail("dropout", "must be a number in [0, 1)", self.dropout)
        if isinstance(self.target_modules, str):
            if not self.target_modules:
                _fail("target_modules", "must not be empty", self.target_modules)
        elif isinstance(self.target_modules, Sequence):
            self.target_modules = tuple(self.target_modules)
            if not self.target_modules or not all(
                isinstance(name, str) and name for name in self.target_modules
            ):
                _fail(
                    "target_modules",
                    "must be a non-empty list of module names",
                    self.target_modules,
                )
        else:
            _fail("target_modules", "must be a module name or a list of them", self.target_modules)
        if self.bias not in LORA_BIASES:
            _fail("bias", f"must be one of {', '.join(LORA_BIASES)}", self.bias)

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> LoraSettings:
        """Build from a parameters mapping (e.g. ``lora`` in a parameters YAML).

        Unknown keys are an error; missing ones take the defaults; ``None`` is all defaults.
        """
        params = dict(params or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(
                f"unknown LoRA parameter(s) {unknown}; valid: {', '.join(sorted(known))}"
            )
        return cls(**params)

    def to_peft(self) -> LoraConfig:
        """The equivalent peft ``LoraConfig`` for a causal LM."""
        targets = (
            self.target_modules
            if isinstance(self.target_modules, str)
            else list(self.target_modules)
        )
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=targets,
            bias=self.bias,
            task_type=TaskType.CAUSAL_LM,
        )


@contextmanager
def quiet_peft() -> Iterator[None]:
    """Silences peft's own call of a deprecated transformers API (not actionable here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
        )
        yield


def is_lora(policy: Policy | nn.Module) -> bool:
    """Whether the policy's model (or the model itself) is a peft ``PeftModel``."""
    model = policy.model if isinstance(policy, Policy) else policy
    return isinstance(model, PeftModel)


def _check_targets(model: nn.Module, targets: tuple[str, ...]) -> None:
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if missing:
        linear = sorted(
            {
                name.rsplit(".", 1)[-1]
                for name, m in model.named_modules()
                if isinstance(m, nn.Linear)
            }
        )
        raise ValueError(
            f"LoRA parameter 'target_modules': {missing} match no module of "
            f"{type(model).__name__}; its linear layers are named {', '.join(linear)}"
        )


def apply_lora(policy: Policy, settings: LoraSettings | None = None) -> Policy:
    """The policy with its model wrapped in a peft ``PeftModel`` carrying a fresh adapter.

    In place, as peft does it: the input's model becomes the wrapped base (its target layers
    are replaced by LoRA layers, its weights frozen), and no weights are copied; deep-copy the
    policy first to keep the original. Only the adapter (``lora_``) parameters train (and
    biases if ``settings.bias`` says so). A fresh adapter's ``lora_B`` is zero, so the wrapped
    model computes exactly what the base did.
    """
    settings = settings or LoraSettings()
    if is_lora(policy):
        raise ValueError("the policy already has a LoRA adapter (it is a PeftModel)")
    if not isinstance(settings.target_modules, str):
        _check_targets(policy.model, settings.target_modules)
    with quiet_peft():
        model = get_peft_model(policy.model, settings.to_peft())
    return Policy(model=model, tokenizer=policy.tokenizer)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that require grad: the adapter's for a LoRA model, all for a plain one."""
    return [p for p in model.parameters() if p.requires_grad]


@contextmanager
def reference_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The model as the reference policy: adapter disabled (LoRA only) and in eval mode.

    For a ``PeftModel`` it yields the same object with peft's ``disable_adapter()`` active, so
    forward passes use the base weights alone; a plain model is only switched to eval mode.
    The training mode is restored on exit. Gradients are left as they are: wrap the calls in
    ``torch.no_grad()`` (as :class:`Reference` does).
    """
    # A frozen copy is in eval mode already: switching (a walk over every module, twice per
    # call) was ~10 % of the default run's reference pass.
    was_training = model.training
    if was_training:
        model.eval()
    try:
        if isinstance(model, PeftModel):
            with model.disable_adapter():
                yield model
        else:
            yield model
    finally:
        if was_training:
            model.train()


class Reference:
    """The reference policy π_ref, called like a model; always without grad, in eval mode.

    Holds either the LoRA policy's own ``PeftModel`` (forward passes run with the adapter
    disabled: the base weights, shared, never copied) or a frozen copy of a plain model.
    Build it with :func:`make_reference`.
    """

    def __init__(self, model: nn.Module, *, shares_weights: bool) -> None:
        self.model = model
        self.shares_weights = shares_weights

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad(), reference_mode(self.model) as model:
            return model(*args, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def logprobs(self, batch: Any, temperature: float = 1.0) -> Tensor:
        """``batch_logprobs`` of a rollout batch under the reference."""
        from fgrpo_pipeline.rollout.logprobs import batch_logprobs

        return batch_logprobs(self, batch, temperature)

    def __repr__(self) -> str:
        kind = "adapter-disabled base (shared weights)" if self.shares_weights else "frozen copy"
        return f"Reference({type(self.model).__name__}, {kind})"


def make_reference(policy: Policy) -> Reference:
    """π_ref for training ``policy``: its adapter-disabled base if LoRA, else a frozen copy.

    A LoRA reference wraps ``policy.model`` itself, so pass the model that will be trained:
    the reference is its base weights as they are, which LoRA never changes. For a plain
    model the reference is a deep copy taken now (eval mode, no grad).
    """
    if is_lora(policy):
        bias = policy.model.peft_config[policy.model.active_adapter].bias
        if bias != "none":
            raise ValueError(
                f"a LoRA policy with bias={bias!r} trains the base biases in place, so its "
                "adapter-disabled model is not the starting policy; use LoRA bias 'none' "
                "for a shared-weight reference"
            )
        return Reference(policy.model, shares_weights=True)
    frozen = copy.deepcopy(policy.model).eval().requires_grad_(False)
    return Reference(frozen, shares_weights=False)


def reference_logprobs(policy_or_model: Policy | nn.Module, batch: Any, temperature: float = 1.0):
    """Per-token log-probs of a rollout batch under the reference of a LoRA policy, no copy.

    The model runs with its adapter disabled (a plain model runs as is), without grad.
    """
    model = policy_or_model.model if isinstance(policy_or_model, Policy) else policy_or_model
    return Reference(model, shares_weights=True).logprobs(batch, temperature)


def merge_for_export(policy: Policy) -> Policy:
    """A plain ``transformers`` model with the adapter merged into (a copy of) the base weights.

    The input policy stays LoRA. The merged model's parameters require grad again, as a
    freshly loaded model's do, and it keeps the policy's generation config. A plain policy
    is returned as is.
    """
    if not is_lora(policy):
        return policy
    source = policy.model
    merged = copy.deepcopy(source).merge_and_unload()
    if not isinstance(merged, PreTrainedModel):
        raise TypeError(f"merging gave a {type(merged).__name__}, not a PreTrainedModel")
    # The wrapper's view: PeftModel.generate copies the wrapper's generation config into the
    # base model, so after a rollout the base's own may be the engine's, not the policy's.
    merged.generation_config = copy.deepcopy(source.generation_config)
    merged.requires_grad_(True)
    merged.train(source.training)
    return Policy(model=merged, tokenizer=policy.tokenizer)
