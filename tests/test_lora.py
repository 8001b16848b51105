"""LoRA through peft: the adapter-disabled base is the reference, adapters save and merge."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from kedro.io import DataCatalog, DatasetError, Version
from peft import PeftModel
from transformers import PreTrainedModel

from fgrpo_pipeline.datasets import AdapterDataset, PolicyDataset
from fgrpo_pipeline.models.lora import (
    LoraSettings,
    Reference,
    apply_lora,
    is_lora,
    make_reference,
    merge_for_export,
    reference_logprobs,
    reference_mode,
    trainable_parameters,
)
from fgrpo_pipeline.models.policy import Policy, build_char_tokenizer, build_tiny_policy
from fgrpo_pipeline.rollout import HFEngine, SamplingConfig, batch_logprobs, token_logprobs
from fgrpo_pipeline.training.preferences import encode_completions

TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1}
TINY["intermediate_size"] = 64
SETTINGS = LoraSettings(r=4, alpha=8)
PROMPTS = ["1+2=", "12*13=", "7-5="]
COMPLETIONS = ["3", "156", "2"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def _policy(tokenizer, seed: int = 0) -> Policy:
    return build_tiny_policy(tokenizer, seed=seed, **TINY)


def _encode(tokenizer):
    return encode_completions(tokenizer, PROMPTS, COMPLETIONS)


def _logps(model, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return token_logprobs(model, *_encode(tokenizer))


def _train(policy: Policy, steps: int = 3) -> None:
    """A few AdamW steps raising the completions' likelihood, on the trainable parameters."""
    model = policy.model.train()
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=5e-2)
    for _ in range(steps):
        loss = -token_logprobs(model, *_encode(policy.tokenizer)).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def _ptrs(model: torch.nn.Module) -> set[int]:
    return {p.data_ptr() for p in model.parameters()}


def _base_name(lora_name: str) -> str:
    """``base_model.model.x.q_proj.base_layer.weight`` → ``x.q_proj.weight``."""
    return lora_name.removeprefix("base_model.model.").replace(".base_layer", "")


@pytest.fixture
def lora_setup(tokenizer):
    """(original base, its log-probs, LoRA policy wrapping the same weights in place)."""
    policy = _policy(tokenizer)
    original = copy.deepcopy(policy.model).eval()
    base_logps = _logps(original, tokenizer)
    return original, base_logps, apply_lora(policy, SETTINGS)


def test_apply_lora_wraps_in_place_and_trains_only_the_adapter(tokenizer):
    policy = _policy(tokenizer)
    ptrs = _ptrs(policy.model)
    lora = apply_lora(policy, SETTINGS)
    assert is_lora(lora) and is_lora(lora.model) and not is_lora(_policy(tokenizer))
    assert isinstance(lora.model, PeftModel)
    assert lora.model.get_base_model() is policy.model  # no copy of the base weights
    assert ptrs <= _ptrs(lora.model)
    trainable = [n for n, p in lora.model.named_parameters() if p.requires_grad]
    assert trainable
    assert all("lora_A" in n or "lora_B" in n for n in trainable)
    targets = {n.split(".")[-4] for n in trainable}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert trainable_parameters(lora.model) == [
        p for p in lora.model.parameters() if p.requires_grad
    ]
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        apply_lora(lora, SETTINGS)


def test_reference_is_the_adapter_disabled_base_exactly_and_shares_its_weights(
    tokenizer, lora_setup
):
    original, base_logps, lora = lora_setup
    reference = make_reference(lora)
    assert isinstance(reference, Reference) and reference.shares_weights
    # No second copy: the reference is the policy's own module, every tensor shared.
    assert reference.model is lora.model
    assert _ptrs(reference.model) == _ptrs(lora.model)
    assert not _ptrs(reference.model) & _ptrs(original)

    # Fresh adapter: lora_B is zero, so policy and reference both equal the base.
    assert torch.allclose(_logps(reference, tokenizer), base_logps, atol=1e-6, rtol=0)
    assert torch.allclose(_logps(lora.model, tokenizer), base_logps, atol=1e-6, rtol=0)

    _train(lora)
    trained = _logps(lora.model, tokenizer)
    assert (trained - base_logps).abs().max() > 1e-3  # the adapter did learn something
    assert lora.model.training  # the reference left the training mode as it was
    ref = token_logprobs(reference, *_encode(tokenizer))  # grad enabled: reference ignores it
    assert not ref.requires_grad
    assert lora.model.training
    assert torch.allclose(ref, base_logps, atol=1e-6, rtol=0)
    assert torch.allclose(reference_logprobs(lora, _batch(tokenizer)), base_logps, atol=1e-6)
    with reference_mode(lora.model) as model, torch.no_grad():
        assert not model.training
        assert torch.allclose(token_logprobs(model, *_encode(tokenizer)), base_logps, atol=1e-6)
    assert lora.model.training
    # Outside the reference the adapter is active again.
    assert torch.equal(_logps(lora.model, tokenizer), trained)


