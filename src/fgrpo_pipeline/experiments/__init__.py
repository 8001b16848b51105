"""Sweeps over methods and seeds: the divergence comparison and the f-HAL λ (safety)
comparison, with their summary tables."""
