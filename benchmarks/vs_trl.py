"""Side by side with TRL's GRPOTrainer: the same model, prompts, reward and sizes.

    pip install -e ".[bench]"            # TRL, an optional benchmark dependency
    python benchmarks/vs_trl.py [--steps 40] [--warmup-steps 5] [--rounds 6] [--threads 2]
    python benchmarks/vs_trl.py --shape realistic [--lengths 16 48 128]

(On the dev machine TRL lives in its own venv layered over the dev venv, so that installing it
changes nothing there: ``/work/venv-bench/bin/python benchmarks/vs_trl.py``; see
docs/benchmarks.md, "Realistic shape".)

Both trainers run in this one process on the same work:

* the same policy, saved with ``save_pretrained`` and loaded back by both; TRL loads its
  reference model from that directory too;
* the same prompts, the same reward (a function with TRL's signature, given to TRL as
  ``reward_funcs`` and to ours as ``train(..., reward_fn=...)`` or by its registry name),
  P prompts × G completions per optimiser step, the same ``max_new_tokens`` /
  ``max_completion_length``, temperature, top_p = 1 and top-k off;
* the same optimiser: torch AdamW, the training learning rate, no weight decay, a constant
  schedule, gradient clipping at ``max_grad_norm``, one optimiser step per generation batch
  (TRL: ``num_iterations=1``, ``gradient_accumulation_steps=1``), float32, no gradient
  checkpointing, the same torch thread count.

Two shapes (``--shape``):

* ``tiny`` (the default): the default ``kedro run``'s work — the ``base_policy`` pipeline's
  tiny Qwen2 (built locally, warmed up with the conf/base parameters), the train split of
  ``data_preparation``, the ``exact_number`` reward, P = 32 × G = 8, 4 new tokens. Writes
  ``benchmarks/results/vs_trl.json``.
* ``realistic``: an untrained Qwen2 of 4.0M parameters (hidden 256, 4 layers, built with
  ``build_tiny_policy`` over the character tokenizer), few-shot sum prompts of ~65 tokens
  (six solved ``a+b=c`` lines, then the question), the ``digit_share`` reward (the share of
  digits in the completion: spread on random text), P = 8 × G = 8, up to 48 new tokens, or
  each of ``--lengths`` (e.g. ``16 48 128``, for how both grow with completion length).
  It measures the cost of a step, not learning: both sides train at a learning rate of
  1e-12 (every step runs all its work, no weight moves), so both keep sampling the
  untrained model's lengths; at a real rate the two losses move the policy apart and each
  side's lengths (its work) with it. Writes ``benchmarks/results/vs_trl_realistic.json``.

Ours trains f-GRPO (the default ``training`` loss: KL divergence, β = 0.1), which always
scores the reference. TRL runs GRPO with β = 0.1 (it then loads a reference model and adds the
k3 KL) and, for scale, with β = 0 (no reference model: less work than ours). The losses differ
by design; the work around them (generation, rewards, policy and reference forward, backward,
AdamW) is the same. When β = 0 is among ``--betas``, ours also runs the same work as TRL's
β = 0 (``ours_grpo_no_reference``: GRPO, ``aggregation: dapo`` as TRL's default loss type,
``kl_coef: 0``, ``score_reference: false``: no reference model, no reference pass), and the
like-for-like ratio of the two is reported beside the others.

Step time is the wall time between the ends of consecutive optimiser steps (everything the
loop does, logging included), median over ``--steps`` steps after ``--warmup-steps``. The
configurations run in rounds, every configuration once per round in a fresh random order
(``random.Random(round)``), so drift in the machine's speed, which is large on a shared host,
hits all of them alike and favours none by its place in the round; round r runs training
seed r on both sides (other prompts, other lengths, averaged over the rounds); and a run
during which other processes kept more than 0.15 of a core busy is measured again (up to 3
tries; ``foreign_cpu_cores`` in the JSON). Each ratio is reported twice: the pooled medians'
ratio, and the median of the rounds' ratios (each round's two runs measured minutes apart)
with a 95 % bootstrap interval over the rounds, the one to read when the machine drifts.
Each trainer's own phases are timed too: ours from its per-step ``time_*`` columns, TRL's by
wrapping its methods (generation, rewards, reference and policy log-probs, the rest of its input
preparation, loss, backward, clipping, optimiser). Tokens/s = generated completion tokens
per step (EOS included) / median step time.
"""