def _batch(tokenizer):
    """A stand-in for a RolloutBatch: the fields batch_logprobs reads."""
    prompt_ids, prompt_mask, completion_ids, completion_mask = _encode(tokenizer)

    class Batch:
        pass

    batch = Batch()
    batch.prompt_ids, batch.prompt_mask = prompt_ids, prompt_mask
    batch.completion_ids, batch.completion_mask = completion_ids, completion_mask
    return batch


def test_training_changes_only_adapter_parameters(tokenizer, lora_setup):
    original, _, lora = lora_setup
    before = {n: p.detach().clone() for n, p in lora.model.named_parameters()}
    _train(lora)
    base_state = original.state_dict()
    changed = []
    for name, param in lora.model.named_parameters():
        if "lora_" in name:
            changed.append(not torch.equal(param, before[name]))
        else:
            assert torch.equal(param, before[name]), name
            assert torch.equal(param, base_state[_base_name(name)]), name
    assert any(changed)
    # lora_B of every adapted layer moved off zero.
    assert all(p.abs().max() > 0 for n, p in lora.model.named_parameters() if "lora_B" in n)


def test_plain_policy_reference_is_a_frozen_copy(tokenizer):
    policy = _policy(tokenizer)
    reference = make_reference(policy)
    assert not reference.shares_weights
    assert reference.model is not policy.model
    assert not _ptrs(reference.model) & _ptrs(policy.model)
    assert not any(p.requires_grad for p in reference.model.parameters())
    base_logps = _logps(policy.model, tokenizer)
    _train(policy, steps=1)
    assert torch.equal(_logps(reference, tokenizer), base_logps)
    assert "frozen copy" in repr(reference)


def test_a_frozen_reference_is_not_switched_between_modes(tokenizer, monkeypatch):
    """It is in eval mode for good: a call walks no modules to switch them (the LoRA
    reference, whose model trains, is switched to eval and back: tested above)."""
    reference = make_reference(_policy(tokenizer))
    switches = []
    for module in reference.model.modules():
        monkeypatch.setattr(module, "train", lambda mode=True, m=module: switches.append(mode))
    reference(input_ids=_encode(tokenizer)[0])
    assert switches == []
    assert not any(m.training for m in reference.model.modules())


def test_rollouts_of_a_lora_policy_and_reference_logprobs(tokenizer, lora_setup):
    original, _, lora = lora_setup
    _train(lora)
    sampling = SamplingConfig(max_new_tokens=4, seed=3)
    batch = HFEngine().generate(lora, PROMPTS, 2, sampling)
    with torch.no_grad():
        logps = batch_logprobs(lora.model, batch, sampling.temperature)
        base = batch_logprobs(original, batch, sampling.temperature)
    assert torch.allclose(batch.old_logps, logps, atol=1e-5)
    reference = make_reference(lora)
    assert torch.allclose(reference.logprobs(batch), base, atol=1e-6, rtol=0)
    assert not torch.allclose(logps, base, atol=1e-3)


