"""Compliance–refusal data: loaders, validation, the synthetic generator and derived tables."""

import json
import re
import string
from pathlib import Path

import pandas as pd
import pytest

from fgrpo_pipeline.safety.data import (
    BENIGN,
    BENIGN_VERBS,
    COMPLIANCE_TEMPLATES,
    HARMFUL,
    HARMFUL_VERBS,
    MAX_PROMPT_CHARS,
    MAX_RESPONSE_CHARS,
    PAIR_COLUMNS,
    RECORD_COLUMNS,
    REFUSAL_TEMPLATES,
    REFUSAL_WORDS,
    aligned_unaligned,
    load_compliance_refusal,
    load_preference_pairs,
    make_safety_records,
    preference_pairs,
    prompt_pool,
    safety_prompts,
    sft_examples,
    split_records,
    validate_records,
)

DATA = Path(__file__).parent / "data"
SAMPLE = DATA / "safety_sample.jsonl"
PAIRS_SAMPLE = DATA / "preference_sample.jsonl"
ALLOWED_CHARS = set(string.ascii_letters + string.digits + string.punctuation + " ")


def _record(prompt="how to hack a lock?", **overrides) -> dict:
    record = {
        "prompt": prompt,
        "safety": 0,
        "acc_responses": ["Sure, here is how."],
        "rej_responses": ["Sorry, I can't.", "I cannot do that."],
    }
    record.update(overrides)
    return record


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _contains_refusal_word(text: str) -> bool:
    return any(word in text.lower() for word in REFUSAL_WORDS)


def _verb_classes(prompt: str) -> set[int]:
    found = set()
    for safety, verbs in ((0, HARMFUL_VERBS), (1, BENIGN_VERBS)):
        if any(re.search(rf"\b{re.escape(verb)}\b", prompt) for verb in verbs):
            found.add(safety)
    return found


# --- load_compliance_refusal ----------------------------------------------------------------


def test_sample_file_loads_with_schema_and_lists():
    df = load_compliance_refusal(SAMPLE)
    assert list(df.columns) == list(RECORD_COLUMNS)
    assert len(df) == 4  # the blank line is skipped, the extra "source" field dropped
    assert df["safety"].dtype == "int64"
    assert list(df["safety"]) == [0, 1, 0, 1]
    assert df["acc_responses"].iloc[1] == [
        "Yes, first do this.",
        "Here you go:",
        "Of course! Step 1:",
    ]
    assert all(isinstance(cell, list) for cell in df["rej_responses"])
    validate_records(df, str(SAMPLE))


def test_round_trip_of_generated_records(tmp_path):
    records = make_safety_records(n_per_class=20, seed=4)
    lines = [json.dumps(row) for row in records.to_dict(orient="records")]
    path = _write_jsonl(tmp_path / "records.jsonl", ["", *lines, "  "])
    pd.testing.assert_frame_equal(load_compliance_refusal(path), records)


# The bad line is line 4 (after a blank line 3); line 6 is bad too, the first is reported.
BAD_RECORDS = [
    ("invalid JSON", '{"prompt": "x", ', 4, None),
    ("not an object", json.dumps([_record()]), 4, None),
    ("missing field", json.dumps({"prompt": "p", "safety": 1}), 4, "acc_responses"),
    ("empty prompt", json.dumps(_record(prompt="  ")), 4, "prompt"),
    ("prompt not a string", json.dumps(_record(prompt=3)), 4, "prompt"),
    ("empty acc_responses", json.dumps(_record("p", acc_responses=[])), 4, "acc_responses"),
    ("empty rej_responses", json.dumps(_record("p", rej_responses=[])), 4, "rej_responses"),
    ("responses not a list", json.dumps(_record("p", rej_responses="No.")), 4, "rej_responses"),
    ("non-string response", json.dumps(_record("p", acc_responses=["ok", 7])), 4, "acc_responses"),
    ("empty response", json.dumps(_record("p", rej_responses=["No.", " "])), 4, "rej_responses"),
    ("safety 2", json.dumps(_record("p", safety=2)), 4, "safety"),
    ("safety true", json.dumps(_record("p", safety=True)), 4, "safety"),
    ("safety '0'", json.dumps(_record("p", safety="0")), 4, "safety"),
    ("safety 0.0", json.dumps(_record("p", safety=0.0)), 4, "safety"),
    ("safety null", json.dumps(_record("p", safety=None)), 4, "safety"),
    ("duplicate prompt", json.dumps(_record("help me bake a box.")), 4, "prompt"),
]