from __future__ import annotations

import argparse
import functools
import random
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import _common as common
import torch

SHAPES = ("tiny", "realistic")
# --steps / --warmup-steps / --rounds when not given: a realistic step is ~10-50× a tiny one;
# its rounds are kept short (a round's runs minutes apart) and many (a ratio per round).
DEFAULT_STEPS = {"tiny": (40, 5), "realistic": (10, 2)}
DEFAULT_ROUNDS = {"tiny": 6, "realistic": 6}
# Ours / TRL's step time to reach (against TRL with a reference model, β > 0).
GOAL_RATIO = {"tiny": 0.6, "realistic": 0.5}
PHASE_GROUPS = ("generation", "scoring", "update")
# Ours doing TRL-at-β=0's work: GRPO with TRL's default token reduction, no reference at all.
OURS_NO_REFERENCE = "ours_grpo_no_reference"
NO_REFERENCE_OVERRIDES = {
    "loss": "grpo",
    "aggregation": "dapo",
    "kl_coef": 0.0,
    "score_reference": False,
}
TRL_PHASES = (
    "generation",
    "rewards",
    "reference_logps",
    "inputs_other",
    "policy_logps",
    "loss",
    "backward",
    "clip",
    "optimizer",
)


def run_ours(
    model_dir: Path,
    params,
    prompts,
    *,
    steps: int,
    warmup: int,
    overrides: dict | None = None,
    reward_fn=None,
) -> dict:
    """Our trainer on the saved policy: step times, phase medians, lengths, mean reward.

    ``reward_fn`` replaces the configured rewards (``train(..., reward_fn=...)``).
    """
    from fgrpo_pipeline.models.policy import load_pretrained_policy
    from fgrpo_pipeline.training.loop import train

    policy = load_pretrained_policy(str(model_dir), tokenizer="fast", local_files_only=True)
    config = common.training_config(params, steps=warmup + steps, **(overrides or {}))
    ends: list[float] = []
    result = train(
        policy,
        prompts,
        config,
        progress=False,
        on_step=lambda *_: ends.append(time.perf_counter()),
        reward_fn=reward_fn,
    )
    intervals = [b - a for a, b in zip(ends, ends[1:], strict=False)][warmup - 1 :]
    metrics = result.metrics.iloc[warmup:]
    phases = {
        name: statistics.median(metrics[f"time_{name}"])
        for name in ("generation", "scoring", "update", "step")
    }
    length = float(metrics["completion_length"].mean())
    return {
        "step_times": intervals,
        "phases_median_s": phases,
        "completion_length": length,
        "completion_tokens_per_step": length * config.prompts_per_step * config.group_size,
        "reward_mean": float(metrics["reward_mean"].mean()),
    }


class _Timer:
    """Accumulates wall time per named phase within the current optimiser step."""

    def __init__(self) -> None:
        self.current: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []

    def wrap(self, name_of, fn, observe=None):
        """``fn`` timed under ``name_of(*args)``; ``observe(result)`` sees what it returns."""

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                result = fn(*args, **kwargs)
            finally:
                self.current[name_of(*args, **kwargs)] += time.perf_counter() - t0
            if observe is not None:
                observe(result)
            return result

        return timed


