"""The ood split: held-out arithmetic problems beyond the training operand range, generated
beside train and test without moving them, and evaluated next to the primary split; and the
difficulty strata (carry / no carry) of a split, scored from the split's own samples."""

import hashlib
import re

import pandas as pd
import pytest

from fgrpo_pipeline.heldout.evaluate import EvaluationConfig, evaluate_policy, evaluate_splits
from fgrpo_pipeline.pipelines.data_preparation.nodes import prepare_prompts
from fgrpo_pipeline.pipelines.evaluation.nodes import evaluate_base_and_trained
from fgrpo_pipeline.pipelines.parameters import read_params
from fgrpo_pipeline.tasks.sources import (
    ARITHMETIC_COLUMNS,
    PROMPT_COLUMNS,
    ArithmeticConfig,
    DataPreparationConfig,
    arithmetic_difficulty,
    arithmetic_prompts,
    load_gsm8k,
    make_arithmetic_prompts,
    validate_prompts,
)
from tests.conftest import half_taught_policy

PROBLEM = re.compile(r"(-?\d+)([+*-])(-?\d+)=")
SAMPLING = {"max_new_tokens": 3}


def _problems(df: pd.DataFrame, split: str) -> set[tuple[int, str, int]]:
    rows = df.loc[df["split"] == split, "prompt"]
    return {(int(a), op, int(b)) for a, op, b in (PROBLEM.fullmatch(p).groups() for p in rows)}


# --- data -----------------------------------------------------------------------------------


def test_ood_rows_lie_beyond_the_training_range_and_share_no_prompt():
    df = make_arithmetic_prompts(
        n_train=40, n_test=10, operations=("+", "-"), operand_max=9, n_ood=60, ood_operand_max=14
    )
    assert list(df.columns) == list(ARITHMETIC_COLUMNS)
    validate_prompts(df, "arithmetic")
    ood = df[df["split"] == "ood"]
    assert len(ood) == 60 and ood.index.min() == 50  # after train and test
    assert ood["id"].tolist() == [f"arith-ood-{i:05d}" for i in range(60)]
    for a, op, b in _problems(df, "ood"):
        assert 0 <= a <= 14 and 0 <= b <= 14 and max(a, b) > 9 and op in "+-"
    for prompt, truth in zip(ood["prompt"], ood["ground_truth"], strict=True):
        assert int(truth) == eval(prompt[:-1])
    assert df["prompt"].is_unique
    assert not _problems(df, "ood") & (_problems(df, "train") | _problems(df, "test"))


def test_all_ood_problems_drawn_are_exactly_the_ring_around_the_training_square():
    # operands in [-2, 5], at least one > 3, for two operations: 2 x (8² - 6²) = 56 problems
    config = ArithmeticConfig(
        n_train=5,
        n_test=5,
        operations=("+", "*"),
        operand_min=-2,
        operand_max=3,
        n_ood=56,
        ood_operand_max=5,
    )
    assert config.n_distinct_ood() == 56
    expected = {
        (a, op, b) for op in ("+", "*") for a in range(-2, 6) for b in range(-2, 6) if max(a, b) > 3
    }
    assert _problems(arithmetic_prompts(config), "ood") == expected


def test_ood_rows_leave_train_and_test_as_they_were():
    without = make_arithmetic_prompts(n_train=50, n_test=20, seed=7)
    with_ood = make_arithmetic_prompts(n_train=50, n_test=20, seed=7, n_ood=30)
    pd.testing.assert_frame_equal(with_ood[with_ood["split"] != "ood"], without)
    # the shipped default (n_ood=180) against the same block without ood rows
    default = arithmetic_prompts(ArithmeticConfig(operations=("+",)))
    plain = arithmetic_prompts(ArithmeticConfig(operations=("+",), n_ood=0))
    assert set(plain["split"]) == {"train", "test"}
    assert default["split"].value_counts().to_dict() == {"train": 720, "test": 180, "ood": 180}
    pd.testing.assert_frame_equal(default.iloc[: len(plain)], plain)


def test_ood_rows_are_seeded():
    first = make_arithmetic_prompts(n_train=10, n_test=5, seed=3, n_ood=20)
    again = make_arithmetic_prompts(n_train=10, n_test=5, seed=3, n_ood=20)
    other = make_arithmetic_prompts(n_train=10, n_test=5, seed=4, n_ood=20)
    pd.testing.assert_frame_equal(first, again)
    assert _problems(first, "ood") != _problems(other, "ood")


