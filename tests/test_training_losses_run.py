"""The training pipeline with the offline-data losses, through real Kedro sessions on the
splits that reward_labeling wrote: DPO's same-prompt pairs and f-HAL's balanced λ."""

import pandas as pd
import pytest

from tests.conftest import SMALL_RUN
from tests.conftest import run_kedro as run

pytestmark = pytest.mark.slow

UPSTREAM = ("data_preparation", "base_policy", "rollout_generation", "reward_labeling")


def _train(project, **params):
    # a new MLflow run per session (kedro-mlflow's hook keeps the last run id in-process)
    import mlflow
    from kedro_mlflow.framework.hooks.mlflow_hook import mlflow_hook

    while mlflow.active_run():
        mlflow.end_run()
    mlflow_hook.run_id = None
    run(
        project,
        "training",
        {"training": {**SMALL_RUN["training"], "steps": 6, "checkpoint_every": 0, **params}},
    )
    data = project / "data/07_model_output"
    return (
        pd.read_parquet(data / "training_metrics.parquet"),
        pd.read_parquet(data / "training_completions.parquet"),
    )


def test_dpo_and_balanced_f_hal_train_on_the_reward_labeling_splits(project_copy):
    for name in UPSTREAM:
        run(project_copy, name)
    labeled = pd.read_parquet(project_copy / "data/05_model_input/labeled_rollouts.parquet")

    # DPO: every pair the loss saw is an aligned and an unaligned response to one prompt
    metrics, completions = _train(project_copy, loss="dpo", log_completions_every=1)
    offline = completions[completions["source"] == "offline"]
    assert set(offline["step"]) == set(range(1, 7))
    assert len(offline) == 6 * 2 * 16  # steps × sides × offline_batch_size
    for _, pair in offline.groupby(["step", "pair"]):
        assert sorted(pair["side"]) == ["aligned", "unaligned"]
        assert pair["prompt"].nunique() == 1
    # drawn from the splits: aligned rows have a > 0, unaligned a < 0 in labeled_rollouts
    advantage = labeled.set_index(["prompt", "completion"])["advantage"]
    for side, sign in (("aligned", 1), ("unaligned", -1)):
        rows = offline[offline["side"] == side]
        values = advantage.loc[list(zip(rows["prompt"], rows["completion"], strict=True))]
        assert (sign * values > 0).all()
    # prompts of the splits with one side only are skipped, and counted
    splits = project_copy / "data/05_model_input"
    aligned = set(pd.read_parquet(splits / "aligned.parquet")["prompt"])
    unaligned = set(pd.read_parquet(splits / "unaligned.parquet")["prompt"])
    assert (metrics["offline_prompts_skipped"] == len(aligned ^ unaligned)).all()

    # f-HAL at λ = 0.5, balanced: both terms' gradient norms logged at every step
    metrics, _ = _train(project_copy, loss="f_hal", lam=0.5, hal_scaling="balanced")
    assert len(metrics) == 6
    for column in ("grad_norm_online", "grad_norm_offline"):
        assert (metrics[column] > 0).all()