def run_trl(
    model_dir: Path,
    params,
    prompts,
    *,
    beta: float,
    steps: int,
    warmup: int,
    overrides: dict | None = None,
    reward=None,
) -> dict:
    """TRL's GRPOTrainer on the saved policy, with ``reward`` (default ``exact_number``)."""
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    if reward is None:
        from fgrpo_pipeline.algorithms.rewards import exact_number as reward

    cfg = common.training_config(params, **(overrides or {}))
    p, g = cfg.prompts_per_step, cfg.group_size
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as out_dir:
        args = GRPOConfig(
            output_dir=out_dir,
            # One optimiser step = one generation batch of P prompts × G completions.
            per_device_train_batch_size=p * g,
            num_generations=g,
            gradient_accumulation_steps=1,
            num_iterations=1,
            max_completion_length=cfg.sampling.max_new_tokens,
            temperature=cfg.sampling.temperature,
            top_p=cfg.sampling.top_p,
            top_k=0,
            beta=beta,
            epsilon=cfg.loss.epsilon,
            scale_rewards="group",
            learning_rate=cfg.learning_rate,
            weight_decay=cfg.weight_decay,
            max_grad_norm=cfg.max_grad_norm,
            lr_scheduler_type="constant",
            optim="adamw_torch",
            max_steps=warmup + steps,
            seed=cfg.seed,
            use_cpu=True,
            bf16=False,
            fp16=False,
            gradient_checkpointing=False,
            use_vllm=False,
            model_init_kwargs={"dtype": torch.float32},
            logging_steps=10,
            log_completions=False,
            report_to="none",
            save_strategy="no",
            eval_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(model_dir))
        tokenizer.padding_side = "left"
        dataset = Dataset.from_pandas(prompts[["prompt", "ground_truth"]], preserve_index=False)
        timer = _Timer()
        ends: list[float] = []
        tokens: list[float] = []  # completion tokens (TRL's completion_mask) per generation
        rewards: list[float] = []  # mean reward per generation batch

        class StepClock(TrainerCallback):
            def on_pre_optimizer_step(self, *_, **__):
                self.t_opt = time.perf_counter()

            def on_optimizer_step(self, *_, **__):
                timer.current["optimizer"] += time.perf_counter() - self.t_opt

            def on_step_end(self, *_, **__):
                ends.append(time.perf_counter())
                timer.steps.append(dict(timer.current))
                timer.current.clear()

        trainer = GRPOTrainer(
            model=str(model_dir),
            reward_funcs=[reward],
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[StepClock()],
        )
        trainer.remove_callback(PrinterCallback)  # no per-log prints (disable_tqdm adds it)
        torch.set_num_threads(threads)  # the same threads as ours, whatever the trainer set
        ref = trainer.ref_model

        def logps_name(model, *_, **__):
            if model is ref or not torch.is_grad_enabled():
                return "reference_logps"
            return "policy_logps"

        def count_tokens(output) -> None:
            tokens.append(float(output["completion_mask"].sum()))

        def mean_reward(per_func) -> None:  # [N, reward functions], NaN where a func abstains
            rewards.append(float(torch.nansum(per_func, dim=1).mean()))

        def named(name):
            return lambda *_, **__: name

        for attr, name_of, observe in (
            ("_generate_and_score_completions", named("generate_and_score"), count_tokens),
            ("_generate_single_turn", named("generation"), None),
            ("_calculate_rewards", named("rewards"), mean_reward),
            ("_get_per_token_logps_and_entropies", logps_name, None),
            ("_compute_loss", named("loss"), None),
            ("_clip_grad_norm", named("clip"), None),
        ):
            # Private methods of TRL 1.16: a release without one only loses that phase's time.
            if hasattr(trainer, attr):
                setattr(trainer, attr, timer.wrap(name_of, getattr(trainer, attr), observe))
        trainer.accelerator.backward = timer.wrap(named("backward"), trainer.accelerator.backward)
        trainer.train()
        for step in timer.steps:
            # _compute_loss calls the policy forward: "loss" holds both; keep the loss's own part.
            step["loss"] = step.get("loss", 0.0) - step.get("policy_logps", 0.0)
            # _generate_and_score_completions holds generation, rewards and the reference
            # pass; the rest is TRL's input preparation (tokenising, padding, advantages, ...).
            inner = sum(step.get(k, 0.0) for k in ("generation", "rewards", "reference_logps"))
            step["inputs_other"] = step.pop("generate_and_score", inner) - inner
        intervals = [b - a for a, b in zip(ends, ends[1:], strict=False)][warmup - 1 :]
        phases = {
            name: statistics.median(step.get(name, 0.0) for step in timer.steps[warmup:])
            for name in TRL_PHASES
        }
        timed_tokens = tokens[warmup:] or tokens
        return {
            "beta": beta,
            "reference_model": ref is not None,
            "step_times": intervals,
            "phases_median_s": phases,
            "completion_length": statistics.fmean(timed_tokens) / (p * g) if tokens else None,
            "completion_tokens_per_step": statistics.fmean(timed_tokens) if tokens else None,
            "reward_mean": statistics.fmean(rewards[warmup:] or rewards) if rewards else None,
            "torch_threads": torch.get_num_threads(),
        }