@pytest.mark.parametrize(
    ("arithmetic", "message"),
    [
        ({"n_ood": -1}, r"data_preparation.arithmetic.n_ood must be >= 0, got -1"),
        ({"n_ood": 1.5}, r"data_preparation.arithmetic.n_ood must be an integer"),
        (
            {"n_ood": 5, "ood_operand_max": 29},
            r"data_preparation.arithmetic.ood_operand_max \(29\) must be > operand_max \(29\)",
        ),
        (
            {"operations": ["+"], "n_ood": 5000, "ood_operand_max": 39},
            r"data_preparation.arithmetic.n_ood = 5000 exceeds the 700 distinct ood problems",
        ),
    ],
)
def test_bad_ood_parameters_are_refused_naming_the_parameter(arithmetic, message):
    with pytest.raises(ValueError, match=f"^parameters_data_preparation.yml: {message}"):
        read_params(DataPreparationConfig, {"arithmetic": arithmetic})


def test_no_ood_rows_need_no_ood_range():
    table = prepare_prompts(
        {"arithmetic": {"n_train": 4, "n_test": 2, "n_ood": 0, "ood_operand_max": 0}}
    )
    assert set(table["split"]) == {"train", "test"}


def test_gsm8k_has_no_ood_split():
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'test'\)"):
        load_gsm8k(None, split="ood")


# --- difficulty -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "op", "b", "difficulty"),
    [
        (5, "+", 7, "carry"),
        (12, "+", 3, "no_carry"),
        (19, "+", 1, "carry"),
        (25, "+", 5, "carry"),  # 5 + 5 = 10 carries
        (14, "+", 25, "no_carry"),  # 4 + 5 = 9 does not
        (0, "+", 0, "no_carry"),
        (29, "+", 29, "carry"),
        (35, "+", 4, "no_carry"),  # an ood operand, the same rule
        (5, "-", 7, "other"),
        (5, "*", 7, "other"),
        (-3, "+", 4, "other"),  # a negative operand: really a subtraction
    ],
)
def test_difficulty_of_hand_checked_problems(a, op, b, difficulty):
    assert arithmetic_difficulty(a, op, b) == difficulty


def test_every_row_s_difficulty_follows_its_prompt():
    df = make_arithmetic_prompts(
        n_train=60, n_test=30, operand_min=-3, operand_max=9, n_ood=40, ood_operand_max=14
    )
    for prompt, difficulty in zip(df["prompt"], df["difficulty"], strict=True):
        a, op, b = PROBLEM.fullmatch(prompt).groups()
        a, b = int(a), int(b)
        if op == "+" and min(a, b) >= 0:
            assert difficulty == ("carry" if a % 10 + b % 10 >= 10 else "no_carry"), prompt
        else:
            assert difficulty == "other", prompt
    assert set(df["difficulty"]) == {"carry", "no_carry", "other"}
    assert set(df.loc[df["split"] == "ood", "difficulty"]) == {"carry", "no_carry", "other"}


# sha256 of the shipped train and test rows (operations ["+"], seed 0) as they were before
# the difficulty column (and the ood split) existed: the new column moves none of them
SHIPPED_TRAIN_TEST = "9b6e7b1702feca34acfada67c8fa625bfcaac1582ca75d575d699048a746a6c9"


def test_the_difficulty_column_leaves_train_and_test_rows_as_they_were():
    df = arithmetic_prompts(ArithmeticConfig(operations=("+",)))
    rows = df.loc[df["split"] != "ood", list(PROMPT_COLUMNS)]
    text = "\n".join(",".join(row) for row in rows.itertuples(index=False))
    assert hashlib.sha256(text.encode()).hexdigest() == SHIPPED_TRAIN_TEST
    # both strata of the held-out split are large enough to be a benchmark
    test = df.loc[df["split"] == "test", "difficulty"].value_counts().to_dict()
    assert test == {"no_carry": 97, "carry": 83}


# --- evaluation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("evaluation", "message"),
    [
        ({"extra_splits": ["dev"]}, r"evaluation.extra_splits 'dev' is unknown; valid: train"),
        ({"extra_splits": ["ood", "ood"]}, r"evaluation.extra_splits has duplicates"),
        ({"split": "test", "extra_splits": ["test"]}, r"evaluation.extra_splits repeats split"),
    ],
)
def test_bad_extra_splits_are_refused_naming_the_parameter(evaluation, message):
    with pytest.raises(ValueError, match=f"^parameters_evaluation.yml: {message}"):
        read_params(EvaluationConfig, evaluation)


