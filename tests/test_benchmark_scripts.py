"""The benchmark scripts run at their smallest settings (their timings are not checked here)."""

import json
import os
import subprocess
import sys

from tests.conftest import PROJECT_ROOT


def test_loss_cost_runs_with_one_round(tmp_path):
    # One round gives one time per loss: its interquartile range is that time, not a crash.
    out = tmp_path / "loss_cost.json"
    command = [sys.executable, "benchmarks/loss_cost.py", "--reps", "1", "--rounds", "1"]
    command += ["--threads", "1", "--max-load", "1000", "--out", str(out)]
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        command, check=False, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    sizes = json.loads(out.read_text())["sizes"]
    assert set(sizes) == {"default", "large"}
    for size in sizes.values():
        assert "grpo" in size["losses"]
        for row in size["losses"].values():
            q1, q3 = row["iqr_us"]
            assert q1 == row["median_us"] == q3 > 0