def child(spec: dict) -> dict:
    """One configuration's run, in an interpreter of its own (see ``run_rounds``); the
    spec's ``seed`` and ``overrides`` (training parameters), if given, go over the shape's."""
    params = common.project_parameters()
    prompts, _, overrides, reward = common.shape_inputs(
        spec["shape"], params, spec["max_new_tokens"], build_policy=False
    )
    if "seed" in spec:
        overrides["seed"] = spec["seed"]
    overrides.update(spec.get("overrides", {}))
    runner = {"ours": run_ours, "trl": run_trl}[spec["trainer"]]
    options = {"reward_fn": reward} if spec["trainer"] == "ours" else {"reward": reward}
    if spec["trainer"] == "trl":
        options["beta"] = spec["beta"]
    return runner(
        Path(spec["model_dir"]),
        params,
        prompts,
        steps=spec["steps"],
        warmup=spec["warmup"],
        overrides=overrides,
        **options,
    )


def run_rounds(
    model_dir: Path,
    *,
    args,
    threads: int,
    max_new_tokens: int | None = None,
    tag: str = "",
) -> dict[str, list[dict]]:
    """Every configuration (ours, then TRL at each β) once per round, each measured clean,
    each in a fresh interpreter: process-wide state (the C allocator's settings and heap,
    thread pools) must not pass from one trainer to the next."""
    configs = [
        ("ours", "ours", None, {}),
        *((f"trl_beta_{beta:g}", "trl", beta, {}) for beta in args.betas),
    ]
    if 0.0 in args.betas:
        configs.append((OURS_NO_REFERENCE, "ours", None, NO_REFERENCE_OVERRIDES))
    runs: dict[str, list[dict]] = {name: [] for name, *_ in configs}  # tables in this order
    for round_ in range(args.rounds):
        order = random.Random(round_).sample(configs, len(configs))
        for position, (name, trainer, beta, overrides) in enumerate(order):
            spec = {
                "trainer": trainer,
                "beta": beta,
                "overrides": overrides,
                "shape": args.shape,
                "max_new_tokens": max_new_tokens,
                "model_dir": str(model_dir),
                "steps": args.steps,
                "warmup": args.warmup_steps,
                "threads": threads,
                # Round r runs seed r on both sides: each round samples other prompts (and
                # so other lengths); rounds of one seed would repeat one draw of them.
                "seed": round_,
            }
            run, foreign, tries = common.measure_clean(
                lambda spec=spec: common.in_child(__file__, spec), label=f"{tag}{name}"
            )
            runs[name].append(
                {**run, "foreign_cpu_cores": foreign, "tries": tries, "place_in_round": position}
            )
            median = statistics.median(runs[name][-1]["step_times"])
            print(f"{tag}round {round_}: {name} {median:.4f}", flush=True)
    return runs


def _mean_of(reps: list[dict], key: str) -> float | None:
    values = [r[key] for r in reps if r.get(key) is not None]
    return statistics.fmean(values) if values else None


def phase_groups(name: str, phases: dict[str, float], step: float) -> dict[str, float]:
    """Both trainers' phases in our trainer's three groups, plus what neither names.

    generation; scoring = rewards (+ our advantages) + reference log-probs (+ TRL's other input
    preparation); update = policy forward + loss + backward + clipping + optimiser; other =
    the median step minus those (loop and bookkeeping outside them; ≈, medians do not add).
    """
    if name.startswith("ours"):
        groups = {k: phases[k] for k in ("generation", "scoring", "update")}
    else:
        groups = {
            "generation": phases["generation"],
            "scoring": phases["rewards"] + phases["reference_logps"] + phases["inputs_other"],
            "update": sum(
                phases[k] for k in ("policy_logps", "loss", "backward", "clip", "optimizer")
            ),
        }
    groups["other"] = step - sum(groups.values())
    return groups


