"""A third-party plugin package (examples/) is discovered through entry points and trains."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, tiny_run_config


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(REPO / "examples" / "grpo-plugin-reverse")],
                   check=True, capture_output=True, text=True)
    return target


def _grpo(args, site: Path, cwd: Path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)]), "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "grpo.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def test_entry_points_are_listed_with_their_source(installed_plugin, tmp_path):
    out = _grpo(["list"], installed_plugin, tmp_path)
    assert out.returncode == 0, out.stderr
    lines = {line.split()[0]: line for line in out.stdout.splitlines() if line.startswith("  ")}
    assert "reverse_words" in lines and "grpo-plugin-reverse" in lines["reverse_words"]
    assert "reversed_exact" in lines and "entry point" in lines["reversed_exact"]


def test_two_steps_on_the_plugin_task(installed_plugin, tiny_model_dir, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("task: {name: reverse_words}\n")
    overrides = [o for o in tiny_run_config(tiny_model_dir, tmp_path / "run", Path("unused"))
                 if not o.startswith(("task.name", "plugins"))]
    out = _grpo(["train", str(cfg), *overrides, "--no-progress"], installed_plugin, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()
    assert "reward/reversed_exact" in (tmp_path / "run" / "metrics.jsonl").read_text()


def test_broken_entry_point_is_reported_not_dropped(tmp_path):
    site = tmp_path / "site"
    dist = site / "broken_plugin-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[grpo.tasks]\nbroken_task = broken_mod:Task\n")
    (site / "broken_mod.py").write_text("raise ImportError('needs a missing dependency')\n")
    out = _grpo(["list", "tasks"], site, tmp_path)
    assert out.returncode == 0
    assert "broken_task" in out.stdout and "FAILED TO LOAD" in out.stdout and "missing dependency" in out.stdout
    cfg = tmp_path / "c.yaml"
    cfg.write_text("task: {name: broken_task}\n")
    out = _grpo(["train", str(cfg)], site, tmp_path)
    assert out.returncode == 2
    assert "task 'broken_task' failed to load: ImportError: needs a missing dependency" in out.stderr
