"""Multi-process training: the trainer under ``accelerate launch`` with two CPU processes.

Both ranks must run, end with identical weights (DDP synchronised the gradients: the ranks'
own rollouts, and so their local gradients, differ), and the logged metrics must cover every
group of every step. The up-front checks (batch layout, mixed precision), gradient
checkpointing and bf16 are tested in this process.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from fgrpo_pipeline.launch import load_policy, parse_assignments, weights_sha256
from fgrpo_pipeline.rollout import repeat_each
from fgrpo_pipeline.tasks.sources import make_arithmetic_prompts
from fgrpo_pipeline.training.config import TrainerConfig
from fgrpo_pipeline.training.distributed import check_batch_layout, check_launch
from fgrpo_pipeline.training.loop import train
from fgrpo_pipeline.training.preferences import PreferenceData
from fgrpo_pipeline.training.preferences import offline_minibatch as _offline_minibatch
from tests.conftest import half_taught_policy

TRAINING = {
    "steps": 3,
    "prompts_per_step": 4,
    "group_size": 4,
    "learning_rate": 1e-2,
    "seed": 0,
    "sampling": {"max_new_tokens": 3},
    "log_completions_every": 1,
    "checkpoint_every": 3,
    "progress": False,
}
PROCESSES = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


LAUNCH_FLAGS = [
    # torchrun's launcher; without CUDA the trainer runs the processes on the CPU (gloo).
    # (--cpu --num_processes 2 would start one process: see fgrpo_pipeline.launch)
    "--multi_gpu",
    "--num_processes",
    str(PROCESSES),
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
]


def accelerate_launch(
    args: list[str], cwd: Path, launch: list[str] = LAUNCH_FLAGS, timeout: float = 240
) -> float:
    """Run ``-m fgrpo_pipeline.launch <args>`` in two CPU processes; returns the seconds."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *launch,
        "--main_process_port",
        str(free_port()),
        "-m",
        "fgrpo_pipeline.launch",
        "--threads",
        "1",
        *args,
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "KEDRO_DISABLE_TELEMETRY": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    start = time.perf_counter()
    done = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return time.perf_counter() - start


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """(folder, prompts): a half-taught tiny policy saved as save_pretrained, its prompts."""
    folder = tmp_path_factory.mktemp("inputs")
    prompts = make_arithmetic_prompts(n_train=40, n_test=0, operations=("+",), operand_max=9)
    prompts.to_parquet(folder / "prompts.parquet")
    policy = half_taught_policy(prompts)
    policy.model.save_pretrained(folder / "policy")
    policy.tokenizer.save_pretrained(folder / "policy")
    (folder / "params.yml").write_text(yaml.safe_dump({"training": TRAINING}))
    return folder, prompts


def files_run(folder: Path, out: Path, *sets: str, launch: list[str] = LAUNCH_FLAGS) -> list[dict]:
    """``launch files`` on the ``inputs`` with ``--set`` overrides, rollouts recorded; returns
    the ranks' reports."""
    seconds = accelerate_launch(
        [
            "files",
            "--policy",
            str(folder / "policy"),
            "--prompts",
            str(folder / "prompts.parquet"),
            "--params",
            str(folder / "params.yml"),
            "--output",
            str(out),
            "--record-rollouts",
            *(arg for value in sets for arg in ("--set", value)),
        ],
        cwd=out,
        launch=launch,
    )
    print(f"2-process launch: {seconds:.1f} s")
    return [json.loads((out / f"rank_{r:03d}.json").read_text()) for r in range(PROCESSES)]


@pytest.fixture(scope="module")
def two_process_run(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return out, files_run(inputs[0], out, f"resume_dir={out / 'resume'}")


def test_both_ranks_run_and_end_with_identical_weights(inputs, two_process_run):
    folder, _ = inputs
    out, ranks = two_process_run
    assert sorted(p.name for p in out.glob("rank_*.json")) == ["rank_000.json", "rank_001.json"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["num_processes"] == PROCESSES and r["steps"] == TRAINING["steps"] for r in ranks)
    rewards = [[call["rewards"] for call in r["rollouts"]] for r in ranks]
    # The ranks trained on different rollouts: apart, their updates would differ. A step
    # where they differ and one has reward spread (a non-zero f-GRPO gradient) exists.
    assert any(a != b and (np.ptp(a) > 0 or np.ptp(b) > 0) for a, b in zip(*rewards, strict=True))
    metrics = pd.read_csv(out / "metrics.csv")
    assert (metrics["grad_norm"] > 0).any()
    start = weights_sha256(load_policy(folder / "policy").model)
    assert ranks[0]["weights_sha256"] != start  # trained
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]  # synchronised
    # rank 0 alone saved the policy, and it is the ranks' weights
    assert weights_sha256(load_policy(out / "policy").model) == ranks[0]["weights_sha256"]


