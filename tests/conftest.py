"""Shared test setup: offline, quiet and thread-limited (2-core machines run tests too)."""

import contextlib
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
def project_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A scratch copy of the project's configuration with empty data folders, as the cwd.

    Being the working directory keeps relative stores (``sqlite:///mlflow.db``) inside it.
    """
    with scratch_project(tmp_path, monkeypatch) as project:
        yield project


@contextlib.contextmanager
def scratch_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """:func:`project_copy` for any scope (a module's fixture passes its own folder and
    ``pytest.MonkeyPatch.context()``)."""
    monkeypatch.chdir(tmp_path)
    # kedro-mlflow's hook is a process-wide singleton that remembers the last run id; a CLI
    # run is one process, but tests run many sessions in one.
    from kedro_mlflow.framework.hooks.mlflow_hook import mlflow_hook

    mlflow_hook.run_id = None
    shutil.copytree(PROJECT_ROOT / "conf", tmp_path / "conf")
    # An absolute store per copy: MLflow caches stores by URI, so a relative sqlite URI
    # would keep pointing at the first test's database.
    mlflow_yml = tmp_path / "conf/base/mlflow.yml"
    mlflow_yml.write_text(
        mlflow_yml.read_text().replace("sqlite:///mlflow.db", f"sqlite:///{tmp_path}/mlflow.db")
    )
    shutil.copy(PROJECT_ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copy(PROJECT_ROOT / ".telemetry", tmp_path / ".telemetry")
    (tmp_path / "src").mkdir()  # the package itself is installed; Kedro only checks the folder
    for layer in sorted(p.name for p in (PROJECT_ROOT / "data").iterdir() if p.is_dir()):
        (tmp_path / "data" / layer).mkdir(parents=True)
    yield tmp_path
    # kedro-mlflow leaves its (already finished) run on this thread's active-run stack after an
    # in-process session; a later session would adopt it. The CLI exits, so only tests see it.
    import mlflow

    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)
    # kedro-mlflow sets the registry URI (and MLFLOW_REGISTRY_URI, which outlives the session)
    mlflow.set_registry_uri(None)
    os.environ.pop("MLFLOW_REGISTRY_URI", None)


# Addition of one-digit numbers: a format and a skill the warm-up half-learns in seconds.
SMALL_RUN = {
    "data_preparation": {
        "arithmetic": {
            "n_train": 80,
            "n_test": 20,
            "n_ood": 20,
            "ood_operand_max": 12,
            "operations": ["+"],
            "operand_max": 9,
        }
    },
    "base_policy": {"progress": False, "warmup": {"steps": 120, "batch_size": 32}},
    "rollout_generation": {"num_prompts": 8},
    "training": {
        "steps": 150,
        "prompts_per_step": 16,
        "learning_rate": 0.0003,
        "checkpoint_every": 75,
        "log_completions_every": 50,
        "progress": False,
    },
    "evaluation": {"k_samples": 2},
}


def run_kedro(project: Path, pipeline_name: str, extra: dict | None = None) -> None:
    """Run one registered pipeline of the project copy in a real Kedro session."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(project)
    params = {**SMALL_RUN, **(extra or {})}
    with KedroSession.create(project_path=project, runtime_params=params) as session:
        session.run(pipeline_names=[pipeline_name])


@pytest.fixture(scope="module")
def prompts():
    """One-digit sums, 40 training prompts (a module's own fixture of this name wins)."""
    from fgrpo_pipeline.tasks.sources import make_arithmetic_prompts

    return make_arithmetic_prompts(n_train=40, n_test=0, operations=("+",), operand_max=9)


@pytest.fixture(scope="module")
def policy(prompts):
    """A tiny policy half taught on ``prompts`` (a module's own fixture of this name wins)."""
    return half_taught_policy(prompts)


def half_taught_policy(prompts):
    """A tiny policy warmed up briefly on ``prompts``' train rows: right sometimes, so groups
    have reward spread."""
    from fgrpo_pipeline.models.policy import build_char_tokenizer, build_tiny_policy
    from fgrpo_pipeline.training.warmup import supervised_warmup

    policy = build_tiny_policy(build_char_tokenizer(), hidden_size=32, intermediate_size=64)
    train = prompts[prompts["split"] == "train"]
    supervised_warmup(
        policy,
        train["prompt"].tolist(),
        train["ground_truth"].tolist(),
        steps=60,
        batch_size=32,
        learning_rate=3e-3,
        seed=0,
        progress=False,
    )
    return policy


# A small model for engine tests; prompts of different lengths, so shorter ones are padded.
TINY_MODEL = {
    "hidden_size": 32,
    "num_layers": 2,
    "num_heads": 2,
    "num_kv_heads": 1,
    "intermediate_size": 64,
}
ENGINE_PROMPTS = ["1+2=", "12*13=", "5-9=", "27+8="]


def briefly_warmed_policy():
    """A tiny policy warmed up briefly on a+b: emits EOS often, but not always within 2
    tokens (both kinds of completion end appear in a batch)."""
    import random

    from fgrpo_pipeline.models.policy import build_char_tokenizer, build_tiny_policy
    from fgrpo_pipeline.training.warmup import supervised_warmup

    rng = random.Random(0)
    pairs = [(rng.randrange(30), rng.randrange(30)) for _ in range(200)]
    policy = build_tiny_policy(build_char_tokenizer(), **TINY_MODEL)
    supervised_warmup(
        policy,
        [f"{a}+{b}=" for a, b in pairs],
        [str(a + b) for a, b in pairs],
        steps=60,
        batch_size=32,
        learning_rate=1e-2,
        seed=0,
        progress=False,
    )
    return policy


def trained_lora(policy, *, seed: int = 1, std: float = 0.3):
    """A deep copy of ``policy`` with a rank-4 LoRA adapter whose B matrices are not zero, so
    the adapter changes every output (a fresh one computes exactly the base)."""
    import copy

    from fgrpo_pipeline.models.lora import LoraSettings, apply_lora

    lora = apply_lora(copy.deepcopy(policy), LoraSettings(r=4, alpha=8, dropout=0.0))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in lora.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
    return lora
