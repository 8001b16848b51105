"""The hf engine's two samplers at a toy and at a real vocabulary: generation time per rollout.

    python benchmarks/sampler.py [--vocabs 100 151936] [--rounds 6] [--rollouts 3]

``engine_options.sampler`` chooses how the engine's decoding loop draws a token:
``multinomial`` (the default) is ``generate``'s own draw, ``argmax(probs / q)`` with an
Exp(1) number q per vocabulary entry, so a seed gives ``generate``'s samples; ``inverse_cdf``
draws one uniform per row and finds its token by the cumulative probabilities (two levels
of blocks): the same distribution, other samples. On a CPU the exponential noise costs
~25 ns per entry, which at a real vocabulary (Qwen2.5's 151,936 tokens) and 64 rows is
more than a small model's whole decoding step.

The model is the realistic shape's (``vs_trl.py --shape realistic``: an untrained Qwen2,
hidden 256, 4 layers, tied embeddings) with its vocabulary set to each of ``--vocabs``
(the prompts' character ids are valid in any of them); P = 8 few-shot prompts × G = 8,
48 new tokens, temperature 1. The rollouts run through ``rollout.decoding.decode``, the
hf engine's loop (the engine itself would decode the completions with the character
tokenizer, which has no text for ids past 100). For each vocabulary, ``--rounds`` rounds;
in each, both samplers run ``--rollouts`` rollouts back to back, in alternating order, and
the round's ratio is inverse_cdf / multinomial of the median rollout times. Also timed:
the sampling call alone on [64, V] logits. Writes ``benchmarks/results/sampler.json``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import _common as common
import torch

ROWS = common.REALISTIC_PROMPTS_PER_STEP * common.REALISTIC_GROUP_SIZE


def build_model(vocab: int):
    """The realistic shape's untrained Qwen2 with a vocabulary of ``vocab`` tokens, and the
    tokenizer whose ids (< 100) the prompts use."""
    from transformers import Qwen2ForCausalLM

    from fgrpo_pipeline.models.policy import build_char_tokenizer, tiny_qwen2_config

    tokenizer = build_char_tokenizer()
    config = tiny_qwen2_config(
        tokenizer,
        **common.REALISTIC_MODEL,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    config.vocab_size = max(vocab, len(tokenizer))
    torch.manual_seed(common.REALISTIC_SEED)
    return Qwen2ForCausalLM(config).eval(), tokenizer


def rollout_seconds(model, tokenizer, prompts, sampler: str, seed: int) -> float:
    from fgrpo_pipeline.rollout import SamplingConfig
    from fgrpo_pipeline.rollout.decoding import decode

    encoded = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    sampling = SamplingConfig(max_new_tokens=common.REALISTIC_MAX_NEW_TOKENS, seed=seed)
    start = time.perf_counter()
    with torch.no_grad():
        torch.manual_seed(seed)
        decoded = decode(
            model,
            encoded["input_ids"],
            encoded["attention_mask"],
            common.REALISTIC_GROUP_SIZE,
            sampling,
            [tokenizer.eos_token_id],
            tokenizer.pad_token_id,
            sampler=sampler,
        )
    seconds = time.perf_counter() - start
    assert decoded is not None
    return seconds


def sampling_call_seconds(vocab: int, sampler: str, calls: int = 10) -> float:
    """Median time of one sampling call on [64, vocab] logits (the loop's per-step draw)."""
    from fgrpo_pipeline.rollout import SamplingConfig
    from fgrpo_pipeline.rollout.decoding import _sample

    logits = torch.randn(ROWS, vocab, generator=torch.Generator().manual_seed(0)) * 3
    config = SamplingConfig()
    times = []
    for _ in range(calls + 2):
        start = time.perf_counter()
        _sample(logits, config, sampler=sampler)
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def measure_vocab(vocab: int, rounds: int, rollouts: int) -> dict:
    from fgrpo_pipeline.rollout.decoding import SAMPLERS as samplers

    model, tokenizer = build_model(vocab)
    table = common.realistic_prompts()
    times: dict[str, list[float]] = {s: [] for s in samplers}
    per_round: dict[str, list[float]] = {s: [] for s in samplers}
    p = common.REALISTIC_PROMPTS_PER_STEP
    for r in range(rounds):
        prompts = table["prompt"].tolist()[r * p : (r + 1) * p]
        rollout_seconds(model, tokenizer, prompts, "multinomial", seed=r)  # warm-up
        order = samplers if r % 2 == 0 else samplers[::-1]
        for sampler in order:
            runs = [
                rollout_seconds(model, tokenizer, prompts, sampler, seed=r * rollouts + i)
                for i in range(rollouts)
            ]
            times[sampler] += runs
            per_round[sampler].append(statistics.median(runs))
        print(
            f"vocab {vocab} round {r}: "
            + ", ".join(f"{s} {per_round[s][-1]:.3f} s" for s in samplers),
            flush=True,
        )
    ratio = common.paired_median_ratio(per_round["inverse_cdf"], per_round["multinomial"])
    return {
        "vocab_size": model.config.vocab_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "rollout_s": {s: common.summary(times[s]) for s in samplers},
        "rollout_s_per_round": per_round,
        "inverse_cdf_over_multinomial": ratio,
        "sampling_call_ms": {s: 1000 * sampling_call_seconds(vocab, s) for s in samplers},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocabs", type=int, nargs="+", default=[100, 151_936])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--rollouts", type=int, default=3, help="per sampler and round")
    common.machine_arguments(parser)
    args = parser.parse_args()

    common.quiet_libraries()
    threads = common.set_threads(args.threads)
    load = common.wait_for_quiet(args.max_load)
    results = {}
    for vocab in args.vocabs:
        found, foreign, tries = common.measure_clean(
            lambda vocab=vocab: measure_vocab(vocab, args.rounds, args.rollouts),
            label=f"vocab {vocab}",
        )
        results[str(vocab)] = {**found, "foreign_cpu_cores": foreign, "tries": tries}
        calls = found["sampling_call_ms"]
        print(
            f"vocab {vocab}: rollout inverse_cdf / multinomial "
            f"{common.interval_text(found['inverse_cdf_over_multinomial'])}; sampling call "
            f"{calls['multinomial']:.2f} → {calls['inverse_cdf']:.2f} ms at {ROWS} rows"
        )
    common.write_result(
        "sampler",
        {
            "benchmark": "sampler",
            "command": common.command_line("sampler.py"),
            "settings": {
                "rows": ROWS,
                "max_new_tokens": common.REALISTIC_MAX_NEW_TOKENS,
                "rollouts_per_sampler_and_round": args.rollouts,
            },
            "load": load,
            "load_at_end": common.load_avg(),
            "machine": common.machine_info() | {"torch_threads": threads},
            "vocabularies": results,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
