"""Sweeps over arms and seeds: the engine (``sweep``), the divergence comparison and the
f-HAL λ (safety) comparison built on it, with their summary tables; statistics over seeds."""
