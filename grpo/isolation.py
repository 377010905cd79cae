"""Where verifier code runs, so that it cannot take the trainer down.

Process-mode verifiers (the default for every verifier, plugins and TRL/verl reward
functions included) run in pebble pool workers. ``isolate_worker`` is the pool's
initializer; in each new worker it

* starts a new session (``setsid``): ``kill(0, ...)`` and the terminal's Ctrl-C reach the
  worker's own group only, never the trainer's;
* arranges SIGKILL for the worker when its parent dies (``PR_SET_PDEATHSIG``), so a
  killed trainer leaves no workers behind;
* moves the worker's code into new PID and mount namespaces (a user namespace too when
  not root): the worker forks once, the child is PID 1 of the new PID namespace, in its
  own process group, with a private ``/proc`` of that namespace, and runs the tasks; the
  original waits for it and shares its fate (pebble's timeouts kill the original, the
  child follows by its death signal). Processes outside, the trainer first, have no PID
  there and no ``/proc`` entry: ``kill(getppid(), 9)``, ``killpg``, a PID read from
  ``/proc``, ``/proc/<pid>/mem`` cannot reach them; every process the verifier forks dies
  with its PID 1.

Each step is best effort where the kernel refuses it (no namespaces, no prctl): the
worker then runs with what worked (``docs/reliability.md`` records what was measured
on this machine as root and as an ordinary user). The workers keep the trainer's uid:
dropping root to nobody was measured to break lazy imports from a Python installed
under ``/root`` (``No module named 'cmath'``), and the namespaces already stop signals.

Inline verifiers run in the trainer's process: they are trusted code (the built-in
``python_tests``, which sandboxes the programs itself, and ``reward_model``). They get a
watchdog (``inline_deadline``): a call that runs past its deadline raises in the
trainer's main thread and costs that call's rewards, like an exception. ``os._exit``
or a signal from inline code cannot be caught in the same process: that is why
inline is for trusted code only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Iterator

_CLONE_NEWNS, _CLONE_NEWUSER, _CLONE_NEWPID = 0x00020000, 0x10000000, 0x20000000
_PR_SET_PDEATHSIG = 1


class VerifierTimeout(Exception):
    """An inline verifier call ran past its watchdog deadline."""


class WorkerError(Exception):
    """What a pool worker's call raised, as text. Any exception (``SystemExit``, one that cannot be
    pickled back) returns as this plain one, so a call costs its own result: never the run (pebble
    re-raises a worker's ``SystemExit`` in the trainer) nor the pool (an exception that fails to
    unpickle breaks it for every later call)."""


@contextlib.contextmanager
def worker_call(memory_mb: int, keep: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Around one call inside a pool worker: the address space capped at what the worker maps now
    plus ``memory_mb`` (the workers are forked from the trainer, so they start with its address
    space: gigabytes of model, tens of them of CUDA mappings on a GPU; an absolute cap would leave
    the call nothing to allocate), restored after; what the call raises becomes a ``WorkerError``,
    except ``MemoryError`` and the ``keep`` types (a verifier's broken contract stops the run)."""
    import resource

    limit = int(memory_mb) * 2**20 + address_space_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard == resource.RLIM_INFINITY or limit < hard:
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    except (MemoryError, *keep):
        raise
    except BaseException as exc:
        raise WorkerError(f"{type(exc).__name__}: {exc}"[:500]) from None
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def address_space_bytes() -> int:
    """This process's virtual size (what RLIMIT_AS counts); 0 where /proc does not say."""
    import resource

    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return 0


