"""The divergence comparison: scoring (Relative Overall, ranks), the sweep, MLflow child runs."""

import math

import matplotlib.pyplot as plt
import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from fgrpo_pipeline.experiments.divergence_sweep import (
    curves_table,
    method_loss,
    method_names,
    run_comparison,
    summarise,
)
from fgrpo_pipeline.heldout.evaluate import EvaluationConfig
from fgrpo_pipeline.pipelines.comparison.nodes import (
    check_params,
    compare_divergences,
    sweep_training_params,
)
from fgrpo_pipeline.reporting.plots import comparison_curves
from fgrpo_pipeline.tasks.sources import make_arithmetic_prompts
from tests.conftest import half_taught_policy

BASE = {"sampled_accuracy": 0.3, "greedy_accuracy": 0.5}
STEPS = 3
SAMPLING = {"max_new_tokens": 3}
TRAINING = {
    "loss": "f_grpo",
    "divergence": "kl",
    "steps": STEPS,
    "prompts_per_step": 4,
    "group_size": 4,
    "learning_rate": 1e-3,
    "sampling": SAMPLING,
    "checkpoint_every": 2,
    "progress": False,
}
EVALUATION = {"split": "test", "k_samples": 2, "sampling": SAMPLING}


def hand_made_runs() -> pd.DataFrame:
    """kl and pearson tie on sampled accuracy; pearson sits at the base on greedy accuracy."""
    rows = [
        # method, seed, sampled, greedy
        ("kl", 0, 0.5, 0.7),
        ("kl", 1, 0.7, 0.7),
        ("grpo", 0, 0.4, 0.9),
        ("grpo", 1, 0.4, 0.9),
        ("pearson", 0, 0.6, 0.5),
        ("pearson", 1, 0.6, 0.5),
    ]
    runs = pd.DataFrame(rows, columns=["method", "seed", "sampled_accuracy", "greedy_accuracy"])
    return runs.assign(
        mean_reward=runs["sampled_accuracy"], kl_to_ref=0.1, wall_time=[1.0, 3.0] * 3
    )


def test_summarise_relative_overall_ranks_and_spread():
    summary = summarise(hand_made_runs(), BASE).set_index("method")
    # sampled: base 0.3 -> 0, best 0.6 -> 100; greedy: base 0.5 -> 0, best 0.9 -> 100
    expected = {"kl": (100 + 50) / 2, "grpo": (100 / 3 + 100) / 2, "pearson": (100 + 0) / 2}
    for method, value in expected.items():
        assert summary.loc[method, "relative_overall"] == pytest.approx(value)
    # ranks: sampled kl = pearson (1.5 each), grpo 3; greedy grpo 1, kl 2, pearson 3
    assert summary["avg_rank"].to_dict() == pytest.approx(
        {"kl": 1.75, "grpo": 2.0, "pearson": 2.25}
    )
    assert summary.loc["kl", "accuracy_std"] == pytest.approx(math.sqrt(0.02))  # ddof 1
    assert summary.loc["grpo", "accuracy_std"] == pytest.approx(0.0)
    assert summary.loc["kl", "accuracy_mean"] == pytest.approx(0.6)
    assert summary.loc["grpo", "greedy_accuracy_mean"] == pytest.approx(0.9)
    assert summary.loc["kl", "accuracy_change"] == pytest.approx(0.3)
    assert summary.loc["kl", "wall_time_mean"] == pytest.approx(2.0)
    assert (summary["n_seeds"] == 2).all()
    assert list(summary.index) == ["kl", "grpo", "pearson"]  # best Relative Overall first
    assert summary.loc["grpo", "loss"] == "grpo" and summary.loc["kl", "divergence"] == "kl"
    required = {
        "accuracy_mean",
        "accuracy_std",
        "greedy_accuracy_mean",
        "greedy_accuracy_std",
        "reward_mean",
        "kl_to_ref_mean",
        "wall_time_mean",
        "n_seeds",
        "relative_overall",
        "avg_rank",
    }
    assert required <= set(summary.columns)


