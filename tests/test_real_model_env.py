"""The real-model environment (conf/qwen_math) end to end, with a tiny local model standing
in for Qwen2.5-Math: pretrained loading, GSM8K with the chat prompt, math-verify rewards,
LoRA with the adapter-disabled reference, and a resumable training state."""

from pathlib import Path

import pandas as pd
import pytest

from fgrpo_pipeline.models.policy import (
    build_char_tokenizer,
    build_tiny_policy,
    load_pretrained_policy,
)
from tests.conftest import PROJECT_ROOT

SAMPLE = str(PROJECT_ROOT / "tests/data/gsm8k_sample.jsonl")


@pytest.fixture
def tiny_pretrained(tmp_path: Path) -> Path:
    """A save_pretrained directory, as a hub download would leave."""
    policy = build_tiny_policy(
        build_char_tokenizer(), hidden_size=32, intermediate_size=64, max_position_embeddings=512
    )
    directory = tmp_path / "tiny-math"
    policy.model.save_pretrained(directory)
    policy.tokenizer.save_pretrained(directory)
    return directory


def _run(project: Path, params: dict) -> None:
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(project)
    with KedroSession.create(project_path=project, env="qwen_math", runtime_params=params) as s:
        s.run(pipeline_names=["__default__"])


def test_qwen_math_environment_runs_end_to_end_on_a_tiny_local_model(project_copy, tiny_pretrained):
    sampling = {"max_new_tokens": 6}
    resume_dir = project_copy / "data/06_models/training_resume"
    _run(
        project_copy,
        {
            "data_preparation": {
                "gsm8k": {
                    "train_path": SAMPLE,
                    "test_path": SAMPLE,
                    "limit_train": 8,
                    "limit_test": 4,
                }
            },
            "base_policy": {
                "pretrained": {
                    "model": str(tiny_pretrained),
                    "tokenizer": "fast",
                    "local_files_only": True,
                    "dtype": "float32",
                }
            },
            "rollout_generation": {"num_prompts": 2, "sampling": sampling},
            "training": {
                "steps": 2,
                "prompts_per_step": 2,
                "checkpoint_every": 1,
                "log_completions_every": 1,
                "lora": {"r": 4, "alpha": 8},
                "resume_dir": str(resume_dir),
                "sampling": sampling,
                "progress": False,
            },
            "evaluation": {"max_prompts": 2, "sampling": sampling},
        },
    )
    prompts = pd.read_parquet(project_copy / "data/03_primary/prompts.parquet")
    assert prompts.loc[0, "prompt"].startswith("<|im_start|>system\nPlease reason step by step")
    assert "\\boxed{}" in prompts.loc[0, "prompt"]
    metrics = pd.read_parquet(project_copy / "data/07_model_output/training_metrics.parquet")
    assert metrics["step"].tolist() == [1, 2]
    assert metrics.loc[0, "kl_to_ref"] == pytest.approx(0.0, abs=1e-5)  # adapter starts at 0
    assert [p.name for p in resume_dir.iterdir()] == ["step_000002"]
    # the trained policy is saved merged: a plain transformers load reads it back
    trained_dir = next((project_copy / "data/06_models/trained_policy").iterdir())
    trained = load_pretrained_policy(
        str(trained_dir / "trained_policy"), tokenizer="fast", local_files_only=True
    )
    assert not hasattr(trained.model, "peft_config")
    report = pd.read_json(project_copy / "data/08_reporting/evaluation.json")
    assert {"base", "trained"} <= set(report.columns)


def test_pretrained_source_needs_a_model(project_copy):
    with pytest.raises(ValueError, match=r"base_policy.pretrained.model"):
        _run(project_copy, {"base_policy": {"pretrained": {"model": None}}})
