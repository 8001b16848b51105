"""Lineage is visible in kedro-viz: a real `kedro viz run` serves every pipeline and dataset.

The viewer runs as a subprocess in a scratch copy of the project and is read through its
JSON API (kedro-viz 12.x, ``kedro_viz/api/rest/router.py``):

* ``GET /api/main`` -- the default pipeline's graph plus the list of registered pipelines;
* ``GET /api/pipelines/<id>`` -- one registered pipeline's graph (what the pipeline selector shows);
* ``GET /api/nodes/<node id>`` -- the metadata panel of one node (a dataset's file path).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fgrpo_pipeline.pipeline_registry import register_pipelines
from fgrpo_pipeline.pipelines.arms import remember_session_params

pytestmark = pytest.mark.slow

HOST = "127.0.0.1"
STARTUP_TIMEOUT = 90.0  # seconds for the viewer to answer; it usually takes ~10 s
# The datasets the README points at, with the layer conf/base/catalog_*.yml gives them.
EXPECTED_LAYERS = {
    "prompts": "primary",
    "aligned": "model_input",
    "unaligned": "model_input",
    "base_policy": "model_input",
    "trained_policy": "models",
    "evaluation_report": "reporting",
}


def _free_port() -> int:
    """A free loopback port below 32768.

    kedro-viz refuses ports above 49151 and silently moves to the next port when the one asked
    for is taken, so an OS-assigned ephemeral port (32768-60999 on Linux) will not do.
    """
    rng = random.Random()
    for _ in range(100):
        port = rng.randrange(20000, 32000)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port found")


# Loopback only: ignore any proxy configured in the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(port: int, path: str, timeout: float = 10.0):
    with _OPENER.open(f"http://{HOST}:{port}{path}", timeout=timeout) as response:
        return json.loads(response.read())


def _log_tail(log: Path, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"


def _wait_until_up(proc: subprocess.Popen, port: int, log: Path) -> dict:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"kedro viz exited early ({proc.returncode}):\n{_log_tail(log)}")
        try:
            return _get(port, "/api/main", timeout=5.0)
        except (OSError, ValueError):  # not listening yet / still loading the project
            time.sleep(0.5)
    pytest.fail(
        f"kedro viz did not answer on port {port} in {STARTUP_TIMEOUT} s:\n{_log_tail(log)}"
    )


def _stop(proc: subprocess.Popen) -> None:
    """Stop the CLI and the server process it spawns (both in the session's process group)."""
    pgid = proc.pid  # start_new_session=True: the CLI leads its own process group
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=15)
    # The spawned server (and multiprocessing's resource tracker) may outlive the CLI.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)


def _mlflow_runs(store: Path) -> list:
    import mlflow
    from mlflow.entities import ViewType

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{store}")
    try:
        return mlflow.search_runs(
            search_all_experiments=True, run_view_type=ViewType.ALL, output_format="list"
        )
    finally:
        mlflow.set_tracking_uri(previous)


def test_viz_shows_every_pipeline_and_the_lineage_of_the_datasets(project_copy: Path):
    # the names themselves are checked in tests/pipelines/test_registry_and_nodes.py
    remember_session_params(None)  # the arms as the viewer builds them: from conf/
    registered_pipelines = register_pipelines()
    registered = set(registered_pipelines)

    port = _free_port()
    log = project_copy / "viz.log"
    env = {
        **os.environ,
        "KEDRO_DISABLE_TELEMETRY": "1",
        "DO_NOT_TRACK": "1",
        # kedro-viz asks PyPI for its latest version at start-up; a refusing loopback proxy
        # makes that fail at once instead of waiting on the network.
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "https_proxy": "http://127.0.0.1:9",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        "COLUMNS": "200",  # readable rich logs in the failure message
    }
    command = [sys.executable, "-m", "kedro", "viz", "run"]
    command += ["--no-browser", "--host", HOST, "--port", str(port)]  # no --autoreload
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command,
            cwd=project_copy,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        main = _wait_until_up(proc, port, log)
        graphs = {name: _get(port, f"/api/pipelines/{name}") for name in sorted(registered)}
        aligned_id = next(n["id"] for n in main["nodes"] if n["name"] == "aligned")
        aligned_meta = _get(port, f"/api/nodes/{aligned_id}")
    finally:
        _stop(proc)

    # Every registered pipeline is in the pipeline selector and has its own graph.
    assert main["selected_pipeline"] == "__default__"
    assert {p["id"] for p in main["pipelines"]} == registered
    for name, graph in graphs.items():
        assert graph["selected_pipeline"] == name
        assert any(n["type"] == "task" for n in graph["nodes"]), name

    # The datasets are nodes of the default graph, each with its catalog layer.
    data = {n["name"]: n for n in main["nodes"] if n["type"] == "data"}
    assert set(EXPECTED_LAYERS) <= set(data), sorted(data)
    assert {name: data[name]["layer"] for name in EXPECTED_LAYERS} == EXPECTED_LAYERS
    assert data["aligned"]["layer"] == data["unaligned"]["layer"] == "model_input"

    # Lineage: reward_labeling writes aligned/unaligned, and they feed the node that writes
    # trained_policy, in both the default graph and the training stage's own graph.
    for graph in (main, graphs["training"]):
        names = {n["id"]: n["name"] for n in graph["nodes"]}
        ids = {name: node_id for node_id, name in names.items()}
        trainers = {e["source"] for e in graph["edges"] if e["target"] == ids["trained_policy"]}
        for split in ("aligned", "unaligned"):
            assert any(
                e["source"] == ids[split] and e["target"] in trainers for e in graph["edges"]
            ), f"{split} does not feed the node that writes trained_policy"
    labeling = {n["id"] for n in graphs["reward_labeling"]["nodes"] if n["type"] == "task"}
    writers = {e["source"] for e in main["edges"] if e["target"] == aligned_id}
    assert writers and writers <= labeling

    # The layer bands are in data-flow order (no layer cycle); "intermediate" holds the safety
    # setting's records.
    assert main["layers"] == [
        "intermediate",
        "primary",
        "model_input",
        "models",
        "model_output",
        "reporting",
    ], main["layers"]

    # The sweeps draw every arm (a namespace: its training and evaluation nodes) and the
    # summary node that reads them all.
    for sweep, summary in (
        ("comparison", "compare_divergences_node"),
        ("safety_comparison", "compare_safety_node"),
    ):
        arms = {n.namespace for n in registered_pipelines[sweep].nodes if n.namespace}
        assert len(arms) >= 10, (sweep, sorted(arms))
        drawn = json.dumps(graphs[sweep])
        assert all(f'"{arm}' in drawn for arm in arms), sweep
        tasks = {n["name"] for n in graphs[sweep]["nodes"] if n["type"] == "task"}
        assert any(summary in name for name in tasks), sorted(tasks)[:5]

    # Clicking a dataset shows where it lives.
    assert aligned_meta["filepath"].endswith("data/05_model_input/aligned.parquet")

    # The viewer loads the project without hooks: kedro-mlflow must not have started a run.
    store = project_copy / "mlflow.db"
    if store.exists():
        assert _mlflow_runs(store) == [], "kedro viz created an MLflow run"
