"""Helpers shared by the benchmark scripts (not a benchmark itself).

Every benchmark builds the same inputs the default ``kedro run`` builds, from the project's
own ``conf/base`` parameters: the arithmetic prompts of ``data_preparation``, the tiny Qwen2
policy of ``base_policy`` warmed up exactly as that pipeline does, and the ``training``
configuration. Results go to ``benchmarks/results/<name>.json`` with the machine they ran on.
"""

from __future__ import annotations

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

# The run keys of parameters_training.yml that say how a run is shown, not what it trains.
_RUN_KEYS = ("progress", "resume_dir")


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
    from fgrpo_pipeline.tasks.sources import make_arithmetic_prompts

    options = dict(params["data_preparation"]["arithmetic"])
    options["operations"] = tuple(options["operations"])
    prompts = make_arithmetic_prompts(**options)
    return prompts[prompts["split"] == "train"].reset_index(drop=True)


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

    ``sampling`` overrides merge key by key. No checkpoints or completions tables, and
    ``num_threads=0`` (the benchmark sets the threads itself).
    """
    from fgrpo_pipeline.training.config import TrainerConfig

    values = {k: v for k, v in params["training"].items() if k not in _RUN_KEYS}
    values = json.loads(json.dumps(values))  # plain containers, no OmegaConf nodes
    values.update(checkpoint_every=0, log_completions_every=0, num_threads=0)
    sampling = {**values.get("sampling", {}), **overrides.pop("sampling", {})}
    values.update(overrides, sampling=sampling)
    return TrainerConfig.from_params(values)


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


def fit_exponent(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Slope b of the least-squares line log y = a + b log x (y ∝ x^b)."""
    import math

    lx = [math.log(x) for x in xs]
    ly = [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    sxx = sum((x - mx) ** 2 for x in lx)
    return sum((x - mx) * (y - my) for x, y in zip(lx, ly, strict=True)) / sxx


def write_result(name: str, payload: Mapping[str, Any], out: Path | None = None) -> Path:
    path = out or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"written: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return path
