"""``PolicyDataset``: a versioned Kedro dataset holding a :class:`Policy` as a directory.

The directory is what ``save_pretrained`` writes for the model and the tokenizer, loaded back
with ``AutoModelForCausalLM`` and ``PreTrainedTokenizerFast``. Loading never reaches a hub.
"""

from __future__ import annotations

import tempfile
import uuid
from copy import deepcopy
from pathlib import PurePosixPath
from typing import Any

import fsspec
from kedro.io.core import (
    AbstractVersionedDataset,
    DatasetError,
    Version,
    get_filepath_str,
    get_protocol_and_path,
)
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from fgrpo_pipeline.models.policy import Policy


class PolicyDataset(AbstractVersionedDataset[Policy, Policy]):
    """Saves/loads a :class:`Policy` (model + tokenizer) as a ``save_pretrained`` directory.

    Example catalog entry::

        warm_policy:
          type: fgrpo_pipeline.datasets.PolicyDataset
          filepath: data/06_models/warm_policy
          versioned: true

    A save is written to a staging directory beside the target and renamed into place, so a
    failed save leaves no half-written policy behind. ``load_args`` go to the model's
    ``from_pretrained`` (e.g. ``dtype``), ``save_args`` to its ``save_pretrained``. The
    filepath may carry an fsspec protocol (e.g. ``memory://``); the rename is atomic only on
    filesystems where a move is.

    Subclasses holding another ``(model, tokenizer)`` dataclass override the class attributes
    ``_data_type`` (what ``save`` accepts and ``load`` builds), ``_model_class`` (the
    ``Auto*`` class that loads the model) and ``_name`` (used in messages).
    """

    _data_type: type = Policy
    _model_class: type = AutoModelForCausalLM
    _name = "policy"

    def __init__(
        self,
        filepath: str,
        version: Version | None = None,
        load_args: dict[str, Any] | None = None,
        save_args: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        protocol, path = get_protocol_and_path(filepath, version)
        self._protocol = protocol
        self._fs = fsspec.filesystem(protocol)
        self._load_args = deepcopy(load_args) or {}
        self._save_args = deepcopy(save_args) or {}
        self.metadata = metadata
        super().__init__(
            filepath=PurePosixPath(path),
            version=version,
            exists_function=self._fs.exists,
            glob_function=self._fs.glob,
        )

    def load(self) -> Policy:
        load_path = get_filepath_str(self._get_load_path(), self._protocol)
        if not self._fs.isdir(load_path):
            raise DatasetError(f"no saved {self._name} directory at '{load_path}' for {self}")
        if self._protocol == "file":
            return self._from_pretrained(load_path)
        with tempfile.TemporaryDirectory(prefix=f"{self._name}-load-") as local:
            self._fs.get(load_path.rstrip("/") + "/", local, recursive=True)
            return self._from_pretrained(local)

    def _from_pretrained(self, local_dir: str) -> Policy:
        model = self._model_class.from_pretrained(
            local_dir, **{**self._load_args, "local_files_only": True}
        )
        # Not AutoTokenizer: in transformers 5.x it maps a qwen2 ``config.json`` to Qwen2Tokenizer
        # whatever tokenizer_config.json says, and that rebuilds a byte-level BPE pipeline
        # (mangling the character tokenizer). tokenizer.json alone specifies any fast tokenizer.
        tokenizer = PreTrainedTokenizerFast.from_pretrained(local_dir, local_files_only=True)
        return self._data_type(model=model, tokenizer=tokenizer)

    def save(self, data: Policy) -> None:
        save_path = get_filepath_str(self._get_save_path(), self._protocol)
        # Staging sits beside the target (same filesystem, so the final move is a rename) and
        # its name does not match the version glob, so a failed save is never loaded.
        staging = f"{save_path}.tmp-{uuid.uuid4().hex}"
        try:
            if self._protocol == "file":
                self._write(data, staging)
            else:
                with tempfile.TemporaryDirectory(prefix=f"{self._name}-save-") as local:
                    self._write(data, local)
                    self._fs.put(local.rstrip("/") + "/", staging, recursive=True)
            self._replace(staging, save_path)
        except Exception:
            if self._fs.exists(staging):
                self._fs.rm(staging, recursive=True)
            raise
        finally:
            self._invalidate_cache()

    def _write(self, data: Policy, directory: str) -> None:
        if not isinstance(data, self._data_type):
            raise DatasetError(
                f"{type(self).__name__} saves a {self._data_type.__name__}, "
                f"got {type(data).__name__}"
            )
        data.model.save_pretrained(directory, **self._save_args)
        data.tokenizer.save_pretrained(directory)

    def _replace(self, staging: str, target: str) -> None:
        """Move ``staging`` to ``target``; an existing (unversioned) target is replaced."""
        if not self._fs.exists(target):
            self._fs.mv(staging, target, recursive=True)
            return
        backup = f"{target}.old-{uuid.uuid4().hex}"
        self._fs.mv(target, backup, recursive=True)
        try:
            self._fs.mv(staging, target, recursive=True)
        except Exception:
            self._fs.mv(backup, target, recursive=True)
            raise
        self._fs.rm(backup, recursive=True)

    def _exists(self) -> bool:
        try:
            load_path = get_filepath_str(self._get_load_path(), self._protocol)
        except DatasetError:
            return False
        return self._fs.isdir(load_path)

    def _describe(self) -> dict[str, Any]:
        return {
            "filepath": self._filepath,
            "protocol": self._protocol,
            "load_args": self._load_args,
            "save_args": self._save_args,
            "version": self._version,
        }

    def _release(self) -> None:
        super()._release()
        self._invalidate_cache()

    def _invalidate_cache(self) -> None:
        self._fs.invalidate_cache(get_filepath_str(self._filepath, self._protocol))
