"""The divergence comparison: scoring (Relative Overall, ranks, intervals) and the sweep engine
(the Kedro pipeline and its MLflow child runs: tests/test_sweep_pipelines.py)."""

import matplotlib.pyplot as plt
import pandas as pd
import pytest

from fgrpo_pipeline.experiments.divergence_sweep import (
    curves_table,
    method_loss,
    method_names,
    run_comparison,
    summarise,
)
from fgrpo_pipeline.heldout.evaluate import EvaluationConfig
from fgrpo_pipeline.pipelines.comparison.nodes import check_params, sweep_training_params
from fgrpo_pipeline.reporting.plots import comparison_curves
from fgrpo_pipeline.tasks.sources import make_arithmetic_prompts
from tests.conftest import half_taught_policy

BASE = {"sampled_accuracy": 0.3, "greedy_accuracy": 0.5}
BENCHMARKS = ("sampled_accuracy", "greedy_accuracy")  # two hand-made benchmarks
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


def test_summarise_relative_overall_ranks_and_intervals():
    summary = summarise(hand_made_runs(), BASE, benchmarks=BENCHMARKS).set_index("method")
    # sampled: base 0.3 -> 0, best 0.6 -> 100; greedy: base 0.5 -> 0, best 0.9 -> 100
    expected = {"kl": (100 + 50) / 2, "grpo": (100 / 3 + 100) / 2, "pearson": (100 + 0) / 2}
    for method, value in expected.items():
        assert summary.loc[method, "relative_overall_mean"] == pytest.approx(value)
        low, high = summary.loc[method, ["relative_overall_ci_low", "relative_overall_ci_high"]]
        assert low <= value + 1e-9 and value - 1e-9 <= high
    # ranks: sampled kl = pearson (1.5 each), grpo 3; greedy grpo 1, kl 2, pearson 3
    assert summary["avg_rank"].to_dict() == pytest.approx(
        {"kl": 1.75, "grpo": 2.0, "pearson": 2.25}
    )
    assert summary.loc["kl", "sampled_accuracy_mean"] == pytest.approx(0.6)
    # kl's seeds are 0.5 and 0.7: the interval spans them; grpo's seeds agree: no width
    assert summary.loc["kl", "sampled_accuracy_ci_low"] == pytest.approx(0.5)
    assert summary.loc["kl", "sampled_accuracy_ci_high"] == pytest.approx(0.7)
    assert summary.loc["grpo", "sampled_accuracy_ci_low"] == pytest.approx(0.4)
    assert summary.loc["grpo", "greedy_accuracy_mean"] == pytest.approx(0.9)
    assert summary.loc["kl", "sampled_accuracy_change"] == pytest.approx(0.3)
    assert summary.loc["kl", "wall_time_mean"] == pytest.approx(2.0)
    # paired by seed: kl − grpo = 0.1, 0.3; pearson − grpo = 0.2, 0.2
    assert summary.loc["kl", "diff_vs_grpo_mean"] == pytest.approx(0.2)
    assert summary.loc["pearson", "diff_vs_grpo_ci_low"] == pytest.approx(0.2)
    assert summary.loc["grpo", "diff_vs_grpo_mean"] == 0
    assert (summary["n_seeds"] == 2).all()
    assert list(summary.index) == ["kl", "grpo", "pearson"]  # best Relative Overall first
    assert summary.loc["grpo", "loss"] == "grpo" and summary.loc["kl", "divergence"] == "kl"


def test_summarise_base_is_zero_and_an_unbeaten_benchmark_is_left_out():
    runs = hand_made_runs()
    at_base = runs.assign(sampled_accuracy=0.3, greedy_accuracy=0.5)
    at_base["method"] = at_base["method"].replace({"kl": "hellinger"})
    both = pd.concat([runs, at_base[at_base["method"] == "hellinger"]], ignore_index=True)
    summary = summarise(both, BASE, benchmarks=BENCHMARKS).set_index("method")
    assert summary.loc["hellinger", "relative_overall_mean"] == 0

    # nobody beats the base on greedy accuracy: Relative Overall is the sampled score alone
    worse = runs.assign(greedy_accuracy=0.4)
    summary = summarise(worse, BASE, benchmarks=BENCHMARKS).set_index("method")
    assert summary.loc["kl", "relative_overall_mean"] == pytest.approx(100)
    assert summary.loc["grpo", "relative_overall_mean"] == pytest.approx(100 / 3)
    one_seed = summarise(runs[runs["seed"] == 0], BASE, benchmarks=BENCHMARKS)
    assert one_seed["sampled_accuracy_ci_low"].isna().all() and (one_seed["n_seeds"] == 1).all()


def test_summarise_without_the_second_split_scores_the_first_alone():
    summary = summarise(hand_made_runs(), BASE).set_index("method")  # no ood columns
    assert summary.loc["pearson", "relative_overall_mean"] == pytest.approx(100)
    assert "ood_sampled_accuracy_mean" not in summary


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
    base = {"sampled_accuracy": 0.0, "greedy_accuracy": 0.5}
    summary = summarise(runs, base, benchmarks=BENCHMARKS).set_index("method")
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
