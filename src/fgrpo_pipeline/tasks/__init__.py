"""Prompt sources: the generated arithmetic task of the embedded default and GSM8K."""
