"""``engine_options`` reach the engine in every pipeline that samples: rollout generation and
the held-out evaluation, as training (tests/test_decoding.py checks the options themselves)."""

from __future__ import annotations

from fgrpo_pipeline.heldout.evaluate import EvaluationConfig, evaluate_policy
from fgrpo_pipeline.pipelines.rollout_generation.nodes import generate_rollouts

SAMPLING = {"temperature": 1.5, "max_new_tokens": 4}
INVERSE_CDF = {"sampler": "inverse_cdf"}

# ``prompts`` and ``policy``: conftest's (one-digit sums, a policy half taught on them).


def _rollouts(policy, prompts, engine_options):
    params = {"num_prompts": 12, "group_size": 4, "seed": 3, "sampling": SAMPLING}
    return generate_rollouts(policy, prompts, {**params, "engine_options": engine_options})


def test_rollout_generation_samples_with_its_engine_options(policy, prompts):
    default = _rollouts(policy, prompts, {})
    inverse = _rollouts(policy, prompts, INVERSE_CDF)
    # the same prompts, in the same order; the sampler's other random stream draws other
    # completions, reproducibly
    assert inverse["prompt_id"].tolist() == default["prompt_id"].tolist()
    assert inverse["completion"].tolist() != default["completion"].tolist()
    again = _rollouts(policy, prompts, INVERSE_CDF)
    assert again["completion"].tolist() == inverse["completion"].tolist()


def test_the_evaluation_samples_with_its_engine_options(policy, prompts):
    test = prompts.iloc[:12]  # which split does not matter here

    def evaluate(engine_options):
        config = EvaluationConfig(k_samples=4, sampling=SAMPLING, engine_options=engine_options)
        return evaluate_policy(policy, policy, test, config)

    (default_metrics, default), (inverse_metrics, inverse) = evaluate({}), evaluate(INVERSE_CDF)
    # the sampled answers (the samples table) come from the other random stream
    assert inverse["prompt_id"].tolist() == default["prompt_id"].tolist()
    assert inverse["completion"].tolist() != default["completion"].tolist()
    # greedy decoding draws nothing: the same answers either way
    assert inverse["greedy_correct"].tolist() == default["greedy_correct"].tolist()
    assert inverse_metrics["greedy_accuracy"] == default_metrics["greedy_accuracy"]
