"""Rewards: exact_number, math_verify and format on real GSM8K rows and arithmetic answers."""

import json
import math
import threading
from pathlib import Path

import pytest

from fgrpo_pipeline.algorithms.rewards import (
    REWARDS,
    combine_rewards,
    get_reward,
    score_completions,
)

SAMPLE = Path(__file__).parent / "data" / "gsm8k_sample.jsonl"
ROWS = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
ANSWERS = [row["answer"] for row in ROWS]
FINALS = [answer.rsplit("#### ", 1)[1] for answer in ANSWERS]


def _perturbed(answer: str) -> str:
    """The same worked answer with its final number off by one."""
    steps, final = answer.rsplit("#### ", 1)
    return f"{steps}#### {int(final) + 1}"


def _score(name: str, completions: list[str], ground_truth: list[str]) -> list[float]:
    prompts = ["p"] * len(completions)
    return score_completions(get_reward(name), prompts, completions, ground_truth=ground_truth)


def test_registry_names_and_unknown_reward():
    assert REWARDS.names() == ["exact_number", "math_verify", "format"]
    assert get_reward("format").__name__ == "format"
    with pytest.raises(ValueError, match="exact_number, math_verify, format"):
        get_reward("length")


@pytest.mark.parametrize("name", ["exact_number", "math_verify"])
def test_real_gsm8k_answers_score_one_against_their_ground_truth(name):
    # Reference given either as the bare number or as the full worked answer.
    assert _score(name, ANSWERS, FINALS) == [1.0] * len(ROWS)
    assert _score(name, ANSWERS, ANSWERS) == [1.0] * len(ROWS)


@pytest.mark.parametrize("name", ["exact_number", "math_verify"])
def test_perturbed_gsm8k_answers_score_zero(name):
    assert _score(name, [_perturbed(answer) for answer in ANSWERS], ANSWERS) == [0.0] * len(ROWS)


@pytest.mark.parametrize("name", ["exact_number", "math_verify"])
def test_only_the_marked_answer_counts_not_calculator_annotations(name):
    # "<<48/2=24>>24" holds 24, the marked answer is 72: only 72 must count.
    answer = ANSWERS[0]
    assert "<<48/2=24>>" in answer
    assert _score(name, [answer, answer.replace("#### 72", "#### 24")], ["72", "72"]) == [1, 0]


@pytest.mark.parametrize(
    ("completion", "reference", "expected"),
    [
        ("19", "19", 1.0),
        (" 19\n", "19", 1.0),
        ("19.0", "19", 1.0),
        ("19<|endoftext|>", "19", 1.0),
        ("19</s><pad><pad>", "19", 1.0),
        ("-4", "-4", 1.0),
        ("4", "-4", 0.0),
        ("5-9=-4", "-4", 1.0),
        ("20", "19", 0.0),
        ("", "19", 0.0),
        ("nineteen", "19", 0.0),
        ("I think 12 then 19", "19", 1.0),
        ("19 or maybe 20", "19", 0.0),
        ("The total is $1,200.", "1200", 1.0),
        ("#### 1,200", "1200", 1.0),
        ("#### 2.50", "2.5", 1.0),
        ("#### 72\n\nQuestion: Tom has 5 apples", "72", 1.0),
        ("#### \nso 72", "72", 1.0),
        ("72 ####", "72", 0.0),
    ],
)
def test_exact_number_cases(completion, reference, expected):
    assert _score("exact_number", [completion], [reference]) == [expected]


def test_exact_number_rejects_a_non_numeric_reference():
    with pytest.raises(ValueError, match="exact_number.*position 1.*'abc'"):
        _score("exact_number", ["1", "2"], ["1", "abc"])
    # The parses are cached: a bad reference is refused every time, not only the first.
    with pytest.raises(ValueError, match="position 0.*'abc'"):
        _score("exact_number", ["2"], ["abc"])
    with pytest.raises(ValueError, match="position 0.*42"):
        _score("exact_number", ["42"], [42])


