"""Figures of runs and comparisons (matplotlib), returned for the catalog to save."""
