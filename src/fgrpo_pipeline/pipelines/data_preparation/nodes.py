"""Nodes of ``data_preparation``: build the prompts table (parameters_data_preparation.yml)."""

from __future__ import annotations

from typing import Any

import pandas as pd

from fgrpo_pipeline.tasks.sources import load_gsm8k, make_arithmetic_prompts, validate_prompts

SOURCES = ("arithmetic", "gsm8k")


def check_params(params: dict[str, Any]) -> None:
    """Fail before any work on an unknown source or missing source block."""
    source = params.get("source")
    if source not in SOURCES:
        raise ValueError(
            f"parameters_data_preparation.yml: unknown data_preparation.source {source!r}; "
            f"valid: {', '.join(SOURCES)}"
        )
    if not isinstance(params.get(source), dict):
        raise ValueError(f"parameters_data_preparation.yml: data_preparation.{source} is missing")


def prepare_prompts(params: dict[str, Any]) -> pd.DataFrame:
    """The prompts table (id, prompt, ground_truth, split) from the selected source.

    ``arithmetic`` is generated here; ``gsm8k`` reads the jsonl files the parameters name
    (the published format, e.g. copied into data/01_raw/gsm8k/), or ``hub_name`` from the
    hub with the optional ``datasets`` package.
    """
    check_params(params)
    source = params["source"]
    options = dict(params[source])
    if source == "arithmetic":
        table = make_arithmetic_prompts(**options)
    else:
        template = options.get("prompt_template", "{question}\nAnswer:")
        table = pd.concat(
            [
                load_gsm8k(
                    options.get(f"{split}_path"),
                    split=split,
                    limit=options.get(f"limit_{split}"),
                    prompt_template=template,
                    hub_name=options.get("hub_name"),
                    hub_config=options.get("hub_config", "main"),
                )
                for split in ("train", "test")
            ],
            ignore_index=True,
        )
    validate_prompts(table, source=f"data_preparation.source={source}")
    return table
