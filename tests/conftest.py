"""Shared test setup: offline, quiet and thread-limited (2-core machines run tests too)."""

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

# Tests that run processes side by side must share the cores; one process uses them all.
torch.set_num_threads(max(1, int(os.environ.get("FGRPO_TEST_THREADS", "2"))))

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def project_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A scratch copy of the project's configuration with empty data folders, as the cwd.

    Being the working directory keeps relative stores (``sqlite:///mlflow.db``) inside it.
    """
    monkeypatch.chdir(tmp_path)
    shutil.copytree(PROJECT_ROOT / "conf", tmp_path / "conf")
    shutil.copy(PROJECT_ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copy(PROJECT_ROOT / ".telemetry", tmp_path / ".telemetry")
    (tmp_path / "src").mkdir()  # the package itself is installed; Kedro only checks the folder
    for layer in sorted(p.name for p in (PROJECT_ROOT / "data").iterdir() if p.is_dir()):
        (tmp_path / "data" / layer).mkdir(parents=True)
    return tmp_path
