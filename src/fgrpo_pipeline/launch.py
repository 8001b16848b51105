"""Entry point of multi-process training: ``accelerate launch ... -m fgrpo_pipeline.launch``.

Every process (rank) runs this module with the same arguments; :func:`trainer.train` shards
each step's prompts across them (see :mod:`fgrpo_pipeline.training.distributed`). Two modes:

``files``: the policy, prompts and parameters from files, no Kedro::

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
        --dynamo_backend no -m fgrpo_pipeline.launch files \\
        --policy data/06_models/base_policy/<version>/base_policy \\
        --prompts data/03_primary/prompts.parquet \\
        --params my_training.yml --set steps=100 --output data/06_models/ddp_run

  ``--params`` is a YAML / JSON file of the ``training`` parameters (flat, as in
  parameters_training.yml, or under a ``training`` key; plain values, no ``${...}``).
  Every rank writes ``<output>/rank_<r>.json`` (rank, process count, a digest of its final
  weights, with ``--record-rollouts`` the prompts, completions and rewards it scored each
  step); rank 0 alone writes ``metrics.csv``, ``completions.parquet`` and the trained
  ``policy/`` (a LoRA policy merged).

``kedro``: the ``training`` pipeline of the Kedro project in the working directory::

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
        --dynamo_backend no -m fgrpo_pipeline.launch kedro --params "training.steps=100"

  Rank 0 runs ``kedro run --pipelines=training`` (hooks, one MLflow run, the catalog saves);
  the other ranks load the same inputs from the catalog, without hooks, and run the same node
  with it, discarding its outputs. Only the single-node ``training`` pipeline can run this way
  (all ranks must reach the training loop together).

On a machine without CUDA ``--multi_gpu`` still starts N processes (torchrun) and the trainer
runs them on the CPU with gloo (``accelerate launch --cpu --num_processes N`` would start one
process: accelerate runs several CPU processes only through mpirun). Each process uses
``--threads`` torch threads, by default the cores divided by the processes on the machine:
more would oversubscribe the cores. An accelerate config file
(``accelerate launch --config_file conf/accelerate/ddp_cpu.yaml ...``) may replace the flags;
see conf/accelerate/. Its mixed precision must match the ``mixed_precision`` training
parameter (checked).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

TRAINING_PIPELINE = "training"


def rank() -> int:
    """This process's rank (``RANK``, set by accelerate launch / torchrun), 0 if alone."""
    return int(os.environ.get("RANK", "0"))


def default_threads() -> int:
    """The machine's cores divided by the processes on it (at least 1)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    return max(1, (os.cpu_count() or 1) // max(1, local))


def weights_sha256(model: torch.nn.Module) -> str:
    """A digest of the state dict's names and bytes: equal digests, equal weights."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        digest.update(memoryview(data.numpy()))
    return digest.hexdigest()


def _parse_value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def set_nested(target: dict[str, Any], dotted: str, value: Any) -> None:
    """``target["a"]["b"] = value`` for ``dotted = "a.b"``."""
    *parents, leaf = dotted.split(".")
    for key in parents:
        target = target.setdefault(key, {})
        if not isinstance(target, dict):
            raise ValueError(f"cannot set {dotted!r}: {key!r} is not a mapping")
    target[leaf] = value


