"""Pipeline registry as the CLI sees it, and node-level behaviour not covered end to end."""

import os
import subprocess
import sys

import pytest

from fgrpo_pipeline.pipelines.data_preparation.nodes import prepare_prompts
from tests.conftest import PROJECT_ROOT

SAMPLE = str(PROJECT_ROOT / "tests/data/gsm8k_sample.jsonl")
PIPELINES = [
    "data_preparation",
    "base_policy",
    "rollout_generation",
    "reward_labeling",
    "training",
    "evaluation",
]
SAFETY_PIPELINES = ["safety_data", "reward_model", "safety_base_policy", "safety_training"]


def test_kedro_registry_list_shows_every_pipeline():
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "kedro", "registry", "list"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    listed = {line.strip("- ").strip() for line in out.splitlines() if line.startswith("- ")}
    assert listed == {
        "__default__",
        "comparison",
        *PIPELINES,
        *SAFETY_PIPELINES,
        "safety",
        "safety_comparison",
    }


def test_safety_comparison_runs_from_the_data_up():
    from fgrpo_pipeline.pipeline_registry import register_pipelines

    pipelines = register_pipelines()
    sweep = pipelines["safety_comparison"]
    # everything it reads is made inside it: one command works from a fresh clone
    assert {i for i in sweep.inputs() if not i.startswith("params:")} == set()
    order = [n.name for n in sweep.nodes]
    assert order.index("fit_reward_model_node") < order.index("compare_safety_node")
    assert {n.name for n in pipelines["safety"].nodes} == {
        n.name for name in SAFETY_PIPELINES for n in pipelines[name].nodes
    }


def test_default_pipeline_is_the_stages_in_order():
    from fgrpo_pipeline.pipeline_registry import register_pipelines

    pipelines = register_pipelines()
    default_nodes = {n.name for n in pipelines["__default__"].nodes}
    assert default_nodes == {n.name for name in PIPELINES for n in pipelines[name].nodes}
    order = [n.name for n in pipelines["__default__"].nodes]
    assert order.index("prepare_prompts_node") < order.index("train_policy_node")
    assert order.index("label_rollouts_node") < order.index("train_policy_node")


def test_gsm8k_source_builds_the_prompts_table_from_real_rows():
    params = {
        "source": "gsm8k",
        "gsm8k": {"train_path": SAMPLE, "test_path": SAMPLE, "limit_train": 5, "limit_test": 3},
    }
    table = prepare_prompts(params)
    assert table["split"].value_counts().to_dict() == {"train": 5, "test": 3}
    assert table.loc[0, "ground_truth"] == "72"  # "#### 72" of the first published row
    assert table.loc[0, "prompt"].endswith("\nAnswer:")


def test_unknown_source_is_rejected_naming_the_file():
    with pytest.raises(
        ValueError, match="parameters_data_preparation.yml.*'hub'.*arithmetic, gsm8k"
    ):
        prepare_prompts({"source": "hub"})