def test_each_rank_samples_whole_groups_of_its_share_of_the_prompts(inputs, two_process_run):
    _, prompts = inputs
    _, ranks = two_process_run
    gen = torch.Generator().manual_seed(TRAINING["seed"])  # the trainer's draws
    p, g = TRAINING["prompts_per_step"], TRAINING["group_size"]
    share = p // PROCESSES
    for step in range(TRAINING["steps"]):
        pick = torch.randint(len(prompts), (p,), generator=gen).tolist()
        for rank, report in enumerate(ranks):
            call = report["rollouts"][step]
            assert report["rollouts"][step]["step"] == step + 1
            mine = pick[rank * share : (rank + 1) * share]
            assert call["prompts"] == repeat_each(prompts["prompt"].iloc[mine].tolist(), g)
            assert len(call["rewards"]) == share * g


def test_metrics_cover_every_group_of_every_rank(two_process_run):
    out, ranks = two_process_run
    metrics = pd.read_csv(out / "metrics.csv")
    completions = pd.read_parquet(out / "completions.parquet")
    p, g = TRAINING["prompts_per_step"], TRAINING["group_size"]
    assert metrics["step"].tolist() == [1, 2, 3]
    assert (metrics["groups"] == p).all()
    for step, row in metrics.set_index("step").iterrows():
        calls = [r["rollouts"][step - 1] for r in ranks]
        every = np.array([x for c in calls for x in c["rewards"]], dtype=np.float32)
        assert len(every) == p * g
        assert row["reward_mean"] == pytest.approx(float(every.mean()), abs=1e-6)
        assert row["reward_std"] == pytest.approx(float(every.std(ddof=1)), abs=1e-5)
        table = completions[completions["step"] == step]
        # the completions table holds rank 0's groups, then rank 1's
        assert table["prompt"].tolist() == [x for c in calls for x in c["prompts"]]
        assert table["completion"].tolist() == [x for c in calls for x in c["completions"]]
        assert table["reward"].tolist() == pytest.approx(every.tolist())


def test_a_two_process_state_resumes_only_with_two_processes(inputs, two_process_run):
    folder, prompts = inputs
    out, _ = two_process_run
    # rank 0 alone wrote the resume state (one state, no staging left over)
    assert sorted(p.name for p in (out / "resume").iterdir()) == ["step_000003"]
    config = TrainerConfig.from_params(
        {k: v for k, v in TRAINING.items() if k != "progress"} | {"steps": 4}
    )
    with pytest.raises(ValueError, match="num_processes=2 there, '<unset>' here"):
        train(load_policy(folder / "policy"), prompts, config, resume_dir=out / "resume")


FSDP_CONFIG = Path(__file__).parents[1] / "conf/accelerate/fsdp2_cpu.yaml"


def launch_fsdp(folder: Path, out: Path, version: int, *sets: str) -> list[dict]:
    """The file-mode run of ``two_process_run`` (without resume) under FSDP ``version``: the
    shipped FSDP2 config, or the same with FSDP1; returns the ranks' reports."""
    config = yaml.safe_load(FSDP_CONFIG.read_text())
    config["fsdp_config"]["fsdp_version"] = version
    if version == 1:
        config["fsdp_config"] |= {"fsdp_use_orig_params": True, "fsdp_sharding_strategy": 1}
        del config["fsdp_config"]["fsdp_reshard_after_forward"]
    (out / "accelerate.yaml").write_text(yaml.safe_dump(config))
    return files_run(folder, out, *sets, launch=["--config_file", str(out / "accelerate.yaml")])


@pytest.fixture(scope="module", params=[2, 1], ids=["fsdp2", "fsdp1"])
def fsdp_run(request, inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"fsdp{request.param}")
    return out, launch_fsdp(inputs[0], out, request.param), request.param


