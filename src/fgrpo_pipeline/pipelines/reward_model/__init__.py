"""The `reward_model` pipeline."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
