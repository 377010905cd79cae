"""The zygote: a pre-imported interpreter that forks one fresh harness per request."""

from __future__ import annotations

import os

from . import harness
from .linux import libc, seccomp_program


def main() -> None:
    """Pre-import what a harness needs, then fork one harness per request."""
    import ast  # noqa: F401  (pre-imported for the harnesses)
    import ctypes  # noqa: F401
    import resource  # noqa: F401
    import socket
    import tempfile  # noqa: F401
    import traceback  # noqa: F401

    for name in ("builtins", "copy", "math", "random", "re", "collections", "itertools", "functools",
                 "string", "heapq", "bisect", "operator", "fractions", "decimal", "hashlib", "typing",
                 "platform", "sysconfig", "errno", "io", "shutil"):
        __import__(name)
    libc()
    seccomp_program()
    sock = socket.socket(fileno=int(os.environ.pop("SANDBOX_ZYGOTE_FD")))
    parent = os.getppid()
    sock.send(b"ready")
    sock.settimeout(1.0)
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 64, 3)
        except TimeoutError:
            if os.getppid() != parent:  # the caller died (its forked children may hold the socket)
                break
            continue
        except OSError:
            break
        if not msg or msg == b"exit":
            break
        if msg.startswith(b"reap "):
            try:
                os.waitpid(int(msg[5:]), 0)
            except ChildProcessError:
                pass
            sock.send(b"ok")
            continue
        if msg != b"spawn" or len(fds) != 3:
            for fd in fds:
                os.close(fd)
            continue
        pid = os.fork()
        if pid == 0:
            try:
                sock.close()
                os.setsid()
                for i, fd in enumerate(fds):
                    os.dup2(fd, i)
                for fd in fds:
                    if fd > 2:
                        os.close(fd)
                harness.main()
            finally:
                os._exit(3)
        for fd in fds:
            os.close(fd)
        sock.send(b"%d" % pid)
    os._exit(0)
