"""SweepRunHook on its own, with a real MLflow store: an arm's child run is opened before its
first node, found again by its tag (as a ParallelRunner worker finds it), and closed FAILED
when a node fails; threads are divided under ParallelRunner; nothing without an active run."""

import os

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from fgrpo_pipeline.pipelines.arms import ArmSpec, arm_pipeline
from fgrpo_pipeline.tracking.sweep_runs import PARENT_ENV, THREADS_ENV, SweepRunHook


def _train(*args, label, seed):
    raise AssertionError("not run: the hook is called directly")


def _evaluate(*args):
    raise AssertionError("not run")


@pytest.fixture
def pipeline():
    return sum(
        (
            arm_pipeline(
                ArmSpec("comparison", method, 0),
                train=_train,
                evaluate=_evaluate,
                train_inputs=["base_policy", "params:comparison"],
                evaluate_inputs=["base_policy"],
            )
            for method in ("kl", "grpo")
        ),
        start=arm_pipeline(
            ArmSpec("comparison", "pearson", 1),
            train=_train,
            evaluate=_evaluate,
            train_inputs=["base_policy", "params:comparison"],
            evaluate_inputs=["base_policy"],
        ),
    )


@pytest.fixture
def store(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    mlflow.set_experiment("hook-test")
    yield MlflowClient()
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)
    os.environ.pop(PARENT_ENV, None)
    os.environ.pop(THREADS_ENV, None)


def _node(pipeline, name):
    return next(n for n in pipeline.nodes if n.name == name)


def _children(client, parent):
    return client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
    )


def test_an_arm_is_one_child_run_found_again_by_tag_and_failed_on_error(store, pipeline):
    hook = SweepRunHook()
    with mlflow.start_run() as parent:
        hook.before_pipeline_run({"runner": "SequentialRunner"}, pipeline, None)
        train = _node(pipeline, "comparison.kl_seed0.train")
        hook.before_node_run(train, None, {}, False, "r")
        (child,) = _children(store, parent)
        assert child.info.status == "RUNNING"
        assert child.data.tags["sweep_arm"] == "comparison.kl_seed0"

        # another process's copy of the hook (a ParallelRunner worker) finds the same run
        other = SweepRunHook()
        evaluate = _node(pipeline, "comparison.kl_seed0.evaluate")
        other.before_node_run(evaluate, None, {}, False, "r")
        assert [c.info.run_id for c in _children(store, parent)] == [child.info.run_id]

        other.on_node_error(RuntimeError("boom"), evaluate, None, {}, False, "r")
        assert store.get_run(child.info.run_id).info.status == "FAILED"
        hook.after_pipeline_run({}, {}, pipeline, None)
    assert PARENT_ENV not in os.environ


def test_under_parallel_runner_the_cores_are_divided_among_the_workers(store, pipeline):
    hook = SweepRunHook()
    threads = torch.get_num_threads()
    try:
        hook.before_pipeline_run({"runner": "ParallelRunner"}, pipeline, None)
        expected = max(1, (os.cpu_count() or 1) // min(os.cpu_count() or 1, 3))
        assert os.environ[THREADS_ENV] == str(expected)
        hook.before_node_run(_node(pipeline, "comparison.grpo_seed0.train"), None, {}, False, "r")
        assert torch.get_num_threads() == expected
        assert PARENT_ENV not in os.environ  # no active run: nothing tracked
    finally:
        torch.set_num_threads(threads)
        hook.after_pipeline_run({}, {}, pipeline, None)
    assert THREADS_ENV not in os.environ


def test_without_an_active_run_no_child_run_is_made(store, pipeline):
    hook = SweepRunHook()
    hook.before_pipeline_run({"runner": "SequentialRunner"}, pipeline, None)
    hook.before_node_run(_node(pipeline, "comparison.kl_seed0.train"), None, {}, False, "r")
    experiment = mlflow.get_experiment_by_name("hook-test")
    assert store.search_runs([experiment.experiment_id]) == []
    hook.after_pipeline_run({}, {}, pipeline, None)
