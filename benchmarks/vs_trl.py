"""Side by side with TRL's GRPOTrainer: the same model, prompts, reward and sizes.

    pip install -e ".[bench]"            # TRL, an optional benchmark dependency
    python benchmarks/vs_trl.py [--steps 40] [--warmup-steps 5] [--rounds 3] [--threads 2]

(On the dev machine TRL lives in its own venv layered over the dev venv, so that installing it
changes nothing there: ``/work/venv-bench/bin/python benchmarks/vs_trl.py``.)

Both trainers run in this one process on the same work:

* the same tiny Qwen2 policy — the ``base_policy`` pipeline's (built locally, warmed up with
  the conf/base parameters) saved with ``save_pretrained`` and loaded back by both; TRL
  loads its reference model from that directory too;
* the same prompts (the train split of ``data_preparation``), the same reward
  (``fgrpo_pipeline.algorithms.rewards.exact_number``, which has TRL's signature and reads the
  ``ground_truth`` column), P prompts × G completions per optimiser step, the same
  ``max_new_tokens`` / ``max_completion_length``, temperature, top_p = 1 and top-k off;
* the same optimiser: torch AdamW, the training learning rate, no weight decay, a constant
  schedule, gradient clipping at ``max_grad_norm``, one optimiser step per generation batch
  (TRL: ``num_iterations=1``, ``gradient_accumulation_steps=1``), float32, no gradient
  checkpointing, the same torch thread count.

Ours trains f-GRPO (the default ``training`` loss: KL divergence, β = 0.1), which always
scores the reference. TRL runs GRPO with β = 0.1 (it then loads a reference model and adds the
k3 KL) and, for scale, with β = 0 (no reference model: less work than ours). The losses differ
by design; the work around them (generation, rewards, policy and reference forward, backward,
AdamW) is the same.

Step time is the wall time between the ends of consecutive optimiser steps (everything the
loop does, logging included), median over ``--steps`` steps after ``--warmup-steps``. The
configurations run in rounds (ours, TRL β>0, TRL β=0, then again), so drift in machine load
hits all of them alike, and a run during which other processes kept more than 0.15 of a core
busy is measured again (up to 3 tries; ``foreign_cpu_cores`` in the JSON). Each trainer's
own phases are timed too: ours from its per-step ``time_*`` columns, TRL's by wrapping its
methods (generation, rewards, reference and policy log-probs, loss, backward, clipping,
optimiser). Writes ``benchmarks/results/vs_trl.json``.
"""

from __future__ import annotations

import argparse
import functools
import logging
import statistics
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

import _common as common
import torch


def run_ours(model_dir: Path, params, prompts, *, steps: int, warmup: int) -> dict:
    from fgrpo_pipeline.models.policy import load_pretrained_policy
    from fgrpo_pipeline.training.loop import train

    policy = load_pretrained_policy(str(model_dir), tokenizer="fast", local_files_only=True)
    config = common.training_config(params, steps=warmup + steps)
    ends: list[float] = []
    result = train(
        policy, prompts, config, progress=False, on_step=lambda *_: ends.append(time.perf_counter())
    )
    intervals = [b - a for a, b in zip(ends, ends[1:], strict=False)][warmup - 1 :]
    metrics = result.metrics.iloc[warmup:]
    phases = {
        name: statistics.median(metrics[f"time_{name}"])
        for name in ("generation", "scoring", "update", "step")
    }
    return {
        "step_times": intervals,
        "phases_median_s": phases,
        "completion_length": float(metrics["completion_length"].mean()),
        "reward_mean": float(metrics["reward_mean"].mean()),
    }


