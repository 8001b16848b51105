"""The vLLM rollout engine, as far as it runs without a GPU.

vLLM is not installed here (it pins another torch, and needs CUDA), so its generation is
tested only on a GPU machine. What is tested: selection by name, the missing-package error,
settings validation, request building, the conversion of vLLM-shaped outputs into the
rollout batch, and the engine's calls into a stand-in ``vllm`` module (lazy build, weight and
adapter sync). The stand-ins below mirror the fields of vLLM 0.33.0's ``Logprob``,
``CompletionOutput`` and ``RequestOutput`` that the engine reads.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import fgrpo_pipeline
from fgrpo_pipeline.models.lora import LoraSettings, apply_lora
from fgrpo_pipeline.rollout import (
    ENGINES,
    RolloutBatch,
    SamplingConfig,
    get_engine,
    token_logprobs,
)
from fgrpo_pipeline.rollout.tables import rollouts_to_table
from fgrpo_pipeline.rollout.vllm import (
    LOGPROBS_MODE,
    SUPPORTED_VLLM,
    VLLMEngine,
    VLLMSettings,
    build_requests,
    import_vllm,
    llm_kwargs,
    outputs_to_batch,
    per_request_kwargs,
    request_seed,
)
from tests.conftest import ENGINE_PROMPTS as PROMPTS
from tests.conftest import briefly_warmed_policy

ROOT = Path(__file__).resolve().parents[1]


# --- stand-ins for vLLM's output classes (vllm.logprobs / vllm.outputs, 0.33.0) -----------


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None
    stop_reason: int | str | None = None
    text: str = ""
    cumulative_logprob: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int] | None
    outputs: list[CompletionOutput]
    finished: bool = True


@pytest.fixture(scope="module")
def policy():
    return briefly_warmed_policy()


def _hf(policy, group_size=4, prompts=PROMPTS, **sampling) -> RolloutBatch:
    return get_engine("hf").generate(policy, prompts, group_size, SamplingConfig(**sampling))


def _as_vllm(
    policy,
    batch: RolloutBatch,
    *,
    keep_eos: bool = True,
    eos_logprob: bool = False,
    one_per_prompt: bool = False,
    reverse: bool = False,
) -> list[RequestOutput]:
    """The HF batch as vLLM would return it; ``keep_eos=False`` leaves the EOS out of
    ``token_ids`` (and of ``logprobs`` unless ``eos_logprob``)."""
    eos = policy.tokenizer.eos_token_id
    prompt_ids = policy.tokenizer(PROMPTS)["input_ids"]
    g = 1 if one_per_prompt else batch.group_size
    requests = []
    for i in range(len(batch) // batch.group_size):
        outs = []
        for k in range(g):
            r = i * batch.group_size + k
            n = int(batch.lengths[r])
            ids = batch.completion_ids[r, :n].tolist()
            logps = batch.old_logps[r, :n].tolist()
            stopped = not bool(batch.truncated[r])
            entries = [{t: Logprob(lp, rank=1)} for t, lp in zip(ids, logps, strict=True)]
            if stopped and not keep_eos:
                ids = ids[:-1]
                entries = entries if eos_logprob else entries[:-1]
            outs.append(
                CompletionOutput(
                    index=k,
                    token_ids=ids,
                    logprobs=entries,
                    finish_reason="stop" if stopped else "length",
                    stop_reason=eos if stopped else None,
                )
            )
        if reverse:
            outs.reverse()
        requests.append(RequestOutput(str(i), prompt_ids[i], outs))
    return requests


def _assert_same(a: RolloutBatch, b: RolloutBatch, exact_logps: bool = True) -> None:
    assert a.prompts == b.prompts
    assert a.completions == b.completions
    assert a.group_size == b.group_size
    for name in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, name
        assert torch.equal(x, y), name
    assert torch.equal(a.lengths, b.lengths)
    assert torch.equal(a.truncated, b.truncated)
    assert a.old_logps.dtype == b.old_logps.dtype == torch.float32
    if exact_logps:
        assert torch.equal(a.old_logps, b.old_logps)
    else:
        torch.testing.assert_close(a.old_logps, b.old_logps, atol=1e-4, rtol=0)


# --- selection, the missing package, settings ----------------------------------------------


def test_selected_by_name_without_importing_vllm():
    assert "vllm" in ENGINES.names()
    engine = get_engine("vllm", gpu_memory_utilization=0.3, tensor_parallel_size=2)
    assert isinstance(engine, VLLMEngine)
    assert engine.settings == VLLMSettings(gpu_memory_utilization=0.3, tensor_parallel_size=2)
    ENGINES.check("vllm", "training.engine")


def test_importing_rollout_registers_vllm_and_does_not_import_it():
    code = (
        "import sys\n"
        "from fgrpo_pipeline.rollout import ENGINES\n"
        "assert ENGINES.names() == ['hf', 'vllm'], ENGINES.names()\n"
        "assert 'vllm' not in sys.modules\n"
    )
    src = str(Path(fgrpo_pipeline.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


def _assert_install_message(message: str) -> None:
    assert "rollout engine 'vllm' needs the optional vllm package" in message
    assert f"supported: vllm{SUPPORTED_VLLM}" in message
    assert "pip install -e '.[gpu]' on a CUDA machine" in message


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_generating_without_vllm_says_how_to_install_it(policy):
    with pytest.raises(RuntimeError) as caught:
        get_engine("vllm").generate(policy, PROMPTS, 2, SamplingConfig())
    _assert_install_message(str(caught.value))


def test_import_vllm_error_when_the_import_fails(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(RuntimeError) as caught:
        import_vllm()
    _assert_install_message(str(caught.value))
    assert isinstance(caught.value.__cause__, ImportError)


def test_the_gpu_extra_pins_the_supported_range():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["optional-dependencies"]["gpu"] == [f"vllm{SUPPORTED_VLLM}"]


@pytest.mark.parametrize(
    ("settings", "name"),
    [
        ({"gpu_memory_utilization": 0}, "gpu_memory_utilization"),
        ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
        ({"gpu_memory_utilization": "half"}, "gpu_memory_utilization"),
        ({"gpu_memory_utilization": True}, "gpu_memory_utilization"),
        ({"tensor_parallel_size": 0}, "tensor_parallel_size"),
        ({"tensor_parallel_size": 2.0}, "tensor_parallel_size"),
        ({"tensor_parallel_size": True}, "tensor_parallel_size"),
        ({"dtype": "int8"}, "dtype"),
        ({"enable_lora": "yes"}, "enable_lora"),
        ({"enforce_eager": 1}, "enforce_eager"),
        ({"max_lora_rank": 4}, "max_lora_rank"),
        ({"max_lora_rank": 16.0}, "max_lora_rank"),
        ({"model_path": 3}, "model_path"),
        ({"model_path": ""}, "model_path"),
        ({"gpu_memory": 0.5}, "gpu_memory"),
    ],
)
def test_bad_settings_fail_naming_the_parameter(settings, name):
    with pytest.raises(ValueError, match=name):
        get_engine("vllm", **settings)


def test_llm_kwargs_carry_the_settings_and_processed_logprobs():
    settings = VLLMSettings(gpu_memory_utilization=0.4, tensor_parallel_size=2, dtype="bfloat16")
    kwargs = llm_kwargs(settings, "/m")
    assert kwargs["model"] == kwargs["tokenizer"] == "/m"
    assert kwargs["gpu_memory_utilization"] == 0.4
    assert kwargs["tensor_parallel_size"] == 2
    assert kwargs["dtype"] == "bfloat16"
    assert kwargs["logprobs_mode"] == LOGPROBS_MODE == "processed_logprobs"
    assert "enable_lora" not in kwargs
    lora = llm_kwargs(VLLMSettings(enable_lora=True, max_lora_rank=32), "/m")
    assert lora["enable_lora"] is True
    assert lora["max_lora_rank"] == 32


# --- request building ----------------------------------------------------------------------


def test_requests_are_the_hf_engines_prompt_ids_with_bos(policy):
    requests, _ = build_requests(policy, PROMPTS, 3, SamplingConfig())
    tok = policy.tokenizer
    assert [r["prompt_token_ids"] for r in requests] == tok(PROMPTS)["input_ids"]
    assert all(r["prompt_token_ids"][0] == tok.bos_token_id for r in requests)
    batch = _hf(policy, group_size=1, max_new_tokens=1)
    for request, ids, mask in zip(requests, batch.prompt_ids, batch.prompt_mask, strict=True):
        assert ids[mask.bool()].tolist() == request["prompt_token_ids"]


def test_sampling_kwargs(policy):
    sampling = SamplingConfig(temperature=0.7, top_p=0.9, max_new_tokens=5, seed=11)
    _, kwargs = build_requests(policy, PROMPTS, 3, sampling)
    assert kwargs == {
        "n": 3,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 0,
        "max_tokens": 5,
        "logprobs": 0,
        "seed": 11,
        "stop_token_ids": [policy.tokenizer.eos_token_id],
        "ignore_eos": True,
        "detokenize": False,
    }


def test_greedy_kwargs_ask_for_one_completion_at_temperature_zero(policy):
    sampling = SamplingConfig(do_sample=False, temperature=0.7, max_new_tokens=4, seed=3)
    _, kwargs = build_requests(policy, PROMPTS, 3, sampling)
    assert kwargs["n"] == 1
    assert kwargs["temperature"] == 0.0
    assert "seed" not in kwargs and "top_p" not in kwargs and "top_k" not in kwargs
    assert kwargs["max_tokens"] == 4
    assert kwargs["logprobs"] == 0
    assert per_request_kwargs(kwargs, 2) == [kwargs, kwargs]


def test_build_requests_rejects_bad_arguments(policy):
    with pytest.raises(ValueError, match="prompts"):
        build_requests(policy, [], 2, SamplingConfig())
    with pytest.raises(ValueError, match="group_size"):
        build_requests(policy, PROMPTS, 0, SamplingConfig())
    with pytest.raises(ValueError, match="temperature"):
        build_requests(policy, PROMPTS, 2, SamplingConfig(temperature=0.005))


def test_each_prompt_gets_its_own_reproducible_seed():
    kwargs = {"n": 4, "seed": 7}
    seeds = [kw["seed"] for kw in per_request_kwargs(kwargs, 50)]
    assert seeds == [request_seed(7, i) for i in range(50)]
    assert seeds == [kw["seed"] for kw in per_request_kwargs(kwargs, 50)]
    # vLLM seeds the k-th of n samples seed + k: no two samples of the rollout share one.
    samples = {s + k for s in seeds for k in range(4)}
    assert len(samples) == 50 * 4
    assert seeds != [kw["seed"] for kw in per_request_kwargs({"n": 4, "seed": 8}, 50)]
    assert all(0 <= s < 2**32 for s in seeds)


# --- outputs → rollout batch ---------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_batch(policy):
    """EOS-terminated rows, shorter ones (right padding) and truncated ones."""
    batch = _hf(policy, group_size=4, max_new_tokens=3, seed=0)
    assert batch.truncated.any() and (~batch.truncated).any()
    assert (batch.lengths < batch.completion_ids.shape[1]).any(), "needs right padding"
    assert batch.prompt_mask.eq(0).any(), "needs left padding"
    return batch


def test_outputs_become_the_hf_engines_batch(policy, hf_batch):
    sampling = SamplingConfig(max_new_tokens=3, seed=0)
    got = outputs_to_batch(policy, PROMPTS, 4, _as_vllm(policy, hf_batch), sampling)
    _assert_same(got, hf_batch)


def test_outputs_in_any_index_order(policy, hf_batch):
    outputs = _as_vllm(policy, hf_batch, reverse=True)
    got = outputs_to_batch(policy, PROMPTS, 4, outputs, SamplingConfig(max_new_tokens=3))
    _assert_same(got, hf_batch)


def test_a_stop_token_left_out_of_token_ids_is_put_back(policy, hf_batch):
    sampling = SamplingConfig(max_new_tokens=3)
    # Its log-prob returned: identical.
    outputs = _as_vllm(policy, hf_batch, keep_eos=False, eos_logprob=True)
    _assert_same(outputs_to_batch(policy, PROMPTS, 4, outputs, sampling), hf_batch)
    # No log-prob for it: recomputed by teacher forcing, the rest kept as returned.
    outputs = _as_vllm(policy, hf_batch, keep_eos=False)
    got = outputs_to_batch(policy, PROMPTS, 4, outputs, sampling)
    _assert_same(got, hf_batch, exact_logps=False)
    eos_at = hf_batch.completion_ids == policy.tokenizer.eos_token_id
    assert torch.equal(got.old_logps[~eos_at], hf_batch.old_logps[~eos_at])


def test_greedy_one_output_per_prompt_fills_the_group(policy):
    hf = _hf(policy, group_size=3, do_sample=False, max_new_tokens=3)
    outputs = _as_vllm(policy, hf, one_per_prompt=True)
    sampling = SamplingConfig(do_sample=False, max_new_tokens=3)
    _assert_same(outputs_to_batch(policy, PROMPTS, 3, outputs, sampling), hf)


def test_greedy_old_logps_vllm_reports_before_temperature_are_recomputed(policy):
    """Greedy vLLM log-probs ignore T. Here the returned values are deliberately wrong: they
    must not survive."""
    sampling = {"do_sample": False, "temperature": 0.7, "max_new_tokens": 3}
    hf = _hf(policy, group_size=2, **sampling)
    outputs = _as_vllm(policy, hf)
    for request in outputs:
        for out in request.outputs:
            out.logprobs = [{t: Logprob(-99.0)} for t in out.token_ids]
    got = outputs_to_batch(policy, PROMPTS, 2, outputs, SamplingConfig(**sampling))
    _assert_same(got, hf, exact_logps=False)


def test_top_p_old_logps_are_vllms_nucleus_log_probs(policy):
    """With top-p < 1 vLLM's processed log-probs are renormalised over the nucleus, like the
    HF engine's: they are kept as returned, and a stop token's missing one is recomputed by
    teacher forcing over the nucleus too."""
    sampling = {"temperature": 1.2, "top_p": 0.8, "max_new_tokens": 3, "seed": 2}
    hf = _hf(policy, group_size=2, **sampling)
    config = SamplingConfig(**sampling)
    _assert_same(outputs_to_batch(policy, PROMPTS, 2, _as_vllm(policy, hf), config), hf)
    assert (~hf.truncated).any(), "the check needs a completion that stopped"
    got = outputs_to_batch(policy, PROMPTS, 2, _as_vllm(policy, hf, keep_eos=False), config)
    _assert_same(got, hf, exact_logps=False)
    # not the full-vocabulary log-probs: the nucleus did cut
    with torch.no_grad():
        full = token_logprobs(
            policy.model,
            hf.prompt_ids,
            hf.prompt_mask,
            hf.completion_ids,
            hf.completion_mask,
            temperature=1.2,
        )
    assert (hf.old_logps - full).max() > 1e-3


def test_conversion_errors(policy, hf_batch):
    sampling = SamplingConfig(max_new_tokens=3)
    outputs = _as_vllm(policy, hf_batch)
    with pytest.raises(ValueError, match="4 prompts"):
        outputs_to_batch(policy, PROMPTS, 4, outputs[:3], sampling)
    with pytest.raises(ValueError, match="group_size=3"):
        outputs_to_batch(policy, PROMPTS, 3, outputs, sampling)
    with pytest.raises(ValueError, match="prompt order"):
        outputs_to_batch(policy, PROMPTS, 4, outputs[::-1], sampling)
    broken = copy.deepcopy(outputs)
    broken[0].outputs[0].logprobs = None
    with pytest.raises(ValueError, match="logprobs=0"):
        outputs_to_batch(policy, PROMPTS, 4, broken, sampling)
    broken = copy.deepcopy(outputs)
    broken[1].outputs[2].finish_reason = "abort"
    with pytest.raises(RuntimeError, match="abort"):
        outputs_to_batch(policy, PROMPTS, 4, broken, sampling)


def test_the_batch_feeds_the_rollout_table(policy, hf_batch):
    outputs = _as_vllm(policy, hf_batch, keep_eos=False, eos_logprob=True)
    batch = outputs_to_batch(policy, PROMPTS, 4, outputs, SamplingConfig(max_new_tokens=3))
    ids = [f"p{i}" for i in range(len(PROMPTS)) for _ in range(4)]
    truths = ["3", "156", "-4", "35"]
    truths = [t for t in truths for _ in range(4)]
    table = rollouts_to_table(batch, ids, truths, torch.zeros_like(batch.old_logps))
    expected = rollouts_to_table(hf_batch, ids, truths, torch.zeros_like(hf_batch.old_logps))
    assert len(table) == 16
    assert table.equals(expected)
    assert all(len(row) == n for row, n in zip(table["old_logps"], table["length"], strict=True))


# --- the engine's calls into vLLM, with a stand-in module -----------------------------------


@dataclass
class FakeSamplingParams:
    kwargs: dict


@dataclass
class FakeLoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str


@dataclass
class FakeLLM:
    """Records what the engine asks of ``vllm.LLM``; answers "3</s>" to every prompt."""

    kwargs: dict
    generated: list = field(default_factory=list)
    loaded: list = field(default_factory=list)
    resets: int = 0

    def generate(self, prompts, sampling_params, *, use_tqdm, lora_request):
        self.generated.append((prompts, sampling_params, lora_request))
        answer = [self.tokenizer.convert_tokens_to_ids("3"), self.tokenizer.eos_token_id]
        return [
            RequestOutput(
                str(i),
                p["prompt_token_ids"],
                [
                    CompletionOutput(
                        k, answer, [{t: Logprob(-0.5)} for t in answer], "stop", answer[-1]
                    )
                    for k in range(params.kwargs["n"])
                ],
            )
            for i, (p, params) in enumerate(zip(prompts, sampling_params, strict=True))
        ]

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        worker = types.SimpleNamespace(
            model_runner=types.SimpleNamespace(model=types.SimpleNamespace(load_weights=self._load))
        )
        return [method(worker, *args, **(kwargs or {}))]

    def _load(self, weights):
        self.loaded.append(weights)

    def reset_prefix_cache(self):
        self.resets += 1


@pytest.fixture
def fake_vllm(monkeypatch, policy):
    llms: list[FakeLLM] = []

    def make_llm(**kwargs):
        llm = FakeLLM(kwargs)
        llm.tokenizer = policy.tokenizer
        llms.append(llm)
        return llm

    vllm = types.ModuleType("vllm")
    vllm.LLM = make_llm
    vllm.SamplingParams = lambda **kwargs: FakeSamplingParams(kwargs)
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = FakeLoRARequest
    vllm.lora, lora.request = lora, request
    for name, module in (("vllm", vllm), ("vllm.lora", lora), ("vllm.lora.request", request)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    return llms


def _copy(policy):
    return copy.deepcopy(policy)


def test_engine_builds_the_llm_on_first_use_from_the_saved_policy(fake_vllm, policy):
    policy = _copy(policy)
    engine = get_engine("vllm", gpu_memory_utilization=0.3)
    assert fake_vllm == []
    sampling = SamplingConfig(max_new_tokens=3, seed=5)
    batch = engine.generate(policy, PROMPTS, 2, sampling)
    (llm,) = fake_vllm
    path = Path(llm.kwargs["model"])
    assert (path / "config.json").exists() and (path / "tokenizer.json").exists()
    assert llm.kwargs["gpu_memory_utilization"] == 0.3
    assert llm.kwargs["logprobs_mode"] == "processed_logprobs"
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    prompts, params, lora_request = llm.generated[0]
    assert prompts == build_requests(policy, PROMPTS, 2, sampling)[0]
    assert [p.kwargs["seed"] for p in params] == [request_seed(5, i) for i in range(4)]
    assert all(p.kwargs["n"] == 2 for p in params)
    assert lora_request is None
    assert llm.loaded == [], "built from the current policy: nothing to push"
    assert batch.completions == ["3"] * 8
    assert batch.lengths.tolist() == [2] * 8
    assert not batch.truncated.any()
    assert torch.equal(batch.old_logps, torch.full((8, 2), -0.5))

    engine.generate(policy, PROMPTS, 2, sampling)
    assert len(fake_vllm) == 1, "one LLM per engine"
    engine.close()


def test_a_model_path_is_loaded_then_given_the_policys_weights(fake_vllm, policy, tmp_path):
    policy = _copy(policy)
    engine = get_engine("vllm", model_path=str(tmp_path))
    engine.generate(policy, PROMPTS, 2, SamplingConfig(max_new_tokens=2))
    (llm,) = fake_vllm
    assert llm.kwargs["model"] == str(tmp_path)
    assert len(llm.loaded) == 1, "a model_path may hold other weights (a resumed run)"
    engine.close()


def test_weights_are_synced_after_a_step_and_before_a_stale_rollout(fake_vllm, policy):
    policy = _copy(policy)
    engine = get_engine("vllm")
    sampling = SamplingConfig(max_new_tokens=2)
    engine.generate(policy, PROMPTS, 2, sampling)
    (llm,) = fake_vllm
    engine.sync_weights(policy)  # what the trainer calls after optimizer.step()
    names = [name for name, _ in policy.model.named_parameters()]
    assert [n for n, _ in llm.loaded[-1]] == names
    assert llm.resets == 1
    engine.generate(policy, PROMPTS, 2, sampling)
    assert len(llm.loaded) == 1, "unchanged weights are not pushed again"

    with torch.no_grad():
        next(policy.model.parameters()).add_(0.25)  # an optimiser step nobody synced
    engine.generate(policy, PROMPTS, 2, sampling)
    assert len(llm.loaded) == 2 and llm.resets == 2
    pushed = dict(llm.loaded[-1])
    for name, param in policy.model.named_parameters():
        assert torch.equal(pushed[name], param)
    engine.close()


def test_lora_adapter_sync_uses_a_new_request_each_time(fake_vllm, policy):
    policy = apply_lora(_copy(policy), LoraSettings(r=8))
    engine = get_engine("vllm", enable_lora=True, max_lora_rank=8)
    sampling = SamplingConfig(max_new_tokens=2)
    engine.generate(policy, PROMPTS, 2, sampling)
    (llm,) = fake_vllm
    assert llm.kwargs["enable_lora"] is True and llm.kwargs["max_lora_rank"] == 8
    with safe_open(Path(llm.kwargs["model"]) / "model.safetensors", "pt") as saved:
        keys = list(saved.keys())
    assert "model.layers.0.self_attn.q_proj.weight" in keys
    assert not any("lora_" in k or "base_layer" in k for k in keys), "the base alone"
    first = llm.generated[0][2]
    assert first.lora_int_id == 1
    assert (Path(first.lora_path) / "adapter_config.json").exists()

    engine.sync_weights(policy)
    engine.generate(policy, PROMPTS, 2, sampling)
    second = llm.generated[1][2]
    assert second.lora_int_id == 2 and second.lora_path != first.lora_path
    engine.sync_weights(policy)
    assert not Path(first.lora_path).exists(), "adapters older than the last are removed"
    assert Path(second.lora_path).exists()
    assert llm.loaded == [], "LoRA syncs push adapters, not weights"
    engine.close()


def test_lora_settings_must_fit_the_policy(fake_vllm, policy):
    with pytest.raises(ValueError, match="enable_lora"):
        get_engine("vllm", enable_lora=True).generate(_copy(policy), PROMPTS, 2, SamplingConfig())
    lora = apply_lora(_copy(policy), LoraSettings(r=16))
    with pytest.raises(ValueError, match="max_lora_rank"):
        get_engine("vllm", enable_lora=True, max_lora_rank=8).generate(
            lora, PROMPTS, 2, SamplingConfig()
        )


def test_a_lora_policy_without_enable_lora_pushes_merged_weights(fake_vllm, policy):
    lora = apply_lora(_copy(policy), LoraSettings(r=8))
    engine = get_engine("vllm")
    engine.generate(lora, PROMPTS, 2, SamplingConfig(max_new_tokens=2))
    (llm,) = fake_vllm
    with torch.no_grad():
        for name, param in lora.model.named_parameters():
            if "lora_B" in name:
                param.add_(0.1)
    engine.generate(lora, PROMPTS, 2, SamplingConfig(max_new_tokens=2))
    pushed = dict(llm.loaded[-1])
    assert set(pushed) == {name for name, _ in policy.model.named_parameters()}
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(pushed[q], dict(policy.model.named_parameters())[q])
    engine.close()