def test_fsdp_trains_as_ddp_does_with_the_weights_sharded(inputs, fsdp_run, two_process_run):
    # Each rank holds half the weights, gradients and optimiser state; rollouts run on a full
    # copy gathered after every step. Same rollouts and (to float rounding) weights as DDP.
    out, ranks, _ = fsdp_run
    ddp_out, ddp_ranks = two_process_run
    total = sum(p.numel() for p in load_policy(inputs[0] / "policy").model.parameters())
    assert [r["local_parameters"] for r in ddp_ranks] == [total, total]
    assert all(0 < r["local_parameters"] < total for r in ranks)
    assert sum(r["local_parameters"] for r in ranks) >= total  # shards cover every weight
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    for fsdp_rank, ddp_rank in zip(ranks, ddp_ranks, strict=True):
        assert [c["completions"] for c in fsdp_rank["rollouts"]] == [
            c["completions"] for c in ddp_rank["rollouts"]
        ]
    fsdp_model, ddp_model = (load_policy(o / "policy").model for o in (out, ddp_out))
    start = load_policy(inputs[0] / "policy").model.state_dict()
    moved = False
    for key, value in fsdp_model.state_dict().items():
        torch.testing.assert_close(value, ddp_model.state_dict()[key], atol=1e-5, rtol=0)
        moved |= not torch.equal(value, start[key])
    assert moved
    fsdp_metrics, ddp_metrics = (pd.read_csv(o / "metrics.csv") for o in (out, ddp_out))
    assert fsdp_metrics["reward_mean"].tolist() == ddp_metrics["reward_mean"].tolist()
    assert fsdp_metrics["loss"].tolist() == pytest.approx(ddp_metrics["loss"].tolist(), abs=1e-6)


def test_an_fsdp_run_resumes_to_the_uninterrupted_result(inputs, fsdp_run, tmp_path):
    # the optimiser state is gathered from the shards into the resume state, and shared out
    # again on loading: stopped after step 2 and rerun, the run ends as the one that was not
    out, ranks, version = fsdp_run
    resume_dir, first, second = tmp_path / "resume", tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    sets = (f"resume_dir={resume_dir}", "checkpoint_every=1")
    launch_fsdp(inputs[0], first, version, *sets, "steps=2")
    resumed = launch_fsdp(inputs[0], second, version, *sets)
    assert [call["step"] for call in resumed[0]["rollouts"]] == [3]  # only step 3 ran
    assert [r["weights_sha256"] for r in resumed] == [r["weights_sha256"] for r in ranks]
    metrics, uninterrupted = (pd.read_csv(o / "metrics.csv") for o in (second, out))
    columns = [c for c in metrics if not c.startswith("time_") and c != "tokens_per_second"]
    pd.testing.assert_frame_equal(metrics[columns], uninterrupted[columns])


def test_fsdp_trains_a_lora_adapter_against_the_base_with_the_adapter_off(inputs, tmp_path):
    folder, _ = inputs
    lora = "lora={r: 4, alpha: 8, target_modules: [q_proj, v_proj]}"
    ranks = launch_fsdp(folder, tmp_path, 2, lora)
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    # the adapter starts as a no-op: the policy is the reference at step 1
    kl_to_ref = pd.read_csv(tmp_path / "metrics.csv")["kl_to_ref"]
    assert kl_to_ref.iloc[0] == pytest.approx(0.0, abs=1e-5) and kl_to_ref.iloc[-1] > 1e-4
    trained = load_policy(tmp_path / "policy").model.state_dict()  # saved merged
    start = load_policy(folder / "policy").model.state_dict()
    changed = {key for key in start if not torch.equal(trained[key], start[key])}
    assert changed and all(key.endswith(("q_proj.weight", "v_proj.weight")) for key in changed)


