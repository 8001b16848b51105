"""Checkpoint and resume: a run killed mid-way and rerun ends as the uninterrupted run does."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from fgrpo_pipeline.datasets import PolicyDataset
from fgrpo_pipeline.models.policy import build_char_tokenizer, build_tiny_policy
from fgrpo_pipeline.tasks.sources import make_arithmetic_prompts
from fgrpo_pipeline.training.config import TrainerConfig
from fgrpo_pipeline.training.loop import train
from tests.conftest import half_taught_policy

ROOT = Path(__file__).resolve().parents[1]
TIMING = ["time_generation", "time_scoring", "time_update", "time_step", "tokens_per_second"]
STATE_FILES = {
    "model.pt",
    "optimizer.pt",
    "trainer_state.pt",
    "metrics.json",
    "completions.json",
    "fingerprint.json",
}
PARAMS = {
    "steps": 12,
    "prompts_per_step": 4,
    "group_size": 4,
    "learning_rate": 1e-3,
    "seed": 3,
    "checkpoint_every": 4,
    "log_completions_every": 3,
    "sampling": {"max_new_tokens": 3},
}


def config(**overrides) -> TrainerConfig:
    return TrainerConfig.from_params({**PARAMS, **overrides})


class RunningMean:
    """A stateful monitor with the state_dict protocol: the mean reward of the steps so far."""

    def __init__(self) -> None:
        self.total, self.count = 0.0, 0

    def __call__(self, row):
        self.total += row["reward_mean"]
        self.count += 1
        return {"reward_running_mean": self.total / self.count}

    def state_dict(self):
        return {"total": self.total, "count": self.count}

    def load_state_dict(self, state) -> None:
        self.total, self.count = state["total"], state["count"]


class Interrupt(Exception):
    pass


def interrupt_at(at: int):
    def on_step(step, row):
        if step == at:
            raise Interrupt

    return on_step


# The child trains like `uninterrupted` below and SIGKILLs itself in step 7, after the state
# of step 4 was written.
CHILD = """
import os, signal, sys
sys.path.insert(0, {root!r})
import pandas as pd, torch
torch.set_num_threads(1)
from fgrpo_pipeline.datasets import PolicyDataset
from fgrpo_pipeline.training.config import TrainerConfig
from fgrpo_pipeline.training.loop import train
from tests.test_resume import PARAMS, RunningMean

def on_step(step, row):
    if step == 7:
        os.kill(os.getpid(), signal.SIGKILL)

train(
    PolicyDataset(filepath={policy!r}).load(),
    pd.read_pickle({prompts!r}),
    TrainerConfig.from_params(PARAMS),
    progress=False,
    monitors=[RunningMean()],
    on_step=on_step,
    resume_dir={resume!r},
)
sys.exit("the child was not killed")
"""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """(folder, policy, prompts): the policy as the child loads it, from disk."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("inputs")
    prompts = make_arithmetic_prompts(n_train=40, n_test=0, operations=("+",), operand_max=9)
    prompts.to_pickle(folder / "prompts.pkl")
    PolicyDataset(filepath=str(folder / "policy")).save(half_taught_policy(prompts))
    yield folder, PolicyDataset(filepath=str(folder / "policy")).load(), prompts
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def uninterrupted(inputs):
    _, policy, prompts = inputs
    return train(policy, prompts, config(), progress=False, monitors=[RunningMean()])