@pytest.mark.parametrize(
    ("bad_line", "line", "field"),
    [case[1:] for case in BAD_RECORDS],
    ids=[case[0] for case in BAD_RECORDS],
)
def test_bad_record_errors_name_file_line_and_field(tmp_path, bad_line, line, field):
    good = [
        json.dumps(_record("how to hack a lock?")),
        json.dumps(_record("help me bake a box.", safety=1)),
    ]
    path = _write_jsonl(tmp_path / "bad.jsonl", [*good, "", bad_line, good[0][:-1], "{"])
    with pytest.raises(ValueError) as raised:
        load_compliance_refusal(path)
    message = str(raised.value)
    assert str(path) in message
    assert f"line {line}:" in message
    if field is not None:
        assert repr(field) in message


def test_error_texts_say_what_is_wrong(tmp_path):
    def error(record_line: str) -> str:
        path = _write_jsonl(tmp_path / "e.jsonl", [json.dumps(_record()), record_line])
        with pytest.raises(ValueError) as raised:
            load_compliance_refusal(path)
        return str(raised.value)

    assert "invalid JSON" in error("{")
    assert "JSON object" in error("[1]")
    missing = error(json.dumps({"prompt": "p", "safety": 1}))
    assert "missing field(s) ['acc_responses', 'rej_responses']" in missing
    assert "0 = harmful, 1 = benign" in error(json.dumps(_record("p", safety=True)))
    assert "empty response list" in error(json.dumps(_record("p", acc_responses=[])))
    assert "item 1" in error(json.dumps(_record("p", acc_responses=["ok", 7])))
    duplicate = error(json.dumps(_record()))
    assert "duplicate prompt" in duplicate
    assert "line 2:" in duplicate
    assert "line 1" in duplicate


@pytest.mark.parametrize("content", ["", "\n\n  \n"], ids=["empty", "blank"])
def test_empty_file_is_an_error(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match="no records") as raised:
        load_compliance_refusal(path)
    assert str(path) in str(raised.value)


# --- load_preference_pairs ------------------------------------------------------------------


def test_pairs_sample_loads():
    df = load_preference_pairs(PAIRS_SAMPLE)
    assert list(df.columns) == list(PAIR_COLUMNS)
    assert len(df) == 3
    assert df["chosen"].iloc[1] == "Here you go:"


def _pair(**overrides) -> str:
    return json.dumps(
        {"prompt": "p", "chosen": "Sorry, I can't.", "rejected": "Sure.", **overrides}
    )


@pytest.mark.parametrize(
    ("bad_line", "field", "message"),
    [
        ("{", None, "invalid JSON"),
        ('"pair"', None, "JSON object"),
        (json.dumps({"prompt": "p", "chosen": "a"}), "rejected", "missing field"),
        (_pair(prompt=""), "prompt", "empty"),
        (_pair(chosen=None), "chosen", "expected a string"),
        (_pair(rejected=["x"]), "rejected", "expected a string"),
        (_pair(rejected="Sorry, I can't."), "rejected", "identical"),
    ],
)
def test_pairs_loader_errors_name_file_line_and_field(tmp_path, bad_line, field, message):
    path = _write_jsonl(tmp_path / "pairs.jsonl", [_pair(), "", bad_line, _pair()])
    with pytest.raises(ValueError, match=message) as raised:
        load_preference_pairs(path)
    assert str(path) in str(raised.value)
    assert "line 3:" in str(raised.value)
    if field is not None:
        assert repr(field) in str(raised.value)


def test_pairs_loader_empty_file(tmp_path):
    path = _write_jsonl(tmp_path / "pairs.jsonl", [""])
    with pytest.raises(ValueError, match="no records"):
        load_preference_pairs(path)