def test_merge_for_export_gives_a_plain_model_with_the_same_logprobs(
    tokenizer, lora_setup, tmp_path
):
    _, _, lora = lora_setup
    _train(lora)
    # A rollout first: peft's generate copies the engine's generation config into the base.
    HFEngine().generate(lora, PROMPTS[:1], 2, SamplingConfig(max_new_tokens=2))
    expected = _logps(lora.model, tokenizer)

    merged = merge_for_export(lora)
    assert isinstance(merged.model, PreTrainedModel)
    assert not isinstance(merged.model, PeftModel) and not is_lora(merged)
    assert not any("lora_" in name for name, _ in merged.model.named_modules())
    assert merged.tokenizer is lora.tokenizer
    assert all(p.requires_grad for p in merged.model.parameters())
    assert not _ptrs(merged.model) & _ptrs(lora.model)
    assert torch.allclose(_logps(merged.model, tokenizer), expected, atol=1e-5, rtol=0)
    config = merged.model.generation_config
    assert (config.top_k, config.max_new_tokens, config.output_logits) == (0, None, None)

    # The input stays LoRA and unchanged.
    assert is_lora(lora)
    assert torch.equal(_logps(lora.model, tokenizer), expected)
    assert merge_for_export(merged) is merged

    # The merged model exports through PolicyDataset like any policy.
    dataset = PolicyDataset(filepath=str(tmp_path / "merged"))
    dataset.save(merged)
    assert torch.allclose(_logps(dataset.load().model, tokenizer), expected, atol=1e-5)


def test_adapter_round_trips_through_a_versioned_adapter_dataset(tokenizer, lora_setup, tmp_path):
    original, base_logps, lora = lora_setup
    base_dir = tmp_path / "base"
    original.save_pretrained(base_dir)
    _train(lora)
    expected = _logps(lora.model, tokenizer)

    catalog = DataCatalog.from_config(
        {
            "lora_policy": {
                "type": "fgrpo_pipeline.datasets.AdapterDataset",
                "filepath": str(tmp_path / "lora_policy"),
                "base": str(base_dir),
                "versioned": True,
            }
        }
    )
    catalog.save("lora_policy", lora)
    (version,) = (tmp_path / "lora_policy").iterdir()
    files = sorted(p.name for p in (version / "lora_policy").iterdir())
    assert "adapter_config.json" in files and "adapter_model.safetensors" in files
    assert "tokenizer.json" in files
    assert "model.safetensors" not in files  # the adapter only, not the base weights

    loaded = catalog.load("lora_policy")
    assert is_lora(loaded)
    assert torch.allclose(_logps(loaded.model, tokenizer), expected, atol=1e-6, rtol=0)
    assert loaded.tokenizer(PROMPTS)["input_ids"] == tokenizer(PROMPTS)["input_ids"]
    assert loaded.tokenizer.padding_side == "left"
    assert loaded.model.generation_config.top_k == 0
    trainable = [n for n, p in loaded.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert torch.allclose(_logps(make_reference(loaded), tokenizer), base_logps, atol=1e-6)

    frozen = AdapterDataset(
        filepath=str(tmp_path / "lora_policy"),
        base=str(base_dir),
        trainable=False,
        version=Version(None, None),
    ).load()
    assert not any(p.requires_grad for p in frozen.model.parameters())
    assert torch.allclose(_logps(frozen.model, tokenizer), expected, atol=1e-6, rtol=0)


def test_adapter_dataset_errors(tokenizer, lora_setup, tmp_path):
    original, _, lora = lora_setup
    base_dir = tmp_path / "base"
    original.save_pretrained(base_dir)

    with pytest.raises(DatasetError, match="LoRA policy"):
        AdapterDataset(filepath=str(tmp_path / "plain")).save(_policy(tokenizer))
    assert not (tmp_path / "plain").exists()
    with pytest.raises(DatasetError, match="Policy"):
        AdapterDataset(filepath=str(tmp_path / "plain")).save({"model": 1})

    AdapterDataset(filepath=str(tmp_path / "adapter")).save(lora)
    with pytest.raises(DatasetError, match="'base' option"):
        AdapterDataset(filepath=str(tmp_path / "adapter")).load()
    with pytest.raises(DatasetError, match="no base model directory"):
        AdapterDataset(filepath=str(tmp_path / "adapter"), base=str(tmp_path / "nope")).load()
    with pytest.raises(DatasetError, match="no saved adapter"):
        AdapterDataset(filepath=str(tmp_path / "missing"), base=str(base_dir)).load()

    other = tmp_path / "other_base"
    build_tiny_policy(
        tokenizer, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1
    ).model.save_pretrained(other)
    with pytest.raises(DatasetError, match="could not load the adapter"):
        AdapterDataset(filepath=str(tmp_path / "adapter"), base=str(other)).load()

    text = repr(AdapterDataset(filepath=str(tmp_path / "adapter"), base=str(base_dir)))
    assert "base" in text and "trainable" in text


@pytest.mark.parametrize(
    ("params", "name"),
    [
        ({"r": 0}, "r"),
        ({"r": 2.5}, "r"),
        ({"r": True}, "r"),
        ({"alpha": 0}, "alpha"),
        ({"alpha": math.nan}, "alpha"),
        ({"alpha": "16"}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"target_modules": []}, "target_modules"),
        ({"target_modules": ""}, "target_modules"),
        ({"target_modules": ["q_proj", ""]}, "target_modules"),
        ({"target_modules": 3}, "target_modules"),
        ({"bias": "some"}, "bias"),
    ],
)
def test_bad_settings_name_the_parameter(params, name):
    with pytest.raises(ValueError, match=f"LoRA parameter '{name}'"):
        LoraSettings(**params)
    with pytest.raises(ValueError, match=f"LoRA parameter '{name}'"):
        LoraSettings.from_params(params)


