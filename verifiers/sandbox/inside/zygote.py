"""The zygote: a pre-imported interpreter that forks one fresh harness per request."""

from __future__ import annotations

import json
import os

from . import harness, view
from .linux import libc, seccomp_program

_ZYGOTE_TMP_MB = 1  # the zygote's own /tmp inside its view; runs mount their own over it


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
    spec = os.environ.pop("SANDBOX_VIEW", None)
    if spec and os.geteuid() == 0:
        try:  # root: build the allow-listed view once; each run's namespaces copy this one
            view.enter_view(json.loads(spec), _ZYGOTE_TMP_MB, False, {})
            view.TEMPLATE.append(True)
        except OSError:
            pass  # every run builds its own view (or reports why it cannot)
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