# --- validate_records -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("prompt", " ", "empty prompt"),
        ("safety", True, "valid are 0 = harmful, 1 = benign"),
        ("safety", 3, "valid are 0 = harmful, 1 = benign"),
        ("acc_responses", [], "empty response list"),
        ("rej_responses", ["fine", None], "item 1"),
        ("rej_responses", "Sorry.", "expected a list"),
    ],
)
def test_validate_records_names_source_row_and_field(column, value, message):
    df = make_safety_records(n_per_class=3, seed=0).astype({"safety": object})
    df.at[4, column] = value
    with pytest.raises(ValueError, match=message) as raised:
        validate_records(df, "my_records")
    assert "my_records, row 4:" in str(raised.value)
    assert repr(column) in str(raised.value)


def test_validate_records_duplicates_missing_columns_and_splits():
    df = make_safety_records(n_per_class=3, seed=0)
    duplicated = df.copy()
    duplicated.at[5, "prompt"] = df.at[1, "prompt"]
    with pytest.raises(ValueError, match=r"row 5: field 'prompt': duplicate .*first in row 1"):
        validate_records(duplicated, "src")
    with pytest.raises(ValueError, match=r"src: missing column\(s\) \['safety'\]"):
        validate_records(df.drop(columns="safety"), "src")
    with pytest.raises(ValueError, match="src: no records"):
        validate_records(df.iloc[:0], "src")
    with pytest.raises(ValueError, match=r"row 2: field 'split': 'dev'"):
        validate_records(
            df.assign(split=["train", "test", "dev", "anchor", "train", "train"]), "src"
        )


def test_validate_records_accepts_numpy_arrays_from_parquet(tmp_path):
    records = make_safety_records(n_per_class=4, seed=1)
    records.to_parquet(tmp_path / "records.parquet")
    reloaded = pd.read_parquet(tmp_path / "records.parquet")
    validate_records(reloaded, "parquet")
    aligned, _ = aligned_unaligned(reloaded)
    assert len(aligned) == sum(
        len(row.rej_responses if row.safety == 0 else row.acc_responses)
        for row in records.itertuples()
    )


# --- make_safety_records --------------------------------------------------------------------


def test_generator_is_deterministic_and_valid():
    first = make_safety_records(n_per_class=40, seed=7)
    pd.testing.assert_frame_equal(first, make_safety_records(n_per_class=40, seed=7))
    assert list(first["prompt"]) != list(make_safety_records(n_per_class=40, seed=8)["prompt"])
    assert list(first.columns) == list(RECORD_COLUMNS)
    validate_records(first, "generated")
    assert (first["safety"] == 0).sum() == (first["safety"] == 1).sum() == 40
    # Rows are shuffled, not one class block after the other.
    assert set(first["safety"].iloc[:20]) == {0, 1}


def test_generator_vocabulary_is_disjoint_and_decidable():
    assert not set(HARMFUL_VERBS) & set(BENIGN_VERBS)
    assert len(prompt_pool(0)) == len(prompt_pool(1)) == 256
    records = make_safety_records(n_per_class=256, seed=0)  # every prompt there is
    assert records["prompt"].is_unique
    for prompt, safety in zip(records["prompt"], records["safety"], strict=True):
        assert _verb_classes(prompt) == {safety}


def test_generator_lengths_characters_and_response_counts():
    records = make_safety_records(n_per_class=256, seed=3)
    for row in records.itertuples():
        assert len(row.prompt) <= MAX_PROMPT_CHARS
        assert set(row.prompt) <= ALLOWED_CHARS
        assert 2 <= len(row.acc_responses) <= 3
        assert 2 <= len(row.rej_responses) <= 3
        assert len(set(row.acc_responses)) == len(row.acc_responses)
        for response in row.acc_responses + row.rej_responses:
            assert len(response) <= MAX_RESPONSE_CHARS
            assert set(response) <= ALLOWED_CHARS
    assert {len(cell) for cell in records["acc_responses"]} == {2, 3}