class _Timer:
    """Accumulates wall time per named phase within the current optimiser step."""

    def __init__(self) -> None:
        self.current: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []

    def wrap(self, name_of, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.current[name_of(*args, **kwargs)] += time.perf_counter() - t0

        return timed


def run_trl(model_dir: Path, params, prompts, *, beta: float, steps: int, warmup: int) -> dict:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from fgrpo_pipeline.algorithms.rewards import exact_number

    cfg = common.training_config(params)
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
        lengths: list[float] = []  # per logging window, from TRL's own metrics
        rewards: list[float] = []

        class StepClock(TrainerCallback):
            def on_pre_optimizer_step(self, *_, **__):
                self.t_opt = time.perf_counter()

            def on_optimizer_step(self, *_, **__):
                timer.current["optimizer"] += time.perf_counter() - self.t_opt

            def on_log(self, _args, _state, _control, logs=None, **__):
                for key, values in (("completions/mean_length", lengths), ("reward", rewards)):
                    if logs and key in logs:
                        values.append(float(logs[key]))

            def on_step_end(self, *_, **__):
                ends.append(time.perf_counter())
                timer.steps.append(dict(timer.current))
                timer.current.clear()

        trainer = GRPOTrainer(
            model=str(model_dir),
            reward_funcs=[exact_number],
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

        for attr, name_of in (
            ("_generate_single_turn", lambda *_, **__: "generation"),
            ("_calculate_rewards", lambda *_, **__: "rewards"),
            ("_get_per_token_logps_and_entropies", logps_name),
            ("_compute_loss", lambda *_, **__: "loss"),
            ("_clip_grad_norm", lambda *_, **__: "clip"),
        ):
            # Private methods of TRL 1.16: a release without one only loses that phase's time.
            if hasattr(trainer, attr):
                setattr(trainer, attr, timer.wrap(name_of, getattr(trainer, attr)))
        trainer.accelerator.backward = timer.wrap(
            lambda *_, **__: "backward", trainer.accelerator.backward
        )
        trainer.train()
        # _compute_loss calls the policy forward: "loss" holds both; keep the loss's own part.
        for step in timer.steps:
            step["loss"] = step.get("loss", 0.0) - step.get("policy_logps", 0.0)
        intervals = [b - a for a, b in zip(ends, ends[1:], strict=False)][warmup - 1 :]
        phases = {
            name: statistics.median(step.get(name, 0.0) for step in timer.steps[warmup:])
            for name in (
                "generation",
                "rewards",
                "reference_logps",
                "policy_logps",
                "loss",
                "backward",
                "clip",
                "optimizer",
            )
        }
        return {
            "beta": beta,
            "reference_model": ref is not None,
            "step_times": intervals,
            "phases_median_s": phases,
            "completion_length": statistics.fmean(lengths) if lengths else None,
            "reward_mean": statistics.fmean(rewards) if rewards else None,
            "torch_threads": torch.get_num_threads(),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per run")
    parser.add_argument("--warmup-steps", type=int, default=5, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=3, help="repeats of every configuration")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    parser.add_argument("--betas", type=float, nargs="+", default=[0.1, 0.0], help="TRL betas")
    parser.add_argument("--max-load", type=float, default=0.8)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    try:
        import trl
    except ImportError:
        raise SystemExit("TRL is not installed: pip install -e '.[bench]'") from None
    import transformers

    warnings.filterwarnings("ignore")
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("trl").setLevel(logging.ERROR)

    threads = common.set_threads(args.threads)
    load = common.wait_for_quiet(args.max_load)
    params = common.project_parameters()
    prompts = common.default_prompts(params)
    policy = common.base_policy(params, prompts)
    cfg = common.training_config(params)

    runs: dict[str, list[dict]] = defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "policy"
        policy.model.save_pretrained(model_dir)
        policy.tokenizer.save_pretrained(model_dir)
        for round_ in range(args.rounds):
            torch.set_num_threads(threads)
            run, foreign, tries = common.measure_clean(
                lambda: run_ours(
                    model_dir, params, prompts, steps=args.steps, warmup=args.warmup_steps
                ),
                label="ours",
            )
            runs["ours"].append({**run, "foreign_cpu_cores": foreign, "tries": tries})
            median = statistics.median(runs["ours"][-1]["step_times"])
            print(f"round {round_}: ours {median:.4f}")
            for beta in args.betas:
                torch.set_num_threads(threads)
                name = f"trl_beta_{beta:g}"
                run, foreign, tries = common.measure_clean(
                    lambda beta=beta: run_trl(
                        model_dir,
                        params,
                        prompts,
                        beta=beta,
                        steps=args.steps,
                        warmup=args.warmup_steps,
                    ),
                    label=name,
                )
                runs[name].append({**run, "foreign_cpu_cores": foreign, "tries": tries})
                median = statistics.median(runs[name][-1]["step_times"])
                print(f"round {round_}: {name} {median:.4f}")

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
            "trl_version": trl.__version__,
        },
        "load": load,
        "load_at_end": common.load_avg(),
        "machine": common.machine_info(),
        "configs": {},
    }
    for name, reps in runs.items():
        times = [t for rep in reps for t in rep["step_times"]]
        phases = {
            key: statistics.median(rep["phases_median_s"][key] for rep in reps)
            for key in reps[0]["phases_median_s"]
        }
        results["configs"][name] = {
            "step_time_s": common.summary(times),
            "step_time_median_per_round_s": [statistics.median(r["step_times"]) for r in reps],
            "foreign_cpu_cores_per_round": [r["foreign_cpu_cores"] for r in reps],
            "tries_per_round": [r["tries"] for r in reps],
            "phases_median_s": phases,
            "completion_length": statistics.fmean(
                r["completion_length"] for r in reps if r["completion_length"] is not None
            ),
            "reward_mean": statistics.fmean(
                r["reward_mean"] for r in reps if r["reward_mean"] is not None
            ),
            **({"reference_model": reps[0]["reference_model"]} if "beta" in reps[0] else {}),
        }
    ours = results["configs"]["ours"]["step_time_s"]["median"]
    results["ratio_ours_to_trl"] = {
        name: ours / cfg_["step_time_s"]["median"]
        for name, cfg_ in results["configs"].items()
        if name != "ours"
    }
    # The same ratio round by round (each round runs every configuration back to back).
    ours_rounds = results["configs"]["ours"]["step_time_median_per_round_s"]
    results["ratio_ours_to_trl_per_round"] = {
        name: [
            o / t for o, t in zip(ours_rounds, cfg_["step_time_median_per_round_s"], strict=True)
        ]
        for name, cfg_ in results["configs"].items()
        if name != "ours"
    }
    results["goal_ratio_at_most"] = 0.7
    print(f"\n{'config':>14}{'median step s':>16}{'ours / it':>12}")
    for name, cfg_ in results["configs"].items():
        ratio = results["ratio_ours_to_trl"].get(name, 1.0)
        print(f"{name:>14}{cfg_['step_time_s']['median']:>16.4f}{ratio:>12.3f}")
    for name, ratios in results["ratio_ours_to_trl_per_round"].items():
        print(f"ours / {name} per round: " + ", ".join(f"{r:.3f}" for r in ratios))
    for name, cfg_ in results["configs"].items():
        print(name, {k: round(v, 4) for k, v in cfg_["phases_median_s"].items()})
    common.write_result("vs_trl", results, args.out)


if __name__ == "__main__":
    main()
