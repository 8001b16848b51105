"""PolicyDataset: a Policy saved as a save_pretrained directory, optionally versioned."""

from __future__ import annotations

import re
import uuid

import fsspec
import pytest
import torch
from kedro.io import DataCatalog, DatasetError, Version

from fgrpo_pipeline.datasets import PolicyDataset
from fgrpo_pipeline.models.policy import Policy, build_char_tokenizer, build_tiny_policy

TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1}
TINY["intermediate_size"] = 64
# Kedro's version format, e.g. 2024-01-15T10.30.00.000Z.
VERSION = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}\.\d{2}\.\d{2}\.\d{3}Z$")
TEXTS = ["1+2=", "12*13=", "Janet has 16 eggs.\n#### 9"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def _policy(tokenizer, seed: int = 0) -> Policy:
    return build_tiny_policy(tokenizer, seed=seed, **TINY)


def _logits(policy: Policy) -> torch.Tensor:
    batch = policy.tokenizer(TEXTS, padding=True, return_tensors="pt")
    policy.model.eval()
    with torch.no_grad():
        return policy.model(**batch).logits


def _assert_same_policy(loaded: Policy, original: Policy) -> None:
    assert torch.equal(_logits(loaded), _logits(original))
    assert loaded.tokenizer(TEXTS)["input_ids"] == original.tokenizer(TEXTS)["input_ids"]
    assert loaded.tokenizer.padding_side == "left"
    config = loaded.model.generation_config
    assert (config.pad_token_id, config.eos_token_id, config.top_k) == (
        original.tokenizer.pad_token_id,
        original.tokenizer.eos_token_id,
        0,
    )


def test_save_then_load_gives_identical_logits_and_tokenizer(tokenizer, tmp_path):
    policy = _policy(tokenizer)
    dataset = PolicyDataset(filepath=str(tmp_path / "policy"))
    assert not dataset.exists()
    dataset.save(policy)
    assert dataset.exists()
    assert (tmp_path / "policy" / "config.json").is_file()
    assert (tmp_path / "policy" / "tokenizer.json").is_file()
    _assert_same_policy(dataset.load(), policy)


def test_unversioned_save_replaces_the_previous_policy(tokenizer, tmp_path):
    dataset = PolicyDataset(filepath=str(tmp_path / "policy"))
    dataset.save(_policy(tokenizer, seed=0))
    second = _policy(tokenizer, seed=1)
    dataset.save(second)
    _assert_same_policy(dataset.load(), second)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy"]


def test_versioned_save_creates_timestamped_version_dirs_and_loads_the_latest(tokenizer, tmp_path):
    filepath = tmp_path / "policy"
    first, second = _policy(tokenizer, seed=0), _policy(tokenizer, seed=1)
    PolicyDataset(filepath=str(filepath), version=Version(None, None)).save(first)
    PolicyDataset(filepath=str(filepath), version=Version(None, None)).save(second)

    versions = sorted(p.name for p in filepath.iterdir())
    assert len(versions) == 2
    assert all(VERSION.match(v) for v in versions)
    for version in versions:
        assert sorted(p.name for p in (filepath / version).iterdir()) == ["policy"]
        assert (filepath / version / "policy" / "model.safetensors").is_file()

    latest = PolicyDataset(filepath=str(filepath), version=Version(None, None))
    assert latest.exists()
    _assert_same_policy(latest.load(), second)
    pinned = PolicyDataset(filepath=str(filepath), version=Version(versions[0], None))
    _assert_same_policy(pinned.load(), first)


def test_loading_a_missing_policy_raises_dataset_error(tmp_path):
    for version in (None, Version(None, None)):
        dataset = PolicyDataset(filepath=str(tmp_path / "missing"), version=version)
        assert not dataset.exists()
        with pytest.raises(DatasetError):
            dataset.load()


def test_a_failed_save_leaves_nothing_half_written(tokenizer, tmp_path):
    filepath = tmp_path / "policy"
    good = _policy(tokenizer, seed=0)
    # The model is written first, then the tokenizer fails: the save must leave no trace.
    broken = Policy(model=_policy(tokenizer, seed=1).model, tokenizer=None)

    with pytest.raises(DatasetError):
        PolicyDataset(filepath=str(filepath)).save(broken)
    assert not filepath.exists()
    assert list(tmp_path.iterdir()) == []

    dataset = PolicyDataset(filepath=str(filepath))
    dataset.save(good)
    with pytest.raises(DatasetError):
        dataset.save(broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy"]
    _assert_same_policy(dataset.load(), good)

    versioned = PolicyDataset(filepath=str(tmp_path / "v"), version=Version(None, None))
    with pytest.raises(DatasetError):
        versioned.save(broken)
    assert not versioned.exists()


def test_save_rejects_non_policies(tmp_path):
    with pytest.raises(DatasetError, match="Policy"):
        PolicyDataset(filepath=str(tmp_path / "policy")).save({"model": 1})


def test_fsspec_memory_filesystem_round_trip(tokenizer):
    root = f"policies-{uuid.uuid4().hex}"
    policy = _policy(tokenizer)
    dataset = PolicyDataset(filepath=f"memory:///{root}/policy", version=Version(None, None))
    try:
        dataset.save(policy)
        assert dataset.exists()
        _assert_same_policy(dataset.load(), policy)
    finally:
        fsspec.filesystem("memory").rm(f"/{root}", recursive=True)


def test_catalog_entry_saves_and_loads_a_versioned_policy(tokenizer, tmp_path):
    catalog = DataCatalog.from_config(
        {
            "warm_policy": {
                "type": "fgrpo_pipeline.datasets.PolicyDataset",
                "filepath": str(tmp_path / "warm_policy"),
                "versioned": True,
            }
        }
    )
    policy = _policy(tokenizer)
    catalog.save("warm_policy", policy)
    _assert_same_policy(catalog.load("warm_policy"), policy)
    (version,) = [p.name for p in (tmp_path / "warm_policy").iterdir()]
    assert VERSION.match(version)


def test_describe_names_the_filepath_and_version(tmp_path):
    dataset = PolicyDataset(
        filepath=str(tmp_path / "policy"),
        version=Version(None, None),
        load_args={"dtype": "float32"},
        metadata={"owner": "rl"},
    )
    text = repr(dataset)
    assert "policy" in text
    assert "version=" in text
    assert "dtype" in text
    assert dataset.metadata == {"owner": "rl"}