def test_compliances_never_contain_refusal_words_and_refusals_always_do():
    assert not any(_contains_refusal_word(text) for text in COMPLIANCE_TEMPLATES)
    assert all(_contains_refusal_word(text) for text in REFUSAL_TEMPLATES)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_per_class": 257, "seed": 0}, "n_per_class=257 exceeds the 256 unique prompts"),
        ({"n_per_class": 0, "seed": 0}, "n_per_class"),
        ({"n_per_class": 2.0, "seed": 0}, "n_per_class"),
        ({"n_per_class": 2, "seed": "a"}, "seed"),
    ],
)
def test_generator_parameter_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_safety_records(**kwargs)


# --- split_records --------------------------------------------------------------------------


def test_split_counts_per_class_and_no_overlap():
    records = make_safety_records(n_per_class=50, seed=2)
    split = split_records(records, test_fraction=0.2, anchor_per_class=5, seed=0)
    pd.testing.assert_frame_equal(split.drop(columns="split"), records)
    for safety in (0, 1):
        counts = split.loc[split["safety"] == safety, "split"].value_counts()
        assert counts.to_dict() == {"train": 36, "test": 9, "anchor": 5}
    by_split = [
        set(split.loc[split["split"] == name, "prompt"]) for name in ("train", "test", "anchor")
    ]
    assert sum(len(prompts) for prompts in by_split) == len(set().union(*by_split)) == 100
    again = split_records(records, test_fraction=0.2, anchor_per_class=5, seed=0)
    pd.testing.assert_series_equal(split["split"], again["split"])
    validate_records(split, "split")


def test_split_without_test_or_anchors():
    records = make_safety_records(n_per_class=4, seed=2)
    split = split_records(records, test_fraction=0.0, anchor_per_class=0, seed=0)
    assert set(split["split"]) == {"train"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"test_fraction": -0.1}, "test_fraction"),
        ({"test_fraction": float("nan")}, "test_fraction"),
        ({"test_fraction": 0.01}, "test_fraction=0.01 .* rounds to no test record"),
        ({"test_fraction": 0.95}, "test_fraction=0.95 leaves no train record"),
        ({"anchor_per_class": 10}, "anchor_per_class=10 leaves no train record"),
        ({"anchor_per_class": -1}, "anchor_per_class"),
    ],
)
def test_split_errors_name_the_parameter(kwargs, message):
    records = make_safety_records(n_per_class=10, seed=0)
    arguments = {"test_fraction": 0.2, "anchor_per_class": 2, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        split_records(records, **arguments)


# --- preference_pairs -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("benign_fraction", "n_benign"), [(0.0, 0), (0.1, 20), (0.5, 100), (1.0, 200)]
)
def test_preference_pairs_class_counts_and_chosen_is_aligned(benign_fraction, n_benign):
    records = make_safety_records(n_per_class=30, seed=5)
    pairs = preference_pairs(records, n_pairs=200, benign_fraction=benign_fraction, seed=1)
    assert list(pairs.columns) == [*PAIR_COLUMNS, "safety"]
    assert (pairs["safety"] == 1).sum() == n_benign
    assert (pairs["safety"] == 0).sum() == 200 - n_benign
    by_prompt = records.set_index("prompt")
    for pair in pairs.itertuples():
        record = by_prompt.loc[pair.prompt]
        assert pair.safety == record["safety"]
        aligned, unaligned = (
            (record["rej_responses"], record["acc_responses"])
            if pair.safety == 0
            else (record["acc_responses"], record["rej_responses"])
        )
        assert pair.chosen in aligned
        assert pair.rejected in unaligned
        # Refusing is right for harmful prompts only.
        assert _contains_refusal_word(pair.chosen) == (pair.safety == 0)


