"""Peak memory (resident set size) of the default run.

    python benchmarks/memory.py [--mode both|kedro|training] [--training-steps 300]

``kedro``: the default ``kedro run`` (every stage of ``__default__``: data preparation, the
base policy's warm-up, rollouts, labelling, the training steps, evaluation, MLflow
tracking) in a subprocess, in a scratch copy of the project (``conf/``, ``pyproject.toml``
and ``src/``) so that the repository's ``data/`` and ``mlflow.db`` are left alone.
Its peak RSS is read two ways: the kernel's high-water mark of the finished child
(``getrusage(RUSAGE_CHILDREN).ru_maxrss``) and a 10 Hz ``psutil`` sample of the whole
process tree (which would also count helper processes, if any).

``training``: the default-size training alone (``train`` with the conf/base parameters,
``--training-steps`` steps) in a fresh interpreter, with its RSS after the imports, after
the base policy is built and warmed up, and at the end, so the cost of the loop itself is
visible apart from the libraries' import footprint.

Writes ``benchmarks/results/memory.json``. The kedro run takes about 3 minutes on 2 cores.

    python benchmarks/memory.py --shape realistic [--lengths 16 48 128] [--training-steps 10]

``--shape realistic`` (needs TRL, the bench extra): the realistic shape of
``vs_trl.py --shape realistic`` (an untrained 4.0M-parameter Qwen2, ~65-token few-shot
prompts, P = 8 × G = 8, the ``digit_share`` reward) trained by ours (f-GRPO, KL, β = 0.1) and
by TRL's GRPOTrainer (``--betas``, default 0.1: with its reference model, as ours; with 0 among
them, also ours at TRL β = 0's work, GRPO with ``score_reference: false``), each in a
fresh interpreter of its own so the peaks are separate, at each of ``--lengths`` max new
tokens (default 48), for ``--training-steps`` steps (default 10: in a batch of 64 some
completion nearly always fills the budget and both trainers pad to the longest, so every step
has the largest shapes). Each child reports its RSS
after the imports and after training and its own high-water mark
(``getrusage(RUSAGE_SELF).ru_maxrss``); the parent samples its tree at 10 Hz besides. Writes
``benchmarks/results/memory_realistic.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import _common as common
import psutil
import vs_trl

MIB = 2**20

# Runs in a fresh interpreter; prints one JSON line with its RSS at each stage.
TRAINING_CHILD = textwrap.dedent(
    """
    import json, resource, sys, time
    import psutil
    sys.path.insert(0, {bench!r})
    proc = psutil.Process()
    stages = {{"interpreter": proc.memory_info().rss}}
    import _common as common
    import torch
    from fgrpo_pipeline.training.loop import train
    stages["imports"] = proc.memory_info().rss
    common.set_threads({threads})
    params = common.project_parameters()
    prompts = common.default_prompts(params)
    policy = common.base_policy(params, prompts)
    stages["base_policy_warmed_up"] = proc.memory_info().rss
    config = common.training_config(params, steps={steps})
    t0 = time.perf_counter()
    result = train(policy, prompts, config, progress=False)
    seconds = time.perf_counter() - t0
    stages["after_training"] = proc.memory_info().rss
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({{"stages": stages, "peak": peak, "seconds": seconds,
                      "steps": len(result.metrics)}}))
    """
)


# ``--shape realistic``: one trainer in a fresh interpreter; one JSON line of its RSS.
REALISTIC_CHILD = textwrap.dedent(
    """
    import json, logging, resource, sys, time, warnings
    import psutil
    sys.path.insert(0, {bench!r})
    proc = psutil.Process()
    stages = {{"interpreter": proc.memory_info().rss}}
    warnings.filterwarnings("ignore")
    import _common as common
    import torch
    import transformers
    import vs_trl
    if {trainer!r} == "ours":
        from fgrpo_pipeline.training.loop import train
    else:
        import datasets
        from trl import GRPOTrainer
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    stages["imports"] = proc.memory_info().rss
    common.set_threads({threads})
    params = {{"training": json.loads({training!r})}}  # conf/base's, resolved by the parent
    prompts = common.realistic_prompts()
    overrides = {{**common.realistic_overrides({length}), **json.loads({overrides!r})}}
    common_kwargs = dict(steps={steps}, warmup=1, overrides=overrides)
    t0 = time.perf_counter()
    if {trainer!r} == "ours":
        run = vs_trl.run_ours({model_dir!r}, params, prompts, reward_fn=common.digit_share,
                              **common_kwargs)
    else:
        run = vs_trl.run_trl({model_dir!r}, params, prompts, beta={beta!r},
                             reward=common.digit_share, **common_kwargs)
    seconds = time.perf_counter() - t0
    stages["after_training"] = proc.memory_info().rss
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({{"stages": stages, "peak": peak, "seconds": seconds,
                      "completion_length": run["completion_length"]}}))
    """
)


def run_sampled(cmd: list[str], cwd: Path, env: dict) -> dict:
    """Run ``cmd``; its wall time, exit code, output tail and peak RSS (two ways)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    with tempfile.TemporaryFile(mode="w+") as log:
        out = _run_with_sampler(cmd, cwd, env, log)
        log.seek(0)
        stderr_tail = log.read()[-3000:]
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if out.pop("returncode") != 0:
        print(stderr_tail, file=sys.stderr)
        raise SystemExit(f"{' '.join(cmd)} failed")
    out["seconds"] = time.perf_counter() - t0
    # ru_maxrss of RUSAGE_CHILDREN: the largest finished descendant (KiB on Linux); only
    # meaningful if it rose past earlier children's.
    out["peak_rss_mib_kernel"] = after * 1024 / MIB if after > before else None
    return out