def test_the_kedro_training_pipeline_runs_in_two_processes(inputs, project_copy):
    """Rank 0 runs the Kedro session (one MLflow run, the catalog saves); rank 1 joins it."""
    import mlflow
    from mlflow.tracking import MlflowClient

    folder, prompts = inputs
    base = project_copy / "data/06_models/base_policy/2000-01-01T00.00.00.000Z/base_policy"
    policy = load_policy(folder / "policy")
    policy.model.save_pretrained(base)
    policy.tokenizer.save_pretrained(base)
    prompts.to_parquet(project_copy / "data/03_primary/prompts.parquet")
    for side, completion in (("aligned", "2"), ("unaligned", "3")):
        pd.DataFrame({"prompt": ["1+1="], "completion": [completion]}).to_parquet(
            project_copy / f"data/05_model_input/{side}.parquet"
        )
    # FDO on the offline splits: the ranks share out its minibatch and all-reduce its counts
    # (the file-mode run above trains f-GRPO)
    run = {**TRAINING, "sampling.max_new_tokens": 3, "loss": "fdo", "offline_batch_size": 2}
    overrides = ",".join(
        f"training.{key}={value}" for key, value in run.items() if key != "sampling"
    )
    # the shipped accelerate config file instead of flags
    config_file = ["--config_file", str(project_copy / "conf/accelerate/ddp_cpu.yaml")]
    accelerate_launch(["kedro", "--params", overrides], cwd=project_copy, launch=config_file)

    metrics = pd.read_parquet(project_copy / "data/07_model_output/training_metrics.parquet")
    assert metrics["step"].tolist() == [1, 2, 3]
    assert (metrics["groups"] == TRAINING["prompts_per_step"]).all()
    # one aligned "2" and one unaligned "3" sample on each rank: FDO's estimate is that of
    # the whole minibatch, and the policy learns to prefer "2"
    assert metrics["divergence_estimate"].notna().all()
    assert metrics["divergence_estimate"].iloc[-1] > metrics["divergence_estimate"].iloc[0]
    assert len(list((project_copy / "data/06_models/trained_policy").iterdir())) == 1
    assert [p.name for p in (project_copy / "data/06_models/training_checkpoints").iterdir()] == [
        "step_000003"
    ]
    uri = (project_copy / "conf/base/mlflow.yml").read_text().split("mlflow_tracking_uri: ")[1]
    client = MlflowClient(tracking_uri=uri.split()[0])
    runs = [
        run
        for experiment in client.search_experiments()
        for run in client.search_runs([experiment.experiment_id])
    ]
    assert len(runs) == 1  # rank 0's
    history = client.get_metric_history(runs[0].info.run_id, "train/groups")
    assert sorted((m.step, m.value) for m in history) == [(1, 4.0), (2, 4.0), (3, 4.0)]
    mlflow.set_tracking_uri(None)


# --------------------------------------------------------------------------- in-process checks


def test_batch_layout_must_split_into_whole_groups():
    assert check_batch_layout(4, 4, 2) == 2
    assert check_batch_layout(6, 8, 1) == 6
    message = (
        r"'prompts_per_step'=6 is not divisible by the 4 processes: each rank must hold whole "
        r"groups \(P·G = 24 completions in groups of G=4 would be 1\.5 groups, 6 completions, "
        r"per rank\); use a prompts_per_step that is a multiple of 4, e.g\. 4 or 8"
    )
    with pytest.raises(ValueError, match=message):
        check_batch_layout(6, 4, 4)
    with pytest.raises(ValueError, match="multiple of 4, e.g. 4$"):
        check_batch_layout(2, 4, 4)


def test_a_bad_layout_stops_training_before_any_work(monkeypatch, inputs):
    _, prompts = inputs
    monkeypatch.setenv("WORLD_SIZE", "3")
    config = TrainerConfig.from_params({k: v for k, v in TRAINING.items() if k != "progress"})
    with pytest.raises(ValueError, match="'prompts_per_step'=4 is not divisible by the 3"):
        train(None, prompts, config)  # the policy is not even looked at


def test_the_offline_minibatch_must_split_evenly_when_the_loss_uses_one(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    fdo = TrainerConfig.from_params({"loss": "fdo", "offline_batch_size": 5})
    with pytest.raises(ValueError, match="'offline_batch_size'=5 is not divisible by the 2"):
        fdo.check_launch()
    f_grpo = TrainerConfig.from_params({"loss": "f_grpo", "offline_batch_size": 5})
    assert f_grpo.check_launch() == 2  # no offline data: its size does not matter


def test_ranks_score_disjoint_shares_of_one_offline_minibatch(inputs):
    folder, prompts = inputs
    policy = load_policy(folder / "policy")
    data = PreferenceData(
        [f"{i}+1=" for i in range(9)],
        [str(i + 1) for i in range(9)],
        [f"{i}+2=" for i in range(9)],
        [str(i) for i in range(9)],
    )

    def draw(share):
        gen = torch.Generator().manual_seed(7)
        return _offline_minibatch(data, policy, policy.model, 6, gen, 1.0, share)

    whole = draw(slice(None))
    ranks = [draw(slice(r * 3, (r + 1) * 3)) for r in range(2)]
    for side in ("chosen_logps", "rejected_ref_logps"):
        joined = torch.cat([getattr(part, side) for part in ranks])
        torch.testing.assert_close(joined.detach(), getattr(whole, side).detach())
    assert not torch.equal(ranks[0].chosen_logps, ranks[1].chosen_logps)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only checks")
@pytest.mark.parametrize(
    ("env", "message"),
    [
        # without CUDA accelerate would quietly run DDP instead
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, "DeepSpeed config on a machine without CUDA"),
        (
            {"ACCELERATE_USE_FSDP": "true", "FSDP_SYNC_MODULE_STATES": "true"},
            "fsdp_sync_module_states: false",
        ),
    ],
)
def test_accelerate_configs_the_cpu_cannot_run_are_refused(monkeypatch, env, message):
    from fgrpo_pipeline.training.distributed import AccelerateRuntime

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        AccelerateRuntime()


