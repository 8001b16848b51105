"""Sweep arms as namespaced Kedro pipelines: a 2-method × 2-seed comparison in a real Kedro
session with a real MLflow store, one arm rerun alone by namespace, arms side by side under
ParallelRunner, and the summary with its intervals."""

import json

import mlflow
import pandas as pd
import pytest
from kedro.framework.project import pipelines
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from kedro.runner import ParallelRunner
from mlflow.tracking import MlflowClient

from tests.conftest import SMALL_RUN, scratch_project

pytestmark = pytest.mark.slow

STEPS = 3
UPSTREAM = ["data_preparation", "base_policy", "rollout_generation", "reward_labeling"]
SWEEP = {
    **SMALL_RUN,
    "data_preparation": {
        "arithmetic": {
            **SMALL_RUN["data_preparation"]["arithmetic"],
            "n_ood": 12,
            "ood_operand_max": 12,
        }
    },
    "comparison": {
        "methods": ["kl", "grpo"],
        "seeds": [0, 1],
        "progress": False,
        "training_overrides": {"steps": STEPS, "prompts_per_step": 4, "checkpoint_every": 0},
    },
    "evaluation": {"k_samples": 1, "extra_splits": ["ood"], "strata": "difficulty"},
}
ARMS = [
    "comparison.grpo_seed0",
    "comparison.grpo_seed1",
    "comparison.kl_seed0",
    "comparison.kl_seed1",
]


def run(project, pipeline, params=SWEEP, **options):
    """One session, as a new ``kedro run`` process would start it."""
    from kedro_mlflow.framework.hooks.mlflow_hook import mlflow_hook

    while mlflow.active_run():  # an in-process session leaves its run on the stack
        mlflow.end_run()
    mlflow_hook.run_id = None
    bootstrap_project(project)
    with KedroSession.create(project_path=project, runtime_params=params) as session:
        session.run(pipeline_names=[pipeline], **options)


def sweep_runs(project):
    """The comparison pipeline's MLflow runs, newest first, each with its children."""
    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    experiment = client.get_experiment_by_name("fgrpo_pipeline").experiment_id
    parents = client.search_runs(
        [experiment], filter_string="tags.pipelines = 'comparison'", order_by=["start_time DESC"]
    )
    return client, [
        (
            parent,
            client.search_runs(
                [experiment], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
            ),
        )
        for parent in parents
    ]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    with (
        pytest.MonkeyPatch.context() as monkeypatch,
        scratch_project(tmp_path_factory.mktemp("sweep"), monkeypatch) as project,
    ):
        bootstrap_project(project)
        with KedroSession.create(project_path=project, runtime_params=SWEEP) as session:
            session.run(pipeline_names=UPSTREAM)
        run(project, "comparison")
        yield project


def test_every_arm_is_a_namespaced_pair_of_nodes(project):
    bootstrap_project(project)
    pipe = pipelines["comparison"]
    namespaces = sorted({n.namespace for n in pipe.nodes if n.namespace})
    assert namespaces == ARMS
    names = {n.name for n in pipe.nodes}
    assert {f"{arm}.{kind}" for arm in ARMS for kind in ("train", "evaluate")} <= names
    assert "compare_divergences_node" in names
    assert {f"{arm}.evaluation" for arm in ARMS} <= set(pipe.all_inputs())


