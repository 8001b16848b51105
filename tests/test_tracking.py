"""MLflow records every kedro run completely, in a real sqlite store in a temp project."""

import re

import mlflow
import pytest
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from mlflow.tracking import MlflowClient

from fgrpo_pipeline.tracking import metric_name
from tests.conftest import SMALL_RUN, run_kedro

pytestmark = pytest.mark.slow

COMPLETION_COLUMNS = {"prompt", "completion", "reward", "advantage", "side", "implicit_reward"}


def _client(project):
    uri = f"sqlite:///{project}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def _runs(client):
    experiment = client.get_experiment_by_name("fgrpo_pipeline")
    return client.search_runs([experiment.experiment_id]) if experiment else []


def _artifact_tree(client, run_id, path=None):
    files = []
    for item in client.list_artifacts(run_id, path):
        files.extend(_artifact_tree(client, run_id, item.path) if item.is_dir else [item.path])
    return files


def _persisted_outputs(project):
    """Every output of the default pipeline whose catalog entry writes to disk."""
    bootstrap_project(project)
    with KedroSession.create(project_path=project) as session:
        context = session.load_context()
        catalog = context.catalog
        from fgrpo_pipeline.pipeline_registry import register_pipelines

        outputs = register_pipelines()["__default__"].all_outputs()
        # MemoryDatasets write nothing; the MLflow Model logs itself (a logged model, not files)
        return {
            name
            for name in outputs
            if type(catalog.get(name)).__name__ not in ("MemoryDataset", "MlflowPolicyDataset")
        }


def test_a_run_records_every_artifact_param_metric_and_table(project_copy):
    run_kedro(project_copy, "__default__")
    client = _client(project_copy)
    runs = _runs(client)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"

    files = _artifact_tree(client, run.info.run_id)
    datasets = {f.split("/")[1] for f in files}
    assert datasets == _persisted_outputs(project_copy)
    # each under its data layer, e.g. 05_model_input/aligned/aligned.parquet
    layers = {f.split("/")[1]: f.split("/")[0] for f in files}
    assert layers["aligned"] == layers["unaligned"] == "05_model_input"
    assert layers["trained_policy"] == "06_models"
    assert layers["evaluation_report"] == "08_reporting"
    assert any(f.endswith("model.safetensors") for f in files if "/trained_policy/" in f)
    assert all(re.match(r"^\d\d_[a-z_]+/", f) for f in files)

    params = run.data.params
    assert params["training.loss"] == "f_grpo"
    assert params["training.divergence"] == "kl"
    assert params["training.steps"] == "150"
    assert params["data_preparation.arithmetic.operand_max"] == "9"

    steps = SMALL_RUN["training"]["steps"]
    history = client.get_metric_history(run.info.run_id, "train/reward_mean")
    assert sorted(m.step for m in history) == list(range(1, steps + 1))
    assert len(client.get_metric_history(run.info.run_id, "train/kl_to_ref")) == steps

    table_files = sorted(f for f in files if f.endswith(".json") and "training_completions" in f)
    assert [f.rsplit("/", 1)[1] for f in table_files] == [
        "step_000050.json",
        "step_000100.json",
        "step_000150.json",
    ]
    table = mlflow.load_table(table_files[0], run_ids=[run.info.run_id])
    assert set(table.columns) >= COMPLETION_COLUMNS
    assert len(table) == SMALL_RUN["training"]["prompts_per_step"] * 8
    assert set(table["side"]) <= {"aligned", "unaligned", "neutral"}
    assert ((table["side"] == "neutral") == (table["advantage"] == 0)).all()
    assert ((table["side"] == "unaligned") == (table["advantage"] < 0)).all()

    tags = run.data.tags
    assert tags["pipelines"] == "__default__"
    assert tags["loss"] == "f_grpo" and tags["divergence"] == "kl"
    assert tags["lam"] == "0.5" and tags["seed"] == "0"
    assert "git_commit" in tags


def test_a_failing_node_leaves_the_run_failed(project_copy):
    missing = str(project_copy / "data/01_raw/nowhere.jsonl")
    broken = {
        "data_preparation": {
            "source": "gsm8k",
            "gsm8k": {"train_path": missing, "test_path": missing},
        }
    }
    with pytest.raises(Exception, match="nowhere.jsonl"):
        run_kedro(project_copy, "data_preparation", broken)
    runs = _runs(_client(project_copy))
    assert [r.info.status for r in runs] == ["FAILED"]


def test_tracking_switched_off_by_config_records_nothing(project_copy):
    mlflow_yml = project_copy / "conf/base/mlflow.yml"
    text = mlflow_yml.read_text()
    assert "    pipelines: []" in text
    mlflow_yml.write_text(text.replace("    pipelines: []", "    pipelines: [data_preparation]"))
    run_kedro(project_copy, "data_preparation")
    assert (project_copy / "data/03_primary/prompts.parquet").exists()
    assert _runs(_client(project_copy)) == []


@pytest.mark.parametrize(
    ("raw", "safe"),
    [("train/reward_mean", "train/reward_mean"), ("online/kl(π‖ref)", "online/kl___ref_")],
)
def test_metric_names_are_made_mlflow_safe(raw, safe):
    assert metric_name(raw) == safe
