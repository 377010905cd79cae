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
    # mallopt(M_MMAP_THRESHOLD = -3, 64 MiB), mallopt(M_TRIM_THRESHOLD = -1, 256 MiB)
    assert libc.calls == [(-3, 64 * 1024 * 1024), (-1, 256 * 1024 * 1024)]


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
