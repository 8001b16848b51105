"""Verifiable rewards for completions, selected by name.

A reward is ``fn(prompts, completions, **columns) -> list[float]`` (TRL's signature): extra
dataset columns arrive as lists aligned with ``completions`` and unknown ones are ignored.
References come from the ``ground_truth`` column: a number string (``"19"``) or a full GSM8K
answer, whose ``#### <n>`` number is then used.
"""

from __future__ import annotations

import math
import numbers
import re
import threading
from collections.abc import Callable, Sequence
from decimal import Decimal
from functools import lru_cache

from math_verify import parse, verify

from fgrpo_pipeline.algorithms.registry import Registry

RewardFn = Callable[..., list[float]]

REWARDS: Registry[RewardFn] = Registry("reward")

_NUMBER_BODY = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"
# A "-" is a sign only when it does not follow a word or ")" (so "5-9" holds 5 and 9), and a
# match never starts inside another number.
_NUMBER = re.compile(rf"(?:(?<![\w)])-)?(?<![\d.]){_NUMBER_BODY}")
_PLAIN_NUMBER = re.compile(rf"-?{_NUMBER_BODY}")
_ANSWER_LINE = re.compile(rf"^[ \t]*####[ \t]*-?{_NUMBER_BODY}[ \t]*$", re.MULTILINE)
# Trailing special tokens left by decoding without skip_special_tokens: "</s>", "<|im_end|>".
_TRAILING_TOKENS = re.compile(r"(?:\s*<[^<>\s]*>)+\s*$")
_MATH_VERIFY_TIMEOUT_SECONDS = 5


def _register(name: str) -> Callable[[RewardFn], RewardFn]:
    def add(fn: RewardFn) -> RewardFn:
        # TRL logs rewards under ``__name__``; errors below use it too.
        fn.__name__ = name
        return REWARDS.register(name)(fn)

    return add


def get_reward(name: str) -> RewardFn:
    """The reward function registered as ``name``; ``ValueError`` listing valid names."""
    return REWARDS.get(name)


def _clean(completion: str) -> str:
    return _TRAILING_TOKENS.sub("", completion).strip()


def _to_decimal(text: str) -> Decimal:
    return Decimal(text.replace(",", ""))


# Parses are pure functions of short strings that recur: a step scores each completion for
# reward and correctness, and each prompt's reference for its G completions.
@lru_cache(maxsize=8192)
def _completion_number(completion: str) -> Decimal | None:
    """The first number after the first "####", else the last number; None if there is none."""
    text = _clean(completion)
    if "####" in text:
        # The first marker is the model's committed answer; text after it may be run-on output.
        match = _NUMBER.search(text.split("####", 1)[1])
        return _to_decimal(match.group()) if match else None
    numbers_found = _NUMBER.findall(text)
    return _to_decimal(numbers_found[-1]) if numbers_found else None


@lru_cache(maxsize=8192)
def _parse_reference(reference: str) -> Decimal | None:
    text = reference.strip()
    if "####" in text:
        match = _NUMBER.search(text.rsplit("####", 1)[1])
        return _to_decimal(match.group()) if match else None
    return _to_decimal(text) if _PLAIN_NUMBER.fullmatch(text) else None


def _reference_number(reference: str, reward: str, position: int) -> Decimal:
    number = _parse_reference(reference) if isinstance(reference, str) else None
    if number is not None:
        return number
    raise ValueError(
        f"reward {reward!r}: ground_truth at position {position} is not a number or a "
        f"'#### <number>' answer: {reference!r}"
    )


def _references(columns: dict, n: int, reward: str) -> list[str]:
    if "ground_truth" not in columns:
        raise ValueError(f"reward {reward!r} needs a 'ground_truth' column")
    references = list(columns["ground_truth"])
    if len(references) != n:
        raise ValueError(
            f"reward {reward!r}: ground_truth has {len(references)} entries for {n} completions"
        )
    return references


