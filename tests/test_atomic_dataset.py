"""AtomicDataset: a save is complete or absent, never half-written."""

import pandas as pd
import pytest
from kedro.io import DatasetError

from fgrpo_pipeline.datasets import AtomicDataset


def _parquet(path):
    return AtomicDataset(filepath=str(path), dataset={"type": "pandas.ParquetDataset"})


def test_round_trip_and_no_staging_file_left(tmp_path):
    target = tmp_path / "sub" / "table.parquet"
    data = _parquet(target)
    assert not data.exists()
    table = pd.DataFrame({"a": [1, 2], "b": ["x", "y"]})
    data.save(table)
    pd.testing.assert_frame_equal(data.load(), table)
    assert data.exists()
    assert [p.name for p in target.parent.iterdir()] == ["table.parquet"]


def test_a_failed_save_leaves_the_previous_file_untouched(tmp_path):
    target = tmp_path / "table.parquet"
    data = _parquet(target)
    data.save(pd.DataFrame({"a": [1, 2]}))
    before = target.read_bytes()
    unwritable = pd.DataFrame({"a": [1, "not a number"]})  # pyarrow refuses mixed types
    with pytest.raises(Exception):  # noqa: B017 - whatever the writer raises
        data.save(unwritable)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["table.parquet"]


def test_the_wrapped_dataset_keeps_its_options(tmp_path):
    target = tmp_path / "t.csv"
    data = AtomicDataset(
        filepath=str(target),
        dataset={"type": "pandas.CSVDataset", "save_args": {"index": False, "sep": ";"}},
    )
    data.save(pd.DataFrame({"a": [1], "b": [2]}))
    assert target.read_text().splitlines() == ["a;b", "1;2"]


@pytest.mark.parametrize(
    ("filepath", "dataset", "message"),
    [
        ("t.parquet", {"type": "pandas.ParquetDataset", "filepath": "x"}, "filepath once"),
        ("s3://bucket/t.parquet", {"type": "pandas.ParquetDataset"}, "only local files"),
    ],
)
def test_bad_configurations_are_rejected(filepath, dataset, message):
    with pytest.raises(DatasetError, match=message):
        AtomicDataset(filepath=filepath, dataset=dataset)