def _run_with_sampler(cmd: list[str], cwd: Path, env: dict, log) -> dict:
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    peak_tree = [0]
    done = threading.Event()

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                rss = sum(p.memory_info().rss for p in procs if p.is_running())
                peak_tree[0] = max(peak_tree[0], rss)
            except psutil.Error:
                pass
            done.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, _ = proc.communicate()
    done.set()
    sampler.join()
    return {
        "returncode": proc.returncode,
        "peak_rss_mib_sampled_tree": peak_tree[0] / MIB,
        "stdout": stdout,
    }


def kedro_run(extra: list[str]) -> dict:
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "PYTHONUNBUFFERED": "1"}
    kedro = Path(sys.executable).with_name("kedro")
    with tempfile.TemporaryDirectory(prefix="fgrpo-bench-") as tmp:
        project = Path(tmp)
        shutil.copytree(common.ROOT / "conf", project / "conf")
        shutil.copy2(common.ROOT / "pyproject.toml", project / "pyproject.toml")
        # A copy, not a link: kedro wants the source directory inside the project.
        shutil.copytree(
            common.ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__")
        )
        cmd = [str(kedro), "run", *extra]
        out = run_sampled(cmd, project, env)
    out.pop("stdout")
    out["command"] = "kedro run" + (" " + " ".join(extra) if extra else "")
    return out


def training_run(steps: int, threads: int) -> dict:
    code = TRAINING_CHILD.format(bench=str(Path(__file__).parent), steps=steps, threads=threads)
    out = run_sampled([sys.executable, "-c", code], common.ROOT, dict(os.environ))
    child = json.loads(out.pop("stdout").strip().splitlines()[-1])
    out["stages_rss_mib"] = {k: v / MIB for k, v in child["stages"].items()}
    out["peak_rss_mib_self"] = child["peak"] / MIB
    out["training_seconds"] = child["seconds"]
    out["steps"] = child["steps"]
    return out


def realistic_run(
    trainer: str,
    model_dir: Path,
    training: str,
    *,
    length: int,
    steps: int,
    threads: int,
    beta,
    overrides: dict | None = None,
) -> dict:
    """One realistic-shape training (``trainer`` "ours" or "trl") in a fresh interpreter;
    ``overrides``: training parameters over the shape's (ours)."""
    code = REALISTIC_CHILD.format(
        overrides=json.dumps(overrides or {}),
        bench=str(Path(__file__).parent),
        trainer=trainer,
        model_dir=str(model_dir),
        training=training,
        length=length,
        steps=steps,
        threads=threads,
        beta=beta,
    )
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "1"}
    out = run_sampled([sys.executable, "-c", code], common.ROOT, env)
    child = json.loads(out.pop("stdout").strip().splitlines()[-1])
    out["stages_rss_mib"] = {k: v / MIB for k, v in child["stages"].items()}
    out["peak_rss_mib_self"] = child["peak"] / MIB
    out["training_seconds"] = child["seconds"]
    out["completion_length"] = child["completion_length"]
    return out


