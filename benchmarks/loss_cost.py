"""Loss-only cost: each divergence's f-GRPO loss, forward + backward, vs the GRPO loss.

    python benchmarks/loss_cost.py [--reps 40] [--rounds 15] [--threads 0]

On identical tensors — per-token policy log-probs (a leaf that needs grad), reference and
sampling log-probs, the completion mask, rewards and group advantages — each loss is called
exactly as the trainer calls it (``get_loss(name)(LossInputs, LossConfig)``, metrics
included) and its gradient pushed back to the log-probs (``loss.backward()``). No model is
involved: this is the cost the choice of loss adds to a step.

Losses: f-GRPO with each of the six divergences (uniform weights, the default), f-GRPO with
KL and self-normalised importance weights (``weights: snis``), and GRPO (token-level clipped
ratio, the trainer's defaults: ε = 0.2, no KL term). Two sizes: the default batch
(N = P·G = 256 sequences × T = 4 tokens) and a large one (N = 4096 × T = 256), where
per-element work rather than per-call overhead dominates.

Timing: blocks of ``--reps`` calls (a quarter as many at the large size), the losses
interleaved block by block over ``--rounds`` rounds, in a new order each round (so drifting
load and caches left cold by the previous block hit all alike); the median over rounds of the
per-call time. The ratio is f-GRPO / GRPO. Writes ``benchmarks/results/loss_cost.json``.
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import replace

import _common as common
import torch

SIZES = {"default": (256, 4), "large": (4096, 256)}


def make_inputs(n: int, t: int, group_size: int, seed: int = 0):
    """Random but realistic per-token tensors; varying lengths, groups with reward spread."""
    from fgrpo_pipeline.algorithms.advantages import group_advantages
    from fgrpo_pipeline.algorithms.losses import LossInputs

    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(n, t, generator=gen) * 3.0  # log-probs in (-3, 0]
    logps = (old + 0.05 * torch.randn(n, t, generator=gen)).clamp(max=0.0)
    ref = (old + 0.1 * torch.randn(n, t, generator=gen)).clamp(max=0.0)
    lengths = torch.randint(1, t + 1, (n,), generator=gen)
    mask = (torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)).float()
    rewards = torch.bernoulli(torch.full((n,), 0.4), generator=gen)
    advantages = group_advantages(rewards, group_size)
    leaf = (logps * mask).requires_grad_(True)
    inputs = LossInputs(
        logps=leaf,
        ref_logps=ref * mask,
        old_logps=old * mask,
        mask=mask,
        advantages=advantages,
        rewards=rewards,
        group_size=group_size,
    )
    return inputs, leaf


def time_block(loss_fn, inputs, leaf, config, reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        leaf.grad = None
        out = loss_fn(inputs, config)
        out.loss.backward()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=40, help="calls per timed block")
    parser.add_argument("--rounds", type=int, default=15, help="blocks per loss and size")
    common.machine_arguments(parser)
    args = parser.parse_args()

    from fgrpo_pipeline.algorithms.divergences import DIVERGENCES
    from fgrpo_pipeline.algorithms.losses import LossConfig, get_loss

    common.set_threads(args.threads)
    load = common.wait_for_quiet(args.max_load)
    params = common.project_parameters()
    defaults = common.training_config(params)
    g = defaults.group_size
    base = replace(defaults.loss, name="f_grpo", weights="uniform")

    losses: dict[str, LossConfig] = {
        f"f_grpo_{name}": replace(base, divergence=name) for name in DIVERGENCES.names()
    }
    losses["f_grpo_kl_snis"] = replace(base, divergence="kl", weights="snis")
    losses["grpo"] = replace(base, name="grpo")

    results: dict = {
        "benchmark": "loss_cost",
        "command": "python benchmarks/loss_cost.py",
        "settings": {
            "group_size": g,
            "beta": base.beta,
            "reward_bound": base.reward_bound,
            "grpo": {
                "epsilon": base.epsilon,
                "kl_coef": base.kl_coef,
                "aggregation": base.aggregation,
            },
            "reps_per_block": args.reps,
            "rounds": args.rounds,
        },
        "load": load,
        "machine": common.machine_info(),
        "sizes": {},
    }
    for size, (n, t) in SIZES.items():
        inputs, leaf = make_inputs(n, t, g)
        reps = args.reps if size == "default" else max(10, args.reps // 4)
        times: dict[str, list[float]] = {name: [] for name in losses}
        for config in losses.values():  # one untimed block each: caches, allocator
            time_block(get_loss(config.name), inputs, leaf, config, 3)
        with common.ForeignCpu() as foreign:
            order = random.Random(0)
            for _ in range(args.rounds):
                # A new order each round: the block after the large GRPO one runs on caches
                # GRPO evicted, and that should not always be the same loss.
                names = list(losses)
                order.shuffle(names)
                for name in names:
                    config = losses[name]
                    loss_fn = get_loss(config.name)
                    times[name].append(time_block(loss_fn, inputs, leaf, config, reps))
        stats = {name: common.summary(ts) for name, ts in times.items()}
        grpo = stats["grpo"]["median"]
        rows = {
            name: {
                "median_us": s["median"] * 1e6,
                "iqr_us": [s["q1"] * 1e6, s["q3"] * 1e6],
                "ratio_to_grpo": s["median"] / grpo,
            }
            for name, s in stats.items()
        }
        results["sizes"][size] = {
            "sequences": n,
            "tokens_per_sequence": t,
            "foreign_cpu_cores": foreign.cores,
            "losses": rows,
        }
        print(f"\n{size}: N = {n} sequences × T = {t} tokens, forward + backward per call")
        for name, row in rows.items():
            print(f"  {name:<26}{row['median_us']:>10.1f} µs{row['ratio_to_grpo']:>8.2f}× GRPO")
    results["load_at_end"] = common.load_avg()
    common.write_result("loss_cost", results, args.out)


if __name__ == "__main__":
    main()
