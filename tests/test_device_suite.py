"""benchmarks/device_suite.sh --smoke: the one-shot GPU suite runs end to end on CPU (so it cannot rot)."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _probe_wheel(folder: Path) -> None:
    """A minimal valid wheel of one module, ``grpo_suite_probe``, standing in for the carried TRL."""
    import base64
    import hashlib
    import zipfile

    files = {"grpo_suite_probe.py": "CARRIED = True\n",
             "grpo_suite_probe-0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: grpo-suite-probe\nVersion: 0.1\n",
             "grpo_suite_probe-0.1.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = [f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b'=').decode()},"
              f"{len(text.encode())}" for name, text in files.items()]
    files["grpo_suite_probe-0.1.dist-info/RECORD"] = "\n".join(record + ["grpo_suite_probe-0.1.dist-info/RECORD,,"]) + "\n"
    folder.mkdir()
    with zipfile.ZipFile(folder / "grpo_suite_probe-0.1-py3-none-any.whl", "w") as whl:
        for name, text in files.items():
            whl.writestr(name, text)


def test_device_suite_smoke_runs_ours_and_prints_the_roofline(tmp_path):
    """Also: wheels in $WHEELS (on a GPU machine, benchmarks/device_wheels.sh's .whl) are installed
    into $OUT/site first, and that folder is on PYTHONPATH for the benchmark."""
    _probe_wheel(tmp_path / "wheels")
    out_dir = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out_dir), "OMP_NUM_THREADS": "1",
           "WHEELS": str(tmp_path / "wheels")}
    out_dir.mkdir()
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "device_suite.sh"), "--smoke", "--systems", "ours"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    assert "| ours |" in out and "ours per phase (s): generate" in out
    assert "| generate |" in out and "| policy |" in out
    assert "compute floor:" in out and "ours/floor =" in out
    assert (out_dir / "steps.json").is_file() and (out_dir / "model" / "config.json").is_file()
    assert "installed 1 carried wheels" in out and (out_dir / "site" / "grpo_suite_probe.py").is_file()


def test_step_throughput_keeps_what_the_other_workers_measured_when_one_fails(tmp_path, tiny_model_dir):
    """A worker that dies (here TRL's, whose import is made to fail) is dropped with its error:
    the others' steps are still measured, reported and written, and the exit status is non-zero."""
    import json

    broken = tmp_path / "broken" / "trl"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('trl made unimportable by the test')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "broken"), "OMP_NUM_THREADS": "1"}
    record = tmp_path / "steps.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "step_throughput.py"), "--model", str(tiny_model_dir),
                           "--systems", "trl,ours", "--prompts", "2", "--group", "2", "--tokens", "3", "--steps", "1",
                           "--warmup", "0", "--threads", "1", "--rate-seconds", "0.05", "--rate-shapes", "1",
                           "--out", str(tmp_path / "runs"), "--json", str(record)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "trl made unimportable" in proc.stderr and "trl worker exited before it was ready" in proc.stderr
    assert "| ours |" in proc.stdout and "| trl |" not in proc.stdout and "compute floor:" in proc.stdout
    saved = json.loads(record.read_text())
    assert len(saved["records"]["ours"]) == 1 and "trl" in saved["failed"]
