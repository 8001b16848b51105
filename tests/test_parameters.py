"""The parameter blocks as validated dataclasses: every shipped block builds, unknown keys and
bad values are refused naming the file and the parameter, nested blocks are dataclasses."""

import copy
import dataclasses
import functools

import pytest
from kedro.config import OmegaConfigLoader

from fgrpo_pipeline.algorithms.params import ParameterError, Params
from fgrpo_pipeline.hooks import PARAMETER_CLASSES
from fgrpo_pipeline.pipelines.parameters import RunParams, read_params
from fgrpo_pipeline.settings import CONFIG_LOADER_ARGS
from tests.conftest import PROJECT_ROOT

# Kedro's loader registers its resolvers through a call omegaconf deprecates (their code).
pytestmark = pytest.mark.filterwarnings("ignore:register_new_resolver:UserWarning")


@functools.cache
def _loaded(env: str) -> dict:
    args = {**CONFIG_LOADER_ARGS, "default_run_env": env}
    return OmegaConfigLoader(str(PROJECT_ROOT / "conf"), **args)["parameters"]


def shipped_parameters(env: str) -> dict:
    """The parameters a run in ``env`` reads (conf/base, then conf/<env> over it)."""
    return copy.deepcopy(_loaded(env))


@pytest.mark.parametrize("env", ["local", "qwen_math"])
def test_every_shipped_block_builds(env):
    parameters = shipped_parameters(env)
    for block, cls in PARAMETER_CLASSES.items():
        assert block == cls.BLOCK
        assert isinstance(read_params(cls, parameters[block]), cls)


def _first_leaf(cls: type) -> str:
    """The name of a key of the block (the first of its flat keys)."""
    return (cls.config_keys() if issubclass(cls, RunParams) else cls.param_names())[0]


@pytest.mark.parametrize("block", sorted(PARAMETER_CLASSES))
def test_an_unknown_key_names_the_file_and_the_valid_keys(block):
    cls = PARAMETER_CLASSES[block]
    with pytest.raises(ValueError) as raised:
        read_params(cls, {**shipped_parameters("local")[block], "typo_key": 1})
    message = str(raised.value)
    assert message.startswith(f"parameters_{block}.yml: unknown {block} key(s) ['typo_key']")
    assert f"valid: {_first_leaf(cls)}" in message
    for key in cls.RUN_KEYS:
        assert key in message.split("valid: ")[1]


@pytest.mark.parametrize(
    ("block", "params", "message"),
    [
        ("base_policy", {"warmup": {"steps": -1}}, "base_policy.warmup.steps must be ≥ 0"),
        ("base_policy", {"model": {"num_heads": 3}}, "base_policy.model.hidden_size .*num_heads"),
        ("base_policy", {"progress": "yes"}, "base_policy.progress must be true or false"),
        ("rollout_generation", {"num_prompts": 0}, "rollout_generation.num_prompts must be ≥ 1"),
        ("rollout_generation", {"split": "dev"}, r"rollout_generation.split 'dev' is unknown"),
        ("data_preparation", {"arithmetic": {"n_train": 1.5}}, "arithmetic.n_train must be an int"),
        ("reward_labeling", {"advantage_scale": "rank"}, "advantage_scale 'rank' is unknown"),
        ("evaluation", {"k_samples": 0}, "evaluation.k_samples must be ≥ 1"),
        ("safety_data", {"split": {"test_fraction": 1}}, "safety_data.split.test_fraction"),
        ("reward_model", {"training": {"batch_size": 0}}, "reward_model.training.batch_size"),
        ("safety_base_policy", {"refusal_rate": 0}, "safety_base_policy.refusal_rate"),
        ("safety_training", {"monitor": {"window": 0}}, "safety_training.monitor.window"),
        ("safety_training", {"monitor": {"windows": 3}}, r"unknown safety_training.monitor key"),
        ("safety_evaluation", {"split": "test"}, r"unknown safety_evaluation key\(s\) \['split'\]"),
        ("safety_evaluation", {"strata": "x"}, r"unknown safety_evaluation key\(s\) \['strata'\]"),
        ("evaluation", {"strata": " "}, "evaluation.strata must name a column"),
        ("training", {"progress": 1}, "training.progress must be true or false"),
        (
            "rollout_generation",
            {"engine_options": {"sampler": "gumbel"}},
            "rollout_generation.engine_options for 'hf': hf engine option 'sampler' must be",
        ),
        (
            "evaluation",
            {"engine_options": {"beam_width": 2}},
            "evaluation.engine_options for 'hf': .*unexpected keyword argument 'beam_width'",
        ),
        (
            "safety_evaluation",
            {"engine_options": ["inverse_cdf"]},
            "safety_evaluation.engine_options must be a mapping",
        ),
        (
            "training",
            {"engine_options": {"sampler": "inverse_cdf", "use_generate": True}},
            "training parameter 'engine_options' for 'hf': .*'sampler' is 'inverse_cdf', but",
        ),
    ],
)
def test_a_bad_value_names_the_file_and_its_path(block, params, message):
    merged = {**shipped_parameters("local")[block], **params}
    with pytest.raises(ValueError, match=f"^parameters_{block}.yml: .*{message}"):
        read_params(PARAMETER_CLASSES[block], merged)


FREE_MAPPINGS = ("rewards", "training_overrides", "engine_options")


def test_nested_blocks_are_dataclasses_and_run_keys_are_fields():
    parameters = shipped_parameters("local")
    for block, cls in PARAMETER_CLASSES.items():
        built = cls.from_params(parameters[block])
        names = {f.name for f in dataclasses.fields(built)}
        assert set(cls.RUN_KEYS) <= names
        for name, value in parameters[block].items():
            # plain mappings: rewards (weights by name), training_overrides (any training
            # keys), engine_options (the engine's keyword arguments, checked by building it)
            if isinstance(value, dict) and name in names and name not in FREE_MAPPINGS:
                assert dataclasses.is_dataclass(getattr(built, name)), (block, name)


def test_a_parameter_error_is_a_value_error_naming_the_parameter():
    @dataclasses.dataclass
    class Options(Params):
        BLOCK = "options"
        count: int = 1
        names: tuple[str, ...] = ()

        def check(self):
            if self.count < 0:
                raise ParameterError("count", "must be ≥ 0")

    assert Options.from_params({"names": ["a", "b"]}).names == ("a", "b")
    with pytest.raises(ValueError, match=r"^options.count must be ≥ 0$"):
        Options.from_params({"count": -1})
    with pytest.raises(ValueError, match=r"^count must be an integer, got True$"):
        Options(count=True)
    with pytest.raises(ValueError, match=r"names\[1\] must be a string, got 2"):
        Options(names=["a", 2])


def test_evaluation_strata_are_the_arithmetic_difficulty_and_off_for_gsm8k():
    # qwen_math's GSM8K prompts have no difficulty column; the env merges key by key, so it
    # must turn base's strata off itself
    assert shipped_parameters("local")["evaluation"]["strata"] == "difficulty"
    assert shipped_parameters("qwen_math")["evaluation"]["strata"] is None
