"""The `safety_base_policy` pipeline."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
