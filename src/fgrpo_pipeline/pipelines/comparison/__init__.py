"""The `comparison` pipeline: every f-GRPO divergence against GRPO, over several seeds."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