@pytest.mark.parametrize(
    ("completion", "reference", "expected"),
    [
        ("The answer is $\\boxed{72}$", "72", 1.0),
        ("The answer is $\\boxed{73}$", "72", 0.0),
        ("$\\frac{5}{2}$", "2.5", 1.0),
        ("72<|im_end|>", "72", 1.0),
        ("so the final answer is 72", "72", 1.0),
        ("#### 1,200", "1200", 1.0),
        ("I have no idea", "72", 0.0),
        ("", "72", 0.0),
        ("#### ", "72", 0.0),
    ],
)
def test_math_verify_cases(completion, reference, expected):
    assert _score("math_verify", [completion], [reference]) == [expected]


def test_math_verify_works_outside_the_main_thread():
    results = {}

    def run():
        try:
            results["scores"] = _score(
                "math_verify", ["$\\boxed{72}$", ANSWERS[0], "73"], ["72", ANSWERS[0], "72"]
            )
        except Exception as error:  # surfaced by the assertion below
            results["error"] = error

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(timeout=30)
    assert results == {"scores": [1.0, 1.0, 0.0]}


@pytest.mark.parametrize("name", ["exact_number", "math_verify"])
def test_rewards_need_aligned_ground_truth(name):
    with pytest.raises(ValueError, match="ground_truth"):
        get_reward(name)(["p"], ["1"])
    with pytest.raises(ValueError, match="1 entries for 2 completions"):
        get_reward(name)(["p", "p"], ["1", "2"], ground_truth=["1"])


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("-12", 1.0),
        ("  42\n", 1.0),
        ("1,200", 1.0),
        ("2.5<|endoftext|>", 1.0),
        ("She sold 24 in May.\n#### 72", 1.0),
        ("#### -3", 1.0),
        ("12 apples", 0.0),
        ("The answer is 72", 0.0),
        ("#### $72", 0.0),
        ("#### 72 apples", 0.0),
        ("", 0.0),
        ("12+7=19", 0.0),
    ],
)
def test_format_cases(completion, expected):
    assert _score("format", [completion], ["0"]) == [expected]


def test_format_accepts_every_real_gsm8k_answer():
    assert get_reward("format")([], ANSWERS) == [1.0] * len(ANSWERS)


def test_rewards_accept_and_ignore_unknown_columns():
    fn = get_reward("exact_number")
    scores = fn(["p"], ["7"], ground_truth=["7"], solution=["#### 8"], trainer_state=object())
    assert scores == [1.0]


def test_combine_rewards_weighted_sum():
    combined = combine_rewards({"exact_number": 1.0, "format": 0.25, "math_verify": -0.5})
    completions = ["19", "The answer is 19", "20", "\\boxed{19}"]
    scores = score_completions(combined, ["p"] * 4, completions, ground_truth=["19"] * 4)
    # exact: 1 1 0 1; format: 1 0 1 0; math_verify: 1 1 0 1
    assert scores == pytest.approx([0.75, 0.5, 0.25, 0.5])


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({}, "weights"),
        ({"length": 1.0}, "parameter 'weights'.*valid reward names: exact_number"),
        ({"format": math.nan}, r"weights\['format'\]"),
        ({"format": math.inf}, r"weights\['format'\]"),
        ({"format": "1"}, r"weights\['format'\]"),
    ],
)
def test_combine_rewards_errors(weights, message):
    with pytest.raises(ValueError, match=message):
        combine_rewards(weights)


def test_score_completions_checks_count_and_values():
    def short(prompts, completions, **columns):
        return [1.0] * (len(completions) - 1)

    def nan_at_one(prompts, completions, **columns):
        return [0.0, math.nan, 0.0]

    def not_a_list(prompts, completions, **columns):
        return None

    with pytest.raises(ValueError, match="'short' returned 2 scores for 3 completions"):
        score_completions(short, ["p"] * 3, ["a", "b", "c"])
    with pytest.raises(ValueError, match="'nan_at_one' returned nan at position 1"):
        score_completions(nan_at_one, ["p"] * 3, ["a", "b", "c"])
    with pytest.raises(ValueError, match="'not_a_list' returned NoneType"):
        score_completions(not_a_list, ["p"], ["a"])
    assert score_completions(lambda p, c: (1, 0.5), ["p", "p"], ["a", "b"]) == [1.0, 0.5]