def test_launch_environment_checks(monkeypatch):
    for name in ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_CPU", "MASTER_ADDR", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert check_launch(4, 4, "no") == 1
    with pytest.raises(ValueError, match="'mixed_precision' must be one of no, bf16, fp16"):
        check_launch(4, 4, "fp32")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'fp16' needs a CUDA GPU"):
            check_launch(4, 4, "fp16")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(ValueError, match="launch was given mixed precision 'bf16'.*is 'no'"):
        check_launch(4, 4, "no")
    assert check_launch(4, 4, "bf16") == 1
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # what `--cpu --num_processes 2` sets
    with pytest.warns(UserWarning, match="started ONE process"):
        check_launch(4, 4, "no")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"mixed_precision": "fp32"}, "'mixed_precision' must be one of no, bf16, fp16"),
        ({"gradient_checkpointing": "yes"}, "'gradient_checkpointing' must be true or false"),
        ({"share_prompts": 1}, "'share_prompts' must be true or false"),
    ],
)
def test_bad_distributed_parameters(overrides, message):
    with pytest.raises(ValueError, match=message):
        TrainerConfig.from_params({"steps": 1, **overrides})


def test_yaml_no_is_no_mixed_precision():
    assert TrainerConfig.from_params({"mixed_precision": False}).mixed_precision == "no"


def single_config(**overrides) -> TrainerConfig:
    params = {k: v for k, v in TRAINING.items() if k not in ("progress", "checkpoint_every")}
    return TrainerConfig.from_params({**params, "steps": 2, **overrides})


def test_gradient_checkpointing_changes_memory_not_results(inputs):
    folder, prompts = inputs
    policy = load_policy(folder / "policy")
    # bit for bit when every row is scored in full: with share_prompts, checkpointing (which
    # drops the KV cache under grad) makes the policy pass take the full path, equal only up
    # to rounding
    plain = train(policy, prompts, single_config(share_prompts=False), progress=False)
    checkpointed = train(
        policy,
        prompts,
        single_config(gradient_checkpointing=True, checkpoint_every=1, share_prompts=False),
        progress=False,
    )
    assert weights_sha256(checkpointed.policy.model) == weights_sha256(plain.policy.model)
    shared = train(policy, prompts, single_config(gradient_checkpointing=True), progress=False)
    for key, value in shared.policy.model.state_dict().items():
        torch.testing.assert_close(value, plain.policy.model.state_dict()[key], atol=1e-3, rtol=0)
    # switched on for training only: not on the input, the result or its checkpoints
    for model in (policy.model, checkpointed.policy.model, checkpointed.checkpoints[1].model):
        assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        assert getattr(model, "_require_grads_hook", None) is None


def test_bf16_autocast_trains_and_returns_a_plain_model(inputs):
    folder, prompts = inputs
    policy = load_policy(folder / "policy")
    result = train(
        policy,
        prompts,
        single_config(mixed_precision="bf16", checkpoint_every=2),
        progress=False,
    )
    assert np.isfinite(result.metrics["loss"]).all()
    assert (result.metrics["skipped_steps"] == 0).all()
    for model in (result.policy.model, result.checkpoints[2].model):
        assert "_original_forward" not in model.__dict__  # accelerate's autocast is undone
        assert "forward" not in model.__dict__
        assert next(model.parameters()).dtype == torch.float32


def test_parse_assignments():
    assert parse_assignments(["a.b=1,c=[1, 2]", "d=true", "e.f.g=x"]) == {
        "a": {"b": 1},
        "c": [1, 2],
        "d": True,
        "e": {"f": {"g": "x"}},
    }
    with pytest.raises(ValueError, match="expected key=value"):
        parse_assignments(["steps"])