def parse_assignments(items: Sequence[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` (or comma-separated, as ``kedro run --params``) as a nested dict;
    values are read as YAML (``3`` an int, ``true`` a bool, ``[1, 2]`` a list)."""
    out: dict[str, Any] = {}
    for item in items:
        for part in _split_commas(item):
            key, sep, value = part.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"expected key=value, got {part!r}")
            set_nested(out, key.strip(), _parse_value(value.strip()))
    return out


def _split_commas(text: str) -> list[str]:
    """Split on the commas outside brackets (``a=1,b=[1, 2]`` is two assignments)."""
    parts, depth, current = [], 0, []
    for char in text:
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [p for p in (p.strip() for p in parts) if p]


def load_params(path: str | Path | None, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The ``training`` parameters of a YAML / JSON file, with ``overrides`` merged in."""
    import yaml

    params: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of training parameters")
        params = dict(loaded.get("training", loaded))
    return _merge(params, overrides)


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def _read_table(path: str | Path):
    import pandas as pd

    path = Path(path)
    readers = {
        ".parquet": pd.read_parquet,
        ".csv": pd.read_csv,
        ".json": pd.read_json,
        ".jsonl": lambda p: pd.read_json(p, lines=True),
        ".pkl": pd.read_pickle,
    }
    if path.suffix not in readers:
        raise ValueError(f"{path}: unknown table format (use {', '.join(readers)})")
    return readers[path.suffix](path)


def load_policy(path: str | Path):
    """A ``save_pretrained`` directory (as PolicyDataset writes it), read without a hub."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from fgrpo_pipeline.models.policy import Policy

    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    tokenizer.padding_side = "left"
    return Policy(model=model, tokenizer=tokenizer)


class RecordingReward:
    """A reward function that keeps what it scored: one entry per call (one per step)."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.calls: list[dict[str, list]] = []

    def __call__(self, prompts, completions, **columns):
        scores = list(self.fn(prompts, completions, **columns))
        self.calls.append(
            {"prompts": list(prompts), "completions": list(completions), "rewards": scores}
        )
        return scores


def run_files(args: argparse.Namespace) -> int:
    """``files`` mode: train on every rank, write the rank files and rank 0's outputs."""
    from fgrpo_pipeline.algorithms.rewards import combine_rewards
    from fgrpo_pipeline.models.lora import merge_for_export
    from fgrpo_pipeline.pipelines.training.params import TrainingParams
    from fgrpo_pipeline.training.distributed import world_size
    from fgrpo_pipeline.training.loop import train
    from fgrpo_pipeline.training.preferences import preferences_from_splits

    run = TrainingParams.from_params(load_params(args.params, parse_assignments(args.set)))
    config = run.config
    prompts = _read_table(args.prompts)
    if args.split and "split" in prompts.columns:
        prompts = prompts[prompts["split"] == args.split]
    preferences = None
    if args.aligned or args.unaligned:
        if not (args.aligned and args.unaligned):
            raise ValueError("--aligned and --unaligned go together")
        preferences = preferences_from_splits(
            _read_table(args.aligned), _read_table(args.unaligned)
        )
    reward_fn = RecordingReward(combine_rewards(config.rewards)) if args.record_rollouts else None
    policy = load_policy(args.policy)
    result = train(
        policy,
        prompts,
        config,
        preferences=preferences,
        progress=run.progress and not args.quiet,
        reward_fn=reward_fn,
        resume_dir=run.resume_dir,
    )
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    me = rank()
    report: dict[str, Any] = {
        "rank": me,
        "num_processes": world_size(),
        "weights_sha256": weights_sha256(result.policy.model),
        "steps": int(result.metrics["step"].iloc[-1]) if len(result.metrics) else 0,
        "local_parameters": result.local_parameters,
    }
    if reward_fn is not None:
        first = result.resumed_from_step + 1
        report["rollouts"] = [{"step": first + i, **call} for i, call in enumerate(reward_fn.calls)]
    (output / f"rank_{me:03d}.json").write_text(json.dumps(report, indent=1))
    if me == 0:
        result.metrics.to_csv(output / "metrics.csv", index=False)
        result.completions.to_parquet(output / "completions.parquet", index=False)
        if not args.no_save_policy:
            trained = merge_for_export(result.policy)
            trained.model.save_pretrained(output / "policy")
            trained.tokenizer.save_pretrained(output / "policy")
    return 0


def run_kedro(args: argparse.Namespace) -> int:
    """``kedro`` mode: rank 0 runs the pipeline in a Kedro session (hooks, MLflow, saves);
    the other ranks run its node on the same inputs, loaded without hooks."""
    from kedro.framework.project import pipelines, settings
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    project = Path(args.project_path).resolve()
    os.chdir(project)  # the catalog's relative paths
    bootstrap_project(project)
    runtime_params = parse_assignments(args.params)
    pipeline = pipelines[args.pipeline]
    if len(pipeline.nodes) != 1:
        raise ValueError(
            f"pipeline {args.pipeline!r} has {len(pipeline.nodes)} nodes: only a single-node "
            "training pipeline can run in several processes (every rank runs the node)"
        )
    if rank() == 0:
        with KedroSession.create(
            project_path=project, env=args.env, runtime_params=runtime_params
        ) as session:
            session.run(pipeline_names=[args.pipeline])
        return 0
    loader = settings.CONFIG_LOADER_CLASS(
        conf_source=str(project / settings.CONF_SOURCE),
        env=args.env,
        runtime_params=runtime_params,
        **settings.CONFIG_LOADER_ARGS,
    )
    try:
        credentials = loader["credentials"]
    except Exception:  # no credentials file
        credentials = None
    catalog = settings.DATA_CATALOG_CLASS.from_config(loader["catalog"], credentials)
    parameters = loader["parameters"]
    (node,) = pipeline.nodes
    inputs = []
    for name in node.inputs:
        if name == "parameters":
            inputs.append(parameters)
        elif name.startswith("params:"):
            value: Any = parameters
            for key in name.removeprefix("params:").split("."):
                value = value[key]
            inputs.append(value)
        else:
            inputs.append(catalog.load(name))
    node.func(*inputs)  # rank 0's session saves the outputs
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fgrpo_pipeline.launch",
        description="Online f-GRPO training in several processes (run under accelerate launch).",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per process (default: cores / processes on this machine)",
    )
    modes = parser.add_subparsers(dest="mode", required=True)
    files = modes.add_parser("files", help="policy, prompts and parameters from files")
    files.add_argument("--policy", required=True, help="save_pretrained directory")
    files.add_argument("--prompts", required=True, help="table with prompt, ground_truth")
    files.add_argument("--split", default="train", help="keep rows of this split (if any)")
    files.add_argument("--params", help="YAML / JSON file of the training parameters")
    files.add_argument(
        "--set", action="append", default=[], help="override, e.g. steps=10 (repeatable)"
    )
    files.add_argument("--aligned", help="table with prompt, completion (offline data)")
    files.add_argument("--unaligned", help="table with prompt, completion (offline data)")
    files.add_argument("--output", required=True, help="folder for the results")
    files.add_argument("--record-rollouts", action="store_true", help="keep each rank's rollouts")
    files.add_argument("--no-save-policy", action="store_true", help="do not save the policy")
    files.add_argument("--quiet", action="store_true", help="no progress bar")
    files.set_defaults(run=run_files)
    kedro = modes.add_parser("kedro", help="the Kedro project's training pipeline")
    kedro.add_argument("--project-path", default=".", help="the Kedro project (default: cwd)")
    kedro.add_argument("--env", default=None, help="Kedro configuration environment")
    kedro.add_argument(
        "--params", action="append", default=[], help='as kedro run, e.g. "training.steps=10"'
    )
    kedro.add_argument("--pipeline", default=TRAINING_PIPELINE, help=argparse.SUPPRESS)
    kedro.set_defaults(run=run_kedro)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    threads = args.threads or default_threads()
    # accelerate sets its own thread count when OMP_NUM_THREADS is unset
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    torch.set_num_threads(threads)
    try:
        return args.run(args)
    finally:
        from fgrpo_pipeline.training.distributed import destroy_process_group

        destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
