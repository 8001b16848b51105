"""The default run's training budget: held-out accuracy gain and training time per setting.

    python benchmarks/default_budget.py [--settings 2000:1e-4 1000:2e-4 ...] [--seeds 0 1 2 3 4]
        [--jobs 2]

A setting is ``steps:learning_rate[:prompts_per_step[:lr_schedule[:warmup_steps]]]`` (the
rest as in conf/base). For every setting × training seed, the default run's work: its base
policy (the ``base_policy`` pipeline's, warmed up once with conf/base's seed) trained on the
train split with conf/base's f-GRPO (KL, β = 0.1), then base and trained evaluated on the
test split as the ``evaluation`` pipeline does (180 prompts, 4 samples each, and greedy). The
training seed moves the prompt order and the samples, as float rounding on another CPU does,
so the spread over seeds is what the default run's numbers may do on another machine.

Reported per setting: the sampled-accuracy gain (trained − base, in points) per seed, its
mean with a 95 % interval (expanded bootstrap over seeds, as the sweeps), its minimum, the
greedy gain, and the training time. Runs go ``--jobs`` at a time, each in its own
interpreter with the cores divided among them, so training times compare settings within one
invocation only (``--jobs 1`` for the default run's own threads). Writes
``benchmarks/results/default_budget.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import _common as common

DEFAULT_SETTINGS = ("2000:1e-4", "1000:2e-4", "700:3e-4", "500:3e-4:64")


def parse_setting(text: str) -> dict:
    parts = text.split(":")
    setting = {"steps": int(parts[0]), "learning_rate": float(parts[1])}
    if len(parts) > 2:
        setting["prompts_per_step"] = int(parts[2])
    if len(parts) > 3:
        setting["lr_schedule"] = parts[3]
    if len(parts) > 4:
        setting["warmup_steps"] = int(parts[4])
    return setting


def child(spec: dict) -> dict:
    """Train one setting × seed from the saved base policy and evaluate it on the test split."""
    from fgrpo_pipeline.heldout.evaluate import EvaluationConfig, evaluate_policy
    from fgrpo_pipeline.models.policy import load_pretrained_policy
    from fgrpo_pipeline.training.loop import train

    params = common.project_parameters()
    prompts = common.default_prompts(params)  # the train split
    test = common.split_prompts(params, "test")
    base = load_pretrained_policy(spec["model_dir"], tokenizer="fast", local_files_only=True)
    config = common.training_config(params, seed=spec["seed"], **spec["setting"])
    t0 = time.perf_counter()
    result = train(base, prompts, config, progress=False)
    train_s = time.perf_counter() - t0
    evaluation = EvaluationConfig.from_params(dict(params["evaluation"]))
    metrics = {}
    for name, policy in (("base", base), ("trained", result.policy)):
        if name == "base" and not spec["evaluate_base"]:
            continue
        metrics[name], _ = evaluate_policy(policy, base, test, evaluation)
    return {"train_s": train_s, "metrics": metrics}


def main() -> None:
    if common.serve_child(child):
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (cores divided)")
    common.machine_arguments(parser, threads=False)
    args = parser.parse_args()
    settings = [parse_setting(text) for text in args.settings]
    threads = max(1, len(os.sched_getaffinity(0)) // args.jobs)

    common.quiet_libraries()
    load = common.wait_for_quiet(args.max_load)
    params = common.project_parameters()
    policy = common.base_policy(params, common.default_prompts(params))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = common.save_policy(policy, Path(tmp) / "policy")
        specs = [
            {
                "model_dir": str(model_dir),
                "setting": setting,
                "seed": seed,
                "threads": threads,
                # the base is the same for every run: evaluated once, in the first
                "evaluate_base": i == 0 and seed == args.seeds[0],
            }
            for i, setting in enumerate(settings)
            for seed in args.seeds
        ]
        with ThreadPoolExecutor(args.jobs) as pool:
            results = list(pool.map(lambda s: _run(s, len(specs)), specs))
    base = next(r["metrics"]["base"] for r in results if "base" in r["metrics"])
    table = summarise(settings, args.seeds, results, base)
    print_table(table, base)
    common.write_result(
        "default_budget",
        {
            "benchmark": "default_budget",
            "command": common.command_line("default_budget.py"),
            "settings": {"jobs": args.jobs, "threads_per_job": threads, "seeds": args.seeds},
            "load": load,
            "load_at_end": common.load_avg(),
            "wall_s": time.perf_counter() - started,
            "machine": common.machine_info(),
            "base": base,
            "results": table,
        },
        args.out,
    )


def _run(spec: dict, total: int) -> dict:
    result = common.in_child(__file__, spec)
    trained = result["metrics"]["trained"]
    print(
        f"{spec['setting']} seed {spec['seed']}: sampled {trained['sampled_accuracy']:.3f}, "
        f"greedy {trained['greedy_accuracy']:.3f}, train {result['train_s']:.0f} s "
        f"(of {total} runs)",
        flush=True,
    )
    return {**spec, **result}


def summarise(settings: list[dict], seeds: list[int], results: list[dict], base: dict) -> list:
    from fgrpo_pipeline.experiments.statistics import bootstrap_interval

    table = []
    for setting in settings:
        runs = [r for r in results if r["setting"] == setting]
        gains = [
            100 * (r["metrics"]["trained"]["sampled_accuracy"] - base["sampled_accuracy"])
            for r in runs
        ]
        greedy = [
            100 * (r["metrics"]["trained"]["greedy_accuracy"] - base["greedy_accuracy"])
            for r in runs
        ]
        interval = bootstrap_interval(gains)
        table.append(
            {
                **setting,
                "seeds": seeds,
                "sampled_gain_points": gains,
                "sampled_gain_mean": interval.mean,
                "sampled_gain_ci": [interval.low, interval.high],
                "sampled_gain_min": min(gains),
                "greedy_gain_points": greedy,
                "greedy_gain_mean": statistics.fmean(greedy),
                "train_s": [r["train_s"] for r in runs],
                "train_s_median": statistics.median(r["train_s"] for r in runs),
            }
        )
    return table


def print_table(table: list[dict], base: dict) -> None:
    print(f"\nbase: sampled {base['sampled_accuracy']:.3f}, greedy {base['greedy_accuracy']:.3f}")
    print(
        f"{'steps':>6}{'lr':>9}{'P':>4}{'schedule':>10}{'warm-up':>8}{'sampled gain (points)':>26}"
        f"{'min':>7}"
        f"{'greedy gain':>13}{'train s':>9}"
    )
    for row in table:
        ci = row["sampled_gain_ci"]
        print(
            f"{row['steps']:>6}{row['learning_rate']:>9.1e}{row.get('prompts_per_step', 32):>4}"
            f"{row.get('lr_schedule', 'constant'):>10}{row.get('warmup_steps', 0):>8}"
            f"{row['sampled_gain_mean']:>+10.1f} [{ci[0]:+.1f}, {ci[1]:+.1f}]"
            f"{row['sampled_gain_min']:>+7.1f}{row['greedy_gain_mean']:>+13.1f}"
            f"{row['train_s_median']:>9.0f}"
        )


if __name__ == "__main__":
    main()
