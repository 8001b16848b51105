"""``AtomicDataset``: any file dataset, saved to a temporary file and renamed into place.

A failed or interrupted save (an exception, a killed process, a full disk) then leaves the
previous file as it was, never a half-written one that a later run would load.
"""

from __future__ import annotations

import os
import uuid
from copy import deepcopy
from pathlib import Path, PurePosixPath
from typing import Any

from kedro.io.core import AbstractDataset, DatasetError, parse_dataset_definition

STAGING_PREFIX = ".tmp-"


class AtomicDataset(AbstractDataset[Any, Any]):
    """Wraps a local file dataset (``dataset``: its type and options, without ``filepath``).

    Example catalog entry::

        prompts:
          type: fgrpo_pipeline.datasets.AtomicDataset
          filepath: data/03_primary/prompts.parquet
          dataset:
            type: pandas.ParquetDataset
            save_args:
              index: false

    A save writes ``.tmp-<id>-<name>`` beside the target with the wrapped dataset (same
    folder, so the final ``os.replace`` is an atomic rename) and removes it on failure.
    """

    def __init__(
        self,
        filepath: str,
        dataset: dict[str, Any] | str,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        config = {"type": dataset} if isinstance(dataset, str) else deepcopy(dataset)
        if "filepath" in config:
            raise DatasetError(
                f"AtomicDataset for '{filepath}': give filepath once, beside dataset, not in it"
            )
        if "://" in filepath and not filepath.startswith("file://"):
            raise DatasetError(
                f"AtomicDataset for '{filepath}': only local files can be renamed atomically"
            )
        self._filepath = PurePosixPath(filepath.removeprefix("file://"))
        self._dataset_type, self._dataset_config = parse_dataset_definition(config)
        self._inner = self._build(str(self._filepath))
        self.metadata = metadata

    def _build(self, filepath: str) -> AbstractDataset:
        return self._dataset_type(**{**self._dataset_config, "filepath": filepath})

    def load(self) -> Any:
        return self._inner.load()

    def save(self, data: Any) -> None:
        target = Path(self._filepath)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(f"{STAGING_PREFIX}{uuid.uuid4().hex[:8]}-{target.name}")
        try:
            self._build(str(staging)).save(data)
            os.replace(staging, target)
        except BaseException:
            staging.unlink(missing_ok=True)
            raise

    def _exists(self) -> bool:
        return Path(self._filepath).exists()

    def _describe(self) -> dict[str, Any]:
        return {
            "filepath": self._filepath,
            "dataset_type": self._dataset_type.__name__,
            "dataset_config": self._dataset_config,
        }

    def preview(self, *args: Any, **kwargs: Any) -> Any:
        """kedro-viz previews the wrapped dataset."""
        preview = getattr(self._inner, "preview", None)
        if preview is None:
            raise DatasetError(f"{self._dataset_type.__name__} has no preview")
        return preview(*args, **kwargs)
