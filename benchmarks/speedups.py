"""The speed-ups of the realistic-shape work, added one at a time: our trainer's step time
with none of them (the code before), then with each added in turn, in one invocation.

    python benchmarks/speedups.py [--shape tiny|realistic] [--max-new-tokens 48]
        [--steps N] [--warmup-steps W] [--rounds 3] [--threads 0]

The stages (each adds its options to the previous one's; every option is a training
parameter, so the code before is still there to measure against):

0. ``before``: ``transformers``' ``generate`` (``engine_options: {use_generate: true}``),
   one teacher-forced pass padded to the longest completion (``length_buckets: 1``), glibc's
   default malloc (``keep_freed_memory: false``);
1. ``decoding_loop``: the hf engine's own decoding loop (each prompt prefilled once, a KV
   cache allocated once), the prompt's cache repeated to its rows (``cascade_attention:
   false``), every row decoded to the end (``drop_finished: false``)
   (these first stages step the model through its forward: ``direct_step: false``);
2. ``cascade_attention``: each prompt's keys and values held once for its G rows;
3. ``drop_finished``: rows that produced EOS leave the decoding batch;
4. ``direct_step``: the decoding steps run on the model's modules, without its forward's
   per-call machinery;
5. ``length_buckets``: the teacher-forced passes in up to 4 passes of similar lengths;
6. ``keep_freed_memory``: freed tensor memory kept in the process for the next step.

Every stage trains the same saved policy on the same prompts (``--shape``: ``tiny``, the
default run's work; ``realistic``, the 4M-parameter shape of ``vs_trl.py --shape
realistic``) in an interpreter of its own, as the allocator setting is process-wide, in
rounds (every stage once, then again), so drift in machine speed hits all alike; a run while
other processes kept more than 0.15 core busy is repeated. Step time = wall time between
consecutive optimiser steps, median over the timed steps of all rounds; the phases are the
trainer's ``time_*`` columns. Every stage samples what ``generate`` samples for the seed (the
decoding loop draws each row's random numbers as ``generate`` does, finished rows dropped or
not), so the stages do the same work up to float rounding; the mean completion length is
reported beside each to show it.
Writes ``benchmarks/results/speedups_<shape>.json``.

``--interleave``: the machine's drift between runs (±15 % within minutes here) is larger
than most single stages' effect, so this mode runs stages 0–5 in one process, side by side:
one training run per stage (the same policy, prompts and seed), and at every step each run
takes its step in a fresh random order, each step timed on its own. A stage's effect is then
the median over steps of its step time over the other stage's at the same step (paired,
so drift within a step's few seconds hits both alike), with a 95 % bootstrap interval over
the steps. ``keep_freed_memory`` is process-wide and left out (off for all). Writes
``benchmarks/results/speedups_<shape>_interleaved.json``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import _common as common

FORWARD_STEP = {"direct_step": False}  # the decoding loop's stages before direct_step
STAGES = (
    (
        "before",
        "transformers' generate, one padded teacher-forced pass, glibc's default malloc",
        {"engine_options": {"use_generate": True}, "length_buckets": 1, "keep_freed_memory": False},
    ),
    (
        "decoding_loop",
        "+ the engine's own decoding loop (prefill once, KV cache allocated once)",
        {"engine_options": {**FORWARD_STEP, "cascade_attention": False, "drop_finished": False}},
    ),
    (
        "cascade_attention",
        "+ each prompt's keys and values held once while decoding",
        {"engine_options": {**FORWARD_STEP, "drop_finished": False}},
    ),
    (
        "drop_finished",
        "+ finished rows leave the decoding batch",
        {"engine_options": FORWARD_STEP},
    ),
    ("direct_step", "+ decoding steps on the model's modules", {"engine_options": {}}),
    ("length_buckets", "+ completions in up to 4 passes of similar lengths", {"length_buckets": 4}),
    ("keep_freed_memory", "+ freed memory kept for the next step", {"keep_freed_memory": True}),
)
DEFAULT_STEPS = {"tiny": (60, 10), "realistic": (12, 3)}


def stage_options(upto: int) -> dict:
    """The training options of stage ``upto``: every stage's options up to it, merged."""
    options: dict = {}
    for _, _, added in STAGES[: upto + 1]:
        options.update(added)
    return options


