"""``RewardModelDataset``: a versioned Kedro dataset holding a :class:`RewardModel`."""

from __future__ import annotations

from transformers import AutoModelForSequenceClassification

from fgrpo_pipeline.datasets.policy_dataset import PolicyDataset
from fgrpo_pipeline.safety.reward_model import RewardModel


class RewardModelDataset(PolicyDataset):
    """Saves/loads a :class:`RewardModel` (model + tokenizer) as a ``save_pretrained`` directory.

    Everything but the data type is :class:`PolicyDataset`'s: versioning, the atomic save
    through a staging directory, fsspec protocols, ``load_args``/``save_args``. The model loads
    with ``AutoModelForSequenceClassification`` and never from a hub. Example catalog entry::

        reward_model:
          type: fgrpo_pipeline.datasets.RewardModelDataset
          filepath: data/06_models/reward_model
          versioned: true
    """

    _data_type = RewardModel
    _model_class = AutoModelForSequenceClassification
    _name = "reward_model"