def summarise(runs: dict[str, list[dict]]) -> dict:
    """Per configuration: step-time summary, per-round medians, phases, lengths, tokens/s;
    and the ratios of our median step time to each TRL configuration's."""
    configs: dict = {}
    for name, reps in runs.items():
        times = [t for rep in reps for t in rep["step_times"]]
        phases = {
            key: statistics.median(rep["phases_median_s"][key] for rep in reps)
            for key in reps[0]["phases_median_s"]
        }
        step = statistics.median(times)
        tokens = _mean_of(reps, "completion_tokens_per_step")
        configs[name] = {
            "step_time_s": common.summary(times),
            "step_time_median_per_round_s": [statistics.median(r["step_times"]) for r in reps],
            "foreign_cpu_cores_per_round": [r["foreign_cpu_cores"] for r in reps],
            "tries_per_round": [r["tries"] for r in reps],
            "place_in_round": [r["place_in_round"] for r in reps],
            "phases_median_s": phases,
            "phase_groups_s": phase_groups(name, phases, step),
            "completion_length": _mean_of(reps, "completion_length"),
            "completion_tokens_per_step": tokens,
            "tokens_per_s": tokens / step if tokens is not None else None,
            # each phase group's cost per generated completion token (µs)
            "phase_groups_us_per_token": (
                {k: v / tokens * 1e6 for k, v in phase_groups(name, phases, step).items()}
                if tokens
                else None
            ),
            "reward_mean": _mean_of(reps, "reward_mean"),
            **({"reference_model": reps[0]["reference_model"]} if "beta" in reps[0] else {}),
        }
    trl = [name for name in configs if name.startswith("trl")]
    summary = {
        "configs": configs,
        "ratio_ours_to_trl": {name: _ratio(configs, "ours", name) for name in trl},
        # The same ratio round by round (each round runs every configuration back to back).
        "ratio_ours_to_trl_per_round": {
            name: _ratio(configs, "ours", name, per_round=True) for name in trl
        },
        # Their median, with a 95 % bootstrap interval over the rounds.
        "ratio_ours_to_trl_paired": {name: _paired(configs, "ours", name) for name in trl},
    }
    if OURS_NO_REFERENCE in configs and "trl_beta_0" in configs:
        summary["like_for_like_no_reference"] = {
            "ours": OURS_NO_REFERENCE,
            "trl": "trl_beta_0",
            "ratio": _ratio(configs, OURS_NO_REFERENCE, "trl_beta_0"),
            "ratio_per_round": _ratio(configs, OURS_NO_REFERENCE, "trl_beta_0", per_round=True),
            "ratio_paired": _paired(configs, OURS_NO_REFERENCE, "trl_beta_0"),
        }
    return summary


def _paired(configs: dict, ours: str, other: str) -> dict[str, float]:
    return common.paired_median_ratio(
        configs[ours]["step_time_median_per_round_s"],
        configs[other]["step_time_median_per_round_s"],
    )


def _ratio(configs: dict, ours: str, other: str, *, per_round: bool = False):
    """The median step time of ``ours`` over ``other``'s, pooled or per round."""
    if not per_round:
        return configs[ours]["step_time_s"]["median"] / configs[other]["step_time_s"]["median"]
    pairs = zip(
        configs[ours]["step_time_median_per_round_s"],
        configs[other]["step_time_median_per_round_s"],
        strict=True,
    )
    return [o / t for o, t in pairs]


def print_table(summary: dict) -> None:
    print(
        f"{'config':>14}{'median step s':>15}{'ours / it':>11}{'tokens/s':>10}{'length':>8}"
        f"{'gen s':>9}{'score s':>9}{'update s':>9}{'other s':>9}"
    )
    like = summary.get("like_for_like_no_reference", {})
    for name, c in summary["configs"].items():
        ratio = (
            like["ratio"]
            if name == OURS_NO_REFERENCE
            else summary["ratio_ours_to_trl"].get(name, 1.0)
        )
        groups = c["phase_groups_s"]
        tps = c["tokens_per_s"] or float("nan")
        length = c["completion_length"] or float("nan")
        print(
            f"{name:>14}{c['step_time_s']['median']:>15.4f}{ratio:>11.3f}{tps:>10.0f}"
            f"{length:>8.1f}"
            + "".join(f"{groups[k]:>9.4f}" for k in ("generation", "scoring", "update", "other"))
        )
    for name, ratios in summary["ratio_ours_to_trl_per_round"].items():
        print(
            f"ours / {name} per round: " + ", ".join(f"{r:.3f}" for r in ratios)
            + f"; median {common.interval_text(summary['ratio_ours_to_trl_paired'][name])}"
        )  # fmt: skip
    if like:
        print(
            f"like for like, {like['ours']} / {like['trl']}: {like['ratio']:.3f} (rounds "
            + ", ".join(f"{r:.3f}" for r in like["ratio_per_round"])
            + f"; median {common.interval_text(like['ratio_paired'])})"
        )
    print(f"{'µs per generated token':>24}{'gen':>9}{'score':>9}{'update':>9}{'other':>9}")
    for name, c in summary["configs"].items():
        per_token = c["phase_groups_us_per_token"] or {}
        print(
            f"{name:>24}"
            + "".join(f"{per_token.get(k, float('nan')):>9.1f}" for k in (*PHASE_GROUPS, "other"))
        )


