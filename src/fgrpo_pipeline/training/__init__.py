"""The online RL loop and what it stands on: its configuration, the offline preference
minibatches, the named step functions, resumable state, the single- and multi-process
runtimes (accelerate DDP / FSDP), and the supervised warm-up of a base policy."""
