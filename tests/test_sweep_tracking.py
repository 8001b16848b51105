"""The sweeps' MLflow child runs (Kedro layer): one nested run per finished (arm, seed),
dated by its training and evaluation, FAILED when logging breaks off."""

import time

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from fgrpo_pipeline.experiments.sweep import Arm, ArmResult
from fgrpo_pipeline.pipelines.comparison import tracking
from fgrpo_pipeline.pipelines.comparison.tracking import ChildRun, child_runs, log_parent_metrics
from fgrpo_pipeline.training.config import TrainerConfig

ARM = Arm("kl", {"loss": "f_grpo", "divergence": "kl"})


def finished_run(seed: int = 0) -> ArmResult:
    config = TrainerConfig.from_params({"steps": 3, "seed": seed, **ARM.overrides})
    metrics = pd.DataFrame({"step": [1, 2, 3], "reward_mean": [0.1, 0.2, float("nan")]})
    started = time.time() - 60
    return ArmResult(ARM, seed, config, metrics, {}, 40.0, 20.0, started, row={"score": 0.5})


def describe(arm, seed, result):
    return ChildRun(
        name=f"{arm.label}-seed{seed}",
        tags={"method": arm.label, "seed": str(seed)},
        params={**result.config.to_dict(), "method": arm.label},
        values={"eval/score": result.row["score"], "eval/missing": float("nan")},
    )


@pytest.fixture
def store(tmp_path):
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    mlflow.set_experiment("sweep-tracking-test")
    yield MlflowClient()
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(previous)


def children(client, parent):
    return client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
    )


def test_a_finished_run_is_a_dated_child_of_the_active_run(store):
    result = finished_run(seed=1)
    with mlflow.start_run() as parent:
        on_arm = child_runs(describe)
        on_arm(ARM, 1, result)
        log_parent_metrics({"comparison/kl/score": 0.5, "comparison/kl/rank": float("nan")})
        assert mlflow.active_run().info.run_id == parent.info.run_id
    (child,) = children(store, parent)
    assert child.info.run_name == "kl-seed1" and child.info.status == "FINISHED"
    assert child.info.start_time == int(result.started * 1000)
    assert child.info.end_time - child.info.start_time == 60_000  # training + evaluation
    assert child.data.tags["method"] == "kl" and child.data.tags["seed"] == "1"
    assert child.data.params["seed"] == "1" and child.data.params["loss.divergence"] == "kl"
    assert child.data.metrics["eval/score"] == 0.5 and "eval/missing" not in child.data.metrics
    history = store.get_metric_history(child.info.run_id, "train/reward_mean")
    assert [(m.step, m.value) for m in history] == [(1, 0.1), (2, 0.2)]  # NaN is left out
    metrics = store.get_run(parent.info.run_id).data.metrics
    assert metrics == {"comparison/kl/score": 0.5}


def test_a_child_whose_logging_breaks_off_is_failed_and_the_error_raised(store, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("store gone")

    monkeypatch.setattr(tracking, "log_step_metrics", broken)
    with mlflow.start_run() as parent, pytest.raises(RuntimeError, match="store gone"):
        child_runs(describe)(ARM, 0, finished_run())
    (child,) = children(store, parent)
    assert child.info.status == "FAILED"


def test_without_an_active_run_mlflow_is_not_touched(monkeypatch):
    assert mlflow.active_run() is None

    def forbidden(*args, **kwargs):
        raise AssertionError("MLflow used without an active run")

    monkeypatch.setattr(mlflow, "log_metrics", forbidden)
    assert child_runs(describe) is None
    log_parent_metrics({"comparison/kl/score": 0.5})


def test_an_arm_with_its_policy_logs_it_as_a_model_of_its_child_run(store):
    from fgrpo_pipeline.models.policy import build_char_tokenizer, build_tiny_policy

    result = finished_run(seed=2)
    result.policy = build_tiny_policy(build_char_tokenizer(), hidden_size=32, intermediate_size=64)
    with mlflow.start_run() as parent:
        child_runs(describe)(ARM, 2, result)
        assert mlflow.active_run().info.run_id == parent.info.run_id
    (child,) = children(store, parent)
    assert child.info.status == "FINISHED"
    (model,) = mlflow.search_logged_models(
        experiment_ids=[parent.info.experiment_id], output_format="list"
    )
    assert model.source_run_id == child.info.run_id
    registry = MlflowClient(
        tracking_uri=mlflow.get_tracking_uri(), registry_uri=mlflow.get_tracking_uri()
    )
    assert registry.search_registered_models() == []  # logged, not registered
    out = mlflow.pyfunc.load_model(model.model_uri).predict(["1+2="])
    assert len(out) == 1 and isinstance(out[0], str)
