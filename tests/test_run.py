"""The whole workflow through real Kedro sessions, at a size CI runs in well under a minute."""

import json

import pandas as pd
import pytest

from fgrpo_pipeline.pipeline_registry import STAGES
from tests.conftest import SMALL_RUN
from tests.conftest import run_kedro as run

pytestmark = pytest.mark.slow


# 16 rollout groups rather than SMALL_RUN's 8: enough for some to have no reward spread
# (every completion right, or every one wrong), whose rows are neutral.
ROLLOUT_PROMPTS = 16


def test_each_pipeline_runs_alone_on_what_the_previous_saved(project_copy):
    for name in STAGES:
        run(project_copy, name, {"rollout_generation": {"num_prompts": ROLLOUT_PROMPTS}})
    data = project_copy / "data"

    prompts = pd.read_parquet(data / "03_primary/prompts.parquet")
    assert prompts["split"].value_counts().to_dict() == {"train": 80, "test": 20, "ood": 20}

    labeled = pd.read_parquet(data / "05_model_input/labeled_rollouts.parquet")
    aligned = pd.read_parquet(data / "05_model_input/aligned.parquet")
    unaligned = pd.read_parquet(data / "05_model_input/unaligned.parquet")
    groups = pd.read_csv(data / "08_reporting/reward_groups.csv")
    # labeled keeps every row; the splits hold a > 0 and a < 0 only, a = 0 (neutral) neither
    assert len(labeled) == ROLLOUT_PROMPTS * 8
    neutral = labeled["advantage"] == 0
    assert neutral.any(), "the check needs a zero-advantage row (a zero-spread group)"
    assert not (aligned["advantage"] <= 0).any() and not (unaligned["advantage"] >= 0).any()
    assert (labeled["side"] == "neutral").tolist() == neutral.tolist()
    assert len(aligned) + len(unaligned) + int(neutral.sum()) == len(labeled)
    key = ["prompt_id", "completion", "advantage"]
    for split, rows in ((aligned, labeled["advantage"] > 0), (unaligned, labeled["advantage"] < 0)):
        pd.testing.assert_frame_equal(split[key], labeled[rows][key].reset_index(drop=True))
    assert (groups["n_aligned"] + groups["n_unaligned"] + groups["n_neutral"] == 8).all()
    assert len(groups) == ROLLOUT_PROMPTS and groups["zero_std"].any()
    assert groups["n_neutral"].sum() == neutral.sum()
    assert (groups.loc[groups["zero_std"], "n_neutral"] == 8).all()

    metrics = pd.read_parquet(data / "07_model_output/training_metrics.parquet")
    assert len(metrics) == 150
    first, last = metrics["reward_mean"].iloc[:30].mean(), metrics["reward_mean"].iloc[-30:].mean()
    assert last > first + 0.08, (first, last)

    report = json.loads((data / "08_reporting/evaluation.json").read_text())
    for side in ("base", "trained"):
        assert report[side]["n_prompts"] == 20 and report[side]["ood_n_prompts"] == 20
        for metric in ("sampled_accuracy", "greedy_accuracy"):
            assert 0.0 <= report[side][metric] <= 1.0
            assert 0.0 <= report[side][f"ood_{metric}"] <= 1.0
    assert {"ood_sampled_accuracy", "ood_greedy_accuracy"} <= set(report["change"])
    assert report["base"]["kl_to_ref"] == pytest.approx(0.0, abs=1e-4)
    assert report["trained"]["kl_to_ref"] > 0
    assert (data / "08_reporting/training_curves.png").stat().st_size > 10_000
    checkpoints = sorted(p.name for p in (data / "06_models/training_checkpoints").iterdir())
    assert checkpoints == ["step_000075", "step_000150"]
    completions = pd.read_parquet(data / "07_model_output/training_completions.parquet")
    assert set(completions["step"]) == {50, 100, 150}


def test_invalid_parameter_stops_the_run_before_any_work(project_copy):
    with pytest.raises(ValueError, match="unknown divergence 'chi2'.*valid divergence names"):
        run(
            project_copy,
            "__default__",
            {"training": {**SMALL_RUN["training"], "divergence": "chi2"}},
        )
    # nothing ran: not even the first pipeline's output exists, and no MLflow run was opened
    assert not (project_copy / "data/03_primary/prompts.parquet").exists()
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{project_copy}/mlflow.db")
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []
    mlflow.set_tracking_uri(None)
