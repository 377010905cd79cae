"""benchmarks/device_suite.sh --smoke: the one-shot GPU suite runs end to end on CPU (so it cannot rot)."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_device_suite_smoke_runs_ours_and_prints_the_roofline(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "device_suite.sh"), "--smoke", "--systems", "ours"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    assert "| ours |" in out and "ours per phase (s): generate" in out
    assert "| generate |" in out and "| policy |" in out
    assert "compute floor:" in out and "ours/floor =" in out
    assert (tmp_path / "steps.json").is_file() and (tmp_path / "model" / "config.json").is_file()
