"""The safety setting: compliance–refusal data, the learned reward model, the gold judge
and the reward-hacking monitor, and latent separation (Bhattacharyya distance)."""