def growth(per_length: dict[int, dict]) -> dict:
    """Per configuration, over the lengths: step time, tokens/s and phase groups, with the
    exponent b of time ∝ (mean completion length)^b (least squares on log-log)."""
    lengths = sorted(per_length)
    out: dict = {}
    for name in per_length[lengths[0]]["configs"]:
        rows = [per_length[n]["configs"][name] for n in lengths]
        mean_lengths = [r["completion_length"] for r in rows]
        entry = {
            "max_new_tokens": lengths,
            "mean_completion_length": mean_lengths,
            "step_time_median_s": [r["step_time_s"]["median"] for r in rows],
            "tokens_per_s": [r["tokens_per_s"] for r in rows],
            "phase_groups_s": {k: [r["phase_groups_s"][k] for r in rows] for k in PHASE_GROUPS},
        }
        if name.startswith("trl"):
            entry["ratio_ours_to_it"] = [per_length[n]["ratio_ours_to_trl"][name] for n in lengths]
        if name == OURS_NO_REFERENCE:
            entry["ratio_to_trl_beta_0"] = [
                per_length[n]["like_for_like_no_reference"]["ratio"] for n in lengths
            ]
        usable = len(lengths) >= 2 and all(x and x > 0 for x in mean_lengths)
        if usable:
            entry["exponent_vs_mean_length"] = {
                "step": common.fit_exponent(mean_lengths, entry["step_time_median_s"]),
                **{
                    k: common.fit_exponent(mean_lengths, v)
                    for k, v in entry["phase_groups_s"].items()
                    if all(x > 0 for x in v)
                },
            }
        out[name] = entry
    return out


def print_growth(table: dict) -> None:
    lengths = next(iter(table.values()))["max_new_tokens"]
    print("\ngrowth with max_new_tokens (median step s; b: step ∝ mean completion length^b)")
    print(f"{'config':>14}" + "".join(f"{n:>10}" for n in lengths) + f"{'b':>8}")
    for name, entry in table.items():
        b = entry.get("exponent_vs_mean_length", {}).get("step", float("nan"))
        print(
            f"{name:>14}"
            + "".join(f"{t:>10.4f}" for t in entry["step_time_median_s"])
            + f"{b:>8.2f}"
        )
    for name, entry in table.items():
        if "ratio_ours_to_it" in entry:
            print(
                f"{'ours / ' + name:>22}: "
                + ", ".join(f"{r:.3f}" for r in entry["ratio_ours_to_it"])
            )


def main() -> None:
    if common.serve_child(child):
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=SHAPES, default="tiny", help="the work (see above)")
    parser.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        default=None,
        help=f"max new tokens, one measurement each (realistic only; default "
        f"{common.REALISTIC_MAX_NEW_TOKENS}; e.g. 16 48 128 for the growth table)",
    )
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (40; 10)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="untimed steps (5; 2)")
    parser.add_argument("--rounds", type=int, default=None, help="repeats of every config (6)")
    parser.add_argument("--betas", type=float, nargs="+", default=[0.1, 0.0], help="TRL betas")
    common.machine_arguments(parser)
    args = parser.parse_args()
    if args.shape == "tiny" and args.lengths:
        parser.error("--lengths applies to --shape realistic")
    default_steps, default_warmup = DEFAULT_STEPS[args.shape]
    args.steps = default_steps if args.steps is None else args.steps
    args.warmup_steps = default_warmup if args.warmup_steps is None else args.warmup_steps
    args.rounds = DEFAULT_ROUNDS[args.shape] if args.rounds is None else args.rounds
    if args.warmup_steps < 1 or args.steps < 1:
        parser.error("--steps and --warmup-steps must be ≥ 1 (a step time is between two ends)")
    try:
        import trl
    except ImportError:
        raise SystemExit("TRL is not installed: pip install -e '.[bench]'") from None
    common.quiet_libraries()
    threads = common.set_threads(args.threads)
    load = common.wait_for_quiet(args.max_load)
    params = common.project_parameters()
    if args.shape == "realistic":
        realistic(args, params, threads, load, trl.__version__)
        return
    prompts = common.default_prompts(params)
    policy = common.base_policy(params, prompts)
    cfg = common.training_config(params)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = common.save_policy(policy, Path(tmp) / "policy")
        runs = run_rounds(model_dir, args=args, threads=threads)

    results: dict = {
        "benchmark": "vs_trl",
        "command": "python benchmarks/vs_trl.py",
        "settings": {
            "prompts_per_step": cfg.prompts_per_step,
            "group_size": cfg.group_size,
            "completions_per_step": cfg.prompts_per_step * cfg.group_size,
            "max_new_tokens": cfg.sampling.max_new_tokens,
            "temperature": cfg.sampling.temperature,
            "learning_rate": cfg.learning_rate,
            "ours_loss": f"{cfg.loss.name} ({cfg.loss.divergence}, beta={cfg.loss.beta})",
            "trl_loss": "GRPO (loss_type dapo, TRL's default), k3 KL when beta > 0",
            "steps": args.steps,
            "warmup_steps": args.warmup_steps,
            "rounds": args.rounds,
            "seeds": list(range(args.rounds)),
            "trl_version": trl.__version__,
        },
        "load": load,
        "load_at_end": common.load_avg(),
        "machine": common.machine_info(),
        **summarise(runs),
    }
    results["goal_ratio_at_most"] = GOAL_RATIO["tiny"]
    print()
    print_table(results)
    for name, cfg_ in results["configs"].items():
        print(name, {k: round(v, 4) for k, v in cfg_["phases_median_s"].items()})
    common.write_result("vs_trl", results, args.out)


