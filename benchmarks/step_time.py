"""Step-time split of the online loop at the default size and at G·P doubled.

    python benchmarks/step_time.py [--steps 40] [--threads 0] [--out FILE.json]

Builds the default tiny policy locally, warms it up briefly (so groups have reward spread),
then times ``--steps`` training steps of f-GRPO at the default P×G and at 2·P×G, in the same
process. Prints the mean per-step time of generation / scoring (rewards, advantages,
reference log-probs) / update (policy forward, backward, optimiser), tokens per second, and
the ratio of the doubled run to the default one. The first steps are dropped as warm-up.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from fgrpo_pipeline.models.policy import build_char_tokenizer, build_tiny_policy
from fgrpo_pipeline.tasks.sources import make_arithmetic_prompts
from fgrpo_pipeline.training.config import TrainerConfig
from fgrpo_pipeline.training.loop import train
from fgrpo_pipeline.training.warmup import supervised_warmup

COLUMNS = ("time_generation", "time_scoring", "time_update", "time_step", "tokens_per_second")
SKIP = 5  # first steps include allocator and kernel warm-up


def measure(policy, prompts, *, prompts_per_step: int, group_size: int, steps: int) -> dict:
    config = TrainerConfig.from_params(
        {
            "steps": steps + SKIP,
            "prompts_per_step": prompts_per_step,
            "group_size": group_size,
            "learning_rate": 1e-4,
            "sampling": {"max_new_tokens": 4},
        }
    )
    metrics = train(policy, prompts, config, progress=False).metrics.iloc[SKIP:]
    row = {column: float(metrics[column].mean()) for column in COLUMNS}
    row["generation_share"] = row["time_generation"] / row["time_step"]
    row["completions_per_step"] = prompts_per_step * group_size
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per configuration")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--prompts-per-step", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/step_time.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    prompts = make_arithmetic_prompts(n_train=720, n_test=0, operations=("+",), operand_max=29)
    policy = build_tiny_policy(build_char_tokenizer())
    supervised_warmup(
        policy,
        prompts["prompt"].tolist(),
        prompts["ground_truth"].tolist(),
        steps=300,
        batch_size=64,
        learning_rate=2e-3,
        seed=0,
        progress=False,
    )
    p, g = args.prompts_per_step, args.group_size
    results = {
        "default": measure(policy, prompts, prompts_per_step=p, group_size=g, steps=args.steps),
        "doubled": measure(policy, prompts, prompts_per_step=2 * p, group_size=g, steps=args.steps),
    }
    results["ratio_doubled_to_default"] = {
        column: results["doubled"][column] / results["default"][column] for column in COLUMNS
    }
    results["machine"] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }

    header = f"{'':>22}" + "".join(f"{c:>20}" for c in ("default", "doubled", "ratio"))
    print(header)
    for column in (*COLUMNS, "generation_share"):
        ratio = results["ratio_doubled_to_default"].get(column)
        print(
            f"{column:>22}{results['default'][column]:>20.4f}{results['doubled'][column]:>20.4f}"
            + (f"{ratio:>20.2f}" if ratio is not None else "")
        )
    print(f"completions per step: {p * g} vs {2 * p * g}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