def child(spec: dict) -> dict:
    """One stage's run (in its own interpreter): our trainer with the stage's options."""
    import vs_trl

    return vs_trl.child({**spec, "trainer": "ours", "overrides": stage_options(spec["stage"])})


def main() -> None:
    if common.serve_child(child):
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=("tiny", "realistic"), default="tiny")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="realistic only")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (60; 12)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="untimed steps (10; 3)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--interleave", action="store_true", help="stages 0-5 in one process")
    common.machine_arguments(parser)
    args = parser.parse_args()
    steps, warmup = DEFAULT_STEPS[args.shape]
    steps, warmup = args.steps or steps, args.warmup_steps or warmup

    common.quiet_libraries()
    threads = common.set_threads(args.threads)
    load = common.wait_for_quiet(args.max_load)
    params = common.project_parameters()
    if args.interleave:
        interleaved(args, params, steps, warmup, threads, load)
        return
    _, policy, overrides, _ = common.shape_inputs(args.shape, params, args.max_new_tokens)
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in STAGES}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = common.save_policy(policy, Path(tmp) / "policy")
        for round_ in range(args.rounds):
            for stage, (name, _, _) in enumerate(STAGES):
                spec = {
                    "shape": args.shape,
                    "max_new_tokens": args.max_new_tokens,
                    "model_dir": str(model_dir),
                    "stage": stage,
                    "steps": steps,
                    "warmup": warmup,
                    "threads": threads,
                }
                run, foreign, tries = common.measure_clean(
                    lambda spec=spec: common.in_child(__file__, spec), label=name
                )
                runs[name].append({**run, "foreign_cpu_cores": foreign, "tries": tries})
                median = statistics.median(run["step_times"])
                print(f"round {round_}: {name:<18} {median:.4f} s/step", flush=True)

    stages = summarise(runs)
    settings = {
        "shape": args.shape,
        "training_overrides": overrides,
        "parameters": sum(p.numel() for p in policy.model.parameters()),
        "steps": steps,
        "warmup_steps": warmup,
        "rounds": args.rounds,
        "stages": {
            name: {"what": what, "options": stage_options(i)}
            for i, (name, what, _) in enumerate(STAGES)
        },  # fmt: skip
    }
    print_table(stages)
    results = _results(f"speedups_{args.shape}", settings, load, stages)
    common.write_result(f"speedups_{args.shape}", results, args.out)


def interleaved(args, params, steps: int, warmup: int, threads: int, load: dict) -> None:
    """``--interleave`` (module docstring): stages 0-5 stepped in turn in this process."""
    from fgrpo_pipeline.training import step as training_steps
    from fgrpo_pipeline.training.loop import setup

    prompts, policy, overrides, reward = common.shape_inputs(
        args.shape, params, args.max_new_tokens
    )
    names = [name for name, _, _ in STAGES[:-1]]  # keep_freed_memory is process-wide
    runs = {}
    for stage, name in enumerate(names):
        options = {**overrides, **stage_options(stage), "steps": warmup + steps}
        config = common.training_config(params, **options)
        runs[name] = setup(policy, prompts, config, reward_fn=reward, correctness_fn=None,
                           preferences=None, monitors=(), resume_dir=None)  # fmt: skip
    times: dict[str, list[float]] = {name: [] for name in names}
    lengths: dict[str, list[float]] = {name: [] for name in names}
    order = random.Random(0)
    for step in range(1, warmup + steps + 1):
        for name in order.sample(names, len(names)):
            run = runs[name]
            start = time.perf_counter()
            # One step of training.loop.train, in its order.
            chosen = training_steps.sample_prompts(run, step)
            batch = training_steps.generate(run, chosen, step)
            scored = training_steps.score(run, batch, chosen)
            ref_logps = training_steps.reference_logprobs(run, batch)
            result = training_steps.update(run, batch, scored, ref_logps, step)
            training_steps.metrics_row(run, step, batch, scored, ref_logps, result, (0,) * 4)
            if step > warmup:
                times[name].append(time.perf_counter() - start)
                lengths[name].append(float(batch.lengths.float().mean()))
        if step > warmup:
            row = ", ".join(f"{name} {times[name][-1]:.4f}" for name in names)
            print(f"step {step - warmup}/{steps}: {row}", flush=True)
    stages = paired_effects(times, lengths)
    settings = {
        "shape": args.shape,
        "training_overrides": overrides,
        "steps": steps,
        "warmup_steps": warmup,
        "stage_order": "a fresh random order at every step (random.Random(0))",
        "stages": {name: {"options": stage_options(i)} for i, name in enumerate(names)},
        "threads": threads,
    }
    results = _results(f"speedups_{args.shape}_interleaved", settings, load, stages)
    print(
        f"\n{'stage':<18}{'step s':>9}{'/ before [95 %]':>26}{'/ previous [95 %]':>26}{'length':>8}"
    )
    for name, st in stages.items():
        print(
            f"{name:<18}{st['step_time_s']['median']:>9.4f}{common.interval_text(st['to_before']):>26}"
            f"{common.interval_text(st['to_previous']):>26}{st['completion_length']:>8.2f}"
        )
    common.write_result(f"speedups_{args.shape}_interleaved", results, args.out)


