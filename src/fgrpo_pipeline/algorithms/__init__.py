"""The mathematics of the project, on plain tensors: f-divergences and their links,
group advantages, the f-GRPO / FDO / f-HAL / GRPO / DPO losses, rewards, and the reward
labeling of rollouts into aligned / unaligned / neutral sides. Each family is found by name
in a :class:`~fgrpo_pipeline.algorithms.registry.Registry`; parameter blocks are validated
dataclasses (:class:`~fgrpo_pipeline.algorithms.params.Params`). Imports nothing else of the
project: it is the bottom layer."""
