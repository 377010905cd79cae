"""grpo/allocator.py: glibc's thresholds raised once, the user's MALLOC_* settings respected."""

import ctypes
import platform

import pytest

from grpo import allocator


class FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return 1


@pytest.fixture()
def libc(monkeypatch):
    fake = FakeLibc()
    monkeypatch.setattr(ctypes, "CDLL", lambda name: fake)
    monkeypatch.setattr(platform, "system", lambda: "Linux")
    monkeypatch.setattr(platform, "libc_ver", lambda: ("glibc", "2.36"))
    for key in allocator.ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    return fake


def test_raises_mmap_and_trim_thresholds(libc):
    assert allocator.keep_freed_memory() is True
    # mallopt(M_MMAP_THRESHOLD = -3, 256 MiB), mallopt(M_TRIM_THRESHOLD = -1, -1: never trim)
    assert libc.calls == [(-3, 256 * 1024 * 1024), (-1, -1)]


def test_a_freed_update_sized_block_is_reused_without_page_faults():
    """The real setting, in a fresh interpreter: after keep_freed_memory, a freed 100 MB tensor
    (one LM-head chunk's logits for SmolLM2) and a freed 1 GB of smaller blocks (what a policy
    forward keeps for backward) come back without faulting their pages in again once the heap has
    settled (the third round, as every step of a loop after the first); with glibc's
    defaults (MALLOC_* set, so the module stands aside) the same allocations fault."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    import os
    import subprocess
    import sys

    script = (
        "import resource, sys, torch\n"
        "from grpo.allocator import keep_freed_memory\n"
        "applied = keep_freed_memory()\n"
        "def touch():\n"
        "    big = torch.ones(25_000_000)\n"  # 100 MB
        "    small = [torch.ones(2_500_000) for _ in range(100)]\n"  # 100 x 10 MB
        "    del big, small\n"
        "touch()\n"
        "touch()\n"  # the steady state of a loop: the heap has settled to the step's layout
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "touch()\n"
        "print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k not in allocator.ENV_KEYS}
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    kept = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    applied, faults = kept.stdout.split()
    assert applied == "True" and int(faults) < 5_000, kept.stdout
    env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)  # glibc's default thresholds
    env["MALLOC_TRIM_THRESHOLD_"] = str(128 * 1024)
    default = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    applied, faults = default.stdout.split()
    assert applied == "False" and int(faults) > 50_000, default.stdout  # 1.1 GB in 4 KiB pages: ~270k


def test_user_malloc_settings_win(libc, monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert allocator.keep_freed_memory() is False and libc.calls == []


def test_other_c_libraries_are_left_alone(libc, monkeypatch):
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    assert allocator.keep_freed_memory() is False and libc.calls == []


def test_applies_on_this_machine_when_glibc():
    """The real call (this process keeps the setting: it changes no result)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    if any(k in __import__("os").environ for k in allocator.ENV_KEYS):
        pytest.skip("MALLOC_* set in the environment")
    assert allocator.keep_freed_memory() is True