def test_the_summary_has_intervals_and_paired_differences_to_grpo(project):
    summary = pd.read_csv(project / "data/08_reporting/divergence_comparison.csv")
    assert sorted(summary["method"]) == ["grpo", "kl"]
    assert (summary["n_seeds"] == 2).all()
    for metric in (
        "sampled_accuracy",
        "carry_sampled_accuracy",
        "no_carry_sampled_accuracy",
        "ood_sampled_accuracy",
        "relative_overall",
    ):
        for part in ("mean", "ci_low", "ci_high"):
            assert f"{metric}_{part}" in summary, f"{metric}_{part}"
        assert (summary[f"{metric}_ci_low"] <= summary[f"{metric}_mean"] + 1e-12).all()
        assert (summary[f"{metric}_mean"] <= summary[f"{metric}_ci_high"] + 1e-12).all()
    grpo = summary.set_index("method").loc["grpo"]
    assert grpo["diff_vs_grpo_mean"] == 0 and grpo["diff_vs_grpo_ci_high"] == 0
    runs = pd.read_parquet(project / "data/07_model_output/comparison_runs.parquet")
    kl = runs[runs["method"] == "kl"].set_index("seed")["sampled_accuracy"]
    base = runs[runs["method"] == "grpo"].set_index("seed")["sampled_accuracy"]
    assert summary.set_index("method").loc["kl", "diff_vs_grpo_mean"] == pytest.approx(
        (kl - base).mean()
    )
    assert (runs["steps"] == STEPS).all() and len(runs) == 4
    for arm in ARMS:
        folder = arm.replace(".", "/")
        evaluation = json.loads(
            (project / f"data/08_reporting/{folder}/evaluation.json").read_text()
        )
        assert {"sampled_accuracy", "ood_sampled_accuracy", "eval_time"} <= set(evaluation)
    assert (project / "data/08_reporting/comparison_summary.png").stat().st_size > 0


def test_each_arm_is_a_finished_child_run_with_its_metrics_and_model(project):
    client, runs = sweep_runs(project)
    parent, children = runs[-1]  # the first sweep run
    assert sorted(c.info.run_name for c in children) == [
        "grpo-seed0",
        "grpo-seed1",
        "kl-seed0",
        "kl-seed1",
    ]
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["sweep_arm"] in ARMS
        assert child.data.params["seed"] == child.data.tags["seed"]
        assert child.data.params["steps"] == str(STEPS)
        history = client.get_metric_history(child.info.run_id, "train/reward_mean")
        assert sorted(m.step for m in history) == list(range(1, STEPS + 1))
        assert 0 <= child.data.metrics["eval/sampled_accuracy"] <= 1
        assert "eval/ood_sampled_accuracy" in child.data.metrics
        assert {"train_time", "eval_time"} <= set(child.data.metrics)  # the notebook reads them
        models = mlflow.search_logged_models(
            experiment_ids=[parent.info.experiment_id],
            filter_string=f"source_run_id = '{child.info.run_id}'",
            output_format="list",
        )
        assert len(models) == 1
    assert "comparison.kl/relative_overall_mean" in parent.data.metrics
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert not any(path.startswith("comparison") for path in artifacts if "/" in path)


def test_one_arm_reruns_alone_by_namespace_and_the_summary_reads_the_others(project):
    arm = project / "data/08_reporting/comparison/kl_seed1/evaluation.json"
    other = project / "data/08_reporting/comparison/grpo_seed0/evaluation.json"
    before = (arm.stat().st_mtime_ns, other.stat().st_mtime_ns)
    run(project, "comparison", namespaces=["comparison.kl_seed1"])
    assert arm.stat().st_mtime_ns > before[0] and other.stat().st_mtime_ns == before[1]
    _, runs = sweep_runs(project)
    parent, children = runs[0]
    assert [c.info.run_name for c in children] == ["kl-seed1"]
    assert children[0].info.status == "FINISHED"

    run(project, "comparison", node_names=["compare_divergences_node"])
    summary = pd.read_csv(project / "data/08_reporting/divergence_comparison.csv")
    assert (summary["n_seeds"] == 2).all()


def test_arms_run_side_by_side_under_parallel_runner(project):
    run(
        project,
        "comparison",
        namespaces=["comparison.kl_seed0", "comparison.grpo_seed0"],
        runner=ParallelRunner(max_workers=2),
    )
    _, runs = sweep_runs(project)
    parent, children = runs[0]
    assert sorted(c.info.run_name for c in children) == ["grpo-seed0", "kl-seed0"]
    assert all(c.info.status == "FINISHED" for c in children)
    for child in children:
        assert "eval/sampled_accuracy" in child.data.metrics
        assert child.data.params["steps"] == str(STEPS)


def test_a_bad_sweep_block_registers_no_arms_and_is_refused_naming_the_file(project):
    bad = {**SWEEP, "comparison": {**SWEEP["comparison"], "methods": ["kl", "chi2"]}}
    with pytest.raises(ValueError, match="parameters_comparison.yml: .*unknown method 'chi2'"):
        run(project, "comparison", bad)
    assert not [n for n in pipelines["comparison"].nodes if n.namespace]