def realistic(args, params, threads: int, load: dict, trl_version: str) -> None:
    """``--shape realistic``: every configuration at each of ``--lengths``, in rounds."""
    lengths = args.lengths or [common.REALISTIC_MAX_NEW_TOKENS]
    prompts = common.realistic_prompts()
    # RoPE: the position limit only bounds the sequence; it adds no parameters.
    policy = common.realistic_policy(max_position_embeddings=max(512, 128 + max(lengths)))
    prompt_tokens = [len(ids) for ids in policy.tokenizer(prompts["prompt"].tolist())["input_ids"]]
    cfg = common.training_config(params, **common.realistic_overrides(lengths[0]))
    per_length: dict[int, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = common.save_policy(policy, Path(tmp) / "policy")
        for length in lengths:
            runs = run_rounds(
                model_dir,
                args=args,
                threads=threads,
                max_new_tokens=length,
                tag=f"[max_new_tokens {length}] ",
            )
            per_length[length] = summarise(runs)
            print(f"\nmax_new_tokens {length}:")
            print_table(per_length[length])
            print()

    results: dict = {
        "benchmark": "vs_trl_realistic",
        "command": common.command_line("vs_trl.py"),
        "settings": {
            "shape": "realistic",
            "model": {
                **common.REALISTIC_MODEL,
                "parameters": sum(p.numel() for p in policy.model.parameters()),
                "vocab_size": len(policy.tokenizer),
                "tie_word_embeddings": True,
                "trained": False,
            },
            "prompts": {
                "count": len(prompts),
                "shots": common.REALISTIC_SHOTS,
                "tokens_mean": statistics.fmean(prompt_tokens),
                "tokens_min": min(prompt_tokens),
                "tokens_max": max(prompt_tokens),
                "example": prompts["prompt"].iloc[0],
            },
            "reward": "digit_share (share of digits in the completion), both trainers",
            "prompts_per_step": cfg.prompts_per_step,
            "group_size": cfg.group_size,
            "completions_per_step": cfg.prompts_per_step * cfg.group_size,
            "max_new_tokens": lengths,
            "temperature": cfg.sampling.temperature,
            "learning_rate": cfg.learning_rate,
            "ours_loss": f"{cfg.loss.name} ({cfg.loss.divergence}, beta={cfg.loss.beta})",
            "trl_loss": "GRPO (loss_type dapo, TRL's default), k3 KL when beta > 0",
            "trl_betas": args.betas,
            "steps": args.steps,
            "warmup_steps": args.warmup_steps,
            "rounds": args.rounds,
            "seeds": list(range(args.rounds)),
            "trl_version": trl_version,
        },
        "load": load,
        "load_at_end": common.load_avg(),
        "machine": common.machine_info(),
        "lengths": {str(n): s for n, s in per_length.items()},
        "goal_ratio_at_most": GOAL_RATIO["realistic"],
    }
    if len(lengths) >= 2:
        results["growth"] = growth(per_length)
        print_growth(results["growth"])
    common.write_result("vs_trl_realistic", results, args.out)


if __name__ == "__main__":
    main()
