"""Starting harness processes (caller side): a fresh ``python -I -S`` per run, or forks
of a pre-imported zygote; feeding a job in and reading the verdict out under a deadline.

The boot stub loads ``verifiers/sandbox/inside/`` as a standalone package named
``_sandbox`` (no ``verifiers`` package, no site-packages): the harness needs the
standard library only.
"""

from __future__ import annotations

import os
import signal
import sys
import time

_STDERR_CAP = 64 * 1024


class HarnessProcess:
    """A started harness process: its stdin/stdout/stderr pipes and how to kill/reap it."""

    def __init__(self, pid: int, stdin: int, stdout: int, stderr: int, reap):
        self.pid, self.stdin, self.stdout, self.stderr = pid, stdin, stdout, stderr
        self._reap = reap

    def kill(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)  # its session: harness and init (init's death ends the rest)
        except (ProcessLookupError, PermissionError):
            pass

    def finish(self) -> None:
        for fd in (self.stdin, self.stdout, self.stderr):
            try:
                os.close(fd)
            except OSError:
                pass
        self._reap()


INSIDE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "inside")


def boot_command(module: str) -> list[str]:
    """``python -I -S`` running ``main()`` of ``inside/<module>.py``, with ``inside/`` loaded
    as the standalone package ``_sandbox`` (its ``__init__`` is a docstring)."""
    code = ("import sys,importlib,importlib.util as u;"
            f"s=u.spec_from_file_location('_sandbox',{os.path.join(INSIDE, '__init__.py')!r},"
            f"submodule_search_locations=[{INSIDE!r}]);"
            "m=u.module_from_spec(s);sys.modules['_sandbox']=m;s.loader.exec_module(m);"
            f"importlib.import_module('_sandbox.{module}').main()")
    return [sys.executable, "-I", "-S", "-c", code]


ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}


class Launcher:
    """Starts each harness as a fresh interpreter (``python -I -S``)."""

    def start(self) -> HarnessProcess:
        import subprocess

        proc = subprocess.Popen(boot_command("harness"), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True, cwd="/", env=ENV)
        fds = [os.dup(f.fileno()) for f in (proc.stdin, proc.stdout, proc.stderr)]
        for f in (proc.stdin, proc.stdout, proc.stderr):
            f.close()

        def reap():
            try:
                proc.wait(timeout=30)
            except Exception:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

        return HarnessProcess(proc.pid, *fds, reap)

    def close(self) -> None:
        pass


class ZygoteLauncher(Launcher):
    """Forks each harness from a pre-started, pre-imported interpreter (the zygote).

    Each harness is still a fresh process (a fork of a zygote that never runs a job),
    but skips interpreter start-up and imports: several times more executions per
    second. The zygote keeps a harness unreaped until the caller is done with it, so
    killing its process group can never hit a recycled pid. Falls back to a fresh
    interpreter per run if the zygote cannot be started.
    """

    def __init__(self, template: dict | None = None):
        import threading

        self._template = template  # a filesystem view to build once in the zygote (mode auto, root)
        self._lock = threading.Lock()
        self._sock = None
        self._proc = None
        self._failed = False

    def _ensure(self) -> bool:
        import socket
        import subprocess

        if self._proc is not None and self._proc.poll() is None:
            return True
        if self._failed:
            return False
        self._stop(wait=False)
        ours = None
        try:
            import json

            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            env = {**ENV, "SANDBOX_ZYGOTE_FD": str(theirs.fileno())}
            if self._template is not None:
                env["SANDBOX_VIEW"] = json.dumps(self._template)
            self._proc = subprocess.Popen(boot_command("zygote"), stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, pass_fds=(theirs.fileno(),),
                                          start_new_session=True, cwd="/", env=env)
            theirs.close()
            ours.settimeout(60)
            if ours.recv(16) != b"ready":
                raise OSError("zygote did not start")
        except OSError:
            self._failed = True
            if ours is not None:
                ours.close()
            if self._proc is not None:
                self._proc.kill()
                self._proc.wait()
                self._proc = None
            return False
        self._sock = ours
        return True

    def start(self) -> HarnessProcess:
        import socket

        with self._lock:
            for _ in range(2):  # a zygote that died (e.g. with the thread that started it): restart once
                if not self._ensure():
                    break
                pipes = [os.pipe() for _ in range(3)]
                child_ends = [pipes[0][0], pipes[1][1], pipes[2][1]]
                try:
                    socket.send_fds(self._sock, [b"spawn"], child_ends)
                    pid = int(self._sock.recv(64))
                except (OSError, ValueError):
                    for fd in (pipes[0][1], pipes[1][0], pipes[2][0]):
                        os.close(fd)
                    self._stop(wait=False)
                    continue
                finally:
                    for fd in child_ends:
                        os.close(fd)
                return HarnessProcess(pid, pipes[0][1], pipes[1][0], pipes[2][0], lambda: self._reap(pid))
        return super().start()

    def _reap(self, pid: int) -> None:
        with self._lock:
            try:
                self._sock.send(b"reap %d" % pid)
                self._sock.recv(16)
            except (OSError, AttributeError):
                pass

    def _stop(self, wait: bool) -> None:
        if self._sock is not None:
            try:
                self._sock.send(b"exit")  # even if forked children of the caller hold the socket
            except OSError:
                pass
            self._sock.close()
            self._sock = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=10 if wait else 0.5)
            except Exception:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def close(self) -> None:
        self._stop(wait=True)


def pump(h: HarnessProcess, payload: bytes, deadline: float, out_cap: int) -> tuple[bytes, bytes, bool]:
    """Feed stdin, drain stdout/stderr (capped), kill the process group at the deadline."""
    import selectors

    sel = selectors.DefaultSelector()
    os.set_blocking(h.stdin, False)
    sel.register(h.stdin, selectors.EVENT_WRITE)
    sel.register(h.stdout, selectors.EVENT_READ)
    sel.register(h.stderr, selectors.EVENT_READ)
    bufs = {h.stdout: bytearray(), h.stderr: bytearray()}
    caps = {h.stdout: out_cap, h.stderr: _STDERR_CAP}
    view, killed = memoryview(payload), False
    try:
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                killed = True
                break
            for key, _ in sel.select(min(left, 1.0)):
                fd = key.fd
                if fd == h.stdin:
                    try:
                        view = view[os.write(fd, view[:65536]):]
                    except BlockingIOError:
                        continue
                    except OSError:
                        view = view[:0]
                    if not view:
                        sel.unregister(fd)
                        os.close(fd)
                        h.stdin = -1
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    sel.unregister(fd)
                    continue
                if len(bufs[fd]) < caps[fd]:
                    bufs[fd] += chunk[:caps[fd] - len(bufs[fd])]
    finally:
        sel.close()
        if killed:
            h.kill()
    return bytes(bufs[h.stdout]), bytes(bufs[h.stderr]), killed
