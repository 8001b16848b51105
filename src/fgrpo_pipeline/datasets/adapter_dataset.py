"""``AdapterDataset``: a versioned Kedro dataset holding only a LoRA policy's adapter."""

from __future__ import annotations

import tempfile
from copy import deepcopy
from typing import Any

import fsspec
from kedro.io.core import DatasetError, Version, get_protocol_and_path
from peft import PeftModel
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from fgrpo_pipeline.datasets.policy_dataset import PolicyDataset
from fgrpo_pipeline.models.lora import is_lora, quiet_peft
from fgrpo_pipeline.models.policy import Policy


class AdapterDataset(PolicyDataset):
    """Saves the adapter of a LoRA :class:`Policy` and its tokenizer; loads them onto a base.

    A save writes what peft's ``save_pretrained`` does (``adapter_config.json`` and the
    adapter weights, megabytes rather than the base model's size) and the tokenizer, through
    :class:`PolicyDataset`'s staging directory and rename. Loading needs the base model: the
    ``base`` option is a ``save_pretrained`` directory (for a versioned :class:`PolicyDataset`,
    one version's inner directory), loaded with ``AutoModelForCausalLM`` and
    ``local_files_only``; the base's generation config is the one the loaded policy has.
    Example catalog entry::

        lora_policy:
          type: fgrpo_pipeline.datasets.AdapterDataset
          filepath: data/06_models/lora_policy
          base: data/06_models/base_policy_export
          versioned: true

    ``load_args`` go to the base model's ``from_pretrained`` (e.g. ``dtype``), ``save_args``
    to the adapter's ``save_pretrained``. ``trainable`` (default true) loads the adapter with
    grad enabled, to continue training; set it false for inference only. ``base`` may carry an
    fsspec protocol too.
    """

    _name = "adapter"

    def __init__(
        self,
        filepath: str,
        base: str | None = None,
        trainable: bool = True,
        version: Version | None = None,
        load_args: dict[str, Any] | None = None,
        save_args: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            filepath=filepath,
            version=version,
            load_args=deepcopy(load_args),
            save_args=deepcopy(save_args),
            metadata=metadata,
        )
        self._base = base
        self._trainable = bool(trainable)

    def _from_pretrained(self, local_dir: str) -> Policy:
        if not self._base:
            raise DatasetError(
                f"{type(self).__name__} needs the 'base' option (a save_pretrained directory "
                f"of the base model) to load the adapter at '{local_dir}'"
            )
        protocol, path = get_protocol_and_path(self._base)
        fs = fsspec.filesystem(protocol)
        if not fs.isdir(path):
            raise DatasetError(f"no base model directory at '{self._base}' for {self}")
        if protocol == "file":
            base = self._load_base(path)
        else:
            with tempfile.TemporaryDirectory(prefix="adapter-base-") as local:
                fs.get(path.rstrip("/") + "/", local, recursive=True)
                base = self._load_base(local)
        try:
            with quiet_peft():
                model = PeftModel.from_pretrained(base, local_dir, is_trainable=self._trainable)
        except Exception as error:  # a shape mismatch means the adapter is for another base
            raise DatasetError(
                f"could not load the adapter at '{local_dir}' onto the base at "
                f"'{self._base}': {error}"
            ) from error
        tokenizer = PreTrainedTokenizerFast.from_pretrained(local_dir, local_files_only=True)
        return Policy(model=model, tokenizer=tokenizer)

    def _load_base(self, directory: str):
        return AutoModelForCausalLM.from_pretrained(
            directory, **{**self._load_args, "local_files_only": True}
        )

    def _write(self, data: Policy, directory: str) -> None:
        if not isinstance(data, Policy):
            raise DatasetError(f"{type(self).__name__} saves a Policy, got {type(data).__name__}")
        if not is_lora(data):
            raise DatasetError(
                f"{type(self).__name__} saves a LoRA policy (a peft PeftModel), got a plain "
                f"{type(data.model).__name__}; save it with PolicyDataset, or apply_lora first"
            )
        data.model.save_pretrained(directory, **self._save_args)
        data.tokenizer.save_pretrained(directory)

    def _describe(self) -> dict[str, Any]:
        return {**super()._describe(), "base": self._base, "trainable": self._trainable}
