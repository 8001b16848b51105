"""Helpers shared by the benchmark scripts (not a benchmark itself).

Every benchmark builds the same inputs the default ``kedro run`` builds, from the project's
own ``conf/base`` parameters: the arithmetic prompts of ``data_preparation``, the tiny Qwen2
policy of ``base_policy`` warmed up exactly as that pipeline does, and the ``training``
configuration. Results go to ``benchmarks/results/<name>.json`` with the machine they ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")


def load_avg() -> list[float]:
    """The 1, 5 and 15 minute load averages."""
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def wait_for_quiet(max_load: float = 0.8, timeout: float = 600.0, poll: float = 30.0) -> dict:
    """Wait (up to ``timeout`` s) until the 1-minute load is at most ``max_load``.

    Other jobs may share the cores; a benchmark started under load measures them too. Returns
    what was seen: the load at the start, the load when measuring began and the wait.
    """
    start = time.monotonic()
    first = load_avg()
    now = first
    while now[0] > max_load and time.monotonic() - start < timeout:
        print(f"load {now[0]:.2f} > {max_load}: waiting {poll:.0f} s", file=sys.stderr)
        time.sleep(poll)
        now = load_avg()
    return {
        "load_at_invocation": first,
        "load_at_start": now,
        "waited_s": round(time.monotonic() - start, 1),
        "quiet": now[0] <= max_load,
    }


def _busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (user, nice, system, irq, softirq, steal)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    """CPU seconds of this process and of its children that have been waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class ForeignCpu:
    """Measures the CPU that other processes (and the hypervisor's steal) used meanwhile.

    ``with ForeignCpu() as f: ...`` then ``f.cores``: the average number of cores busy with
    work not ours over the block (10 ms tick resolution). A clean measurement on an idle
    machine reads about 0.0; a test suite on the other core reads about 1.0.
    """

    def __enter__(self) -> ForeignCpu:
        self.wall, self.busy, self.own = time.monotonic(), _busy_seconds(), _own_seconds()
        return self

    def __exit__(self, *exc) -> None:
        wall = max(time.monotonic() - self.wall, 1e-9)
        foreign = (_busy_seconds() - self.busy) - (_own_seconds() - self.own)
        self.cores = max(foreign, 0.0) / wall


def measure_clean(fn, *, max_foreign: float = 0.15, tries: int = 3, label: str = ""):
    """``fn()``, repeated (up to ``tries`` times) while other processes used more than
    ``max_foreign`` cores during it. Returns (result, foreign cores of the kept try, tries)."""
    for attempt in range(1, tries + 1):
        with ForeignCpu() as foreign:
            result = fn()
        if foreign.cores <= max_foreign or attempt == tries:
            return result, foreign.cores, attempt
        print(
            f"{label}: other processes used {foreign.cores:.2f} cores meanwhile; measuring again",
            file=sys.stderr,
        )
        time.sleep(5)
    raise AssertionError("unreachable")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _lscpu() -> dict[str, str]:
    import subprocess

    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    fields = {}
    for line in out.splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch
    import transformers

    lscpu = _lscpu()
    flags = set(lscpu.get("Flags", "").split())
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cpu_vendor": lscpu.get("Vendor ID"),
        "cpu_family_model": f"{lscpu.get('CPU family')}/{lscpu.get('Model')}",
        "hypervisor": lscpu.get("Hypervisor vendor"),
        "l2_cache": lscpu.get("L2 cache"),
        "l3_cache": lscpu.get("L3 cache"),
        "simd": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
    }
    try:
        import trl

        info["trl"] = trl.__version__
    except ImportError:
        pass
    return info


def machine_arguments(parser: argparse.ArgumentParser, *, threads: bool = True) -> None:
    """The options every benchmark takes: ``--threads`` (unless the script sets threads its
    own way), ``--max-load`` and ``--out``."""
    if threads:
        parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    parser.add_argument(
        "--max-load",
        type=float,
        default=0.8,
        help="wait until the 1-minute load average is at most this before measuring",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="result file (default: benchmarks/results/)"
    )


