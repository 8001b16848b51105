"""Kedro datasets of this project."""

from fgrpo_pipeline.datasets.adapter_dataset import AdapterDataset
from fgrpo_pipeline.datasets.atomic_dataset import AtomicDataset
from fgrpo_pipeline.datasets.mlflow_policy_dataset import MlflowPolicyDataset
from fgrpo_pipeline.datasets.policy_dataset import PolicyDataset
from fgrpo_pipeline.datasets.reward_model_dataset import RewardModelDataset

__all__ = [
    "AdapterDataset",
    "AtomicDataset",
    "MlflowPolicyDataset",
    "PolicyDataset",
    "RewardModelDataset",
]
