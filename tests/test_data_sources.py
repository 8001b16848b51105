"""Task data sources: synthetic arithmetic and GSM8K jsonl loading and validation."""

import json
from pathlib import Path

import pandas as pd
import pytest

from fgrpo_pipeline.tasks.sources import (
    ARITHMETIC_COLUMNS,
    PROMPT_COLUMNS,
    load_gsm8k,
    make_arithmetic_prompts,
    validate_prompts,
)

SAMPLE = Path(__file__).parent / "data" / "gsm8k_sample.jsonl"
SAMPLE_RECORDS = [json.loads(line) for line in SAMPLE.read_text().splitlines()]


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _record(question="How many?", answer="1 + 1 = <<1+1=2>>2\n#### 2") -> str:
    return json.dumps({"question": question, "answer": answer})


# --- arithmetic ---------------------------------------------------------------------------


def test_arithmetic_schema_ids_and_splits():
    df = make_arithmetic_prompts(n_train=12, n_test=5, seed=3)
    assert list(df.columns) == [*PROMPT_COLUMNS, "difficulty"] == list(ARITHMETIC_COLUMNS)
    assert (df["split"] == "train").sum() == 12
    assert (df["split"] == "test").sum() == 5
    assert df["id"].iloc[0] == "arith-train-00000"
    assert df["id"].iloc[12] == "arith-test-00000"
    assert df["id"].iloc[-1] == "arith-test-00004"
    validate_prompts(df, "arithmetic")


def test_arithmetic_is_deterministic_per_seed():
    first = make_arithmetic_prompts(n_train=50, n_test=20, seed=7)
    again = make_arithmetic_prompts(n_train=50, n_test=20, seed=7)
    other = make_arithmetic_prompts(n_train=50, n_test=20, seed=8)
    pd.testing.assert_frame_equal(first, again)
    assert list(first["prompt"]) != list(other["prompt"])


def test_arithmetic_train_and_test_never_share_a_prompt():
    # 3 operations x 4 x 4 operands = 48 problems: asking for all of them leaves no slack.
    df = make_arithmetic_prompts(n_train=40, n_test=8, operand_min=0, operand_max=3, seed=1)
    assert df["prompt"].is_unique
    train = set(df.loc[df["split"] == "train", "prompt"])
    test = set(df.loc[df["split"] == "test", "prompt"])
    assert not train & test
    assert len(train | test) == 48


def test_arithmetic_ground_truths_are_the_evaluated_prompts():
    df = make_arithmetic_prompts(n_train=200, n_test=50, operand_min=-5, operand_max=29, seed=0)
    for prompt, truth in zip(df["prompt"], df["ground_truth"], strict=True):
        assert prompt.endswith("=")
        assert int(truth) == eval(prompt[:-1])
        assert truth == str(int(truth))
    assert set(df["prompt"].str.extract(r"\d([+*-])")[0]) == {"+", "-", "*"}


def test_arithmetic_prompt_format_and_operation_subset():
    df = make_arithmetic_prompts(n_train=30, n_test=0, operations=("*",), seed=2)
    assert df["prompt"].str.fullmatch(r"\d{1,2}\*\d{1,2}=").all()
    assert len(df) == 30


@pytest.mark.parametrize(
    ("kwargs", "parameter"),
    [
        ({"operations": ("+", "/")}, "operation"),
        ({"operations": ()}, "operations"),
        ({"operations": ("+", "+")}, "operations"),
        ({"operand_min": 5, "operand_max": 4}, "operand_min"),
        ({"n_train": 10, "n_test": 0, "operand_max": 1, "operations": ("+",)}, "n_train + n_test"),
        ({"n_train": -1}, "n_train"),
        ({"n_test": -2}, "n_test"),
        ({"n_train": 1.5}, "n_train"),
    ],
)
def test_arithmetic_parameter_errors_name_the_parameter(kwargs, parameter):
    arguments = {"n_train": 5, "n_test": 5, **kwargs}
    with pytest.raises(ValueError, match=parameter.replace("+", r"\+")):
        make_arithmetic_prompts(**arguments)


# --- GSM8K ----------------------------------------------------------------------------------


def test_gsm8k_sample_loads_with_ids_and_ground_truths():
    df = load_gsm8k(SAMPLE, split="train")
    assert list(df.columns) == [*PROMPT_COLUMNS, "solution"]
    assert len(df) == len(SAMPLE_RECORDS) == 30
    assert df["id"].iloc[0] == "gsm8k-train-00000"
    assert df["id"].iloc[29] == "gsm8k-train-00029"
    assert set(df["split"]) == {"train"}
    for row, record in zip(df.itertuples(), SAMPLE_RECORDS, strict=True):
        assert row.solution == record["answer"]
        assert row.prompt == f"{record['question']}\nAnswer:"
        assert record["answer"].splitlines()[-1] == f"#### {row.ground_truth}"
    assert df["ground_truth"].iloc[0] == "72"
    assert df["ground_truth"].iloc[15] == "448000"
    validate_prompts(df, str(SAMPLE))


