"""The arm × seed sweep engine on its own: plan validation, the per-run callbacks, and runs
that are exactly the direct ``train()`` calls they stand for."""

import math

import pandas as pd
import pytest
import torch

from fgrpo_pipeline.experiments.sweep import (
    Arm,
    ArmResult,
    check_sweep_options,
    curves_table,
    final_mean,
    merge_training_params,
    plan_sweep,
    run_sweep,
)
from fgrpo_pipeline.models.policy import build_char_tokenizer, build_tiny_policy
from fgrpo_pipeline.tasks.sources import make_arithmetic_prompts
from fgrpo_pipeline.training.config import TrainerConfig
from fgrpo_pipeline.training.loop import train

TRAINING = {
    "loss": "f_grpo",
    "divergence": "kl",
    "steps": 2,
    "prompts_per_step": 4,
    "group_size": 4,
    "learning_rate": 1e-2,
    "sampling": {"max_new_tokens": 3},
    "progress": False,
}
ARMS = [
    Arm("hellinger", {"loss": "f_grpo", "divergence": "hellinger"}),
    Arm("grpo", {"loss": "grpo"}),
]
SEEDS = [0, 1]
# per-step columns that measure the machine, not the run
TIMING = ("time_", "tokens_per_second")


@pytest.mark.parametrize(
    ("arms", "seeds", "message"),
    [
        ([], SEEDS, "arms must be a non-empty list of Arm"),
        (ARMS[0], SEEDS, "arms must be a non-empty list of Arm"),
        ([("kl", {"loss": "f_grpo"})], SEEDS, "arms must be Arm instances"),
        ([ARMS[0], Arm("hellinger")], SEEDS, r"arms has duplicates: \['hellinger', 'hellinger'\]"),
        (ARMS, [], "seeds must be a non-empty list of integers"),
        (ARMS, "01", "seeds must be a non-empty list of integers"),
        (ARMS, [0, 0], r"seeds has duplicates: \[0, 0\]"),
        (ARMS, [0, 0.5], "seeds must be integers, got 0.5"),
        (ARMS, [True], "seeds must be integers, got True"),
        ([ARMS[0], Arm("chi2", {"divergence": "chi2"})], SEEDS, "arm 'chi2': .*divergence"),
        ([Arm("dpo", {"loss": "dop"})], SEEDS, "arm 'dpo': unknown loss 'dop'"),
    ],
)
def test_plan_rejects_bad_arms_and_seeds(arms, seeds, message):
    with pytest.raises(ValueError, match=message):
        plan_sweep(arms, seeds, TRAINING)


def test_plan_names_the_arm_of_a_bad_shared_parameter():
    with pytest.raises(ValueError, match=r"arm 'hellinger': unknown training parameter.*stpes"):
        plan_sweep(ARMS, SEEDS, {**TRAINING, "stpes": 3})


def test_plan_is_arm_by_arm_with_each_arms_overrides_and_seed():
    plan = plan_sweep(ARMS, SEEDS, {**TRAINING, "resume_dir": "x", "num_threads": 1})
    assert [(r.arm.label, r.seed) for r in plan.runs] == [
        ("hellinger", 0),
        ("hellinger", 1),
        ("grpo", 0),
        ("grpo", 1),
    ]
    assert [r.config.seed for r in plan.runs] == [0, 1, 0, 1]
    assert [r.config.loss.name for r in plan.runs] == ["f_grpo", "f_grpo", "grpo", "grpo"]
    assert plan.runs[0].config.loss.divergence == "hellinger"
    assert plan.runs[2].config.loss.divergence == "kl"  # grpo's: the default, unused
    assert plan.num_threads == 1 and plan.train_progress is False
    # run keys (progress, resume_dir) say how a run is shown, not what it trains
    # and grpo takes no divergence: the shared block's is dropped for its arm
    assert ARMS[1].params({**TRAINING, "resume_dir": "x"}, 5) == {
        **{k: v for k, v in TRAINING.items() if k not in ("progress", "divergence")},
        "loss": "grpo",
        "seed": 5,
    }


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"arms": [], "sedes": [1]}, r"unknown sweep key\(s\) \['sedes'\]; valid: arms, "),
        ({"training_overrides": {"loss": "dpo", "steps": 3}}, r"may not set \['loss'\]: swept"),
        ({"training_overrides": {"seed": 1}}, r"may not set \['seed'\]: swept"),
        ({"training_overrides": [1]}, "training_overrides must be a mapping"),
        ({"num_threads": -1}, "num_threads must be an integer ≥ 0"),
        ({"num_threads": True}, "num_threads must be an integer ≥ 0"),
        ({"progress": "yes"}, "progress must be true or false"),
    ],
)
def test_sweep_options_reject_swept_keys_in_the_shared_training_block(params, message):
    keys = ("arms", "training_overrides", "num_threads", "progress")
    with pytest.raises(ValueError, match=message):
        check_sweep_options(
            params, block="sweep", keys=keys, swept=("loss", "seed"), swept_by="swept"
        )


