"""A policy as an MLflow Model: kedro-mlflow's model dataset with the transformers flavour."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

from kedro_mlflow.io.models import MlflowModelTrackingDataset

from fgrpo_pipeline.models.lora import is_lora
from fgrpo_pipeline.models.policy import Policy

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _quiet(name: str):
    """Errors only from logger ``name``: mlflow.transformers looks a local model up on the Hub
    for a model card and a license, and warns twice per logged policy that it found neither."""
    quieted = logging.getLogger(name)
    level = quieted.level
    quieted.setLevel(logging.ERROR)
    try:
        yield
    finally:
        quieted.setLevel(level)


class MlflowPolicyDataset(MlflowModelTrackingDataset):
    """Logs a :class:`Policy` to the active MLflow run with ``mlflow.transformers`` (its
    model and tokenizer as a text-generation pipeline), and loads it back as the flavour does.

    kedro-mlflow's ``MlflowModelTrackingDataset`` does the logging (switched off with the
    rest of tracking, registered when ``save_args`` name a ``registered_model_name``); this
    class only turns the policy into what the flavour takes. A LoRA policy is logged the way
    MLflow's PEFT support does: the adapter alone, with a reference to its base model's
    local ``save_pretrained`` directory (the base policy's catalog version, from which the
    policy was loaded), not a merged copy. Example catalog entry::

        trained_policy_model:
          type: fgrpo_pipeline.datasets.MlflowPolicyDataset
          save_args:
            name: trained_policy
            task: text-generation
            registered_model_name: fgrpo-policy
    """

    def __init__(
        self,
        load_args: dict[str, Any] | None = None,
        save_args: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            flavor="mlflow.transformers",
            load_args=load_args,
            save_args=save_args,
            metadata=metadata,
        )

    def _save(self, policy: Policy) -> None:
        if not isinstance(policy, Policy):
            raise TypeError(f"MlflowPolicyDataset saves a Policy, got {type(policy).__name__}")
        saved = self._save_args
        self._save_args = dict(saved)
        base = lora_base_directory(policy)
        if base is not None:
            self._save_args["base_model_path"] = str(base)
        try:
            with _quiet("mlflow.transformers"):
                super()._save({"model": policy.model, "tokenizer": policy.tokenizer})
        finally:
            self._save_args = saved


def lora_base_directory(policy: Policy) -> Path | None:
    """The local ``save_pretrained`` directory a LoRA policy's base was loaded from; None for
    a plain policy, and (with a warning: MLflow then stores the base weights too) for a base
    built in memory."""
    if not is_lora(policy):
        return None
    base = Path(str(policy.model.get_base_model().name_or_path or ""))
    if not (base / "config.json").is_file():
        logger.warning(
            "the LoRA policy's base model has no save_pretrained directory (%r): MLflow "
            "stores its weights beside the adapter; load the base from a directory (as the "
            "base_policy catalog entry does) to log the adapter alone",
            str(base),
        )
        return None
    return base.resolve()