def realistic_memory(args) -> dict:
    """``--shape realistic``: ours and TRL's (each β) at each length, one child each."""
    try:
        import trl  # noqa: F401 - only checked for here; the children import it
    except ImportError:
        raise SystemExit("TRL is not installed: pip install -e '.[bench]'") from None
    import transformers

    transformers.utils.logging.disable_progress_bar()  # save_pretrained's shard bar
    lengths = args.lengths or [common.REALISTIC_MAX_NEW_TOKENS]
    steps = args.training_steps or 10
    training = json.dumps(common.project_parameters()["training"])
    policy = common.realistic_policy(max_position_embeddings=max(512, 128 + max(lengths)))
    trainers = [
        ("ours", "ours", None, {}),
        *((f"trl_beta_{beta:g}", "trl", beta, {}) for beta in args.betas),
    ]
    if 0.0 in args.betas:  # ours at TRL β = 0's work (vs_trl.py): no reference copy
        trainers.append((vs_trl.OURS_NO_REFERENCE, "ours", None, vs_trl.NO_REFERENCE_OVERRIDES))
    runs: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="fgrpo-bench-") as tmp:
        model_dir = common.save_policy(policy, Path(tmp) / "policy")
        for length in lengths:
            for name, trainer, beta, overrides in trainers:
                run = realistic_run(
                    trainer,
                    model_dir,
                    training,
                    length=length,
                    steps=steps,
                    threads=args.threads,
                    beta=beta,
                    overrides=overrides,
                )
                runs.setdefault(name, {})[str(length)] = run
                print(
                    f"max_new_tokens {length}, {name}: peak RSS {run['peak_rss_mib_self']:.0f} "
                    f"MiB (sampled tree {run['peak_rss_mib_sampled_tree']:.0f}); after imports "
                    f"{run['stages_rss_mib']['imports']:.0f} MiB; mean completion length "
                    f"{run['completion_length']:.1f}"
                )
    growth = {}
    for name, by_length in runs.items():
        peaks = [by_length[str(n)]["peak_rss_mib_self"] for n in lengths]
        growth[name] = {
            "max_new_tokens": lengths,
            "peak_rss_mib": peaks,
            "peak_above_imports_mib": [
                p - by_length[str(n)]["stages_rss_mib"]["imports"]
                for p, n in zip(peaks, lengths, strict=True)
            ],
        }
    print(f"\n{'peak RSS, MiB':>24}" + "".join(f"{n:>10}" for n in lengths))
    for name, entry in growth.items():
        print(f"{name:>24}" + "".join(f"{p:>10.0f}" for p in entry["peak_rss_mib"]))
    return {
        "settings": {
            "shape": "realistic",
            "model": {
                **common.REALISTIC_MODEL,
                "parameters": sum(p.numel() for p in policy.model.parameters()),
            },
            "prompts_per_step": common.REALISTIC_PROMPTS_PER_STEP,
            "group_size": common.REALISTIC_GROUP_SIZE,
            "max_new_tokens": lengths,
            "training_steps": steps,
            "trl_betas": args.betas,
            "reward": "digit_share",
        },
        "runs": runs,
        "growth": growth,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("both", "kedro", "training"), default="both")
    parser.add_argument(
        "--shape",
        choices=("tiny", "realistic"),
        default="tiny",
        help="tiny: the default run (--mode); realistic: ours and TRL's per length",
    )
    parser.add_argument(
        "--training-steps", type=int, default=None, help="steps (300 tiny; 10 realistic)"
    )
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=None, help="realistic: max new tokens each"
    )
    parser.add_argument(
        "--betas", type=float, nargs="+", default=[0.1], help="realistic: TRL betas"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (training mode)")
    parser.add_argument("--kedro-args", default="", help="extra `kedro run` arguments")
    common.machine_arguments(parser, threads=False)
    args = parser.parse_args()
    if args.shape == "tiny" and args.lengths:
        parser.error("--lengths applies to --shape realistic")

    load = common.wait_for_quiet(args.max_load)
    if args.shape == "realistic":
        results = {
            "benchmark": "memory_realistic",
            "command": common.command_line("memory.py"),
            "load": load,
            "machine": common.machine_info(),
            **realistic_memory(args),
            "load_at_end": common.load_avg(),
        }
        common.write_result("memory_realistic", results, args.out)
        return
    args.training_steps = args.training_steps or 300
    results: dict = {
        "benchmark": "memory",
        "command": "python benchmarks/memory.py",
        "load": load,
        "machine": common.machine_info(),
    }
    if args.mode in ("both", "training"):
        results["training"] = training_run(args.training_steps, args.threads)
        tr = results["training"]
        print(
            f"training only ({tr['steps']} default-size steps): peak RSS "
            f"{tr['peak_rss_mib_self']:.0f} MiB; stages (MiB): "
            + ", ".join(f"{k} {v:.0f}" for k, v in tr["stages_rss_mib"].items())
        )
    if args.mode in ("both", "kedro"):
        results["kedro_run"] = kedro_run(args.kedro_args.split())
        kr = results["kedro_run"]
        print(
            f"{kr['command']}: {kr['seconds']:.0f} s, peak RSS "
            f"{kr['peak_rss_mib_kernel'] or float('nan'):.0f} MiB (kernel), "
            f"{kr['peak_rss_mib_sampled_tree']:.0f} MiB (sampled tree)"
        )
    results["load_at_end"] = common.load_avg()
    common.write_result("memory", results, args.out)


if __name__ == "__main__":
    main()