def _libc():
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _death_signal() -> bool:
    try:
        import ctypes

        return _libc().prctl(_PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _enter_pid_namespace(root: bool) -> bool:
    """Fork into a new PID namespace; True in the child (PID 1 there). The original process
    never returns: it waits for the child and exits with it."""
    flags = _CLONE_NEWPID | _CLONE_NEWNS | (0 if root else _CLONE_NEWUSER)
    try:
        if _libc().unshare(flags) != 0:
            return False
    except (OSError, AttributeError):
        return False
    worker_pid = os.getpid()
    alive_r, alive_w = os.pipe()  # EOF on alive_r: the original is gone
    child = os.fork()
    if child == 0:
        os.close(alive_w)
        os.setpgid(0, 0)  # its own group: kill(0, ...) from the verifier reaches the namespace only
        _private_proc()
        _death_signal()
        import select

        if select.select([alive_r], [], [], 0)[0]:  # the original died before the death signal was set
            os._exit(1)
        os.close(alive_r)
        _keep_pebble_pid(worker_pid)
        return True
    os.close(alive_r)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # pebble stops a worker with SIGTERM: die, the child follows
    signal.signal(signal.SIGHUP, signal.SIG_DFL)  # not the trainer's Terminated (grpo/cli.py)
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except InterruptedError:
            continue
        except ChildProcessError:
            os._exit(1)
    code = os.waitstatus_to_exitcode(status)
    os._exit(code if code >= 0 else 128 - code)


def _keep_pebble_pid(worker_pid: int) -> None:
    """pebble acknowledges each task with ``os.getpid()``, which the pool maps to the worker it
    started (to kill it at the timeout); inside the namespace that would be 1."""
    import types

    import pebble.pool.process as pool_process

    proxy = types.ModuleType("os")
    proxy.__dict__.update(os.__dict__)
    proxy.getpid = lambda: worker_pid
    pool_process.os = proxy


def _private_proc() -> bool:
    """Mount a /proc of the new PID namespace over the host's (in the private mount namespace):
    the trainer's /proc/<pid> entries (its memory, its fds) are out of sight."""
    import ctypes

    libc = _libc()
    ms_rec, ms_private, ms_nosuid, ms_nodev, ms_noexec = 16384, 1 << 18, 2, 4, 8
    if libc.mount(None, b"/", None, ctypes.c_ulong(ms_rec | ms_private), None) != 0:
        return False
    return libc.mount(b"proc", b"/proc", b"proc", ctypes.c_ulong(ms_nosuid | ms_nodev | ms_noexec), None) == 0


def isolate_worker() -> None:
    """pebble pool initializer: runs in each new worker before its first task (see the module docstring)."""
    root = os.geteuid() == 0
    with contextlib.suppress(OSError):
        os.setsid()
    _death_signal()
    _enter_pid_namespace(root)


class WorkerPool:
    """The pebble process pool verifiers and tools run in (fork: workers inherit plugin modules
    loaded from files; ``isolate_worker``: they die with the trainer and cannot signal it),
    rebuilt when it breaks: a worker killed from outside (the OOM killer, an admin) left
    pebble's pool broken for good, so every later call failed and the run stopped."""

    def __init__(self, workers: int):
        self.workers = workers
        self._pool = None
        self._lock = threading.Lock()  # tool calls schedule from several threads: one pool

    def schedule(self, fn, args: tuple, timeout: float | None):
        try:
            return self._get().schedule(fn, args=args, timeout=timeout)
        except RuntimeError:  # "Unexpected error within the Pool": a broken pool
            self.discard()
            return self._get().schedule(fn, args=args, timeout=timeout)

    def _get(self):
        import multiprocessing

        import pebble

        with self._lock:
            if self._pool is not None and not self._pool.active:
                self._stop(self._pool)
                self._pool = None
            if self._pool is None:
                self._pool = pebble.ProcessPool(max_workers=self.workers,
                                                context=multiprocessing.get_context("fork"),
                                                initializer=isolate_worker)
            return self._pool

    def discard(self) -> None:
        """Drop the pool (after a ``BrokenProcessPool``); the next call starts a new one."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            self._stop(pool)

    close = discard

    @staticmethod
    def _stop(pool) -> None:
        pool.stop()
        pool.join(timeout=10)


@contextlib.contextmanager
def inline_deadline(seconds: float, what: str) -> Iterator[None]:
    """Raise ``VerifierTimeout`` in the calling (main) thread when the block runs past ``seconds``.

    SIGALRM interrupts Python code and blocking system calls; outside the main thread (no
    signals there) the block runs without a watchdog."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread() or sys.platform == "win32":
        yield
        return

    def on_alarm(signum, frame):
        raise VerifierTimeout(f"{what} did not return within {seconds:g}s (inline watchdog)")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