def test_gsm8k_split_limit_and_template():
    df = load_gsm8k(SAMPLE, split="test", limit=3, prompt_template="Q: {question}\nA:")
    assert list(df["id"]) == ["gsm8k-test-00000", "gsm8k-test-00001", "gsm8k-test-00002"]
    assert set(df["split"]) == {"test"}
    assert df["prompt"].iloc[1] == f"Q: {SAMPLE_RECORDS[1]['question']}\nA:"
    assert len(load_gsm8k(SAMPLE, split="test", limit=0)) == 0


def test_gsm8k_numbers_with_commas_signs_and_decimals(tmp_path):
    answers = ["so\n#### 1,200", "#### -3", "x\n####  2.5 ", "#### 109,200,000"]
    path = _write_jsonl(tmp_path / "n.jsonl", [_record(answer=answer) for answer in answers])
    df = load_gsm8k(path, split="train")
    assert list(df["ground_truth"]) == ["1200", "-3", "2.5", "109200000"]
    assert df["solution"].iloc[0] == "so\n#### 1,200"


def test_gsm8k_skips_blank_lines(tmp_path):
    path = _write_jsonl(tmp_path / "b.jsonl", ["", _record(), "   ", _record(), ""])
    assert list(load_gsm8k(path, split="train")["id"]) == ["gsm8k-train-00000", "gsm8k-train-00001"]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"question": "q", "answer": ', "invalid JSON"),
        ('["question", "answer"]', "JSON object"),
        (json.dumps({"answer": "#### 1"}), "question"),
        (json.dumps({"question": "q"}), "answer"),
        (json.dumps({"question": "  ", "answer": "#### 1"}), "question"),
        (json.dumps({"question": 7, "answer": "#### 1"}), "question"),
        (json.dumps({"question": "q", "answer": 1}), "answer"),
        (json.dumps({"question": "q", "answer": "it is 5"}), "####"),
        (json.dumps({"question": "q", "answer": "#### five"}), "####"),
        (json.dumps({"question": "q", "answer": "#### 5\nthat's it"}), "####"),
        (json.dumps({"question": "q", "answer": ""}), "####"),
    ],
)
def test_gsm8k_bad_record_errors_name_file_and_line(tmp_path, bad_line, message):
    # Line 4 is bad (after a blank line) and line 6 is bad too: the first one is reported.
    path = _write_jsonl(
        tmp_path / "bad.jsonl", [_record(), _record(), "", bad_line, _record(), "{"]
    )
    with pytest.raises(ValueError, match=message) as raised:
        load_gsm8k(path, split="train", limit=1)
    assert str(path) in str(raised.value)
    assert "line 4" in str(raised.value)


@pytest.mark.parametrize(
    ("kwargs", "parameter"),
    [
        ({"split": "validation"}, "split"),
        ({"split": "train", "limit": -1}, "limit"),
        ({"split": "train", "prompt_template": "{question} {answer}"}, "prompt_template"),
    ],
)
def test_gsm8k_parameter_errors(kwargs, parameter):
    with pytest.raises(ValueError, match=parameter):
        load_gsm8k(SAMPLE, **kwargs)


# --- validate_prompts -----------------------------------------------------------------------


def _prompts() -> pd.DataFrame:
    return make_arithmetic_prompts(n_train=3, n_test=2, seed=0)


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("prompt", "  ", "empty prompt"),
        ("prompt", None, "expected a string"),
        ("ground_truth", 19, "expected a string"),
        ("split", "valid", "is not one of"),
        ("id", "arith-train-00000", "duplicate id"),
        # the optional difficulty column: every prompt needs a stratum
        ("difficulty", None, "expected a string"),
        ("difficulty", " ", "empty difficulty"),
    ],
)
def test_validate_prompts_names_source_column_and_row(column, value, message):
    df = _prompts()
    df.loc[3, column] = value
    with pytest.raises(ValueError, match=message) as raised:
        validate_prompts(df, "my_prompts")
    assert "my_prompts" in str(raised.value)
    assert f"column {column!r}" in str(raised.value)
    assert "row 3" in str(raised.value)


def test_validate_prompts_missing_column():
    with pytest.raises(ValueError, match=r"my_prompts: missing column\(s\) \['split'\]"):
        validate_prompts(_prompts().drop(columns="split"), "my_prompts")


def test_gsm8k_from_the_hub_without_the_datasets_package_says_what_to_install():
    import importlib.util

    if importlib.util.find_spec("datasets") is not None:
        pytest.skip("the datasets package is installed here")
    with pytest.raises(ValueError, match=r"optional `datasets` package \(pip install datasets\)"):
        load_gsm8k(None, split="train", hub_name="openai/gsm8k")


def test_gsm8k_needs_a_path_or_a_hub_name():
    with pytest.raises(ValueError, match="set a jsonl path or hub_name"):
        load_gsm8k(None, split="test")