def _results(benchmark: str, settings: dict, load: dict, stages: dict) -> dict:
    return {
        "benchmark": benchmark,
        "command": common.command_line("speedups.py"),
        "settings": settings,
        "load": load,
        "load_at_end": common.load_avg(),
        "machine": common.machine_info(),
        "stages": stages,
    }


def paired_effects(times: dict[str, list[float]], lengths: dict[str, list[float]]) -> dict:
    """Per stage: its step times, and the median over steps of its time over the first
    stage's and over the previous stage's at the same step, each with a 95 % bootstrap
    interval over the steps."""
    names = list(times)
    return {
        name: {
            "step_time_s": common.summary(times[name]),
            "to_before": common.paired_median_ratio(times[name], times[names[0]]),
            "to_previous": common.paired_median_ratio(times[name], times[names[max(i - 1, 0)]]),
            "completion_length": statistics.fmean(lengths[name]),
        }
        for i, name in enumerate(names)
    }


def summarise(runs: dict[str, list[dict]]) -> dict:
    """Per stage: step-time summary, per-round medians, phase medians, mean completion length,
    tokens/s, and the step time over stage 0's and over the previous stage's."""
    out: dict = {}
    first = previous = None
    for name, reps in runs.items():
        times = [t for rep in reps for t in rep["step_times"]]
        step = statistics.median(times)
        tokens = statistics.fmean(r["completion_tokens_per_step"] for r in reps)
        out[name] = {
            "step_time_s": common.summary(times),
            "step_time_median_per_round_s": [statistics.median(r["step_times"]) for r in reps],
            "foreign_cpu_cores_per_round": [r["foreign_cpu_cores"] for r in reps],
            "phases_median_s": {
                key: statistics.median(r["phases_median_s"][key] for r in reps)
                for key in reps[0]["phases_median_s"]
            },
            "completion_length": statistics.fmean(r["completion_length"] for r in reps),
            "tokens_per_s": tokens / step,
            "to_before": step / first if first else 1.0,
            "to_previous": step / previous if previous else 1.0,
        }
        first, previous = first or step, step
    # The same ratios round by round (a round runs every stage back to back), less exposed to
    # the machine's drift between rounds.
    rounds = {name: s["step_time_median_per_round_s"] for name, s in out.items()}
    names = list(rounds)
    for i, name in enumerate(names):
        before, prev = rounds[names[0]], rounds[names[max(i - 1, 0)]]
        out[name]["to_before_per_round"] = [
            a / b for a, b in zip(rounds[name], before, strict=True)
        ]
        out[name]["to_previous_per_round"] = [
            a / b for a, b in zip(rounds[name], prev, strict=True)
        ]
    return out


def print_table(stages: dict) -> None:
    print(
        f"\n{'stage':<18}{'step s':>9}{'/ before':>10}{'/ prev':>8}{'gen s':>8}{'score s':>9}"
        f"{'update s':>10}{'length':>8}{'tokens/s':>10}   / prev per round"
    )
    for name, s in stages.items():
        phases = s["phases_median_s"]
        print(
            f"{name:<18}{s['step_time_s']['median']:>9.4f}{s['to_before']:>10.3f}"
            f"{s['to_previous']:>8.3f}{phases['generation']:>8.4f}{phases['scoring']:>9.4f}"
            f"{phases['update']:>10.4f}{s['completion_length']:>8.2f}{s['tokens_per_s']:>10.0f}"
            "   " + ", ".join(f"{r:.3f}" for r in s["to_previous_per_round"])
        )


if __name__ == "__main__":
    main()