def test_from_params(tokenizer):
    assert LoraSettings.from_params(None) == LoraSettings()
    settings = LoraSettings.from_params({"r": 2, "target_modules": ["q_proj", "v_proj"]})
    assert settings.target_modules == ("q_proj", "v_proj")
    assert settings.to_peft().r == 2
    with pytest.raises(ValueError, match=r"unknown LoRA parameter\(s\) \['rank'\]"):
        LoraSettings.from_params({"rank": 4})

    with pytest.raises(ValueError, match="'target_modules'.*c_attn.*q_proj"):
        apply_lora(_policy(tokenizer), LoraSettings(target_modules=("c_attn",)))
    with pytest.raises(ValueError, match="bias='all'"):
        make_reference(apply_lora(_policy(tokenizer), LoraSettings(bias="all")))


def test_the_trainer_trains_only_the_adapter_against_the_unchanged_base(tokenizer):
    from fgrpo_pipeline.tasks.sources import make_arithmetic_prompts
    from fgrpo_pipeline.training.config import TrainerConfig
    from fgrpo_pipeline.training.loop import train

    prompts = make_arithmetic_prompts(n_train=16, n_test=0, operations=["+"], operand_max=9)
    policy = _policy(tokenizer)
    before = {k: v.clone() for k, v in policy.model.state_dict().items()}
    config = TrainerConfig.from_params(
        {
            "steps": 3,
            "prompts_per_step": 4,
            "group_size": 4,
            "learning_rate": 1e-2,
            "rewards": {"format": 1.0},
            "lora": {"r": 4, "alpha": 8},
        }
    )

    def longer_is_better(prompts, completions, **columns):  # spread in every group
        return [float(len(c)) for c in completions]

    result = train(policy, prompts, config, progress=False, reward_fn=longer_is_better)
    trained = result.policy.model
    assert is_lora(result.policy)
    # the input policy is untouched, and so are the trained policy's base weights
    assert all(torch.equal(v, policy.model.state_dict()[k]) for k, v in before.items())
    base = {_base_name(k): v for k, v in trained.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(base[k], v) for k, v in before.items() if k in base)
    moved = [k for k, v in trained.state_dict().items() if "lora_B" in k and v.abs().sum() > 0]
    assert moved, "the adapter did not train"
    assert result.metrics.loc[0, "kl_to_ref"] == pytest.approx(0.0, abs=1e-5)


def test_generating_with_a_lora_policy_leaves_both_generation_configs_as_they_were(tokenizer):
    policy = apply_lora(_policy(tokenizer), LoraSettings(r=4, alpha=8))
    before = (policy.model.generation_config, policy.model.get_base_model().generation_config)
    HFEngine().generate(policy, ["1+1="], 2, SamplingConfig(max_new_tokens=3))
    after = (policy.model.generation_config, policy.model.get_base_model().generation_config)
    assert after[0] is before[0] and after[1] is before[1]
    assert not getattr(after[1], "output_logits", False)
