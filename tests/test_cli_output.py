"""What `kedro run` prints: a bad parameter ends the run with its message under a short trace
(conf/logging.yml), and third-party deprecation warnings are not printed while ours are
(src/fgrpo_pipeline/settings.py). Each test runs the real CLI in a scratch project copy."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

MAX_ERROR_LINES = 60  # before conf/logging.yml: 285 lines at 80 columns


def _kedro(project: Path, *args: str) -> subprocess.CompletedProcess:
    # our filters stand down under PYTHONWARNINGS; KEDRO_LOGGING_CONFIG would replace the file
    ignored = ("PYTHONWARNINGS", "KEDRO_LOGGING_CONFIG")
    env = {k: v for k, v in os.environ.items() if k not in ignored}
    env.update(
        KEDRO_DISABLE_TELEMETRY="1",
        DO_NOT_TRACK="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        COLUMNS="80",  # what a non-terminal gets anyway: line counts do not depend on the caller
    )
    return subprocess.run(
        [sys.executable, "-m", "kedro", "run", *args],
        cwd=project,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _output(done: subprocess.CompletedProcess) -> str:
    return done.stdout + done.stderr


def test_a_bad_parameter_ends_the_run_with_its_message_and_a_short_trace(project_copy: Path):
    assert (project_copy / "conf/logging.yml").is_file()
    done = _kedro(project_copy, "--params", "training.lam=1.5")
    out = _output(done)
    lines = out.splitlines()
    assert done.returncode != 0, out
    assert "Using 'conf/logging.yml' as logging" in out
    # the last line is the error, naming the file and the parameter
    last = [line for line in lines if line.strip()][-1]
    assert last.startswith("ValueError: parameters_training.yml:"), out
    assert "lam" in last and "1.5" in last, out
    assert len(lines) < MAX_ERROR_LINES, f"{len(lines)} lines:\n{out}"
    # the frames between the CLI and our hook are counted, not shown
    assert "frames hidden" in out
    assert "pluggy" not in out and "click/core.py" not in out, out
    assert "hooks.py" in out  # ... but the frame that raised it is
    assert not any((project_copy / "data").rglob("*.*")), "a refused run wrote data"


def test_a_run_prints_no_third_party_deprecation_warnings(project_copy: Path):
    done = _kedro(project_copy, "--pipelines=data_preparation")
    out = _output(done)
    assert done.returncode == 0, out
    assert "Pipeline execution completed" in out  # (at 80 columns "successfully" wraps)
    noisy = [
        line
        for line in out.splitlines()
        if any(w in line for w in ("DeprecationWarning", "FutureWarning", "Pandas4Warning"))
    ]
    assert not noisy, "\n".join(noisy)
    # the UserWarnings every run used to print, about omegaconf's and MLflow's APIs
    assert "register_new_resolver" not in out, out
    assert "Add type hints" not in out, out
    assert "Warning" not in out, out


def test_our_own_warnings_still_show(project_copy: Path):
    mlflow_yml = project_copy / "conf/base/mlflow.yml"
    text = mlflow_yml.read_text()
    start = text.index("mlflow_tracking_uri:")
    end = text.index("\n", start)
    unreachable = "http://127.0.0.1:9"  # the discard port: no server there
    mlflow_yml.write_text(text[:start] + f"mlflow_tracking_uri: {unreachable}" + text[end:])
    done = _kedro(project_copy, "--pipelines=data_preparation")
    out = _output(done)
    assert done.returncode == 0, out
    assert "UnavailableTrackingWarning" in out, out
    assert "register_new_resolver" not in out, out
