"""Held-out evaluation of a policy against its reference: sampled and greedy accuracy,
reward, KL to the reference."""
