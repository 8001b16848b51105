"""Kedro datasets of this project."""

from fgrpo_pipeline.datasets.policy_dataset import PolicyDataset

__all__ = ["PolicyDataset"]