@pytest.fixture(scope="module")
def prompts():
    return make_arithmetic_prompts(
        n_train=40, n_test=8, operations=("+",), operand_max=9, n_ood=6, ood_operand_max=14
    )


@pytest.fixture(scope="module")
def policy(prompts):
    return half_taught_policy(prompts)


def test_evaluate_splits_adds_prefixed_metrics_and_keeps_the_primary_ones(policy, prompts):
    config = EvaluationConfig(k_samples=2, sampling=SAMPLING, extra_splits=["ood"])
    metrics, samples = evaluate_splits(policy, policy, prompts, config)
    test, test_samples = evaluate_policy(
        policy, policy, prompts[prompts["split"] == "test"], config
    )
    ood, ood_samples = evaluate_policy(policy, policy, prompts[prompts["split"] == "ood"], config)
    assert metrics == {**test, **{f"ood_{key}": value for key, value in ood.items()}}
    assert {"ood_sampled_accuracy", "ood_greedy_accuracy", "ood_kl_to_ref"} <= set(metrics)
    assert metrics["n_prompts"] == 8 and metrics["ood_n_prompts"] == 6
    assert samples["split"].tolist() == ["test"] * 16 + ["ood"] * 12
    pd.testing.assert_frame_equal(
        samples.drop(columns="split"), pd.concat([test_samples, ood_samples], ignore_index=True)
    )
    # without extra splits: evaluate_policy's numbers on the primary split, nothing else
    alone, _ = evaluate_splits(
        policy, policy, prompts, EvaluationConfig(k_samples=2, sampling=SAMPLING)
    )
    assert alone == test


def test_max_prompts_caps_each_split(policy, prompts):
    config = EvaluationConfig(k_samples=1, sampling=SAMPLING, max_prompts=3, extra_splits=["ood"])
    metrics, samples = evaluate_splits(policy, policy, prompts, config)
    assert metrics["n_prompts"] == 3 and metrics["ood_n_prompts"] == 3
    assert samples["split"].value_counts().to_dict() == {"test": 3, "ood": 3}


def test_a_split_without_prompts_names_the_parameter(policy, prompts):
    no_ood = prompts[prompts["split"] != "ood"]
    config = EvaluationConfig(k_samples=1, sampling=SAMPLING, extra_splits=["ood"])
    expected = (
        r"^evaluation.extra_splits: split 'ood' has no prompts "
        r"\(set data_preparation.arithmetic.n_ood > 0, or drop it from extra_splits\)$"
    )
    with pytest.raises(ValueError, match=expected):
        evaluate_splits(policy, policy, no_ood, config)
    with pytest.raises(ValueError, match=r"^evaluation.split: split 'test' has no prompts$"):
        evaluate_splits(policy, policy, prompts[prompts["split"] != "test"], config)


def test_the_evaluation_node_reports_ood_for_base_and_trained_and_their_change(policy, prompts):
    params = {"k_samples": 1, "sampling": SAMPLING, "extra_splits": ["ood"]}
    report, samples = evaluate_base_and_trained(policy, policy, prompts, params)
    for side in ("base", "trained"):
        assert report[side]["ood_n_prompts"] == 6
        assert 0 <= report[side]["ood_greedy_accuracy"] <= 1
    assert set(report["change"]) == {
        "sampled_accuracy",
        "greedy_accuracy",
        "mean_reward",
        "completion_length",
        "ood_sampled_accuracy",
        "ood_greedy_accuracy",
    }
    assert report["change"]["ood_greedy_accuracy"] == 0  # the same policy on both sides
    assert set(zip(samples["policy"], samples["split"], strict=True)) == {
        ("base", "test"),
        ("base", "ood"),
        ("trained", "test"),
        ("trained", "ood"),
    }


# --- strata ---------------------------------------------------------------------------------


def _strata_config(**overrides) -> EvaluationConfig:
    # the half-taught policy is right sometimes on the rows it was taught, never on test:
    # its train split is where strata have signal
    return EvaluationConfig(
        **{"split": "train", "k_samples": 4, "sampling": SAMPLING, "strata": "difficulty"}
        | overrides
    )