def set_threads(threads: int) -> int:
    """Set torch's intra-op threads (0 = all usable cores); returns the number set."""
    import torch

    threads = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    return threads


def project_parameters() -> dict[str, Any]:
    """The ``conf/base`` parameters, resolved as a ``kedro run`` resolves them."""
    import warnings

    from kedro.config import OmegaConfigLoader

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # omegaconf's resolver deprecation notice
        loader = OmegaConfigLoader(
            conf_source=str(ROOT / "conf"),
            base_env="base",
            default_run_env="base",
            merge_strategy={"parameters": "soft"},
        )
        return dict(loader["parameters"])


def default_prompts(params: Mapping[str, Any]):
    """The train split of ``data_preparation``'s arithmetic prompts."""
    return split_prompts(params, "train")


def split_prompts(params: Mapping[str, Any], split: str):
    """One split (train, test, ood) of ``data_preparation``'s arithmetic prompts."""
    from fgrpo_pipeline.tasks.sources import make_arithmetic_prompts

    options = dict(params["data_preparation"]["arithmetic"])
    options["operations"] = tuple(options["operations"])
    prompts = make_arithmetic_prompts(**options)
    return prompts[prompts["split"] == split].reset_index(drop=True)


def base_policy(params: Mapping[str, Any], prompts, *, warm: bool = True):
    """The ``base_policy`` pipeline's policy: built locally, warmed up (unless ``warm=False``)."""
    from fgrpo_pipeline.models.policy import build_char_tokenizer, build_tiny_policy, set_seed
    from fgrpo_pipeline.training.warmup import build_warm_policy

    cfg = params["base_policy"]
    if not warm:
        set_seed(cfg["seed"])
        policy = build_tiny_policy(build_char_tokenizer(), seed=cfg["seed"], **cfg["model"])
        policy.model.eval()
        return policy
    policy, _ = build_warm_policy(
        prompts["prompt"].tolist(),
        prompts["ground_truth"].tolist(),
        model=dict(cfg["model"]),
        warmup=dict(cfg["warmup"]),
        seed=cfg["seed"],
        progress=False,
    )
    return policy


def training_config(params: Mapping[str, Any], **overrides: Any):
    """``TrainerConfig`` of parameters_training.yml, with ``overrides`` merged over it.

    ``sampling`` overrides merge key by key. No checkpoints or completions tables,
    ``num_threads=0`` (the benchmark sets the threads itself), and a constant learning rate
    unless ``lr_schedule`` is overridden (TRL's side runs a constant one; default_budget.py
    names the schedule of each setting).
    """
    from fgrpo_pipeline.pipelines.training.params import TrainingParams

    values = json.loads(json.dumps(params["training"]))  # plain containers, no OmegaConf nodes
    values.update(
        checkpoint_every=0,
        log_completions_every=0,
        num_threads=0,
        resume_dir=None,
        lr_schedule="constant",
    )
    sampling = {**values.get("sampling", {}), **overrides.pop("sampling", {})}
    values.update(overrides, sampling=sampling)
    return TrainingParams.from_params(values).config


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median, mean, min and the interquartile range of ``values``."""
    values = sorted(values)
    q = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
    return {
        "median": statistics.median(values),
        "mean": statistics.fmean(values),
        "min": values[0],
        "q1": q[0],
        "q3": q[2],
        "n": len(values),
    }


def paired_median_ratio(values: Sequence[float], baseline: Sequence[float]) -> dict[str, float]:
    """The median of the pairwise ratios values[i] / baseline[i], with a 95 % bootstrap
    interval over the pairs: {"median", "low", "high"}. Pairs measured back to back share
    the machine's drift, which a ratio of two pooled medians does not cancel."""
    import numpy as np

    from fgrpo_pipeline.experiments.statistics import bootstrap_interval

    ratios = [x / y for x, y in zip(values, baseline, strict=True)]
    found = bootstrap_interval(ratios, statistic=lambda rows: np.median(rows, axis=-1))
    return {"median": found.mean, "low": found.low, "high": found.high}