def test_the_shared_training_parameters_merge_the_blocks_options():
    block = {"training_overrides": {"steps": 7}, "num_threads": 2, "progress": False}
    merged = merge_training_params(block, TRAINING)
    assert merged == {**TRAINING, "steps": 7, "num_threads": 2, "progress": False}
    assert merge_training_params({}, TRAINING)["progress"] is True
    assert "num_threads" not in merge_training_params({"num_threads": 0}, TRAINING)


def test_final_mean_and_curves():
    metrics = pd.DataFrame({"step": range(1, 21), "reward_mean": [float(i) for i in range(20)]})
    assert final_mean(metrics, "reward_mean") == pytest.approx(18.5)  # the last 2 of 20
    assert math.isnan(final_mean(metrics, "accuracy"))
    assert math.isnan(final_mean(metrics.iloc[:0], "reward_mean"))
    curves = curves_table({("a", 3): metrics}, ("method", "seed", "step", "reward_mean", "kl"))
    assert list(curves.columns) == ["method", "seed", "step", "reward_mean", "kl"]
    assert (curves["method"] == "a").all() and (curves["seed"] == 3).all()
    assert curves["kl"].isna().all() and curves["seed"].dtype == "int64"
    assert curves_table({}, ("method", "seed", "step")).empty


@pytest.fixture(scope="module")
def setting():
    prompts = make_arithmetic_prompts(n_train=16, n_test=4, operations=("+",), operand_max=9)
    policy = build_tiny_policy(build_char_tokenizer(), hidden_size=32, intermediate_size=64)
    return policy, prompts[prompts["split"] == "train"]


def weights(policy):
    """What the test's evaluate measures: a copy of every weight."""
    return [p.detach().clone() for p in policy.model.parameters()]


def steps_only(metrics: pd.DataFrame) -> pd.DataFrame:
    return metrics[[c for c in metrics.columns if not c.startswith(TIMING)]]


def test_each_run_is_reported_once_and_is_the_direct_train_call(setting):
    policy, prompts = setting
    calls = []

    def on_arm(arm, seed, result):
        calls.append(("arm", arm.label, seed, result))

    result = run_sweep(
        plan_sweep(ARMS, SEEDS, TRAINING),
        policy,
        prompts,
        weights,
        row=lambda r: {"arm": r.arm.label, "seed": r.seed, "steps": len(r.metrics)},
        on_start=lambda arm, seed, config: calls.append(("start", arm.label, seed, config.seed)),
        on_arm=on_arm,
        progress=False,
    )
    order = [(arm.label, seed) for arm in ARMS for seed in SEEDS]
    assert [c[:3] for c in calls] == [
        (kind, label, seed) for label, seed in order for kind in ("start", "arm")
    ]
    reported = [c[3] for c in calls if c[0] == "arm"]
    # once per (arm, seed), with the very result the sweep returns
    assert len(reported) == len(result.arms) == 4
    assert all(a is b for a, b in zip(reported, result.arms, strict=True))
    assert all(isinstance(r, ArmResult) for r in reported)
    assert [(r.arm.label, r.seed) for r in result.arms] == order
    assert [c[3] for c in calls if c[0] == "start"] == [seed for _, seed in order]
    assert result.table(["arm", "seed", "steps"]).values.tolist() == [
        [label, seed, 2] for label, seed in order
    ]
    assert all(r.train_time > 0 and r.eval_time >= 0 and r.started > 0 for r in result.arms)
    assert all(torch.equal(a, b) for a, b in zip(result.base, weights(policy), strict=True))
    assert set(result.metrics) == set(order)

    for run in result.arms:
        params = {**TRAINING, **run.arm.overrides, "seed": run.seed}
        params.pop("progress")
        config = TrainerConfig.from_params(params)
        assert run.config == config
        direct = train(policy, prompts, config, progress=False)
        pd.testing.assert_frame_equal(steps_only(run.metrics), steps_only(direct.metrics))
        trained = weights(direct.policy)
        assert all(torch.equal(a, b) for a, b in zip(run.evaluation, trained, strict=True))
    # the test can fail: arms and seeds do train differently
    hellinger, grpo = result.arms[0].evaluation, result.arms[2].evaluation
    assert not all(torch.equal(a, b) for a, b in zip(hellinger, grpo, strict=True))
    assert not result.arms[0].metrics["loss"].equals(result.arms[1].metrics["loss"])


def test_an_arm_drops_the_loss_options_its_loss_ignores():
    from fgrpo_pipeline.training.config import TrainerConfig

    shared = {"loss": "f_grpo", "divergence": "pearson", "weights": "snis", "progress": False}
    grpo = Arm("grpo", {"loss": "grpo"}).params(shared, seed=3)
    assert grpo == {"loss": "grpo", "seed": 3}
    TrainerConfig.from_params(grpo)  # accepted: nothing grpo would ignore
    f_grpo = Arm("f_grpo:kl", {"divergence": "kl"}).params(shared, seed=3)
    assert f_grpo["divergence"] == "kl" and f_grpo["weights"] == "snis"