def test_strata_metrics_come_from_the_split_s_own_samples(policy, prompts):
    metrics, samples = evaluate_splits(policy, policy, prompts, _strata_config())
    train = prompts[prompts["split"] == "train"]
    plain, plain_samples = evaluate_policy(policy, policy, train, _strata_config(strata=None))
    # the split's own numbers and samples are those without strata
    assert {key: metrics[key] for key in plain} == plain
    pd.testing.assert_frame_equal(samples.drop(columns="split"), plain_samples)
    strata = {"carry", "no_carry"}
    assert set(metrics) == set(plain) | {
        f"{v}_{key}" for v in strata for key in ("n_prompts", "sampled_accuracy", "greedy_accuracy")
    }
    # a direct computation per stratum: its prompts' samples, its prompts' greedy results
    greedy = samples.groupby("prompt_id")["greedy_correct"].agg(["first", "nunique"])
    assert (greedy["nunique"] == 1).all()  # one greedy result per prompt, on its k rows
    assert greedy["first"].mean() == pytest.approx(metrics["greedy_accuracy"], abs=1e-12)
    for v in strata:
        ids = set(train.loc[train["difficulty"] == v, "id"])
        assert metrics[f"{v}_n_prompts"] == len(ids)
        own = samples[samples["prompt_id"].isin(ids)]
        assert metrics[f"{v}_sampled_accuracy"] == own["correct"].mean()
        assert metrics[f"{v}_greedy_accuracy"] == greedy.loc[sorted(ids), "first"].mean()
    # the prompt-weighted means of the strata are the split's accuracies
    n = {v: metrics[f"{v}_n_prompts"] for v in strata}
    assert sum(n.values()) == metrics["n_prompts"] == 40
    for key in ("sampled_accuracy", "greedy_accuracy"):
        mean = sum(n[v] * metrics[f"{v}_{key}"] for v in strata) / sum(n.values())
        assert mean == pytest.approx(metrics[key], abs=1e-12)
    # the test needs signal: right sometimes, in each stratum
    assert 0 < metrics["sampled_accuracy"] < 1
    assert all(metrics[f"{v}_sampled_accuracy"] > 0 for v in strata)


def test_strata_cover_only_the_primary_split_and_its_capped_prompts(policy, prompts):
    config = _strata_config(split="test", k_samples=1, max_prompts=5, extra_splits=["ood"])
    metrics, _ = evaluate_splits(policy, policy, prompts, config)
    # test's first five prompts: 3+5, 7+2, 0+0 (no carry), 9+6, 4+6 (carry)
    assert metrics["no_carry_n_prompts"] == 3 and metrics["carry_n_prompts"] == 2
    assert not any(key.startswith(("ood_carry", "ood_no_carry")) for key in metrics)


def test_bad_strata_are_refused_before_any_generation(prompts):
    # no policy: each check fails before anything is generated
    config = _strata_config()
    gsm8k_like = prompts.drop(columns="difficulty")
    expected = (
        r"^evaluation.strata: the prompts table has no column 'difficulty' \(columns: \['id', "
        r".*set evaluation.strata: null \(or re-run data_preparation\)$"
    )
    with pytest.raises(ValueError, match=expected):
        evaluate_splits(None, None, gsm8k_like, config)
    with pytest.raises(ValueError, match=r"no column 'level'.*strata: null$"):
        evaluate_splits(None, None, prompts, _strata_config(strata="level"))
    unlabelled = prompts.copy()
    unlabelled.loc[3, "difficulty"] = None
    with pytest.raises(ValueError, match=r"^evaluation.strata: column 'difficulty', row 3: no"):
        evaluate_splits(None, None, unlabelled, config)
    clashing = prompts.assign(difficulty="ood")
    with pytest.raises(ValueError, match=r"value\(s\) \['ood'\] that are also extra_splits"):
        evaluate_splits(None, None, clashing, _strata_config(extra_splits=["ood"]))


def test_the_evaluation_node_reports_the_strata_change(policy, prompts):
    params = {"k_samples": 1, "sampling": SAMPLING, "extra_splits": ["ood"]}
    report, _ = evaluate_base_and_trained(
        policy, policy, prompts, {**params, "strata": "difficulty"}
    )
    assert set(report["change"]) == {
        "sampled_accuracy",
        "greedy_accuracy",
        "mean_reward",
        "completion_length",
        "ood_sampled_accuracy",
        "ood_greedy_accuracy",
        "carry_sampled_accuracy",
        "carry_greedy_accuracy",
        "no_carry_sampled_accuracy",
        "no_carry_greedy_accuracy",
    }
    assert report["base"]["carry_n_prompts"] + report["base"]["no_carry_n_prompts"] == 8
    assert report["change"]["carry_greedy_accuracy"] == 0  # the same policy on both sides
