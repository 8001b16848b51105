"""The safety setting end to end: f-HAL's pure cases in the trainer, the λ sweep, its table,
the gold judge's options, and the Kedro pipelines with MLflow."""

import math

import mlflow
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from fgrpo_pipeline.experiments.safety_sweep import (
    METRICS,
    Anchors,
    check_lams_and_seeds,
    run_safety_comparison,
    safety_table,
)
from fgrpo_pipeline.heldout.evaluate import EvaluationConfig
from fgrpo_pipeline.models.policy import build_char_tokenizer, build_tiny_policy
from fgrpo_pipeline.safety.data import (
    aligned_unaligned,
    make_safety_records,
    safety_prompts,
    split_records,
)
from fgrpo_pipeline.safety.judge import NEITHER, GoldJudge
from fgrpo_pipeline.safety.reward_model import build_reward_model, reward_model_reward
from fgrpo_pipeline.training.config import TrainerConfig
from fgrpo_pipeline.training.loop import train
from fgrpo_pipeline.training.preferences import preferences_from_splits
from tests.conftest import run_kedro

SMALL_MODEL = {"hidden_size": 32, "intermediate_size": 64, "max_position_embeddings": 96}


@pytest.fixture(scope="module")
def setting():
    records = split_records(
        make_safety_records(n_per_class=24, seed=0), test_fraction=0.25, anchor_per_class=4, seed=0
    )
    prompts = safety_prompts(records)
    preferences = preferences_from_splits(*aligned_unaligned(records[records["split"] == "train"]))
    tokenizer = build_char_tokenizer()
    policy = build_tiny_policy(tokenizer, seed=0, **SMALL_MODEL)
    reward_model = build_reward_model(tokenizer, hidden_size=32, intermediate_size=64, seed=0)
    return prompts, preferences, policy, reward_model_reward(reward_model)


def _train(setting, **params):
    prompts, preferences, policy, reward_fn = setting
    config = TrainerConfig.from_params(
        {
            "steps": 2,
            "prompts_per_step": 4,
            "group_size": 4,
            "offline_batch_size": 4,
            "learning_rate": 1e-2,
            "sampling": {"max_new_tokens": 6},
            **params,
        }
    )
    result = train(
        policy,
        prompts[prompts["split"] == "train"],
        config,
        preferences=preferences,
        progress=False,
        reward_fn=reward_fn,
        correctness_fn=GoldJudge(),
    )
    return result


def _same_weights(a, b):
    return all(
        torch.equal(p, q)
        for p, q in zip(a.policy.model.parameters(), b.policy.model.parameters(), strict=True)
    )


def test_f_hal_at_lambda_0_trains_exactly_as_f_grpo(setting):
    hal = _train(setting, loss="f_hal", lam=0.0)
    grpo = _train(setting, loss="f_grpo")
    assert _same_weights(hal, grpo)
    assert hal.metrics["loss"].tolist() == grpo.metrics["loss"].tolist()
    moved = _train(setting, loss="f_hal", lam=0.5)
    assert not _same_weights(hal, moved)  # the test can fail: λ does change training


def test_f_hal_at_lambda_1_trains_exactly_as_fdo(setting):
    hal = _train(setting, loss="f_hal", lam=1.0)
    fdo = _train(setting, loss="fdo")
    assert _same_weights(hal, fdo)
    assert hal.metrics["loss"].tolist() == pytest.approx(fdo.metrics["loss"].tolist(), abs=0)


def test_the_sweep_trains_every_lambda_and_reports_base_first(setting):
    prompts, preferences, policy, reward_fn = setting
    starts = []
    result = run_safety_comparison(
        policy,
        prompts[prompts["split"] == "train"],
        prompts[prompts["split"] == "test"],
        Anchors.from_prompts(prompts[prompts["split"] == "anchor"]),
        reward_fn=reward_fn,
        preferences=preferences,
        lams=[0.0, 1.0],
        seeds=[0, 1],
        hal_scalings=["paper", "balanced"],
        training_params={
            "steps": 3,
            "prompts_per_step": 4,
            "group_size": 4,
            "offline_batch_size": 4,
            "sampling": {"max_new_tokens": 6},
        },
        evaluation_config=EvaluationConfig(k_samples=1, sampling={"max_new_tokens": 6}),
        monitor={"window": 1},
        on_run_start=lambda lam, seed, config: starts.append((lam, seed, config.loss.lam)),
        progress=False,
    )
    # λ = 1 has no on-policy term: it runs once, under the first scaling
    assert starts == [
        (0.0, 0, 0.0),
        (0.0, 1, 0.0),
        (1.0, 0, 1.0),
        (1.0, 1, 1.0),
        (0.0, 0, 0.0),
        (0.0, 1, 0.0),
    ]
    table = result.table
    assert table["arm"].tolist() == ["base", "lam=0,paper", "lam=1,paper", "lam=0,balanced"]
    assert table["hal_scaling"].tolist() == ["", "paper", "paper", "balanced"]
    assert {f"{m}_{part}" for m in METRICS for part in ("mean", "ci_low", "ci_high")} <= set(
        table.columns
    )
    assert table.loc[0, "kl_to_ref_mean"] == pytest.approx(0.0, abs=1e-5)  # base vs itself
    assert table["n_seeds"].tolist() == [0, 2, 2, 2]
    assert table.loc[1, "diff_vs_lam0_mean"] == 0  # λ = 0 against itself
    assert len(result.runs) == 6 and result.runs["reward_hacking_steps"].between(0, 1).all()
    assert set(result.curves["method"]) == {"lam=0,paper", "lam=1,paper", "lam=0,balanced"}
    assert len(result.curves) == 6 * 3
    assert list(result.hidden) == ["base", "lam=0,paper", "lam=1,paper", "lam=0,balanced"]
    for metric in ("gold_score", "attack_success_rate", "over_refusal_rate"):
        assert table[f"{metric}_mean"].between(0, 1).all()