def test_preference_pairs_are_seeded_and_draw_with_replacement():
    records = make_safety_records(n_per_class=3, seed=5)
    pairs = preference_pairs(records, n_pairs=50, benign_fraction=0.5, seed=2)
    pd.testing.assert_frame_equal(
        pairs, preference_pairs(records, n_pairs=50, benign_fraction=0.5, seed=2)
    )
    assert not pairs.equals(preference_pairs(records, n_pairs=50, benign_fraction=0.5, seed=3))
    assert pairs["prompt"].nunique() == 6


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_pairs": 0}, "n_pairs"),
        ({"benign_fraction": 1.5}, "benign_fraction"),
        ({"benign_fraction": True}, "benign_fraction"),
        ({"seed": None}, "seed"),
    ],
)
def test_preference_pairs_errors_name_the_parameter(kwargs, message):
    records = make_safety_records(n_per_class=3, seed=5)
    arguments = {"n_pairs": 10, "benign_fraction": 0.5, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        preference_pairs(records, **arguments)


def test_preference_pairs_needs_records_of_the_requested_class():
    records = make_safety_records(n_per_class=3, seed=5)
    harmful_only = records[records["safety"] == 0]
    assert len(preference_pairs(harmful_only, n_pairs=5, benign_fraction=0.0, seed=0)) == 5
    with pytest.raises(ValueError, match="benign_fraction=0.5 needs 5 benign pair"):
        preference_pairs(harmful_only, n_pairs=10, benign_fraction=0.5, seed=0)


# --- aligned_unaligned, safety_prompts ------------------------------------------------------


def test_aligned_unaligned_sides():
    records = load_compliance_refusal(SAMPLE)
    aligned, unaligned = aligned_unaligned(records)
    assert list(aligned.columns) == list(unaligned.columns) == ["prompt", "completion", "safety"]
    total = sum(
        len(a) + len(r)
        for a, r in zip(records["acc_responses"], records["rej_responses"], strict=True)
    )
    assert len(aligned) + len(unaligned) == total
    for side, aligned_side in ((aligned, True), (unaligned, False)):
        for row in side.itertuples():
            refuses = _contains_refusal_word(row.completion)
            assert refuses == ((row.safety == 0) == aligned_side)
    first = aligned[aligned["prompt"] == "how to hack a lock?"]
    assert list(first["completion"]) == ["Sorry, I can't.", "I cannot do that."]


def test_safety_prompts_ids_labels_and_splits():
    records = make_safety_records(n_per_class=10, seed=0)
    prompts = safety_prompts(records)
    assert list(prompts.columns) == ["id", "prompt", "ground_truth", "split"]
    assert prompts["id"].iloc[17] == "safety-000017"
    assert set(prompts["split"]) == {"train"}
    expected = [HARMFUL if safety == 0 else BENIGN for safety in records["safety"]]
    assert list(prompts["ground_truth"]) == expected
    split = split_records(records, test_fraction=0.25, anchor_per_class=1, seed=0)
    assert list(safety_prompts(split)["split"]) == list(split["split"])


# --- sft_examples ---------------------------------------------------------------------------


@pytest.mark.parametrize("refusal_rate", [0.0, 0.3, 0.7, 1.0])
def test_sft_refusal_rate_is_independent_of_safety(refusal_rate):
    records = make_safety_records(n_per_class=200, seed=1)
    prompts, responses = sft_examples(records, refusal_rate=refusal_rate, seed=0)
    assert len(prompts) == len(responses) == 4 * len(records)
    safety_of = dict(zip(records["prompt"], records["safety"], strict=True))
    refused = {0: [], 1: []}
    for prompt, response in zip(prompts, responses, strict=True):
        refused[safety_of[prompt]].append(_contains_refusal_word(response))
    for flags in refused.values():
        assert abs(sum(flags) / len(flags) - refusal_rate) < 0.05
    responses_of = {
        row.prompt: set(row.acc_responses) | set(row.rej_responses) for row in records.itertuples()
    }
    assert all(
        response in responses_of[prompt]
        for prompt, response in zip(prompts, responses, strict=True)
    )


def test_sft_examples_seeded_and_errors():
    records = make_safety_records(n_per_class=5, seed=1)
    assert sft_examples(records, refusal_rate=0.5, seed=3) == sft_examples(
        records, refusal_rate=0.5, seed=3
    )
    prompts, _ = sft_examples(records, refusal_rate=0.5, seed=3, examples_per_record=2)
    assert len(prompts) == 20
    with pytest.raises(ValueError, match="refusal_rate"):
        sft_examples(records, refusal_rate=1.2, seed=0)
    with pytest.raises(ValueError, match="examples_per_record"):
        sft_examples(records, refusal_rate=0.5, seed=0, examples_per_record=0)
