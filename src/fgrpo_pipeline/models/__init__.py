"""Policies: the locally built tiny Qwen2 and its character tokenizer, pretrained loading,
seeding, and LoRA adapters (peft) whose adapter-disabled self is the reference."""