def interval_text(ratio: Mapping[str, float]) -> str:
    return f"{ratio['median']:.3f} [{ratio['low']:.3f}, {ratio['high']:.3f}]"


def fit_exponent(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Slope b of the least-squares line log y = a + b log x (y ∝ x^b)."""
    import math

    lx = [math.log(x) for x in xs]
    ly = [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    sxx = sum((x - mx) ** 2 for x in lx)
    return sum((x - mx) * (y - my) for x, y in zip(lx, ly, strict=True)) / sxx


def command_line(script: str) -> str:
    """``python benchmarks/<script> <this process's options>`` without ``--out <path>``: the
    command recorded beside a result, for anyone to rerun (a scratch output path is not
    part of it)."""
    argv, kept = sys.argv[1:], []
    skip = False
    for arg in argv:
        if skip or arg.startswith("--out="):
            skip = False
            continue
        if arg == "--out":
            skip = True
            continue
        kept.append(arg)
    return " ".join(["python", f"benchmarks/{script}", *kept])


def write_result(name: str, payload: Mapping[str, Any], out: Path | None = None) -> Path:
    path = out or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"written: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return path


# --- The realistic shape (``vs_trl.py --shape realistic``, ``memory.py --shape realistic``) ---
#
# A locally built, untrained Qwen2 of a few million parameters over the character tokenizer;
# few-shot sum prompts of ~60 tokens; P = 8 prompts × G = 8 completions; up to 48 new tokens
# (``--lengths`` for others); a reward with spread on random text. The untrained model samples
# EOS about as often as any other of its 100 tokens, so completions end early more often the
# longer the budget (mean ~36 of 48 in smoke runs); the benchmarks record the mean length.

REALISTIC_MODEL = {
    "hidden_size": 256,
    "num_layers": 4,
    "num_heads": 4,
    "num_kv_heads": 2,
    "intermediate_size": 1024,
}
REALISTIC_PROMPTS_PER_STEP = 8
REALISTIC_GROUP_SIZE = 8
REALISTIC_MAX_NEW_TOKENS = 48
REALISTIC_SHOTS = 6  # solved examples before the question: ~60 prompt tokens with BOS
REALISTIC_NUM_PROMPTS = 512
REALISTIC_SEED = 0
# The realistic shape measures the cost of a step, not learning: at a real rate the two losses
# move the policy apart within a few steps (at 48 new tokens, mean lengths 37 vs 42 after 14
# steps at 5e-4), and a step's cost follows its lengths. At this rate every step still runs
# all its work (AdamW included) but no weight moves in float32, so both trainers sample the
# untrained model's lengths throughout: equal work on both sides.
REALISTIC_LEARNING_RATE = 1e-12

_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # the char tokenizer's, in case left in


def digit_share(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
    """The share of a completion's characters that are digits (0 for an empty one).

    TRL's reward signature, ``(prompts, completions, **kwargs) -> list[float]``, which is also
    ours (``train(..., reward_fn=digit_share)``). On an untrained model's random text it has
    spread within every group (~0.1 on average), so no group's advantages are all zero.
    """
    scores = []
    for completion in completions:
        text = completion
        for token in _SPECIAL_TOKENS:
            text = text.replace(token, "")
        scores.append(sum(ch.isdigit() for ch in text) / len(text) if text else 0.0)
    return scores


digit_share.__name__ = "digit_share"  # TRL logs rewards under __name__


def realistic_prompts(
    num_prompts: int = REALISTIC_NUM_PROMPTS,
    shots: int = REALISTIC_SHOTS,
    seed: int = REALISTIC_SEED,
):
    """Few-shot sums: ``shots`` solved ``a+b=c`` lines (two-digit operands), then a question.

    Columns id, prompt, ground_truth (the question's sum; ours scores correctness with it).
    """
    import random

    import pandas as pd

    rng = random.Random(seed)

    def operands() -> tuple[int, int]:
        return rng.randint(10, 99), rng.randint(10, 99)

    rows = []
    for i in range(num_prompts):
        solved = "".join(f"{a}+{b}={a + b}\n" for a, b in (operands() for _ in range(shots)))
        a, b = operands()
        rows.append(
            {"id": f"realistic-{i:05d}", "prompt": f"{solved}{a}+{b}=", "ground_truth": str(a + b)}
        )
    return pd.DataFrame(rows)


def realistic_policy(*, max_position_embeddings: int = 512, seed: int = REALISTIC_SEED):
    """The untrained Qwen2 of ``REALISTIC_MODEL`` over the character tokenizer (eval mode)."""
    from fgrpo_pipeline.models.policy import build_char_tokenizer, build_tiny_policy

    policy = build_tiny_policy(
        build_char_tokenizer(),
        seed=seed,
        max_position_embeddings=max_position_embeddings,
        **REALISTIC_MODEL,
    )
    policy.model.eval()
    return policy


def realistic_overrides(max_new_tokens: int = REALISTIC_MAX_NEW_TOKENS) -> dict[str, Any]:
    """``training_config`` overrides of the realistic shape (f-GRPO, KL, β = 0.1 as in conf)."""
    return {
        "prompts_per_step": REALISTIC_PROMPTS_PER_STEP,
        "group_size": REALISTIC_GROUP_SIZE,
        "beta": 0.1,
        "learning_rate": REALISTIC_LEARNING_RATE,
        "sampling": {"max_new_tokens": max_new_tokens},
    }


def save_policy(policy, directory: Path) -> Path:
    """``save_pretrained`` of the model and its tokenizer, for both trainers to load back."""
    policy.model.save_pretrained(directory)
    policy.tokenizer.save_pretrained(directory)
    return directory


# --- One measurement in a fresh interpreter -------------------------------------------------
#
# Process-wide state (the C allocator's settings, its heap, torch's thread pools) carries over
# from one trainer to the next within a process; each configuration of ``speedups.py`` and
# ``vs_trl.py`` therefore runs in an interpreter of its own, started by ``in_child``. The child
# is the same script run with ``--child '<json spec>'``; it prints its result as the last line.


def in_child(script: str | Path, spec: Mapping[str, Any]) -> dict[str, Any]:
    """Run ``script --child <spec>`` in a new interpreter; its last stdout line, as JSON."""
    import subprocess

    done = subprocess.run(
        [sys.executable, str(script), "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{Path(script).name} child {spec} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def serve_child(child) -> bool:
    """In a child (``--child <json>`` in ``sys.argv``): torch's threads set to the spec's
    ``threads``, third-party output quieted, ``child(spec)`` run and its result printed as
    the last line; returns whether this process was a child."""
    if "--child" not in sys.argv:
        return False
    import torch

    spec = json.loads(sys.argv[sys.argv.index("--child") + 1])
    quiet_libraries()
    torch.set_num_threads(spec["threads"])
    print(json.dumps(child(spec)))
    return True


def quiet_libraries() -> None:
    """No third-party warnings or progress bars in a benchmark's output."""
    import logging
    import warnings

    import transformers

    warnings.filterwarnings("ignore")
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("trl").setLevel(logging.ERROR)


def shape_inputs(
    shape: str,
    params: Mapping[str, Any],
    max_new_tokens: int | None = None,
    *,
    build_policy: bool = True,
):
    """(prompts, policy, training overrides, reward function) of a benchmark shape: ``tiny``
    (the default run's: its train split, its warmed-up base policy, conf/base's training,
    ``exact_number``) or ``realistic`` (see above; ``digit_share``). The policy is None
    without ``build_policy`` (a child loads the parent's saved copy)."""
    if shape == "tiny":
        prompts = default_prompts(params)
        return prompts, base_policy(params, prompts) if build_policy else None, {}, None
    length = max_new_tokens or REALISTIC_MAX_NEW_TOKENS
    policy = (
        realistic_policy(max_position_embeddings=max(512, 128 + length)) if build_policy else None
    )
    return realistic_prompts(), policy, realistic_overrides(length), digit_share
