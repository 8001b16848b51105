"""How the step time grows with the batch (G·P) and with the completion length.

    python benchmarks/scaling.py [--steps 30] [--warmup-steps 3] [--threads 0]

Two axes, each at × 1, 2 and 4 of the default (conf/base: P = 32, G = 8, 4 new tokens),
timed with ``fgrpo_pipeline.training.loop.train``'s own per-step columns:

* ``batch``: P = 32, 64, 128 prompts × G = 8 (256, 512, 1024 completions per step), 4 new
  tokens, the ``base_policy`` pipeline's warmed-up policy (the default run's).
* ``length``: ``max_new_tokens`` = 4, 8, 16 at the default P × G. The warmed-up policy answers
  in about 3 tokens and stops at EOS whatever the budget, so this axis uses the freshly built
  (not warmed-up) policy, which rarely samples EOS: its completions fill the budget. The
  measured mean completion length is recorded, and the exponent is fitted against it (and
  against the budget).

For each axis the growth exponent b of ``time ∝ x^b`` is fitted by least squares on
log-log, for the step and for each phase (generation; scoring = rewards, advantages and
reference log-probs; update = policy log-probs, loss, backward, optimiser). b = 1 is linear,
b < 1 means the per-completion (or per-token) cost falls as the size grows. Every point is
run twice, the second pass in reverse order (x1 x2 x4 x4 x2 x1), and the two medians averaged,
so that a drift in machine load does not tilt the fit. Writes
``benchmarks/results/scaling.json``.
"""

from __future__ import annotations

import argparse
import statistics

import _common as common
import torch

PHASES = ("time_step", "time_generation", "time_scoring", "time_update")
FACTORS = (1, 2, 4)


def measure(policy, prompts, config, warmup: int) -> dict:
    from fgrpo_pipeline.training.loop import train

    metrics = train(policy, prompts, config, progress=False).metrics.iloc[warmup:]
    row = {col: statistics.median(metrics[col]) for col in PHASES}
    row["tokens_per_second"] = statistics.median(metrics["tokens_per_second"])
    row["completion_length"] = float(metrics["completion_length"].mean())
    return row


def run_axis(name, policy, prompts, configs, warmup, threads) -> list[dict]:
    """Each config twice, forward then backward order; the two medians averaged."""
    passes: dict[int, list[dict]] = {i: [] for i in range(len(configs))}
    order = [*range(len(configs)), *reversed(range(len(configs)))]
    for i in order:
        torch.set_num_threads(threads)
        row, foreign, tries = common.measure_clean(
            lambda i=i: measure(policy, prompts, configs[i], warmup), label=f"{name} x{FACTORS[i]}"
        )
        passes[i].append({**row, "foreign_cpu_cores": foreign, "tries": tries})
        print(f"{name} x{FACTORS[i]}: {passes[i][-1]['time_step'] * 1e3:.1f} ms/step")
    points = []
    for reps in passes.values():
        point = {key: statistics.fmean(r[key] for r in reps) for key in reps[0] if key != "tries"}
        point["per_pass_time_step"] = [r["time_step"] for r in reps]
        point["generation_share"] = point["time_generation"] / point["time_step"]
        points.append(point)
    return points


def exponents(xs, points) -> dict[str, float]:
    keys = (*PHASES, "tokens_per_second")
    return {key: common.fit_exponent(xs, [p[key] for p in points]) for key in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per point and pass")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed steps first")
    common.machine_arguments(parser)
    args = parser.parse_args()

    threads = common.set_threads(args.threads)
    load = common.wait_for_quiet(args.max_load)
    params = common.project_parameters()
    prompts = common.default_prompts(params)
    base = common.training_config(params)
    p, g, length = base.prompts_per_step, base.group_size, base.sampling.max_new_tokens
    steps = args.warmup_steps + args.steps

    warm = common.base_policy(params, prompts)
    batch_configs = [
        common.training_config(params, steps=steps, prompts_per_step=p * k) for k in FACTORS
    ]
    batch = run_axis("batch", warm, prompts, batch_configs, args.warmup_steps, threads)
    for k, point in zip(FACTORS, batch, strict=True):
        point.update(factor=k, prompts_per_step=p * k, group_size=g, completions=p * k * g)

    fresh = common.base_policy(params, prompts, warm=False)
    length_configs = [
        common.training_config(params, steps=steps, sampling={"max_new_tokens": length * k})
        for k in FACTORS
    ]
    lengths = run_axis("length", fresh, prompts, length_configs, args.warmup_steps, threads)
    for k, point in zip(FACTORS, lengths, strict=True):
        point.update(factor=k, max_new_tokens=length * k)

    results = {
        "benchmark": "scaling",
        "command": "python benchmarks/scaling.py",
        "settings": {
            "default_prompts_per_step": p,
            "group_size": g,
            "default_max_new_tokens": length,
            "loss": f"{base.loss.name} ({base.loss.divergence}, beta={base.loss.beta})",
            "steps": args.steps,
            "warmup_steps": args.warmup_steps,
            "passes": 2,
            "length_axis_policy": "freshly built, not warmed up (fills the token budget)",
        },
        "load": load,
        "load_at_end": common.load_avg(),
        "machine": common.machine_info(),
        "batch": {
            "points": batch,
            "exponent_vs_completions": exponents([pt["completions"] for pt in batch], batch),
        },
        "length": {
            "points": lengths,
            "exponent_vs_mean_length": exponents(
                [pt["completion_length"] for pt in lengths], lengths
            ),
            "exponent_vs_max_new_tokens": exponents(
                [pt["max_new_tokens"] for pt in lengths], lengths
            ),
        },
    }

    for axis, fit_key, x_key in (
        ("batch", "exponent_vs_completions", "completions"),
        ("length", "exponent_vs_mean_length", "completion_length"),
    ):
        print(
            f"\n{axis}: {x_key:>18}{'step ms':>10}{'gen ms':>9}{'score ms':>10}"
            f"{'update ms':>11}{'gen share':>11}{'tok/s':>10}"
        )
        for pt in results[axis]["points"]:
            print(
                f"{'':>{len(axis) + 2}}{pt[x_key]:>18.2f}{pt['time_step'] * 1e3:>10.1f}"
                f"{pt['time_generation'] * 1e3:>9.1f}{pt['time_scoring'] * 1e3:>10.1f}"
                f"{pt['time_update'] * 1e3:>11.1f}{pt['generation_share']:>11.1%}"
                f"{pt['tokens_per_second']:>10,.0f}"
            )
        fit = results[axis][fit_key]
        print(
            f"  exponent b (time ∝ {x_key}^b): step {fit['time_step']:.2f}, generation "
            f"{fit['time_generation']:.2f}, scoring {fit['time_scoring']:.2f}, update "
            f"{fit['time_update']:.2f}"
        )
    common.write_result("scaling", results, args.out)


if __name__ == "__main__":
    main()