def test_safety_table_intervals_and_paired_differences_to_lambda_0_per_scaling():
    runs = pd.DataFrame(
        {
            "arm": ["lam=0,paper"] * 2 + ["lam=0.5,paper"] * 2 + ["lam=0.5,balanced"] * 2,
            "lam": [0.0, 0.0, 0.5, 0.5, 0.5, 0.5],
            "hal_scaling": ["paper"] * 4 + ["balanced"] * 2,
            "seed": [0, 1] * 3,
            **{m: [1.0, 3.0, 2.0, 6.0, 5.0, 5.0] for m in METRICS},
        }
    )
    table = safety_table(runs, dict.fromkeys(METRICS, 0.5)).set_index("arm")
    assert list(table.index) == ["base", "lam=0,paper", "lam=0.5,paper", "lam=0.5,balanced"]
    assert table.loc["lam=0,paper", "gold_score_mean"] == 2.0
    assert table.loc["lam=0,paper", "gold_score_ci_low"] == 1.0  # two seeds: their range
    assert table.loc["lam=0,paper", "gold_score_ci_high"] == 3.0
    # paired by seed: (2 − 1, 6 − 3) → mean 2
    assert table.loc["lam=0.5,paper", "diff_vs_lam0_mean"] == 2.0
    assert table.loc["lam=0.5,paper", "bhattacharyya_diff_mean"] == 2.0
    # no λ = 0 under balanced: nothing to pair with
    assert math.isnan(table.loc["lam=0.5,balanced", "diff_vs_lam0_mean"])
    assert table.loc["base", "rm_reward_mean"] == 0.5 and table.loc["base", "n_seeds"] == 0
    assert table.loc["lam=0.5,balanced", "lam"] == 0.5


@pytest.mark.parametrize(
    ("lams", "seeds", "message"),
    [
        ([], [0], "non-empty list"),
        ([0.5, 1.5], [0], r"\[0, 1\]"),
        ([0.5, 0.5], [0], "duplicates"),
        ([True], [0], r"\[0, 1\]"),
        ([0.5], [], "seeds must be a non-empty"),
        ([0.5], [0.5], "seeds must be integers"),
    ],
)
def test_bad_lambdas_and_seeds_are_rejected(lams, seeds, message):
    with pytest.raises(ValueError, match=message):
        check_lams_and_seeds(lams, seeds)


def test_a_judge_with_a_compliance_pattern_sees_garbled_text_as_neither():
    judge = GoldJudge(compliance_pattern=r"\b(?:sure|okay)\b")
    assert judge.classify("So, I wan't t.") == NEITHER  # a reward hack seen in the demo
    assert judge.classify("Sure, here is how.") == "compliance"
    labels = ["harmful", "harmful", "benign", "benign"]
    completions = ["So, I wan't t.", "Sorry, I can't.", "Sorrrrst I con't.", "Okay, step one:"]
    metrics = judge.metrics(labels, completions)
    assert metrics["attack_success_rate"] == 0.0  # garbled is not an answer...
    assert metrics["gold_score"] == 0.5  # ...nor a right behaviour
    assert metrics["neither_rate"] == 0.5
    assert GoldJudge().classify("So, I wan't t.") == "compliance"  # without the pattern


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"threshold": 1}, "unknown judge key"),
        ({"refusal_pattern": "("}, "not a valid regex"),
        ({"compliance_pattern": ""}, "non-empty regular expression"),
    ],
)
def test_bad_judge_parameters_are_rejected(params, message):
    with pytest.raises(ValueError, match=message):
        GoldJudge.from_params(params)


