"""fgrpo_pipeline: f-GRPO, f-HAL and FDO as a Kedro pipeline.

The algorithm core (``divergences``, ``advantages``, ``losses`` and the modules they
use) is plain Python/torch and imports neither Kedro nor MLflow.
"""

__version__ = "0.1.0"