def assert_same_run(result, expected) -> None:
    pd.testing.assert_frame_equal(
        result.metrics.drop(columns=TIMING), expected.metrics.drop(columns=TIMING)
    )
    pd.testing.assert_frame_equal(result.completions, expected.completions)
    for a, b in zip(
        result.policy.model.state_dict().values(),
        expected.policy.model.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b)
    for step in set(result.checkpoints) & set(expected.checkpoints):
        for a, b in zip(
            result.checkpoints[step].model.parameters(),
            expected.checkpoints[step].model.parameters(),
            strict=True,
        ):
            assert torch.equal(a, b)


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_killed_run_resumes_to_the_uninterrupted_result(inputs, uninterrupted, tmp_path):
    folder, policy, prompts = inputs
    resume = tmp_path / "resume"
    script = tmp_path / "child.py"
    script.write_text(
        CHILD.format(
            root=str(ROOT),
            policy=str(folder / "policy"),
            prompts=str(folder / "prompts.pkl"),
            resume=str(resume),
        )
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FGRPO_TEST_THREADS": "1"}
    child = subprocess.run(
        [sys.executable, str(script)],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    assert listing(resume) == ["step_000004"]
    assert set(listing(resume / "step_000004")) == STATE_FILES

    seen = []
    resumed = train(
        policy,
        prompts,
        config(),
        progress=False,
        monitors=[RunningMean()],
        on_step=lambda step, row: seen.append(step),
        resume_dir=resume,
    )
    assert resumed.resumed_from_step == 4
    assert seen == list(range(5, 13))
    assert sorted(resumed.checkpoints) == [4, 8, 12]
    assert "reward_running_mean" in resumed.metrics
    assert_same_run(resumed, uninterrupted)
    assert listing(resume) == ["step_000012"]


def test_interrupted_and_extended_runs_resume_exactly(inputs, uninterrupted, tmp_path):
    _, policy, prompts = inputs
    resume = tmp_path / "resume"
    kwargs = {"progress": False, "resume_dir": resume}
    # A finished 6-step run (last state at step 4) extended to 12 steps, interrupted in step 10.
    short = train(policy, prompts, config(steps=6), monitors=[RunningMean()], **kwargs)
    assert short.resumed_from_step == 0
    with pytest.raises(Interrupt):
        train(
            policy,
            prompts,
            config(),
            monitors=[RunningMean()],
            on_step=interrupt_at(10),
            **kwargs,
        )
    assert listing(resume) == ["step_000008"]
    # checkpoint_every and num_threads may change too: neither alters a step
    resumed = train(policy, prompts, config(checkpoint_every=6), monitors=[RunningMean()], **kwargs)
    assert resumed.resumed_from_step == 8
    assert sorted(resumed.checkpoints) == [12]
    assert_same_run(resumed, uninterrupted)


def test_writing_keeps_only_the_latest_state_and_no_staging(inputs, tmp_path):
    _, policy, prompts = inputs
    resume = tmp_path / "resume"
    stale = resume / ".tmp-step_000002-0123abcd"  # what a write killed half-way leaves
    stale.mkdir(parents=True)
    (stale / "model.pt").write_bytes(b"half")
    listings = {}
    result = train(
        policy,
        prompts,
        config(steps=7, checkpoint_every=2),
        progress=False,
        on_step=lambda step, row: listings.setdefault(step, listing(resume)),
        resume_dir=resume,
    )
    assert result.resumed_from_step == 0  # the stale staging dir is no state
    assert listings == {
        1: [],
        2: [],
        3: ["step_000002"],
        4: ["step_000002"],
        5: ["step_000004"],
        6: ["step_000004"],
        7: ["step_000006"],
    }
    assert listing(resume) == ["step_000006"]
    assert set(listing(resume / "step_000006")) == STATE_FILES


def test_a_failed_write_keeps_the_previous_state(inputs, tmp_path, monkeypatch):
    _, policy, prompts = inputs
    resume = tmp_path / "resume"
    save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        if Path(f).name == "optimizer.pt" and Path(f).parent.name.startswith(".tmp-step_000004"):
            raise OSError("disk full")
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        train(
            policy, prompts, config(steps=4, checkpoint_every=2), progress=False, resume_dir=resume
        )
    assert listing(resume) == ["step_000002"]
    monkeypatch.setattr(torch, "save", save)
    result = train(
        policy, prompts, config(steps=4, checkpoint_every=2), progress=False, resume_dir=resume
    )
    assert result.resumed_from_step == 2
    assert listing(resume) == ["step_000004"]


@pytest.fixture(scope="module")
def saved_state(inputs, tmp_path_factory):
    """A resume state at step 4 of the 4-step run of ``inputs``."""
    _, policy, prompts = inputs
    resume = tmp_path_factory.mktemp("state")
    train(policy, prompts, config(steps=4), progress=False, resume_dir=resume)
    assert listing(resume) == ["step_000004"]
    return resume


def _other_model(policy):
    return build_tiny_policy(build_char_tokenizer(), hidden_size=16, intermediate_size=64)


def _other_weights(policy):
    other = build_tiny_policy(build_char_tokenizer(), hidden_size=32, intermediate_size=64)
    other.model.load_state_dict(policy.model.state_dict())
    with torch.no_grad():
        next(other.model.parameters())[0, 0] += 1e-3
    return other


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"policy": _other_model},
            r"is from a different model: .*embed_tokens\.weight is \[\d+, 32\] float32 there, "
            r"\[\d+, 16\] float32 here",
        ),
        ({"policy": _other_weights}, "is from a different starting policy"),
        (
            {"config": {"learning_rate": 2e-3}},
            "is from a different training config: learning_rate=0.001 there, 0.002 here",
        ),
        (
            {"config": {"sampling": {"max_new_tokens": 4}}},
            "different training config: sampling.max_new_tokens=3 there, 4 here",
        ),
        ({"prompts": lambda p: p.iloc[:20]}, "is from different training prompts"),
        ({"monitors": [RunningMean()]}, "is from different monitors"),
    ],
)
def test_a_state_of_another_run_is_refused(inputs, saved_state, change, message):
    _, policy, prompts = inputs
    before = {p.name: p.stat().st_mtime_ns for p in (saved_state / "step_000004").iterdir()}
    with pytest.raises(ValueError, match=message):
        train(
            change.get("policy", lambda p: p)(policy),
            change.get("prompts", lambda p: p)(prompts),
            config(steps=4, **change.get("config", {})),
            progress=False,
            monitors=change.get("monitors", ()),
            resume_dir=saved_state,
        )
    assert {p.name: p.stat().st_mtime_ns for p in (saved_state / "step_000004").iterdir()} == (
        before
    )


def test_resume_misuse_is_refused(inputs, saved_state, tmp_path):
    _, policy, prompts = inputs
    with pytest.raises(ValueError, match="resume_dir needs training parameter 'checkpoint_every'"):
        train(policy, prompts, config(checkpoint_every=0), progress=False, resume_dir=tmp_path)
    with pytest.raises(ValueError, match="is at step 4, past this run's steps=2"):
        train(policy, prompts, config(steps=2), progress=False, resume_dir=saved_state)


def test_a_finished_run_is_returned_and_plain_monitors_warn(inputs, tmp_path):
    _, policy, prompts = inputs
    resume = tmp_path / "resume"

    def plain(row):
        return {"doubled": 2 * row["reward_mean"]}

    first = train(
        policy, prompts, config(steps=4), progress=False, monitors=[plain], resume_dir=resume
    )
    with pytest.warns(UserWarning, match="has no state_dict/load_state_dict"):
        again = train(
            policy, prompts, config(steps=4), progress=False, monitors=[plain], resume_dir=resume
        )
    assert again.resumed_from_step == 4
    assert sorted(again.checkpoints) == [4]
    pd.testing.assert_frame_equal(again.metrics, first.metrics)  # restored, timings included
    assert_same_run(again, first)