SAFETY_RUN = {
    "safety_data": {
        "synthetic": {"n_per_class": 40},
        "split": {"anchor_per_class": 8, "test_fraction": 0.25},
        "reward_pairs": {"n_train": 200, "n_test": 40},
    },
    "reward_model": {"progress": False, "training": {"steps": 30, "batch_size": 32}},
    "safety_base_policy": {"progress": False, "warmup": {"steps": 40, "batch_size": 32}},
    "safety_training": {
        "steps": 6,
        "prompts_per_step": 4,
        "log_completions_every": 3,
        "progress": False,
        "monitor": {"window": 2},
    },
    "safety_evaluation": {"k_samples": 1, "max_prompts": 16},
    "safety_comparison": {
        "lams": [0.0, 1.0],
        "hal_scalings": ["paper", "balanced"],
        "seeds": [0, 1],
        "progress": False,
        "training_overrides": {"steps": 6, "log_completions_every": 0},
    },
}


def test_safety_comparison_pipeline_writes_the_table_and_one_child_run_per_arm(project_copy):
    run_kedro(project_copy, "safety_comparison", SAFETY_RUN)
    table = pd.read_csv(project_copy / "data/08_reporting/safety_comparison.csv")
    assert table["arm"].tolist() == ["base", "lam=0,paper", "lam=1,paper", "lam=0,balanced"]
    assert table["n_seeds"].tolist() == [0, 2, 2, 2]
    for metric in METRICS:
        assert table[f"{metric}_mean"].notna().all(), metric
        assert table[f"{metric}_ci_low"].iloc[1:].notna().all(), metric
    assert table["diff_vs_lam0_mean"].iloc[1:].notna().all()
    for name in (
        "safety_comparison_curves",
        "safety_comparison_latent_separation",
        "safety_comparison_plot",
        "safety_comparison_pareto",
        "safety_comparison_separation",
    ):
        assert (project_copy / f"data/08_reporting/{name}.png").stat().st_size > 0
    report = pd.read_json(project_copy / "data/08_reporting/reward_model.json", typ="series")
    assert 0 <= report["heldout_accuracy"] <= 1 and report["n_heldout_pairs"] == 40

    client = MlflowClient(mlflow.get_tracking_uri())
    parent = client.search_runs(
        [client.get_experiment_by_name("fgrpo_pipeline").experiment_id],
        filter_string="tags.pipelines = 'safety_comparison'",
    )[0]
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
    )
    assert sorted(c.data.tags["lam"] for c in children) == ["0", "0", "0", "0", "1", "1"]
    assert sorted(c.info.run_name for c in children)[:2] == [
        "lam=0,balanced-seed0",
        "lam=0,balanced-seed1",
    ]
    for child in children:
        history = client.get_metric_history(child.info.run_id, "train/reward_hacking")
        assert [m.step for m in history] == list(range(1, 7))
        assert "eval/gold_score" in child.data.metrics
    assert "safety.base/bhattacharyya_mean" in parent.data.metrics
    assert parent.data.tags["lam"] == "sweep"


def test_safety_pipeline_trains_one_lambda_with_the_monitor(project_copy):
    run_kedro(project_copy, "safety", SAFETY_RUN)
    metrics = pd.read_parquet(project_copy / "data/07_model_output/safety_training_metrics.parquet")
    assert {"rm_reward", "gold_score", "rm_gain", "gold_gain", "reward_hacking"} <= set(metrics)
    evaluation = pd.read_json(project_copy / "data/08_reporting/safety_evaluation.json")
    assert {"base", "trained", "change"} <= set(evaluation.columns)
    latent = pd.read_parquet(project_copy / "data/07_model_output/safety_latent.parquet")
    assert set(latent["model"]) == {"base", "trained"}
    assert (project_copy / "data/08_reporting/safety_latent_separation.png").exists()


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"safety_comparison": {"lams": [0.0, 2.0]}}, "parameters_safety_comparison.yml"),
        ({"safety_training": {"lam": 1.5}}, "parameters_safety_training.yml"),
        ({"safety_training": {"monitor": {"window": 0}}}, "parameters_safety_training.yml"),
        ({"safety_data": {"source": "hub"}}, "parameters_safety_data.yml"),
        ({"safety_base_policy": {"refusal_rate": 1.0}}, "parameters_safety_base_policy.yml"),
        ({"reward_model": {"training": {"steps": -1}}}, "parameters_reward_model.yml"),
        ({"safety_evaluation": {"judge": {"refusal_pattern": "("}}}, "safety_evaluation.yml"),
    ],
)
def test_bad_safety_parameters_stop_the_run_before_any_work(project_copy, params, message):
    with pytest.raises(ValueError, match=message):
        run_kedro(project_copy, "safety_comparison", params)
    assert not any(p.is_file() for p in (project_copy / "data").rglob("*"))
