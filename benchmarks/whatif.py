"""What-if: the shared-prompt scoring and prefill (in src, ``share_prompts``) on vs off, and
optimisations the breakdown points to that are still prototypes, timed against src.

    python benchmarks/whatif.py [--reps 30] [--threads 0]

Each is checked to give the same numbers as the code it replaces on the same batch, and timed
against it in the same process (interleaved, median of ``--reps``) at the default size
(P = 32 prompts × G = 8, 4 new tokens, the warmed-up base policy):

1. ``shared_prompt_logps`` (src: ``batch_logprobs(..., share_prompts=True)``, the default):
   the teacher-forced log-probs (reference: no grad; policy: forward + backward) run the prompt
   once per group — P rows, not P·G — and the completion tokens of its G rows on top of that
   prompt's KV cache. Against ``share_prompts=False``: the token positions processed drop from
   P·G·(L_prompt + T) to P·L_prompt + P·G·(T − 1).
2. ``shared_prompt_generate`` (src: ``HFEngine(share_prompts=True)``, the default): the prefill
   runs each distinct prompt once and ``generate`` starts from its cache repeated G times.
   Same samples (same seed) as ``share_prompts=False``.
3. ``gumbel_sampling`` (prototype): sampling as argmax(logits / T + Gumbel noise) through a
   logits processor and greedy decoding, instead of ``torch.multinomial`` (whose CPU kernel
   draws exponentials slowly). Same distribution, different random stream.
4. ``fused_adamw`` (prototype): ``torch.optim.AdamW(fused=True)`` vs the default for-loop.
5. ``cpu_seed`` (prototype): ``torch.default_generator.manual_seed`` vs ``torch.manual_seed``,
   which also seeds (lazily, with a stack trace each time) CUDA, XPU and MTIA.

Writes ``benchmarks/results/whatif.json``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import _common as common
import torch


def median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def interleaved(fns: dict, reps: int, rounds: int = 3) -> dict[str, float]:
    """Median ms of each callable, measured in alternating blocks."""
    for fn in fns.values():
        fn()
    blocks: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            blocks[name].append(median_ms(fn, max(1, reps // rounds)))
    return {name: statistics.median(v) for name, v in blocks.items()}


def main() -> None:  # noqa: PLR0914 - one linear script
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=30)
    common.machine_arguments(parser)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    import transformers
    from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

    transformers.utils.logging.set_verbosity_error()  # the past_key_values rename notice

    from fgrpo_pipeline.rollout import HFEngine, SamplingConfig, batch_logprobs, get_engine

    common.set_threads(args.threads)
    load = common.wait_for_quiet(args.max_load)
    params = common.project_parameters()
    prompts = common.default_prompts(params)
    policy = common.base_policy(params, prompts)
    config = common.training_config(params)
    p, g, t = config.prompts_per_step, config.group_size, config.sampling.max_new_tokens
    temp = config.sampling.temperature
    chosen = prompts["prompt"].tolist()[:p]
    batch = get_engine("hf").generate(
        policy, chosen, g, SamplingConfig(**{**config.sampling.__dict__, "seed": 1})
    )
    model = copy.deepcopy(policy.model).train()
    reference = copy.deepcopy(policy.model).eval()
    results: dict = {
        "benchmark": "whatif",
        "command": "python benchmarks/whatif.py",
        "settings": {"prompts_per_step": p, "group_size": g, "max_new_tokens": t},
        "load": load,
        "machine": common.machine_info(),
    }

    foreign = common.ForeignCpu().__enter__()

    # 1. shared-prompt teacher forcing (src) -------------------------------------------------
    def plain(net):
        return batch_logprobs(net, batch, temp, share_prompts=False)

    def shared(net):
        return batch_logprobs(net, batch, temp, share_prompts=True)

    with torch.no_grad():
        full, short = plain(reference), shared(reference)
    model.zero_grad()
    plain(model).sum().backward()
    grads = [q.grad.clone() for q in model.parameters()]
    model.zero_grad()
    shared(model).sum().backward()
    grad_err = max(
        ((q.grad - r).abs().max() / r.abs().max().clamp(min=1e-12)).item()
        for q, r in zip(model.parameters(), grads, strict=True)
    )

    def no_grad(fn):
        def run():
            with torch.no_grad():
                fn()

        return run

    timed = interleaved(
        {
            "reference_unshared": no_grad(lambda: plain(reference)),
            "reference_shared": no_grad(lambda: shared(reference)),
            "policy_fwd_bwd_unshared": lambda: plain(model).sum().backward(),
            "policy_fwd_bwd_shared": lambda: shared(model).sum().backward(),
        },
        args.reps,
    )
    lp, lc = batch.prompt_ids.shape[1], batch.completion_ids.shape[1]
    results["shared_prompt_logps"] = {
        "max_abs_logp_difference": (full - short).abs().max().item(),
        "max_relative_grad_difference": grad_err,
        "token_positions_unshared": p * g * (lp + lc),
        "token_positions_shared": p * lp + p * g * (lc - 1),
        "ms": timed,
        "saving_ms": timed["reference_unshared"]
        - timed["reference_shared"]
        + timed["policy_fwd_bwd_unshared"]
        - timed["policy_fwd_bwd_shared"],
    }

    # 2./3. generation: shared-prompt prefill (src), Gumbel sampling (prototype) --------
    tok = policy.tokenizer
    gen_model = copy.deepcopy(policy.model).eval()
    enc = tok(chosen, return_tensors="pt", padding=True, padding_side="left")
    ids = enc["input_ids"].repeat_interleave(g, 0)
    mask = enc["attention_mask"].repeat_interleave(g, 0)
    common_kw = {
        "max_new_tokens": t,
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": [tok.eos_token_id],
        "use_cache": True,
        "return_dict_in_generate": True,
        "output_logits": True,
    }

    class Gumbel(LogitsProcessor):
        def __call__(self, input_ids, scores):
            u = torch.empty_like(scores).uniform_().clamp_(min=1e-20)
            return scores / temp - u.log_().neg_().log_()

    def generate(mode: str, seed: int):
        extra: dict = {}
        if mode == "gumbel":
            cfg = GenerationConfig(do_sample=False, **common_kw)
            extra["logits_processor"] = LogitsProcessorList([Gumbel()])
        else:
            cfg = GenerationConfig(
                do_sample=True, temperature=temp, top_p=1.0, top_k=0, **common_kw
            )
        gen_model.generation_config = cfg
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return gen_model.generate(
                input_ids=ids, attention_mask=mask, generation_config=cfg, **extra
            )

    sampling = SamplingConfig(**config.sampling.__dict__)
    engines = {"unshared": HFEngine(share_prompts=False), "shared": HFEngine(share_prompts=True)}

    def engine_generate(name: str, seed: int):
        run = SamplingConfig(**{**sampling.__dict__, "seed": seed})
        return engines[name].generate(policy, chosen, g, run)

    same = [
        engine_generate("unshared", s).completion_ids.equal(
            engine_generate("shared", s).completion_ids
        )
        for s in range(5)
    ]
    seeds = iter(range(10**6))
    timed = interleaved(
        {
            "engine_unshared": lambda: engine_generate("unshared", next(seeds)),
            "engine_shared": lambda: engine_generate("shared", next(seeds)),
            "generate_multinomial": lambda: generate("multinomial", next(seeds)),
            "generate_gumbel": lambda: generate("gumbel", next(seeds)),
        },
        args.reps,
    )
    results["generation"] = {
        "shared_prompt_same_samples_as_unshared": all(same),
        "ms": timed,
        "shared_prompt_saving_ms": timed["engine_unshared"] - timed["engine_shared"],
        "gumbel_saving_ms": timed["generate_multinomial"] - timed["generate_gumbel"],
        "note": "engine_*: HFEngine.generate (src), with share_prompts off / on; generate_*: "
        "HF generate() with the engine's settings outside HFEngine (no shared prefill, "
        "decode or old_logps), sampling by torch.multinomial vs the Gumbel prototype",
    }

    # 4. fused AdamW --------------------------------------------------------------------------
    def adam_step(fused: bool):
        net = copy.deepcopy(policy.model).train()
        for q in net.parameters():
            q.grad = torch.randn_like(q) * 1e-3
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=fused or None)
        return opt.step

    timed = interleaved({"default": adam_step(False), "fused": adam_step(True)}, args.reps * 5)
    results["adamw"] = {"ms": timed, "saving_ms": timed["default"] - timed["fused"]}

    # 5. seeding ------------------------------------------------------------------------------
    timed = interleaved(
        {
            "torch.manual_seed": lambda: torch.manual_seed(0),
            "default_generator.manual_seed": lambda: torch.default_generator.manual_seed(0),
        },
        args.reps * 10,
    )
    results["seeding"] = {
        "ms": timed,
        "saving_ms": timed["torch.manual_seed"] - timed["default_generator.manual_seed"],
    }
    foreign.__exit__(None, None, None)
    results["foreign_cpu_cores"] = foreign.cores
    results["load_at_end"] = common.load_avg()

    sp = results["shared_prompt_logps"]
    print(
        f"shared-prompt log-probs: |Δlogp| {sp['max_abs_logp_difference']:.1e}, rel. |Δgrad| "
        f"{sp['max_relative_grad_difference']:.1e}; token positions "
        f"{sp['token_positions_unshared']} → {sp['token_positions_shared']}"
    )
    for name, ms in sp["ms"].items():
        print(f"  {name:<26}{ms:8.2f} ms")
    gen = results["generation"]
    same = gen["shared_prompt_same_samples_as_unshared"]
    print(f"generation (same samples with the shared prompt: {same})")
    for name, ms in gen["ms"].items():
        print(f"  {name:<26}{ms:8.2f} ms")
    for key in ("adamw", "seeding"):
        print(key + ": " + ", ".join(f"{k} {v:.3f} ms" for k, v in results[key]["ms"].items()))
    common.write_result("whatif", results, args.out)


if __name__ == "__main__":
    main()