def test_summarise_base_is_zero_and_unbeaten_benchmarks_drop_out():
    runs = hand_made_runs()
    at_base = runs.assign(sampled_accuracy=0.3, greedy_accuracy=0.5)
    at_base["method"] = at_base["method"].replace({"kl": "hellinger"})
    both = pd.concat([runs, at_base[at_base["method"] == "hellinger"]], ignore_index=True)
    assert summarise(both, BASE).set_index("method").loc["hellinger", "relative_overall"] == 0

    # nobody beats the base on greedy accuracy: Relative Overall is the sampled score alone
    worse = runs.assign(greedy_accuracy=0.4)
    summary = summarise(worse, BASE).set_index("method")
    assert summary.loc["kl", "relative_overall"] == pytest.approx(100)
    assert summary.loc["grpo", "relative_overall"] == pytest.approx(100 / 3)
    one_seed = summarise(runs[runs["seed"] == 0], BASE)
    assert one_seed["accuracy_std"].isna().all() and (one_seed["n_seeds"] == 1).all()


def test_equal_means_tie_despite_float_rounding():
    # 0.1 + 0.2 != 0.3 in floating point; the two means are the same accuracy
    runs = pd.DataFrame(
        {
            "method": ["kl", "kl", "grpo", "grpo"],
            "seed": [0, 1, 0, 1],
            "sampled_accuracy": [0.1, 0.2, 0.3, 0.0],
            "greedy_accuracy": [0.7, 0.7, 0.6, 0.6],
        }
    ).assign(mean_reward=0.0, kl_to_ref=0.0, wall_time=1.0)
    summary = summarise(runs, {"sampled_accuracy": 0.0, "greedy_accuracy": 0.5}).set_index("method")
    assert summary["avg_rank"].to_dict() == {"kl": (1.5 + 1) / 2, "grpo": (1.5 + 2) / 2}


def test_methods_map_to_losses_and_bad_names_are_rejected():
    assert method_loss("grpo") == ("grpo", None)
    assert method_loss("hellinger") == ("f_grpo", "hellinger")
    assert len(method_names()) == 7
    with pytest.raises(ValueError, match="unknown method 'chi2'.*total_variation, grpo"):
        method_loss("chi2")


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"methods": ["kl", "chi2"], "seeds": [0]}, "unknown method 'chi2'"),
        ({"methods": [], "seeds": [0]}, "methods must be a non-empty list"),
        ({"methods": ["kl"], "seeds": []}, "seeds must be a non-empty list"),
        ({"methods": ["kl", "kl"], "seeds": [0]}, "methods has duplicates"),
        ({"methods": ["kl"], "seeds": [0, 0]}, "seeds has duplicates"),
        ({"methods": ["kl"], "seeds": [0.5]}, "seeds must be integers"),
        ({"methods": ["kl"], "seeds": [0], "sedes": [1]}, "unknown comparison key"),
        (
            {"methods": ["kl"], "seeds": [0], "training_overrides": {"loss": "dpo"}},
            "may not set \\['loss'\\]",
        ),
        ({"methods": ["kl"], "seeds": [0], "num_threads": -1}, "num_threads"),
    ],
)
def test_bad_comparison_parameters_name_the_file(params, message):
    with pytest.raises(ValueError, match=f"parameters_comparison.yml: .*{message}"):
        check_params(params)


def test_bad_training_override_names_the_file_and_method():
    params = {"methods": ["kl"], "seeds": [0], "training_overrides": {"stpes": 5}}
    with pytest.raises(ValueError, match="parameters_comparison.yml: training_overrides.*stpes"):
        sweep_training_params(params, TRAINING)
    merged = sweep_training_params(
        {"methods": ["kl"], "seeds": [0], "training_overrides": {"steps": 7}, "num_threads": 1},
        TRAINING,
    )
    assert merged["steps"] == 7 and merged["num_threads"] == 1 and merged["progress"] is True


def test_comparison_figure_has_a_line_per_method_and_grpo_dashed():
    runs = [("kl", 0), ("kl", 1), ("grpo", 0), ("grpo", 1)]
    metrics = {
        key: pd.DataFrame(
            {"step": range(1, 41), "reward_mean": [i / 40 for i in range(40)], "accuracy": 0.5}
        )
        for key in runs
    }
    curves = curves_table(metrics)
    assert list(curves.columns) == [
        "method",
        "seed",
        "step",
        "reward_mean",
        "accuracy",
        "kl_to_ref",
    ]
    assert len(curves) == 4 * 40
    fig = comparison_curves(curves)
    try:
        assert len(fig.axes) == 2  # no KL panel: the table has no KL values
        labels = [line.get_label() for line in fig.axes[0].get_lines()]
        assert labels == ["kl (2 seeds)", "grpo (2 seeds)"]
        grpo_line = fig.axes[0].get_lines()[1]
        assert grpo_line.get_linestyle() == "--" and grpo_line.get_color() == "black"
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def prompts():
    table = make_arithmetic_prompts(n_train=40, n_test=8, operations=("+",), operand_max=9)
    return table


