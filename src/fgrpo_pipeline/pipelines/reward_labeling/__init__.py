"""The `reward_labeling` pipeline."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
