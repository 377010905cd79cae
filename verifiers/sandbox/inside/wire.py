"""The sandbox's wire format: length-prefixed JSON frames, shared by the caller, the
harness, init and the program, and how a program's end is reported.

Standard library only (it runs inside the sandbox's processes, see ``inside/__init__.py``).
"""

from __future__ import annotations

import json
import os
import select
import signal
import struct
import time
from typing import Any


FRAME = struct.Struct("!I")
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # one RPC message or job frame


def io_message_bytes(cap: int) -> int:
    """The largest message a stdin/stdout case's result can be: its stdout (``cap`` bytes) JSON-escaped,
    up to 6 bytes a byte (``\\u00e9``), plus the stderr tail and the fields."""
    return 6 * cap + (1 << 20)


def frame(data: bytes) -> bytes:
    return FRAME.pack(len(data)) + data


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def read_exact(fd: int, n: int, deadline: float | None = None) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise Timeout()
        chunk = os.read(fd, min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def send(fd: int, obj: Any) -> None:
    write_all(fd, frame(json.dumps(obj, separators=(",", ":")).encode()))


def recv(fd: int, deadline: float | None = None, max_bytes: int = MAX_MESSAGE_BYTES) -> Any:
    (n,) = FRAME.unpack(read_exact(fd, 4, deadline))
    if n > max_bytes:
        raise ProtocolError(f"message of {n} bytes exceeds {max_bytes}")
    data = read_exact(fd, n, deadline)
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"malformed message ({type(exc).__name__})") from None


class Timeout(BaseException):
    """Wall clock exhausted (BaseException: test code's ``except Exception`` cannot swallow it)."""


class ProtocolError(BaseException):
    """The program's process sent something that is not a well-formed message."""


class ProgramGone(BaseException):
    """The program's process exited or stopped answering."""


def exit_info(status: int) -> dict[str, Any]:
    if os.WIFSIGNALED(status):
        return {"exit": None, "signal": os.WTERMSIG(status)}
    return {"exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None, "signal": None}


def describe_exit(info: dict[str, Any], lim: dict[str, Any]) -> str:
    if info.get("over_budget"):
        return f"program stopped: {info['over_budget']}"
    sig = info.get("signal")
    if sig == signal.SIGXCPU:
        return f"program stopped at its CPU time limit ({lim['cpu_s']:g}s)"
    if sig == signal.SIGKILL:
        return "program killed (SIGKILL: CPU hard limit, or out of memory)"
    if sig:
        try:
            return f"program killed by {signal.Signals(sig).name}"
        except ValueError:
            return f"program killed by signal {sig}"
    return f"program exited (status {info.get('exit')}) before the tests finished"