@pytest.fixture(scope="module")
def policy(prompts):
    return half_taught_policy(prompts)


@pytest.mark.slow
def test_run_comparison_trains_every_method_and_seed(policy, prompts):
    calls = []
    result = run_comparison(
        policy,
        prompts[prompts["split"] == "train"],
        prompts[prompts["split"] == "test"],
        methods=["hellinger", "grpo"],
        seeds=[0, 1],
        training_params=TRAINING,
        evaluation_config=EvaluationConfig(k_samples=2, sampling=SAMPLING),
        on_run_start=lambda m, s: calls.append(("start", m, s)),
        on_run_end=lambda m, s, summary, metrics: calls.append(
            ("end", m, s, summary["seed"], len(metrics))
        ),
        progress=False,
    )
    order = [("hellinger", 0), ("hellinger", 1), ("grpo", 0), ("grpo", 1)]
    assert calls == [c for m, s in order for c in (("start", m, s), ("end", m, s, s, STEPS))]
    assert list(zip(result.runs["method"], result.runs["seed"], strict=True)) == order
    assert result.runs["loss"].tolist() == ["f_grpo", "f_grpo", "grpo", "grpo"]
    assert (result.runs["wall_time"] > 0).all() and (result.runs["steps"] == STEPS).all()
    assert result.runs["sampled_accuracy"].between(0, 1).all()
    assert set(result.summary["method"]) == {"hellinger", "grpo"}
    assert (result.summary["n_seeds"] == 2).all()
    assert len(result.curves) == 4 * STEPS
    assert result.curves.groupby(["method", "seed"]).size().eq(STEPS).all()
    assert result.base["n_prompts"] == 8 and "greedy_accuracy" in result.base


@pytest.fixture
def tracking(tmp_path):
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    mlflow.set_experiment("comparison-test")
    yield
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(previous)


@pytest.mark.slow
def test_node_logs_one_nested_child_run_per_method_and_seed(policy, prompts, tracking):
    params = {"methods": ["kl", "grpo"], "seeds": [0, 1], "progress": False}
    empty = pd.DataFrame(columns=["prompt", "completion"])
    with mlflow.start_run(run_name="parent") as parent:
        summary, runs, curves, base = compare_divergences(
            policy, prompts, empty, empty, params, TRAINING, EVALUATION
        )
        assert mlflow.active_run().info.run_id == parent.info.run_id  # children all ended
    assert len(runs) == 4 and len(summary) == 2 and len(curves) == 4 * STEPS
    assert base["relative_overall"] == 0 and base["n_prompts"] == 8

    client = MlflowClient()
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
    )
    names = sorted(run.info.run_name for run in children)
    assert names == ["grpo-seed0", "grpo-seed1", "kl-seed0", "kl-seed1"]
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        method, seed = child.data.tags["method"], child.data.tags["seed"]
        assert child.data.params["seed"] == seed and child.data.params["steps"] == str(STEPS)
        assert child.data.params["loss"] == ("grpo" if method == "grpo" else "f_grpo")
        history = client.get_metric_history(child.info.run_id, "train/reward_mean")
        assert sorted(m.step for m in history) == list(range(1, STEPS + 1))
        assert 0 <= child.data.metrics["eval/sampled_accuracy"] <= 1
    parent_metrics = client.get_run(parent.info.run_id).data.metrics
    assert parent_metrics["comparison/base/sampled_accuracy"] == base["sampled_accuracy"]
    assert "comparison/kl/relative_overall" in parent_metrics or math.isnan(
        summary.set_index("method").loc["kl", "relative_overall"]
    )


@pytest.mark.slow
def test_node_without_an_active_run_does_not_touch_mlflow(policy, prompts, monkeypatch):
    assert mlflow.active_run() is None

    def forbidden(*args, **kwargs):
        raise AssertionError("MLflow used without an active run")

    monkeypatch.setattr(mlflow, "start_run", forbidden)
    monkeypatch.setattr(mlflow, "log_metrics", forbidden)
    params = {"methods": ["kl"], "seeds": [0], "progress": False}
    empty = pd.DataFrame(columns=["prompt", "completion"])
    training = {**TRAINING, "steps": 1}
    summary, runs, _, _ = compare_divergences(
        policy, prompts, empty, empty, params, training, EVALUATION
    )
    assert len(runs) == 1 and summary["method"].tolist() == ["kl"]
