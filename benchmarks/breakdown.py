"""Step-time breakdown and tokens per second of f-GRPO training at the default size.

    python benchmarks/breakdown.py [--steps 60] [--warmup-steps 5] [--threads 0]

The default size is conf/base's: P = 32 prompts × G = 8 completions per step, 4 new tokens at
most, the ``base_policy`` pipeline's warmed-up tiny Qwen2 (~130k parameters), f-GRPO with the
KL divergence and β = 0.1, AdamW. Two measurements, in this order, in one process:

1. ``trainer``: ``fgrpo_pipeline.training.loop.train`` itself, read from its per-step columns
   ``time_generation`` (rollout), ``time_scoring`` (rewards, advantages, reference
   log-probs), ``time_update`` (policy log-probs, loss, backward, clipping, AdamW) and
   ``tokens_per_second`` (generated completion tokens / step time).
2. ``instrumented``: the trainer's own step functions (``fgrpo_pipeline.training.step``:
   ``sample_prompts``, ``generate``, ``score``, ``reference_logprobs``, ``update``,
   ``metrics_row``) called one by one on the run ``training.loop.setup`` builds, with a clock
   around each: generation (and, inside it, the model's forward calls vs the rest of
   ``generate``), rewards + advantages, reference log-probs, and inside ``update`` the policy
   log-probs, the loss, the backward pass and clipping + AdamW. Its total is checked against
   the trainer's step time.

Medians over ``--steps`` steps after ``--warmup-steps``. Writes
``benchmarks/results/breakdown.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import time
from collections import defaultdict

import _common as common
import torch

PHASES = (
    "prompt_sampling",
    "generation",
    "rewards_advantages",
    "reference_logps",
    "policy_logps",
    "loss_forward",
    "backward",
    "clip_and_optimizer",
    "metrics",
)
# How the instrumented phases map onto the trainer's three columns.
TRAINER_COLUMNS = {
    "generation": ("prompt_sampling", "generation"),
    "scoring": ("rewards_advantages", "reference_logps"),
    "update": ("policy_logps", "loss_forward", "backward", "clip_and_optimizer"),
}


class _Laps:
    """``lap(name)`` adds the time since the previous lap to ``times[name]``."""

    def __init__(self) -> None:
        self.times: dict[str, float] = defaultdict(float)
        self.clock = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.times[name] += now - self.clock
        self.clock = now


def measure_trainer(policy, prompts, config, warmup: int) -> dict:
    from fgrpo_pipeline.training.loop import train

    metrics = train(policy, prompts, config, progress=False).metrics.iloc[warmup:]
    out = {
        col: statistics.median(metrics[col])
        for col in ("time_generation", "time_scoring", "time_update", "time_step")
    }
    out["tokens_per_second"] = statistics.median(metrics["tokens_per_second"])
    out["completion_length_mean"] = float(metrics["completion_length"].mean())
    out["completions_per_second"] = config.prompts_per_step * config.group_size / out["time_step"]
    out["share"] = {
        col: out[f"time_{col}"] / out["time_step"] for col in ("generation", "scoring", "update")
    }
    return out


def _timed(fn, times: dict, name: str):
    """``fn`` with its wall time added to ``times[name]`` on every call."""

    def call(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            times[name] += time.perf_counter() - start

    return call


@contextlib.contextmanager
def _model_calls_timed(model, times: dict):
    """Inside: the model's forward calls and its direct decoding steps add their wall time to
    ``times["generation_model_forward"]`` (the rest of generate() is its overhead)."""
    from fgrpo_pipeline.rollout.direct_step import DirectStep

    direct_step = DirectStep.__call__
    model.forward = _timed(model.forward, times, "generation_model_forward")
    DirectStep.__call__ = _timed(direct_step, times, "generation_model_forward")
    try:
        yield
    finally:
        del model.forward
        DirectStep.__call__ = direct_step


def measure_instrumented(policy, prompts, config, steps: int, warmup: int) -> dict:
    """The trainer's own step functions (``fgrpo_pipeline.training.step``), one clock per
    function, and inside ``update`` the policy scoring, the loss and the backward pass timed
    through the run's own objects (the rest of ``update`` is clipping and AdamW)."""
    from fgrpo_pipeline.training import step as steps_
    from fgrpo_pipeline.training.loop import setup

    run = setup(
        policy, prompts, config, preferences=None, reward_fn=None, correctness_fn=None,
        monitors=(), resume_dir=None,
    )  # fmt: skip
    inner: dict[str, float] = defaultdict(float)
    run.scorer.logprobs = _timed(run.scorer.logprobs, inner, "policy_logps")
    run.scorer.backward = _timed(run.scorer.backward, inner, "backward")
    run.loss_fn = _timed(run.loss_fn, inner, "loss_forward")
    model = run.rollout.model

    rows: list[dict[str, float]] = []
    for step in range(1, warmup + steps + 1):
        inner.clear()
        lap = _Laps()
        t = lap.times
        chosen = steps_.sample_prompts(run, step)
        lap("prompt_sampling")
        with _model_calls_timed(model, inner):
            batch = steps_.generate(run, chosen, step)
        lap("generation")
        scored = steps_.score(run, batch, chosen)
        lap("rewards_advantages")
        ref_logps = steps_.reference_logprobs(run, batch)
        lap("reference_logps")
        result = steps_.update(run, batch, scored, ref_logps, step)
        lap("update")
        row = steps_.metrics_row(run, step, batch, scored, ref_logps, result, (0, 0, 0, 1))
        lap("metrics")
        t.update({k: inner[k] for k in ("policy_logps", "loss_forward", "backward")})
        t["clip_and_optimizer"] = t.pop("update") - sum(
            inner[k] for k in ("policy_logps", "loss_forward", "backward")
        )
        t["generation_model_forward"] = inner["generation_model_forward"]
        t["step"] = sum(t[p] for p in PHASES)
        t["tokens"] = float(batch.completion_mask.sum().item())
        t["completion_length"] = row["completion_length"]
        if not math.isfinite(row["loss"]):
            raise RuntimeError(f"non-finite loss at step {step}")
        rows.append(dict(t))
    rows = rows[warmup:]
    med = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
    step = med["step"]
    return {
        "phases_median_s": {p: med[p] for p in PHASES},
        "phase_share_of_step": {p: med[p] / step for p in PHASES},
        "step_median_s": step,
        "generation_detail": {
            "model_forward_s": med["generation_model_forward"],
            "generate_overhead_s": med["generation"] - med["generation_model_forward"],
            "model_forward_share_of_generation": med["generation_model_forward"]
            / med["generation"],
        },
        "trainer_columns_median_s": {
            col: statistics.median(sum(r[p] for p in ps) for r in rows)
            for col, ps in TRAINER_COLUMNS.items()
        },
        "tokens_per_second": statistics.median(r["tokens"] / r["step"] for r in rows),
        "completion_length_mean": statistics.fmean(r["completion_length"] for r in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="timed steps per measurement")
    parser.add_argument("--warmup-steps", type=int, default=5, help="untimed steps first")
    common.machine_arguments(parser)
    args = parser.parse_args()

    threads = common.set_threads(args.threads)
    load = common.wait_for_quiet(args.max_load)
    params = common.project_parameters()
    prompts = common.default_prompts(params)
    policy = common.base_policy(params, prompts)
    config = common.training_config(params, steps=args.warmup_steps + args.steps)

    trainer, foreign_trainer, tries_trainer = common.measure_clean(
        lambda: measure_trainer(policy, prompts, config, args.warmup_steps), label="trainer"
    )
    torch.set_num_threads(threads)
    inst, foreign_inst, tries_inst = common.measure_clean(
        lambda: measure_instrumented(policy, prompts, config, args.steps, args.warmup_steps),
        label="instrumented",
    )
    results = {
        "benchmark": "breakdown",
        "command": "python benchmarks/breakdown.py",
        "settings": {
            "prompts_per_step": config.prompts_per_step,
            "group_size": config.group_size,
            "max_new_tokens": config.sampling.max_new_tokens,
            "loss": f"{config.loss.name} ({config.loss.divergence}, beta={config.loss.beta})",
            "parameters": sum(p.numel() for p in policy.model.parameters()),
            "steps": args.steps,
            "warmup_steps": args.warmup_steps,
        },
        "load": load,
        "load_at_end": common.load_avg(),
        # Cores other processes kept busy during each measurement (see _common.ForeignCpu),
        # and how many tries it took to get one under 0.15.
        "foreign_cpu_cores": {"trainer": foreign_trainer, "instrumented": foreign_inst},
        "tries": {"trainer": tries_trainer, "instrumented": tries_inst},
        "machine": common.machine_info(),
        "trainer": trainer,
        "instrumented": inst,
        "instrumented_step_to_trainer_step": inst["step_median_s"] / trainer["time_step"],
        "goal_generation_share_at_least": 0.5,
    }

    print(
        f"trainer (median of {args.steps} steps, P×G = {config.prompts_per_step}×"
        f"{config.group_size}, {config.sampling.max_new_tokens} new tokens):"
    )
    for col in ("generation", "scoring", "update"):
        print(f"  {col:<12}{trainer[f'time_{col}'] * 1e3:8.2f} ms  {trainer['share'][col]:6.1%}")
    print(f"  {'step':<12}{trainer['time_step'] * 1e3:8.2f} ms")
    print(
        f"  tokens/s {trainer['tokens_per_second']:,.0f}   completions/s "
        f"{trainer['completions_per_second']:,.0f}"
    )
    print("the trainer's step functions, one by one:")
    for phase in PHASES:
        print(
            f"  {phase:<20}{inst['phases_median_s'][phase] * 1e3:8.2f} ms  "
            f"{inst['phase_share_of_step'][phase]:6.1%}"
        )
    detail = inst["generation_detail"]
    print(
        f"  {'step':<20}{inst['step_median_s'] * 1e3:8.2f} ms "
        f"({results['instrumented_step_to_trainer_step']:.2f}× the trainer's)"
    )
    print(
        f"  generation: model forward {detail['model_forward_s'] * 1e3:.2f} ms, "
        "generate() overhead "
        f"{detail['generate_overhead_s'] * 1e3:.2f} ms"
    )
    common.write_result("breakdown", results, args.out)


if __name__ == "__main__":
    main()