@_register("exact_number")
def exact_number(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """1.0 where the completion's final number equals the reference numerically, else 0.0."""
    references = _references(columns, len(completions), "exact_number")
    scores = []
    for position, (completion, reference) in enumerate(zip(completions, references, strict=True)):
        expected = _reference_number(reference, "exact_number", position)
        scores.append(float(_completion_number(completion) == expected))
    return scores


def _math_verify_answer(text: str) -> str:
    """The part of ``text`` math-verify should parse: the rest of the "####" line if any."""
    text = _clean(text)
    if "####" in text:
        # Worked GSM8K steps hold "<<48/2=24>>" annotations; only the marked answer counts.
        after = text.split("####", 1)[1].strip()
        return after.splitlines()[0] if after else ""
    return text


def _math_verify_score(gold: list, completion: str, timeout: int | None) -> float:
    try:
        answer = parse(_math_verify_answer(completion), parsing_timeout=timeout)
        return float(bool(gold) and verify(gold, answer, timeout_seconds=timeout))
    except Exception:
        # A reward must not abort training; math-verify can raise on odd inputs or timeouts.
        return 0.0


@_register("math_verify")
def math_verify(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """1.0 where math-verify finds the completion's answer equal to the reference, else 0.0."""
    references = _references(columns, len(completions), "math_verify")
    # math-verify times out via SIGALRM, which only works in the main thread: elsewhere
    # (e.g. a reward worker thread) run without its timeout rather than fail. There, an
    # answer like "9**9**9**9" can stall the process, so prefer the main thread.
    in_main = threading.current_thread() is threading.main_thread()
    timeout = _MATH_VERIFY_TIMEOUT_SECONDS if in_main else None
    gold_cache: dict[str, list] = {}  # a group's G completions share one reference
    scores = []
    for completion, reference in zip(completions, references, strict=True):
        if reference not in gold_cache:
            try:
                gold_cache[reference] = parse(
                    _math_verify_answer(reference), parsing_timeout=timeout
                )
            except Exception:
                gold_cache[reference] = []
        scores.append(_math_verify_score(gold_cache[reference], completion, timeout))
    return scores


@_register("format")
def format_reward(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """1.0 where the completion is just a number or has a "#### <number>" line, else 0.0."""
    scores = []
    for completion in completions:
        text = _clean(completion)
        well_formed = _PLAIN_NUMBER.fullmatch(text) or _ANSWER_LINE.search(text)
        scores.append(float(bool(well_formed)))
    return scores


def combine_rewards(weights: dict[str, float]) -> RewardFn:
    """A reward returning ``sum_name weights[name] * reward_name`` for each completion."""
    if not isinstance(weights, dict) or not weights:
        raise ValueError(f"weights must be a non-empty dict of reward name -> weight: {weights!r}")
    for name, weight in weights.items():
        REWARDS.check(name, parameter="weights")
        if (
            not isinstance(weight, numbers.Real)
            or isinstance(weight, bool)
            or not math.isfinite(weight)
        ):
            raise ValueError(f"weights[{name!r}] must be a finite number, got {weight!r}")
    terms = [(name, REWARDS.get(name), float(weight)) for name, weight in weights.items()]

    def combined(prompts: list[str], completions: list[str], **columns) -> list[float]:
        totals = [0.0] * len(completions)
        for name, fn, weight in terms:
            scores = score_completions(fn, prompts, completions, name=name, **columns)
            totals = [total + weight * score for total, score in zip(totals, scores, strict=True)]
        return totals

    combined.__name__ = "combined_" + "_".join(weights)
    return combined


def score_completions(
    fn: RewardFn,
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    name: str | None = None,
    **columns,
) -> list[float]:
    """``fn``'s rewards, checked to be exactly one finite number per completion; errors name
    the reward as ``name`` (its registry name), else its ``__name__``."""
    name = name or getattr(fn, "__name__", repr(fn))
    returned = fn(list(prompts), list(completions), **columns)
    try:
        scores = list(returned)
    except TypeError:
        raise ValueError(
            f"reward {name!r} returned {type(returned).__name__}, not a list of scores"
        ) from None
    if len(scores) != len(completions):
        raise ValueError(
            f"reward {name!r} returned {len(scores)} scores for {len(completions)} completions"
        )
    for position, score in enumerate(scores):
        if not isinstance(score, numbers.Real) or not math.isfinite(score):
            raise ValueError(
                f"reward {name!r} returned {score!r} at position {position}; "
                "expected a finite number"
            )
    return [float(score) for score in scores]
