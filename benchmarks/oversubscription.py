"""Several training processes on the same cores: threads per process vs step time.

    python benchmarks/oversubscription.py [--steps 30] [--layouts 1x2 2x1 2x2]

Each layout ``KxT`` starts K processes at once, each training the default size (conf/base)
with T torch threads, and reads their median step time (``time_step``, after 3 warm-up
steps). ``1x2`` is the usual single run; ``2x1`` is two runs sharing 2 cores with one thread
each; ``2x2`` gives every process as many threads as there are cores — what a multi-process
launcher does unless it divides the threads. Aggregate throughput is completions per second
summed over the processes. The base policy is built (not warmed up) so that startup is short
and the processes overlap fully. Writes ``benchmarks/results/oversubscription.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import _common as common

CHILD = textwrap.dedent(
    """
    import json, statistics, sys
    sys.path.insert(0, {bench!r})
    import _common as common
    from fgrpo_pipeline.training.loop import train
    common.set_threads({threads})
    params = common.project_parameters()
    prompts = common.default_prompts(params)
    policy = common.base_policy(params, prompts, warm=False)
    config = common.training_config(params, steps={steps} + 3)
    metrics = train(policy, prompts, config, progress=False).metrics.iloc[3:]
    print(json.dumps({{"time_step": statistics.median(metrics["time_step"]),
                      "completions": config.prompts_per_step * config.group_size}}))
    """
)


def run_layout(processes: int, threads: int, steps: int) -> dict:
    code = CHILD.format(bench=str(Path(__file__).parent), threads=threads, steps=steps)
    # OMP_NUM_THREADS too, so that no library sizes its own pool to all cores.
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with common.ForeignCpu() as foreign:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", code],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            for _ in range(processes)
        ]
        outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    times = [o["time_step"] for o in outs]
    throughput = sum(o["completions"] / t for o, t in zip(outs, times, strict=True))
    return {
        "processes": processes,
        "threads_per_process": threads,
        "step_time_s_per_process": times,
        "completions_per_second_total": throughput,
        "foreign_cpu_cores": foreign.cores,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--layouts", nargs="+", default=["1x2", "2x1", "2x2"])
    common.machine_arguments(parser, threads=False)
    args = parser.parse_args()

    load = common.wait_for_quiet(args.max_load)
    layouts = []
    for layout in args.layouts:
        k, t = (int(x) for x in layout.split("x"))
        layouts.append(run_layout(k, t, args.steps))
        row = layouts[-1]
        print(
            f"{k} process(es) × {t} thread(s): step "
            + ", ".join(f"{s * 1e3:.1f}" for s in row["step_time_s_per_process"])
            + f" ms; {row['completions_per_second_total']:,.0f} completions/s in total"
        )
    results = {
        "benchmark": "oversubscription",
        "command": "python benchmarks/oversubscription.py",
        "load": load,
        "load_at_end": common.load_avg(),
        "machine": common.machine_info(),
        "layouts": layouts,
    }
    common.write_result("oversubscription", results, args.out)


if __name__ == "__main__":
    main()
