"""The `data_preparation` pipeline."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
