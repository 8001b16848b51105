"""Nodes of ``data_preparation``: build the prompts table (parameters_data_preparation.yml)."""

from __future__ import annotations

from typing import Any

import pandas as pd

from fgrpo_pipeline.pipelines.parameters import read_params
from fgrpo_pipeline.tasks.sources import DataPreparationConfig, validate_prompts


def prepare_prompts(params: dict[str, Any]) -> pd.DataFrame:
    """The prompts table (id, prompt, ground_truth, split) from the selected source.

    ``arithmetic`` is generated here (train, test and, when ``n_ood`` > 0, the ood rows
    beyond the training operand range); ``gsm8k`` reads the jsonl files the parameters name
    (the published format, e.g. copied into data/01_raw/gsm8k/), or ``hub_name`` from the
    hub with the optional ``datasets`` package.
    """
    config = read_params(DataPreparationConfig, params)
    table = config.prompts()
    validate_prompts(table, source=f"data_preparation.source={config.source}")
    return table
