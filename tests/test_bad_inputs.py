"""The bad-input matrix: every bad table or parameter stops the run with one message naming
the file, column, row or parameter, and leaves every output file as it was."""

import shutil
from pathlib import Path

import pandas as pd
import pytest

from fgrpo_pipeline.algorithms.rewards import REWARDS
from tests.conftest import run_kedro

UPSTREAM = ("data_preparation", "base_policy", "rollout_generation", "reward_labeling")
PROMPTS = "data/03_primary/prompts.parquet"
ROLLOUTS = "data/05_model_input/rollouts.parquet"
ALIGNED = "data/05_model_input/aligned.parquet"
UNALIGNED = "data/05_model_input/unaligned.parquet"


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return {"path": tmp_path_factory.mktemp("prepared"), "ready": False}


@pytest.fixture
def prepared(project_copy: Path, template) -> Path:
    """A project whose upstream stages have run (built once per module, then copied)."""
    data = template["path"] / "data"
    if not template["ready"]:
        for name in UPSTREAM:
            run_kedro(project_copy, name)
        shutil.copytree(project_copy / "data", data)
        template["ready"] = True
    else:
        shutil.copytree(data, project_copy / "data", dirs_exist_ok=True)
    return project_copy


def snapshot(project: Path) -> dict[str, tuple[int, int]]:
    """Every file under data/ with its size and modification time (ns)."""
    return {
        str(p.relative_to(project)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in (project / "data").rglob("*")
        if p.is_file()
    }


def edit_table(project: Path, relative: str, change) -> None:
    path = project / relative
    table = pd.read_parquet(path)
    change(table).to_parquet(path, index=False)


def _rename_prompt_column(t):
    return t.rename(columns={"prompt": "question"})


def _blank_prompt(t):
    t.loc[3, "prompt"] = "   "
    return t


def _null_prompt(t):
    t["prompt"] = t["prompt"].astype(object)
    t.loc[2, "prompt"] = None
    return t


def _drop_one_rollout(t):
    return t.drop(index=5).reset_index(drop=True)


def _negative_length(t):
    t.loc[4, "length"] = -1
    return t


def _drop_ground_truth(t):
    return t.drop(columns=["ground_truth"])


def _drop_completion(t):
    return t.drop(columns=["completion"])


def _neutral_unaligned_row(t):
    # what the old rule (a ≤ 0) put in the unaligned split: a row with advantage 0
    t.loc[1, "advantage"] = 0.0
    return t


# (id, file to edit and how, pipeline, runtime params, message pattern)
MATRIX = [
    (
        "renamed column",
        (PROMPTS, _rename_prompt_column),
        "training",
        {},
        r"prompts \(.*data/03_primary/prompts.parquet\): missing column\(s\) \['prompt'\]",
    ),
    (
        "empty prompt",
        (PROMPTS, _blank_prompt),
        "rollout_generation",
        {},
        r"prompts .*column 'prompt', row 3: empty prompt",
    ),
    (
        "non-string prompt",
        (PROMPTS, _null_prompt),
        "evaluation",
        {},
        r"prompts .*column 'prompt', row 2: expected a string, got nan",
    ),
    (
        "missing rollout column",
        (ROLLOUTS, _drop_ground_truth),
        "reward_labeling",
        {},
        r"rollouts \(.*/rollouts.parquet\): missing column\(s\) \['ground_truth'\]",
    ),
    (
        "rows not whole groups",
        (ROLLOUTS, _drop_one_rollout),
        "reward_labeling",
        {},
        r"rollouts .*column 'group': groups of unequal size",
    ),
    (
        "negative length",
        (ROLLOUTS, _negative_length),
        "reward_labeling",
        {},
        r"rollouts .*column 'length', row 4: -1 is not ≥ 0",
    ),
    (
        "offline data without completions",
        (ALIGNED, _drop_completion),
        "training",
        {"training": {"loss": "fdo"}},
        r"aligned .*missing column\(s\) \['completion'\]",
    ),
    (
        "neutral row in the unaligned split",
        (UNALIGNED, _neutral_unaligned_row),
        "training",
        {},
        r"unaligned \(.*/unaligned.parquet\): column 'advantage', row 1: 0.0 is not < 0",
    ),
    (
        "G < 2",
        None,
        "training",
        {"training": {"group_size": 1}},
        r"parameters_training.yml: .*'group_size' must be ≥ 2",
    ),
    (
        "unknown divergence",
        None,
        "training",
        {"training": {"divergence": "chi2"}},
        r"parameters_training.yml: .*divergence.*'chi2'.*kl, reverse_kl",
    ),
    (
        "unknown loss",
        None,
        "training",
        {"training": {"loss": "ppo"}},
        r"parameters_training.yml: .*loss.*'ppo'.*f_grpo",
    ),
    (
        "unknown engine",
        None,
        "training",
        {"training": {"engine": "tgi"}},
        r"parameters_training.yml: .*engine.*'tgi'.*hf",
    ),
    (
        "λ outside [0, 1]",
        None,
        "training",
        {"training": {"loss": "f_hal", "lam": 1.5}},
        r"parameters_training.yml: lam \(λ\) must lie in \[0, 1\], got 1.5",
    ),
    (
        "β ≤ 0",
        None,
        "training",
        {"training": {"beta": 0.0}},
        r"parameters_training.yml: beta must be a finite number > 0, got 0.0",
    ),
    (
        "negative completion length",
        None,
        "training",
        {"training": {"sampling": {"max_new_tokens": -4}}},
        r"parameters_training.yml: max_new_tokens must be an integer >= 1, got -4",
    ),
    (
        "unknown reward",
        None,
        "reward_labeling",
        {"reward_labeling": {"rewards": {"bleu": 1.0}}},
        r"unknown reward 'bleu'.*exact_number",
    ),
    (
        "resume without checkpoints",
        None,
        "training",
        {"training": {"resume_dir": "data/06_models/resume", "checkpoint_every": 0}},
        r"parameters_training.yml: .*'resume_dir' needs 'checkpoint_every' ≥ 1",
    ),
]


@pytest.mark.parametrize(
    ("edit", "pipeline", "params", "message"),
    [case[1:] for case in MATRIX],
    ids=[case[0] for case in MATRIX],
)
def test_bad_input_stops_the_run_and_changes_no_file(prepared, edit, pipeline, params, message):
    if edit is not None:
        edit_table(prepared, *edit)
    before = snapshot(prepared)
    with pytest.raises(ValueError, match=message):
        run_kedro(prepared, pipeline, params)
    assert snapshot(prepared) == before


def test_a_missing_input_names_the_pipeline_that_writes_it(prepared):
    (prepared / ROLLOUTS).unlink()
    before = snapshot(prepared)
    with pytest.raises(ValueError, match=r"rollouts .*no saved data.*\(rollout_generation\)"):
        run_kedro(prepared, "reward_labeling")
    assert snapshot(prepared) == before


@pytest.fixture
def bad_rewards():
    """Rewards a user might register: one returns NaN, one the wrong number of scores."""
    REWARDS.register("nan_reward")(
        lambda prompts, completions, **c: [float("nan")] * len(completions)
    )
    REWARDS.register("short_reward")(lambda prompts, completions, **c: [1.0])
    yield
    for name in ("nan_reward", "short_reward"):
        del REWARDS._entries[name]


@pytest.mark.parametrize(
    ("reward", "message"),
    [
        ("nan_reward", r"reward 'nan_reward' returned nan at position 0; expected a finite"),
        ("short_reward", r"reward 'short_reward' returned 1 scores for \d+ completions"),
    ],
)
def test_a_bad_reward_function_stops_labeling_and_writes_nothing(
    prepared, bad_rewards, reward, message
):
    before = snapshot(prepared)
    with pytest.raises(ValueError, match=message):
        run_kedro(prepared, "reward_labeling", {"reward_labeling": {"rewards": {reward: 1.0}}})
    assert snapshot(prepared) == before


def test_a_resume_state_from_a_different_model_is_refused(prepared):
    resume = {"resume_dir": "data/06_models/resume", "checkpoint_every": 2, "steps": 2}
    run_kedro(prepared, "training", {"training": resume})
    wider = {"base_policy": {"model": {"hidden_size": 48}}}
    run_kedro(prepared, "base_policy", wider)
    before = snapshot(prepared)
    with pytest.raises(ValueError, match=r"is from a different model: .*\[.*48\]"):
        run_kedro(prepared, "training", {"training": resume, **wider})
    assert snapshot(prepared) == before
