"""An MLflow store that cannot be reached costs tracking, never the run's outputs."""

import pytest

from fgrpo_pipeline.tracking import UnavailableTrackingWarning, store_problem
from tests.conftest import run_kedro


def _point_tracking_at(project, uri: str) -> None:
    mlflow_yml = project / "conf/base/mlflow.yml"
    text = mlflow_yml.read_text()
    start = text.index("mlflow_tracking_uri:")
    end = text.index("\n", start)
    mlflow_yml.write_text(text[:start] + f"mlflow_tracking_uri: {uri}" + text[end:])


@pytest.mark.parametrize("kind", ["sqlite", "http"])
def test_an_unreachable_store_leaves_the_outputs_and_warns(project_copy, kind):
    blocker = project_copy / "not-a-directory"
    blocker.write_text("a file where the store's folder should be")
    uri = {
        "sqlite": f"sqlite:///{blocker}/mlflow.db",  # cannot be created, even by root
        "http": "http://127.0.0.1:9",  # no server there (the discard port)
    }[kind]
    assert store_problem(uri) is not None
    _point_tracking_at(project_copy, uri)
    with pytest.warns(UnavailableTrackingWarning) as caught:
        run_kedro(project_copy, "data_preparation")
        run_kedro(project_copy, "base_policy")
    assert (project_copy / "data/03_primary/prompts.parquet").is_file()
    assert any((project_copy / "data/06_models/base_policy").iterdir())
    messages = [str(w.message) for w in caught if w.category is UnavailableTrackingWarning]
    assert len(messages) == 2  # one per run
    assert uri in messages[0] and "NOT tracked" in messages[0]
    assert not list(project_copy.glob("mlflow.db"))  # nothing tracked anywhere in the project


def test_a_reachable_store_is_not_reported(tmp_path):
    assert store_problem(f"sqlite:///{tmp_path}/mlflow.db") is None
