"""Step-time breakdown and tokens per second of f-GRPO training at the default size.

    python benchmarks/breakdown.py [--steps 60] [--warmup-steps 5] [--threads 0]

The default size is conf/base's: P = 32 prompts × G = 8 completions per step, 4 new tokens at
most, the ``base_policy`` pipeline's warmed-up tiny Qwen2 (~130k parameters), f-GRPO with the
KL divergence and β = 0.1, AdamW. Two measurements, in this order, in one process:

1. ``trainer``: ``fgrpo_pipeline.training.loop.train`` itself, read from its per-step columns
   ``time_generation`` (rollout), ``time_scoring`` (rewards, advantages, reference
   log-probs), ``time_update`` (policy log-probs, loss, backward, clipping, AdamW) and
   ``tokens_per_second`` (generated completion tokens / step time).
2. ``instrumented``: a copy of the trainer's step built from the same public functions
   (``HFEngine.generate``, ``score_rollouts``, ``batch_logprobs``, ``get_loss``,
   ``clip_grad_norm_``, ``AdamW.step``) with a clock around each, for the finer split the
   issue asks for: generation (and, inside it, the model's forward calls vs the rest of
   ``generate``), rewards + advantages, reference log-probs, policy log-probs, loss forward,
   loss backward, policy backward, clipping, optimiser, and the metrics row. The backward is
   split by giving the loss a detached copy of the log-probs and then pushing its gradient
   through the policy (``logps.backward(grad)``): the same gradient, two calls instead of one.
   Its total is checked against the trainer's step time.

Medians over ``--steps`` steps after ``--warmup-steps``. Writes
``benchmarks/results/breakdown.json``.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import _common as common
import torch

PHASES = (
    "prompt_sampling",
    "generation",
    "rewards_advantages",
    "reference_logps",
    "policy_logps",
    "loss_forward",
    "loss_backward",
    "policy_backward",
    "clip_grad",
    "optimizer",
    "metrics",
)
# How the instrumented phases map onto the trainer's three columns.
TRAINER_COLUMNS = {
    "generation": ("prompt_sampling", "generation"),
    "scoring": ("rewards_advantages", "reference_logps"),
    "update": (
        "policy_logps",
        "loss_forward",
        "loss_backward",
        "policy_backward",
        "clip_grad",
        "optimizer",
    ),
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


def measure_instrumented(policy, prompts, config, steps: int, warmup: int) -> dict:
    """The trainer's step (no micro-batching, no offline data), one clock per phase."""
    from fgrpo_pipeline.algorithms.advantages import frac_reward_zero_std
    from fgrpo_pipeline.algorithms.labeling import score_rollouts
    from fgrpo_pipeline.algorithms.losses import LossInputs, get_loss
    from fgrpo_pipeline.algorithms.rewards import combine_rewards, get_reward
    from fgrpo_pipeline.models.lora import make_reference
    from fgrpo_pipeline.models.policy import Policy, set_seed
    from fgrpo_pipeline.rollout import SamplingConfig, batch_logprobs, get_engine, repeat_each

    set_seed(config.seed)
    policy = Policy(model=copy.deepcopy(policy.model), tokenizer=policy.tokenizer)
    reference = make_reference(policy)
    model = policy.model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    engine = get_engine(config.engine, **config.engine_options)
    loss_fn = get_loss(config.loss.name)
    reward_fn = combine_rewards(config.rewards)
    correctness_fn = get_reward(config.correctness_reward)
    gen = torch.Generator().manual_seed(config.seed)
    temperature, g = config.sampling.temperature, config.group_size

    # Time the model's own forward calls inside generate(): the rest is generate()'s overhead
    # (input preparation, cache, masks, logits processors, sampling, stopping checks).
    forward_time = [0.0]
    forward_calls = [0]
    inner_forward = model.forward

    def timed_forward(*args, **kwargs):
        t = time.perf_counter()
        try:
            return inner_forward(*args, **kwargs)
        finally:
            forward_time[0] += time.perf_counter() - t
            forward_calls[0] += 1

    rows: list[dict[str, float]] = []
    for step in range(1, warmup + steps + 1):
        lap = _Laps()
        t = lap.times

        pick = torch.randint(len(prompts), (config.prompts_per_step,), generator=gen).tolist()
        chosen = prompts.iloc[pick]
        sampling = SamplingConfig(
            **{**asdict(config.sampling), "seed": config.seed * 100_003 + step}
        )
        lap("prompt_sampling")
        forward_time[0], forward_calls[0] = 0.0, 0
        model.forward = timed_forward
        batch = engine.generate(policy, chosen["prompt"].tolist(), g, sampling)
        del model.forward
        lap("generation")
        t["generation_model_forward"] = forward_time[0]
        t["generation_forward_calls"] = forward_calls[0]

        scored = score_rollouts(
            batch.completions,
            batch.prompts,
            repeat_each(chosen["ground_truth"].tolist(), g),
            reward_fn=reward_fn,
            correctness_fn=correctness_fn,
            group_size=g,
            advantage_scale=config.advantage_scale,
        )
        lap("rewards_advantages")
        with torch.no_grad():
            ref_logps = batch_logprobs(reference, batch, temperature)
        lap("reference_logps")

        logps = batch_logprobs(model, batch, temperature)
        lap("policy_logps")
        leaf = logps.detach().requires_grad_(True)
        inputs = LossInputs(
            logps=leaf,
            ref_logps=ref_logps,
            old_logps=batch.old_logps,
            mask=batch.completion_mask,
            advantages=scored.advantages,
            rewards=scored.rewards,
            group_size=g,
        )
        out = loss_fn(inputs, config.loss)
        optimizer.zero_grad(set_to_none=True)
        applied = torch.isfinite(out.loss).item()
        lap("loss_forward")
        out.loss.backward()
        lap("loss_backward")
        logps.backward(leaf.grad)
        lap("policy_backward")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        applied = applied and torch.isfinite(grad_norm).item()
        lap("clip_grad")
        if applied:
            optimizer.step()
        lap("optimizer")

        mask = batch.completion_mask
        log_ratio_ref = ((batch.old_logps - ref_logps) * mask).sum(dim=1)
        row = {
            "reward_mean": scored.rewards.mean().item(),
            "reward_std": scored.rewards.std().item(),
            "accuracy": scored.correct.float().mean().item(),
            "frac_reward_zero_std": frac_reward_zero_std(scored.rewards, g),
            "loss": out.loss.item(),
            "kl_to_ref": log_ratio_ref.mean().item(),
            "completion_length": batch.lengths.float().mean().item(),
            "frac_truncated": batch.truncated.float().mean().item(),
            "grad_norm": float(grad_norm),
            "tokens": int(mask.sum().item()),
        }
        lap("metrics")
        t["step"] = sum(t[p] for p in PHASES)
        t["tokens"] = row["tokens"]
        t["completion_length"] = row["completion_length"]
        if not math.isfinite(row["loss"]):
            raise RuntimeError(f"non-finite loss at step {step}")
        rows.append(dict(t))

    rows = rows[warmup:]
    med = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
    step = med["step"]
    out = {
        "phases_median_s": {p: med[p] for p in PHASES},
        "phase_share_of_step": {p: med[p] / step for p in PHASES},
        "step_median_s": step,
        "generation_detail": {
            "model_forward_s": med["generation_model_forward"],
            "generate_overhead_s": med["generation"] - med["generation_model_forward"],
            "forward_calls": med["generation_forward_calls"],
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
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="timed steps per measurement")
    parser.add_argument("--warmup-steps", type=int, default=5, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    parser.add_argument("--max-load", type=float, default=0.8)
    parser.add_argument("--out", type=Path, default=None)
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
    print("instrumented copy of the step:")
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
        f"  generation: model forward {detail['model_forward_s'] * 1e3:.2f} ms in "
        f"{detail['forward_calls']:.0f} calls, generate() overhead "
        f"{detail['generate_overhead_s'] * 1e3:.2f} ms"
    )
    common.write_result("breakdown", results, args.out)


if __name__ == "__main__":
    main()
