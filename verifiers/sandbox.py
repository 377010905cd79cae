"""Run model-written Python in a sandbox, and prove test results the program cannot forge.

Processes of one execution (``docs/sandbox.md`` has the threat model)::

    caller (Sandbox, in the trainer)          -- enforces the wall clock from outside:
      |                                          kills the harness's process group
      +-- zygote    one per Sandbox, a pre-imported `python -I -S` that only forks harnesses
          +-- harness   fresh process per run, trusted: reads the job from stdin, runs
              |         the TESTS, writes the verdict to its stdout. No model code runs here.
              +-- init  pid 1 of a new PID namespace, trusted: private mounts, seccomp,
                  |     forks the program, times it, kills every process in the namespace.
                  +-- program   untrusted: unprivileged uid, rlimits, no network, a private
                                tmpfs as working directory; fd 0/1/2 and one RPC socket.

The program is forked *before* the harness reads the tests, so the tests are never in
its memory or on any disk it can see. The tests call the program's functions through
proxies: arguments and return values cross the RPC socket as plain data (int, float,
str, bytes, bool, None, list, tuple, dict, set, complex, Fraction, Decimal) decoded by a
strict decoder; anything else comes back as an opaque proxy that equals nothing but
itself, refuses ``bool()`` and arithmetic. So asserts are real Python asserts evaluated
in a process the program cannot reach: exiting early, patching asserts or ``builtins``,
always-equal objects, printing "passed", killing processes (other namespaces) all fail
the run. stdin/stdout problems never send the expected output into the sandbox: the
caller compares the captured lines.

Layers that depend on the machine (``python -m verifiers.sandbox --report`` prints
what is in effect): as root, a separate uid per worker slot, network + PID + mount +
IPC namespaces; unprivileged with user namespaces, the same namespaces inside a user
namespace; otherwise rlimits, seccomp and process groups only. A seccomp filter
(x86_64, aarch64) refuses non-Unix sockets in every mode.

Only the standard library is used: the harness runs as ``python -I -S`` and imports
this file without the rest of the package.
"""

from __future__ import annotations

import json
import os
import select
import signal
import struct
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

_FRAME = struct.Struct("!I")
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # one RPC message or job frame
_STDERR_CAP = 64 * 1024


# ============================================================================ caller side
@dataclass(frozen=True)
class Limits:
    """Resource limits of one execution (a test run, or one stdin/stdout case)."""

    wall_s: float = 10.0  # wall clock, program start to verdict; enforced from outside
    cpu_s: float = 10.0  # RLIMIT_CPU of the program (SIGXCPU, then SIGKILL 1 s later)
    memory_mb: int = 512  # RLIMIT_AS of the program
    file_size_mb: int = 16  # RLIMIT_FSIZE: largest file it may write
    tmpfs_mb: int = 64  # size of its private working directory (a tmpfs), when mounts work
    max_processes: int = 32  # RLIMIT_NPROC of its uid (processes + threads)
    max_open_files: int = 64  # RLIMIT_NOFILE
    max_output_bytes: int = 1024 * 1024  # captured stdout per stdin/stdout case; more fails it


@dataclass(frozen=True)
class TestsJob:
    """Run ``program``, then ``tests`` (asserts, or ``def check(candidate)`` + ``check(f)``)."""

    __test__ = False  # not a pytest class
    program: str
    tests: str
    partial: bool = False  # keep going after a failed assert (partial credit)


@dataclass(frozen=True)
class IOJob:
    """Run ``program`` once per case with ``input`` on stdin; stdout must equal ``output``."""

    program: str
    cases: list[dict[str, str]]


@dataclass
class Result:
    ok: bool  # every test passed / every case matched
    passed: int  # assertions (cases) that passed
    total: int  # assertions executed (+1 if the tests stopped on an error) / cases
    status: str  # passed | failed | error | timeout | crashed
    reason: str  # one short line for samples.jsonl
    isolation: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0


def _hidden_paths(extra: tuple[str, ...] = ()) -> list[str]:
    """Directories the program must not see: site-packages (datasets, solutions), the
    caller's working directory and project, home; never an ancestor of the stdlib."""
    import site

    keep = _stdlib_dirs()
    cands = [p for p in sys.path if p and ("site-packages" in p or "dist-packages" in p)]
    try:
        cands += site.getsitepackages() + [site.getusersitepackages()]
    except AttributeError:  # virtualenv's old site.py
        pass
    cands += [os.getcwd(), os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
              os.path.expanduser("~"), *extra]
    out: list[str] = []
    for p in cands:
        p = os.path.realpath(p)
        if p == "/" or not os.path.isdir(p) or p.startswith("/tmp/") or p in out:
            continue
        if any(k == p or k.startswith(p + "/") for k in keep):
            continue
        out.append(p)
    return sorted(out)


def _stdlib_dirs() -> list[str]:
    """The interpreter's standard library directories (of the base install, not a venv)."""
    import sysconfig

    paths = sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_exec_prefix,
                                      "installed_base": sys.base_prefix,
                                      "installed_platbase": sys.base_exec_prefix})
    out = {os.path.realpath(paths[k]) for k in ("stdlib", "platstdlib")}
    out |= {os.path.realpath(p) for p in sys.path if p and "lib-dynload" in p}
    out = {p for p in out if os.path.isdir(p)}
    return sorted(p for p in out if not any(p != q and p.startswith(q + "/") for q in out))


class Sandbox:
    """A pool of ``workers`` threads, each driving one sandboxed execution at a time.

    ``run_many`` scores a batch (G completions x P prompts) in parallel; every job gets
    a fresh harness process. Each worker slot has its own uid (when run as root), so the
    process-count limit of one program never starves another.
    """

    BASE_UID = 1_700_000_000

    MODES = ("auto", "userns", "none")

    def __init__(self, limits: Limits | None = None, workers: int | None = None,
                 hide_paths: tuple[str, ...] = (), zygote: bool = True, mode: str = "auto"):
        import queue
        import random

        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode  # "userns" / "none" skip the stronger layers (for testing fallbacks)
        self.limits = limits or Limits()
        self.workers = max(1, workers or os.cpu_count() or 1)
        self._hidden = _hidden_paths(tuple(hide_paths))
        block = random.Random().randrange(1 << 20)  # separate uid ranges for separate pools
        self._uid0 = self.BASE_UID + block * 128
        self._slots: queue.SimpleQueue[int] = queue.SimpleQueue()
        for s in range(self.workers):
            self._slots.put(s)
        self._executor = None
        self._launcher: _Launcher = _ZygoteLauncher() if zygote else _Launcher()

    # ---------------------------------------------------------------- public API
    def run_many(self, jobs: list[TestsJob | IOJob]) -> list[Result]:
        if not jobs:
            return []
        if self._executor is None:
            from concurrent.futures import ThreadPoolExecutor

            self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="sandbox")
        return list(self._executor.map(self.run, jobs))

    def run(self, job: TestsJob | IOJob) -> Result:
        slot = self._slots.get()
        try:
            return self._run(job, slot)
        finally:
            self._slots.put(slot)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self._launcher.close()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _run(self, job: TestsJob | IOJob, slot: int) -> Result:
        import secrets

        lim = self.limits
        io = isinstance(job, IOJob)
        header = {
            "kind": "io" if io else "tests",
            "program": job.program,
            "limits": asdict(lim),
            "uid": self._uid0 + slot,
            "hide": self._hidden,
            "mode": self.mode,
        }
        nonce = secrets.token_hex(16)
        second: dict[str, Any] = {"nonce": nonce}
        if io:
            header["inputs"] = [c.get("input", "") for c in job.cases]
            # room for the expected output (plus slack), never less than the configured cap
            header["output_caps"] = [max(lim.max_output_bytes, 2 * len(c["output"].encode()) + 1024)
                                     for c in job.cases]
            budget = len(job.cases) * (lim.wall_s + 1.0) + 10.0
        else:
            second.update(tests=job.tests, partial=job.partial)
            budget = lim.wall_s + 10.0
        payload = _frame(json.dumps(header).encode()) + _frame(json.dumps(second).encode())
        t0 = time.monotonic()
        harness = self._launcher.start()
        try:
            out, err, killed = _pump(harness, payload, deadline=t0 + budget, out_cap=MAX_MESSAGE_BYTES)
        finally:
            harness.finish()
        wall = time.monotonic() - t0
        if killed:
            return Result(False, 0, 1, "timeout", f"timeout: sandbox killed after {budget:g}s", wall_s=wall)
        try:
            (n,) = _FRAME.unpack(out[:4])
            res = json.loads(out[4:4 + n])
            if res.get("nonce") != nonce:
                raise ValueError("bad nonce")
            iso = res.get("isolation", {})
            if io:
                return _io_result(job, res, iso, wall, asdict(lim))
            return Result(res["ok"] is True, int(res["passed"]), int(res["total"]), str(res["status"]),
                          str(res["reason"]), iso, wall)
        except Exception:
            tail = err.decode(errors="replace").strip().splitlines()[-1:] or ["no verdict"]
            return Result(False, 0, 1, "error", f"error: sandbox harness failed: {tail[0][:150]}", wall_s=wall)

    def report(self) -> dict[str, Any]:
        """Isolation layers in effect, measured by running a probe program in the sandbox."""
        res = self.run(IOJob(_PROBE, [{"input": "", "output": ""}]))
        try:
            probe = json.loads(res.isolation.get("stdout", "") or "{}")
        except ValueError:
            probe = {"error": res.reason}
        return {"layers": {k: v for k, v in res.isolation.items() if k != "stdout"}, "probe": probe}


def _io_result(job: IOJob, res: dict[str, Any], iso: dict[str, Any], wall: float,
               lim: dict[str, Any]) -> Result:
    from verifiers.code import compare_output

    passed, first_fail = 0, ""
    cases = res.get("cases", [])
    for i, (case, got) in enumerate(zip(job.cases, cases)):
        if got.get("timed_out"):
            why = "timeout"
        elif got.get("truncated"):
            why = "output limit exceeded"
        elif got.get("signal"):
            why = _describe_exit(got, lim)
        elif got.get("exit") != 0:
            tail = (got.get("stderr") or "").strip().splitlines()[-1:]
            why = f"runtime error: {tail[0][:120]}" if tail else f"exit status {got.get('exit')}"
        else:
            match, why = compare_output(case["output"], got.get("stdout", ""))
            if match:
                passed += 1
                continue
        first_fail = first_fail or f"case {i + 1}/{len(job.cases)}: {why}"
    total = len(job.cases)
    if len(cases) < total:
        first_fail = first_fail or f"error: only {len(cases)} of {total} cases ran"
    iso = dict(iso)
    if cases:
        iso["stdout"] = cases[0].get("stdout", "")
    ok = passed == total
    status = "passed" if ok else ("timeout" if any(c.get("timed_out") for c in cases) else "failed")
    return Result(ok, passed, total, status, f"passed {passed}/{total}" if ok else first_fail, iso, wall)


class _Harness:
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


def _boot(entry: str) -> list[str]:
    # Load this file alone (no package __init__): the harness needs the stdlib only.
    code = ("import sys,importlib.util as u;"
            f"s=u.spec_from_file_location('_sandbox',{os.path.abspath(__file__)!r});"
            f"m=u.module_from_spec(s);sys.modules['_sandbox']=m;s.loader.exec_module(m);m.{entry}()")
    return [sys.executable, "-I", "-S", "-c", code]


_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}


class _Launcher:
    """Starts each harness as a fresh interpreter (``python -I -S``)."""

    def start(self) -> _Harness:
        import subprocess

        proc = subprocess.Popen(_boot("_harness_main"), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True, cwd="/", env=_ENV)
        fds = [os.dup(f.fileno()) for f in (proc.stdin, proc.stdout, proc.stderr)]
        for f in (proc.stdin, proc.stdout, proc.stderr):
            f.close()

        def reap():
            try:
                proc.wait(timeout=30)
            except Exception:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

        return _Harness(proc.pid, *fds, reap)

    def close(self) -> None:
        pass


class _ZygoteLauncher(_Launcher):
    """Forks each harness from a pre-started, pre-imported interpreter (the zygote).

    Each harness is still a fresh process (a fork of a zygote that never runs a job),
    but skips interpreter start-up and imports: several times more executions per
    second. The zygote keeps a harness unreaped until the caller is done with it, so
    killing its process group can never hit a recycled pid. Falls back to a fresh
    interpreter per run if the zygote cannot be started.
    """

    def __init__(self):
        import threading

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
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            self._proc = subprocess.Popen(_boot("_zygote_main"), stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, pass_fds=(theirs.fileno(),),
                                          start_new_session=True, cwd="/",
                                          env={**_ENV, "SANDBOX_ZYGOTE_FD": str(theirs.fileno())})
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

    def start(self) -> _Harness:
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
                return _Harness(pid, pipes[0][1], pipes[1][0], pipes[2][0], lambda: self._reap(pid))
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


def _zygote_main() -> None:
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
    _c()
    _seccomp_program()
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
                _harness_main()
            finally:
                os._exit(3)
        for fd in fds:
            os.close(fd)
        sock.send(b"%d" % pid)
    os._exit(0)


def _pump(h: _Harness, payload: bytes, deadline: float, out_cap: int) -> tuple[bytes, bytes, bool]:
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


def _frame(data: bytes) -> bytes:
    return _FRAME.pack(len(data)) + data


# ====================================================================== low-level helpers
def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _read_exact(fd: int, n: int, deadline: float | None = None) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise _Timeout()
        chunk = os.read(fd, min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def _send(fd: int, obj: Any) -> None:
    _write_all(fd, _frame(json.dumps(obj, separators=(",", ":")).encode()))


def _recv(fd: int, deadline: float | None = None, max_bytes: int = MAX_MESSAGE_BYTES) -> Any:
    (n,) = _FRAME.unpack(_read_exact(fd, 4, deadline))
    if n > max_bytes:
        raise _ProtocolError(f"message of {n} bytes exceeds {max_bytes}")
    data = _read_exact(fd, n, deadline)
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise _ProtocolError(f"malformed message ({type(exc).__name__})") from None


class _Timeout(BaseException):
    """Wall clock exhausted (BaseException: test code's ``except Exception`` cannot swallow it)."""


class _ProtocolError(BaseException):
    """The program's process sent something that is not a well-formed message."""


class _ProgramGone(BaseException):
    """The program's process exited or stopped answering."""


# ------------------------------------------------------------------ Linux syscalls (ctypes)
CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER = 0x00020000, 0x08000000, 0x10000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = 32, 4096, 8192, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_SECCOMP, PR_SET_NO_NEW_PRIVS = 1, 4, 22, 38

_libc = None


def _c():
    global _libc
    if _libc is None:
        import ctypes

        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _sys(name: str, *args) -> None:
    import ctypes
    import errno

    fn = getattr(_c(), name, None)
    if fn is None:  # not Linux: every layer that needs it reports itself off
        raise OSError(errno.ENOSYS, f"{name}: not available on this system")
    if fn(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")


def _unshare(flags: int) -> None:
    _sys("unshare", flags)


def _mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = (lambda s: None if s is None else s.encode())
    _sys("mount", enc(src), enc(target), enc(fstype), flags, enc(data))


def _prctl(option: int, arg: int) -> None:
    import ctypes

    _sys("prctl", option, ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))


# seccomp: refuse sockets other than AF_UNIX (and io_uring, x32 and foreign-ABI syscalls).
_SECCOMP_ARCH = {  # machine -> (AUDIT_ARCH, socket nr, io_uring_setup nr, has x32 bit)
    "x86_64": (0xC000003E, 41, 425, True),
    "aarch64": (0xC00000B7, 198, 425, False),
}


_SECCOMP: list = []  # [(fprog, filter array)] built once (in the zygote), reused by every fork


def _seccomp_program():
    import ctypes
    import errno
    import platform

    if _SECCOMP:
        return _SECCOMP[0]
    spec = _SECCOMP_ARCH.get(platform.machine())
    if spec is None:
        _SECCOMP.append(None)
        return None
    arch, nr_socket, nr_uring, x32 = spec
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    allow, deny = 0x7FFF0000, 0x00050000 | errno.EPERM
    deny_net = 0x00050000 | errno.EACCES
    # (code, jt, jf, k); jump offsets are relative to the next instruction.
    prog = [(ld, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, deny), (ld, 0, 0, 0)]
    if x32:
        prog += [(jge, 0, 1, 0x40000000), (ret, 0, 0, deny)]
    prog += [(jeq, 0, 1, nr_uring), (ret, 0, 0, deny),
             (jeq, 1, 0, nr_socket), (ret, 0, 0, allow),
             (ld, 0, 0, 16), (jeq, 0, 1, 1), (ret, 0, 0, allow), (ret, 0, 0, deny_net)]

    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                    ("k", ctypes.c_uint)]

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]

    arr = (Filter * len(prog))(*[Filter(*ins) for ins in prog])
    _SECCOMP.append((Prog(len(prog), arr), arr))
    return _SECCOMP[0]


def _install_seccomp() -> bool:
    import ctypes

    built = _seccomp_program()
    if built is None:
        return False
    try:
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
        _sys("prctl", PR_SET_SECCOMP, ctypes.c_ulong(2), ctypes.byref(built[0]), ctypes.c_ulong(0),
             ctypes.c_ulong(0))
    except OSError:
        return False
    return True


# ============================================================================= the harness
def _harness_main() -> None:
    """Entry point of the harness process (``python -I -S``), reading the job from stdin."""
    result_fd = os.dup(1)
    os.dup2(2, 1)  # test code's prints go to stderr, never into the verdict channel
    iso: dict[str, Any] = {}
    try:
        hdr = json.loads(_read_exact(0, _FRAME.unpack(_read_exact(0, 4))[0]))
        # The harness itself is trusted but may run heavy test code: cap it too.
        _set_rlimit("RLIMIT_AS", 4096 * 1024 * 1024)
        if os.geteuid() != 0 or hdr.get("mode", "auto") != "auto":
            hdr["own_processes"] = _count_own_processes()  # before a PID namespace hides them
        mode = _enter_namespaces(iso, hdr.get("mode", "auto"))
        ctl_h, ctl_i = _socketpair()
        rpc_h, rpc_c = _socketpair() if hdr["kind"] == "tests" else (-1, -1)
        init_pid = os.fork()
        if init_pid == 0:  # -------- init: forked before the tests are read
            try:
                os.close(result_fd)
                os.close(ctl_h)
                if rpc_h >= 0:
                    os.close(rpc_h)
                _init_main(hdr, mode, ctl_i, rpc_c)
            finally:
                os._exit(0)
        os.close(ctl_i)
        if rpc_c >= 0:
            os.close(rpc_c)
        second = json.loads(_read_exact(0, _FRAME.unpack(_read_exact(0, 4))[0]))
        os.close(0)
        ready = _recv(ctl_h, time.monotonic() + 30)
        iso.update(ready.get("layers", {}))
        if hdr["kind"] == "io":
            out = {"cases": _harness_io(hdr, ctl_h)}
        else:
            out = _harness_tests(hdr, second, ctl_h, rpc_h)
        os.close(ctl_h)  # init kills everything left in the namespace and exits
        try:
            os.waitpid(init_pid, 0)
        except ChildProcessError:
            pass
        out.update(nonce=second["nonce"], isolation=iso)
        _write_all(result_fd, _frame(json.dumps(out).encode()))
    except BaseException:
        import traceback

        traceback.print_exc()
        os._exit(3)
    os._exit(0)


def _socketpair() -> tuple[int, int]:
    import socket

    a, b = socket.socketpair()
    return a.detach(), b.detach()


def _set_rlimit(name: str, soft: int, hard: int | None = None) -> None:
    import resource

    res = getattr(resource, name)
    cur_soft, cur_hard = resource.getrlimit(res)
    hard = soft if hard is None else hard
    if cur_hard != resource.RLIM_INFINITY:
        hard = min(hard, cur_hard)
        soft = min(soft, hard)
    resource.setrlimit(res, (soft, hard))


def _enter_namespaces(iso: dict[str, Any], want: str) -> str:
    """New network + PID (+ IPC) namespaces for init and the program; returns the mode:
    ``root`` (also a separate uid), ``userns`` (inside a user namespace) or ``none``."""
    flags = CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC
    if want == "none":
        flags = 0
    if flags and want == "auto" and os.geteuid() == 0:
        try:
            _unshare(flags)
            iso.update(mode="root", uid_separation=True, netns=True, pidns=True, ipcns=True)
            return "root"
        except OSError as exc:
            iso["unshare_error"] = str(exc)
    uid, gid = os.geteuid(), os.getegid()
    try:
        if not flags:
            raise OSError("namespaces not requested")
        _unshare(CLONE_NEWUSER | flags)
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"0 {uid} 1")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"0 {gid} 1")
        iso.update(mode="userns", uid_separation=False, netns=True, pidns=True, ipcns=True)
        return "userns"
    except OSError as exc:
        if flags:
            iso["userns_error"] = str(exc)
    try:
        _prctl(PR_SET_DUMPABLE, 0)  # same uid as the program: at least refuse ptrace//proc/pid/mem
    except OSError:
        pass
    iso.update(mode="none", uid_separation=False, netns=False, pidns=False, ipcns=False)
    return "none"


# ------------------------------------------------------------------- harness: stdin/stdout
def _harness_io(hdr: dict[str, Any], ctl: int) -> list[dict[str, Any]]:
    lim = hdr["limits"]
    results = []
    for text, cap in zip(hdr["inputs"], hdr["output_caps"]):
        _send(ctl, {"op": "io", "stdin": text, "cap": cap})
        try:
            results.append(_recv(ctl, time.monotonic() + lim["wall_s"] + 30))
        except (_Timeout, EOFError, _ProtocolError):
            break
    return results


# --------------------------------------------------------------------- harness: the tests
def _harness_tests(hdr: dict[str, Any], second: dict[str, Any], ctl: int, rpc: int) -> dict[str, Any]:
    import ast
    import builtins
    import importlib

    lim = hdr["limits"]
    partial = bool(second.get("partial"))
    _send(ctl, {"op": "serve"})  # the program loads while the tests compile
    deadline = time.monotonic() + lim["wall_s"]
    try:
        tree = ast.parse(second["tests"], "<tests>")
        written = sum(isinstance(node, ast.Assert) for node in ast.walk(tree))
        code = compile(_AssertCounter().visit(tree), "<tests>", "exec")
    except SyntaxError as exc:
        return _verdict(False, 0, 1, "error", f"error: the tests do not parse: {exc.msg} (line {exc.lineno})")
    remote = _Remote(rpc, deadline)
    tally = _Tally(partial)
    try:
        hello = remote.recv()
        if not hello.get("ok"):
            msg = f"{hello.get('e', 'Error')}: {hello.get('msg', '')}"
            return _verdict(False, 0, 1, "failed", f"program failed to load: {msg}"[:200])
        ns: dict[str, Any] = {"__name__": "__tests__", "__builtins__": builtins}
        names = hello.get("names", {})
        if not isinstance(names, dict):
            raise _ProtocolError("bad names")
        for name, enc in names.items():
            if not isinstance(name, str) or not name.isidentifier():
                raise _ProtocolError("bad name")
            if name.startswith(("__", "_sandbox")) or hasattr(builtins, name):
                continue  # the tests keep their __builtins__ and the real len, abs, AssertionError...
            if name in _SAFE_MODULES or isinstance(enc, dict) and set(enc) == {"m"}:
                # A module the program imported: the harness's own copy of it, and only
                # side-effect-free stdlib modules; a program's fake `math` is never used.
                module = name if name in _SAFE_MODULES else str(enc["m"])
                if module.partition(".")[0] in _SAFE_MODULES:
                    try:
                        ns[name] = importlib.import_module(module)
                    except Exception:
                        pass
                continue
            ns[name] = remote.decode(enc)
        ns["_sandbox_record_"] = tally.record
        _run_with_alarm(code, ns, deadline)
    except _Timeout:
        return _verdict(False, tally.passed, tally.total + 1, "timeout", f"timeout after {lim['wall_s']:g}s"
                        + _after(tally))
    except (_ProgramGone, EOFError):
        why = f"program failed: {remote.broken}"
        if remote.broken in ("", "program process exited"):  # ask init how it ended
            why = "program exited before the tests finished"
            try:
                info = _recv(ctl, time.monotonic() + 1.0)
                if isinstance(info, dict) and info.get("op") == "exited":
                    why = _describe_exit(info, lim)
            except (_Timeout, EOFError, OSError, _ProtocolError):
                pass
        return _verdict(False, tally.passed, tally.total + 1, "crashed", why + _after(tally))
    except _ProtocolError as exc:
        return _verdict(False, tally.passed, tally.total + 1, "failed", f"program sent bad data: {exc}")
    except BaseException as exc:  # noqa: BLE001 - any error in the tests is a failure
        line = "" if isinstance(exc, _AssertFailed) else _test_line(exc)
        return _verdict(False, tally.passed, tally.total + (0 if isinstance(exc, _AssertFailed) else 1), "failed",
                        f"{_exc_text(exc)}{line}"[:200])
    if remote.broken:  # the tests swallowed a protocol error or a vanished program
        return _verdict(False, tally.passed, tally.total + 1, "crashed", f"program failed: {remote.broken}")
    if tally.total == 0:
        if written:  # e.g. `for x in f(): assert ...` with an empty f(), or check() never called
            return _verdict(False, 0, 1, "failed", "no assertion ran (the tests hold asserts that never executed)")
        return _verdict(True, 1, 1, "passed", "passed (tests without assert ran to completion)")
    ok = tally.passed == tally.total
    reason = f"passed {tally.passed}/{tally.total} assertions" if ok else tally.first_failure
    return _verdict(ok, tally.passed, tally.total, "passed" if ok else "failed", reason)


def _verdict(ok: bool, passed: int, total: int, status: str, reason: str) -> dict[str, Any]:
    return {"ok": ok, "passed": passed, "total": total, "status": status, "reason": reason}


def _after(tally) -> str:
    return f" ({tally.passed} assertion(s) passed before)" if tally.total else ""


def _exc_text(exc: BaseException) -> str:
    if isinstance(exc, _AssertFailed):
        return str(exc)
    msg = str(exc)
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def _test_line(exc: BaseException) -> str:
    tb, line = exc.__traceback__, None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<tests>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return f" (tests line {line})" if line else ""


def _run_with_alarm(code, ns: dict[str, Any], deadline: float) -> None:
    """exec the tests; SIGALRM at the deadline covers loops in the test code itself."""

    def on_alarm(signum, frame):
        raise _Timeout()

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(0.001, deadline - time.monotonic()))
    try:
        exec(code, ns)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# Modules a program's namespace may hand to the tests (the harness imports its own copy).
_SAFE_MODULES = frozenset(
    "abc array bisect calendar cmath collections copy dataclasses datetime decimal enum fractions "
    "functools hashlib heapq itertools json math numbers operator random re statistics string struct "
    "sys textwrap time typing unicodedata".split())


class _AssertFailed(AssertionError):
    pass


_TRUTH = bool  # captured at import: the tests' namespace cannot rebind it


class _Tally:
    """Counts assertions; in strict mode the first failure stops the tests."""

    def __init__(self, partial: bool):
        self.partial = partial
        self.passed = self.total = 0
        self.first_failure = ""

    def record(self, value: Any, lineno: int, source: str, error: BaseException | None = None) -> None:
        self.total += 1
        try:
            ok = error is None and _TRUTH(value)
        except Exception as exc:  # a program object has no trusted truth value
            if not self.partial:
                raise
            ok, error = False, exc
        if ok:
            self.passed += 1
            return
        why = f"{type(error).__name__}: {error}" if error is not None else "AssertionError"
        msg = f"assertion {self.total} failed (tests line {lineno}): {source[:80]}" + \
            ("" if error is None else f" -> {why[:60]}")
        self.first_failure = self.first_failure or msg
        if not self.partial:
            raise _AssertFailed(msg)


class _AssertCounter:
    """AST pass: ``assert c, m`` -> record(bool(c)) so assertions can be counted.

    Strict mode keeps Python's semantics (an exception in ``c`` propagates); partial
    mode catches it, counts the assertion as failed and goes on.
    """

    def visit(self, tree):
        import ast

        class T(ast.NodeTransformer):
            def visit_Assert(self, node):
                src = ast.unparse(node.test)
                rec = ast.parse(
                    "try:\n"
                    "    _sandbox_value_ = TEST\n"
                    "    _sandbox_err_ = None\n"
                    "except Exception as _sandbox_e_:\n"
                    "    if not _sandbox_record_.__self__.partial: raise\n"
                    "    _sandbox_value_, _sandbox_err_ = False, _sandbox_e_\n"
                    f"_sandbox_record_(_sandbox_value_, {node.lineno}, {src!r}, _sandbox_err_)\n").body
                rec[0].body[0].value = node.test  # TEST -> <the assert's condition>
                for n in rec:
                    ast.copy_location(n, node)
                    for sub in ast.walk(n):
                        ast.copy_location(sub, node)
                return rec

        return ast.fix_missing_locations(T().visit(tree))


# ------------------------------------------------------------------ harness: RPC + proxies
_EXC_OK = {"ArithmeticError", "AssertionError", "AttributeError", "BufferError", "EOFError",
           "FloatingPointError", "IndexError", "KeyError", "LookupError", "MemoryError", "NameError",
           "NotImplementedError", "OSError", "OverflowError", "RecursionError", "RuntimeError",
           "StopIteration", "TypeError", "UnboundLocalError", "UnicodeError", "ValueError",
           "ZeroDivisionError", "FileNotFoundError", "PermissionError", "TimeoutError", "Exception"}


class ProgramError(Exception):
    """An exception of a non-builtin type raised by the program."""


class _Remote:
    """The harness end of the RPC socket. Decodes only plain data and handles."""

    def __init__(self, fd: int, deadline: float):
        self.fd, self.deadline = fd, deadline
        self.broken = ""

    def recv(self) -> Any:
        try:
            msg = _recv(self.fd, self.deadline)
        except (EOFError, OSError):
            self.broken = self.broken or "program process exited"
            raise _ProgramGone() from None
        except _ProtocolError as exc:
            self.broken = self.broken or str(exc)
            raise
        if not isinstance(msg, dict):
            self.broken = "bad message"
            raise _ProtocolError("bad message")
        return msg

    def request(self, op: str, h: int, args: tuple = (), kwargs: dict | None = None, **kw) -> Any:
        if self.broken:
            raise _ProgramGone()
        try:
            _send(self.fd, {"op": op, "h": h, **kw})
        except OSError:
            self.broken = "program process exited"
            raise _ProgramGone() from None
        msg = self.recv()
        if msg.get("ok") is True:
            try:
                value = self.decode(msg.get("v"))
                changes = msg.get("m", []) if op == "call" else []
                if type(changes) is not list or any(type(c) is not list or len(c) != 2 for c in changes):
                    raise _ProtocolError("bad argument changes")
                for key, enc in changes:  # in-place changes to list/dict/set arguments
                    self._mutated(args, kwargs or {}, key, enc)
            except _ProtocolError as exc:  # fails the run even if the tests catch everything
                self.broken = self.broken or str(exc)
                raise
            return value
        name, text = str(msg.get("e", "Error")), str(msg.get("msg", ""))[:500]
        if name in _EXC_OK and (name != "StopIteration" or op == "next"):
            import builtins

            raise getattr(builtins, name)(text)
        if name in ("SystemExit", "KeyboardInterrupt", "GeneratorExit"):
            self.broken = f"program raised {name}"
            raise _ProgramGone()
        # (StopIteration from a call would silently end the test's map()/generator loops)
        raise ProgramError(f"{name}: {text}")

    def _mutated(self, args: tuple, kwargs: dict, key: Any, enc: Any) -> None:
        orig = args[key] if type(key) is int and 0 <= key < len(args) else \
            kwargs.get(key) if type(key) is str else None
        new = self.decode(enc)
        if type(orig) is list and type(new) is list or type(orig) is bytearray and type(new) is bytearray:
            orig[:] = new
        elif type(orig) in (dict, set) and type(new) is type(orig):
            orig.clear()
            orig.update(new)

    def call(self, h: int, args: tuple, kwargs: dict) -> Any:
        return self.request("call", h, args, kwargs, a=[self.encode(a) for a in args],
                            k={str(k): self.encode(v) for k, v in kwargs.items()})

    # plain data <-> JSON. Tags: l list, t tuple, d dict, s set, f frozenset, b bytes,
    # y bytearray, c complex, i big int (hex), q Fraction, D Decimal, h handle.
    def encode(self, v: Any) -> Any:
        return _encode(v, None, self)

    def decode(self, x: Any, depth: int = 0) -> Any:
        if depth > 100:
            raise _ProtocolError("value nested too deeply")
        t = type(x)
        if t in (int, float, str, bool) or x is None:
            return x
        if t is not dict or len(x) != 1:
            raise _ProtocolError("bad value")
        (tag, v), = x.items()
        d = depth + 1
        if tag in ("l", "t", "s", "f") and type(v) is list:
            items = [self.decode(i, d) for i in v]
            try:
                return {"l": list, "t": tuple, "s": set, "f": frozenset}[tag](items)
            except TypeError:
                raise _ProtocolError("unhashable set item") from None
        if tag == "d" and type(v) is list:
            out = {}
            for pair in v:
                if type(pair) is not list or len(pair) != 2:
                    raise _ProtocolError("bad dict item")
                try:
                    out[self.decode(pair[0], d)] = self.decode(pair[1], d)
                except TypeError:
                    raise _ProtocolError("unhashable dict key") from None
            return out
        if tag in ("b", "y") and type(v) is str:
            try:
                return (bytes if tag == "b" else bytearray).fromhex(v)
            except ValueError:
                raise _ProtocolError("bad bytes") from None
        if tag == "c" and type(v) is list and len(v) == 2 and all(type(p) in (int, float) for p in v):
            return complex(v[0], v[1])
        if tag == "i" and type(v) is str and 0 < len(v) <= 200_000:
            try:
                return int(v, 16)
            except ValueError:
                raise _ProtocolError("bad int") from None
        if tag == "q" and type(v) is list and len(v) == 2:
            from fractions import Fraction

            n, m = (self.decode(p, d) for p in v)
            if type(n) is int and type(m) is int and m > 0:
                return Fraction(n, m)
        if tag == "D" and type(v) is str and len(v) <= 10_000:
            from decimal import Decimal, InvalidOperation

            try:
                return Decimal(v)
            except InvalidOperation:
                pass
        if tag == "h" and type(v) is list and len(v) == 2 and type(v[0]) is int and type(v[1]) is str:
            return Proxy(self, v[0], v[1][:100])
        raise _ProtocolError(f"bad value tag {tag!r}")


def _encode(v: Any, handles: list | None, remote: _Remote | None, depth: int = 0) -> Any:
    """Plain data -> JSON-able tags. Program side (``handles``): anything else becomes a
    handle. Harness side (``remote``): proxies become their handle, anything else is refused."""
    t = type(v)
    if t is bool or v is None or t is str or t is float:
        return v
    if t is int:
        return v if -(1 << 62) < v < (1 << 62) else {"i": format(v, "x") if v >= 0 else "-" + format(-v, "x")}
    if depth > 90:
        if handles is not None:
            handles.append(v)
            return {"h": [len(handles) - 1, t.__name__]}
        raise TypeError("value nested too deeply to pass to the program")
    d = depth + 1
    if t in (list, tuple, set, frozenset):
        tag = {list: "l", tuple: "t", set: "s", frozenset: "f"}[t]
        return {tag: [_encode(i, handles, remote, d) for i in v]}
    if t is dict:
        return {"d": [[_encode(k, handles, remote, d), _encode(i, handles, remote, d)] for k, i in v.items()]}
    if t is bytes:
        return {"b": v.hex()}
    if t is bytearray:
        return {"y": v.hex()}
    if t is complex:
        return {"c": [v.real, v.imag]}
    mod = getattr(t, "__module__", "")
    if t.__name__ == "Fraction" and mod == "fractions":
        return {"q": [_encode(v.numerator, handles, remote, d), _encode(v.denominator, handles, remote, d)]}
    if t.__name__ == "Decimal" and mod in ("decimal", "_decimal", "_pydecimal"):
        return {"D": str(v)}
    if handles is not None:
        handles.append(v)
        return {"h": [len(handles) - 1, t.__name__]}
    if isinstance(v, Proxy) and object.__getattribute__(v, "_remote") is remote:
        return {"h": [object.__getattribute__(v, "_h"), ""]}
    raise TypeError(f"cannot pass a {t.__name__} to the program (only plain data and its own objects)")


class Proxy:
    """An object that lives in the program's process. Calls, attributes, items, len and
    iteration are forwarded; truth value, arithmetic and comparison with anything but
    another of the program's objects are refused or false."""

    __slots__ = ("_remote", "_h", "_type")

    def __init__(self, remote: _Remote, h: int, type_name: str):
        object.__setattr__(self, "_remote", remote)
        object.__setattr__(self, "_h", h)
        object.__setattr__(self, "_type", type_name)

    def _req(self, op: str, **kw) -> Any:
        return object.__getattribute__(self, "_remote").request(op, object.__getattribute__(self, "_h"), **kw)

    def _enc(self, v: Any) -> Any:
        return object.__getattribute__(self, "_remote").encode(v)

    def __call__(self, *args, **kwargs):
        return object.__getattribute__(self, "_remote").call(object.__getattribute__(self, "_h"), args, kwargs)

    def __getattr__(self, name: str):
        return self._req("getattr", name=name)

    def __setattr__(self, name: str, value: Any) -> None:
        self._req("setattr", name=name, v=self._enc(value))

    def __getitem__(self, key):
        return self._req("getitem", v=self._enc(key))

    def __setitem__(self, key, value) -> None:
        self._req("setitem", v=self._enc(key), w=self._enc(value))

    def __delitem__(self, key) -> None:
        self._req("delitem", v=self._enc(key))

    def __len__(self) -> int:
        n = self._req("len")
        if type(n) is not int or n < 0:
            raise TypeError("len() of a program object returned a non-int")
        return n

    def __iter__(self):
        it = self._req("iter")
        if not isinstance(it, Proxy):
            raise TypeError("iter() of a program object returned plain data")
        return it

    def __next__(self):
        return self._req("next")

    def __repr__(self) -> str:
        s = self._req("repr")
        if type(s) is not str:
            raise TypeError("repr() of a program object is not a str")
        return s

    def __str__(self) -> str:
        s = self._req("str")
        if type(s) is not str:
            raise TypeError("str() of a program object is not a str")
        return s

    def __bool__(self) -> bool:
        raise TypeError(f"a {object.__getattribute__(self, '_type')} object from the program has no "
                        "trusted truth value; return a bool")

    def __hash__(self) -> int:
        return object.__hash__(self)

    def _cmp(self, op: str, other: Any):
        if not isinstance(other, Proxy) or object.__getattribute__(other, "_remote") is not \
                object.__getattribute__(self, "_remote"):
            return NotImplemented  # == with plain data falls back to identity: False
        return self._req("cmp", name=op, v=self._enc(other))

    def __eq__(self, other):
        if other is self:
            return True
        return self._cmp("eq", other)

    def __ne__(self, other):
        if other is self:
            return False
        return self._cmp("ne", other)

    def __lt__(self, other):
        return self._cmp("lt", other)

    def __le__(self, other):
        return self._cmp("le", other)

    def __gt__(self, other):
        return self._cmp("gt", other)

    def __ge__(self, other):
        return self._cmp("ge", other)


# ================================================================================== init
def _init_main(hdr: dict[str, Any], mode: str, ctl: int, rpc: int) -> None:
    """pid 1 of the sandbox's PID namespace: set up mounts and seccomp, then run the
    program on request and kill every process in the namespace after each run."""
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    try:
        _prctl(PR_SET_DUMPABLE, 0)  # no ptrace or /proc/1/mem from a program with the same uid
    except OSError:
        pass
    layers: dict[str, Any] = {}
    workdir = _setup_mounts(hdr, mode, layers)
    layers["seccomp"] = _install_seccomp()
    layers["rlimits"] = ["AS", "CPU", "FSIZE", "NPROC", "NOFILE", "CORE"]
    _send(ctl, {"op": "ready", "layers": layers})
    try:
        while True:
            try:
                req = _recv(ctl)
            except (EOFError, OSError):
                break
            if req.get("op") == "serve":
                _init_serve(hdr, mode, ctl, rpc, workdir)
                break
            if req.get("op") == "io":
                _send(ctl, _init_io(hdr, mode, workdir, req["stdin"], int(req["cap"])))
    finally:
        _kill_all(mode, hdr)
        if mode == "none" or not layers.get("mountns"):
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)


def _setup_mounts(hdr: dict[str, Any], mode: str, layers: dict[str, Any]) -> str:
    """Private mount namespace: a tmpfs working directory, tmpfs over /tmp-like and hidden
    directories, a /proc of the new PID namespace, the rest read-only."""
    import tempfile

    lim = hdr["limits"]
    layers["mountns"] = False
    if mode != "none":
        try:
            _unshare(CLONE_NEWNS)
            _mount(None, "/", None, MS_REC | MS_PRIVATE)
            _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV,
                   f"size={lim['tmpfs_mb']}m,nr_inodes=4096,mode=1777")
            if mode == "root":
                layers["stdlib_exposed"] = _expose_stdlib()
            hidden = []
            for path in ["/var/tmp", "/dev/shm", "/run/lock", *hdr.get("hide", [])]:
                if os.path.isdir(path) and not path.startswith("/tmp"):
                    try:
                        _mount("tmpfs", path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                               "size=4k,nr_inodes=16,mode=755")
                        hidden.append(path)
                    except OSError:
                        pass
            layers["hidden"] = [p for p in hidden if p in hdr.get("hide", [])]
            try:
                _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
                layers["private_proc"] = True
            except OSError:
                layers["private_proc"] = False
            try:
                _mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY)
                layers["readonly_root"] = True
            except OSError:
                layers["readonly_root"] = False
            layers["mountns"] = True
            return "/tmp"
        except OSError as exc:
            layers["mount_error"] = str(exc)
    workdir = tempfile.mkdtemp(prefix="sandbox-")
    if mode == "root":
        os.chown(workdir, hdr["uid"], hdr["uid"])
    return workdir


def _expose_stdlib() -> list[str]:
    """Make the stdlib readable by the unprivileged uid when it sits under a private
    directory (pyenv in /root, mode 700): a tmpfs over that directory with the stdlib
    bind-mounted back in. Also hides the rest of that directory."""
    need, exposed = _stdlib_dirs(), []
    for path in need:
        parts = path.split("/")
        for i in range(2, len(parts)):
            anc = "/".join(parts[:i])
            if os.stat(anc).st_mode & 0o001:
                continue
            stage = f"/tmp/.sandbox-stage-{os.getpid()}"
            os.makedirs(stage, exist_ok=True)
            # bind every needed path under `anc` to the stage, cover `anc`, move them back
            under = [q for q in need if q.startswith(anc + "/")]
            staged = []
            for j, q in enumerate(under):
                s = f"{stage}/{j}"
                os.mkdir(s)
                _mount(q, s, None, MS_BIND | MS_REC)
                staged.append((s, q))
            _mount("tmpfs", anc, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,nr_inodes=256,mode=755")
            for s, q in staged:
                os.makedirs(q, mode=0o755, exist_ok=True)
                _mount(s, q, None, MS_MOVE)
                os.rmdir(s)
            os.rmdir(stage)
            _mount(None, anc, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
            exposed += [f"{q} (under a tmpfs over {anc})" for q in under]
            break
    return exposed


def _kill_all(mode: str, hdr: dict[str, Any], pgid: int | None = None) -> None:
    """Kill every process the program started (pid 1's kill(-1) spares only itself)."""
    if mode in ("root", "userns") and os.getpid() == 1:
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            pass
    elif pgid:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    while True:  # reap everything, orphans included (we are their init)
        try:
            if os.waitpid(-1, 0)[0] == 0:
                break
        except ChildProcessError:
            break


def _init_serve(hdr: dict[str, Any], mode: str, ctl: int, rpc: int, workdir: str) -> None:
    stdio = (os.open(os.devnull, os.O_RDONLY), os.open(os.devnull, os.O_WRONLY), os.open(os.devnull, os.O_WRONLY))
    pid = _spawn_program(hdr, mode, workdir, stdio, rpc, lambda: _program_serve(hdr["program"]))
    for fd in (*stdio, rpc):
        os.close(fd)
    # Wait for the harness to finish (ctl closes) or the backstop deadline; tell the
    # harness how the program ended if it ends first.
    deadline = time.monotonic() + hdr["limits"]["wall_s"] + 2.0
    status = None
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or select.select([ctl], [], [], min(left, 0.02 if status is None else left))[0]:
            break
        if status is None:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                _send(ctl, {"op": "exited", **_exit_info(status)})
            else:
                status = None
    _kill_all(mode, hdr, pgid=pid)


def _exit_info(status: int) -> dict[str, Any]:
    if os.WIFSIGNALED(status):
        return {"exit": None, "signal": os.WTERMSIG(status)}
    return {"exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None, "signal": None}


def _describe_exit(info: dict[str, Any], lim: dict[str, Any]) -> str:
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


def _init_io(hdr: dict[str, Any], mode: str, workdir: str, text: str, cap: int) -> dict[str, Any]:
    lim = hdr["limits"]
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = _spawn_program(hdr, mode, workdir, (in_r, out_w, err_w), -1,
                         lambda: _program_io(hdr["program"]))
    for fd in (in_r, out_w, err_w):
        os.close(fd)
    data = memoryview(text.encode("utf-8", "surrogateescape"))
    out, err = bytearray(), bytearray()
    readers = {out_r: out, err_r: err}
    for fd in (in_w, out_r, err_r):
        os.set_blocking(fd, False)
    writers = [in_w] if data else []
    if not data:
        os.close(in_w)
    deadline = time.monotonic() + lim["wall_s"]
    timed_out = truncated = False
    status = None
    while readers or status is None:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        r, w, _ = select.select(list(readers), writers, [], min(left, 0.05))
        for fd in w:
            try:
                data = data[os.write(fd, data[:65536]):]
            except BlockingIOError:
                pass
            except OSError:  # the program closed its stdin
                data = data[:0]
            if not data:
                os.close(fd)
                writers = []
        for fd in r:
            chunk = os.read(fd, 65536)
            if not chunk:
                del readers[fd]
                continue
            buf = readers[fd]
            limit = cap if fd == out_r else 4096
            if fd == out_r and len(buf) + len(chunk) > cap:
                truncated = True
            buf += chunk[:max(0, limit - len(buf))]
        if truncated:
            break
        if status is None:
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status = st
                if readers:  # the program exited; its children may hold the pipes open
                    deadline = min(deadline, time.monotonic() + 0.5)
    for fd in [out_r, err_r] + writers:
        os.close(fd)
    _kill_all(mode, hdr, pgid=pid)
    if status is None:
        try:
            done, status = os.waitpid(pid, 0)
        except ChildProcessError:
            status = None
    info = _exit_info(status) if status is not None else {"exit": None, "signal": None}
    return {"stdout": out.decode("utf-8", "replace"), "stderr": err[-2000:].decode("utf-8", "replace"),
            "timed_out": timed_out, "truncated": truncated, **info}


def _spawn_program(hdr: dict[str, Any], mode: str, workdir: str, stdio: tuple[int, int, int],
                   rpc: int, body) -> int:
    """Fork the program process: stdio and (optionally) the RPC socket as its only fds,
    rlimits, the unprivileged uid, then ``body()``. Never returns in the child."""
    pid = os.fork()
    if pid:
        return pid
    try:
        lim = hdr["limits"]
        os.setsid()  # its own process group: the fallback mode kills by group
        for i, fd in enumerate(stdio):
            os.dup2(fd, i)
        keep = 3
        if rpc >= 0:
            os.dup2(rpc, 3)
            keep = 4
        os.closerange(keep, 65536)
        os.chdir(workdir)
        os.umask(0o077)
        mb = 1024 * 1024
        _set_rlimit("RLIMIT_AS", lim["memory_mb"] * mb)
        _set_rlimit("RLIMIT_CPU", max(1, int(lim["cpu_s"] + 0.999)), max(1, int(lim["cpu_s"] + 0.999)) + 1)
        _set_rlimit("RLIMIT_FSIZE", lim["file_size_mb"] * mb)
        _set_rlimit("RLIMIT_NOFILE", lim["max_open_files"])
        _set_rlimit("RLIMIT_CORE", 0)
        if mode == "root":
            uid = hdr["uid"]
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            _set_rlimit("RLIMIT_NPROC", lim["max_processes"])
            os.setresuid(uid, uid, uid)
        else:
            # the limit counts every process of the (shared) uid, not only the sandbox's
            _set_rlimit("RLIMIT_NPROC", lim["max_processes"] + hdr.get("own_processes", 1024))
            if mode == "userns":
                _drop_capabilities()  # uid 0 of the user namespace, but without its capabilities
        try:
            _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # init's death takes the program with it
        except OSError:
            pass
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE, signal.SIGALRM):
            signal.signal(sig, signal.SIG_DFL)
        os.environ.clear()
        os.environ.update(PATH="/usr/bin:/bin", HOME=workdir, LANG="C.UTF-8", TMPDIR=workdir)
        body()
    except BaseException:
        pass
    os._exit(111)


def _drop_capabilities() -> None:
    import ctypes

    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable (x2): all empty
    _sys("capset", header, data)


def _count_own_processes() -> int:
    uid, n = os.getuid(), 0
    try:
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    n += os.stat(f"/proc/{entry}").st_uid == uid
                except OSError:
                    pass
    except OSError:
        return 1024
    return n


# =============================================================================== program
def _fresh_stdio() -> None:
    import io

    sys.stdin = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)), encoding="utf-8")
    sys.stdout = io.TextIOWrapper(io.BufferedWriter(io.FileIO(1, "w", closefd=False)), encoding="utf-8")
    sys.stderr = io.TextIOWrapper(io.BufferedWriter(io.FileIO(2, "w", closefd=False)), encoding="utf-8",
                                  line_buffering=True)
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr
    sys.argv = ["program"]
    sys.path[:] = [p for p in sys.path if p.startswith(sys.base_prefix) or p.startswith(sys.prefix)]


def _program_io(program: str) -> None:
    """Run the program as ``__main__`` with the case on stdin; exit status 0 on success."""
    import builtins
    import traceback

    _fresh_stdio()
    code = 0
    try:
        exec(compile(program, "<program>", "exec"), {"__name__": "__main__", "__builtins__": builtins})
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        code = code or 1
    os._exit(code & 0xFF)


def _program_serve(program: str) -> None:
    """Run the program's top level, then answer the harness's requests on fd 3."""
    import builtins
    import operator

    _fresh_stdio()
    fd = 3
    handles: list[Any] = []

    def reply_error(exc: BaseException) -> None:
        t = type(exc)
        try:
            text = str(exc)[:500]
        except BaseException:
            text = ""
        name = t.__name__ if getattr(builtins, t.__name__, None) is t else f"{t.__module__}.{t.__name__}"
        _send(fd, {"ok": False, "e": name, "msg": text})

    ns: dict[str, Any] = {"__name__": "solution", "__builtins__": builtins}
    try:
        exec(compile(program, "<program>", "exec"), ns)
    except BaseException as exc:
        reply_error(exc)
        os._exit(0)
    import types

    names = {}
    for k, v in list(ns.items()):
        if k.startswith("__"):
            continue
        if isinstance(v, types.ModuleType):
            names[k] = {"m": v.__name__}
        else:
            try:
                enc = _encode(v, handles, None)
                if len(json.dumps(enc)) > 100_000:  # big tables stay in the program, as a handle
                    handles.append(v)
                    enc = {"h": [len(handles) - 1, type(v).__name__]}
                names[k] = enc
            except Exception:
                continue
    _send(fd, {"ok": True, "names": names})
    ops = {"eq": operator.eq, "ne": operator.ne, "lt": operator.lt, "le": operator.le,
           "gt": operator.gt, "ge": operator.ge}
    dec = _ProgramDecoder(handles)
    while True:
        try:
            req = _recv(fd)
        except BaseException:
            os._exit(0)
        try:
            op, obj = req["op"], handles[req["h"]]
            muts = []
            if op == "call":
                args = [dec(a) for a in req["a"]]
                kwargs = {k: dec(v) for k, v in req["k"].items()}
                before = {i: json.dumps(req["a"][i]) for i, a in enumerate(args)
                          if type(a) in (list, dict, set, bytearray)}
                before.update({k: json.dumps(req["k"][k]) for k, a in kwargs.items()
                               if type(a) in (list, dict, set, bytearray)})
                value = obj(*args, **kwargs)
                for key in before:
                    now = _encode(args[key] if isinstance(key, int) else kwargs[key], handles, None)
                    if json.dumps(now) != before[key]:
                        muts.append([key, now])
            elif op == "getattr":
                value = getattr(obj, req["name"])
            elif op == "setattr":
                setattr(obj, req["name"], dec(req["v"]))
                value = None
            elif op == "getitem":
                value = obj[dec(req["v"])]
            elif op == "setitem":
                obj[dec(req["v"])] = dec(req["w"])
                value = None
            elif op == "delitem":
                del obj[dec(req["v"])]
                value = None
            elif op == "len":
                value = len(obj)
            elif op == "iter":
                value = iter(obj)
                handles.append(value)
                _send(fd, {"ok": True, "v": {"h": [len(handles) - 1, type(value).__name__]}})
                continue
            elif op == "next":
                value = next(obj)
            elif op == "repr":
                value = repr(obj)
            elif op == "str":
                value = str(obj)
            elif op == "cmp":
                value = ops[req["name"]](obj, dec(req["v"]))
            else:
                raise ValueError(f"unknown op {op!r}")
            _send(fd, {"ok": True, "v": _encode(value, handles, None), "m": muts})
        except BaseException as exc:
            reply_error(exc)


class _ProgramDecoder:
    """Decode the harness's tags inside the program process (handles -> its objects)."""

    def __init__(self, handles: list[Any]):
        self.handles = handles

    def __call__(self, x: Any) -> Any:
        t = type(x)
        if t is not dict:
            return x
        (tag, v), = x.items()
        if tag == "h":
            return self.handles[v[0]]
        if tag in ("l", "t", "s", "f"):
            return {"l": list, "t": tuple, "s": set, "f": frozenset}[tag](self(i) for i in v)
        if tag == "d":
            return {self(k): self(i) for k, i in v}
        if tag in ("b", "y"):
            return (bytes if tag == "b" else bytearray).fromhex(v)
        if tag == "c":
            return complex(*v)
        if tag == "i":
            return -int(v[1:], 16) if v.startswith("-") else int(v, 16)
        if tag == "q":
            from fractions import Fraction

            return Fraction(self(v[0]), self(v[1]))
        if tag == "D":
            from decimal import Decimal

            return Decimal(v)
        raise ValueError(f"bad tag {tag!r}")


# ======================================================================== isolation report
_PROBE = r'''
import json, os, resource, socket
out = {"uid": os.getuid(), "cwd": os.getcwd()}
try:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM); s.settimeout(2)
    s.connect(("1.1.1.1", 53)); out["network"] = "REACHABLE"
except OSError as e:
    out["network"] = f"blocked ({e.strerror or e})"
out["visible_processes"] = sum(p.isdigit() for p in os.listdir("/proc"))
try:  # opened for appending and closed unwritten: changes nothing even where allowed
    os.close(os.open("/etc/passwd", os.O_WRONLY | os.O_APPEND)); out["write_etc"] = "ALLOWED"
except OSError as e:
    out["write_etc"] = f"refused ({e.strerror})"
for name in ("AS", "CPU", "FSIZE", "NPROC", "NOFILE"):
    out["RLIMIT_" + name] = resource.getrlimit(getattr(resource, "RLIMIT_" + name))[0]
for line in open("/proc/self/status"):
    if line.startswith(("Seccomp:", "NoNewPrivs:")):
        k, v = line.split(":"); out[k] = v.strip()
print(json.dumps(out))
'''


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m verifiers.sandbox",
                                 description="Sandbox for model-written Python (see docs/sandbox.md).")
    ap.add_argument("--report", action="store_true", help="print the isolation layers in effect here")
    args = ap.parse_args(argv)
    if not args.report:
        ap.print_help()
        return 0
    with Sandbox(workers=1) as sb:
        rep = sb.report()
    print("isolation layers (harness/init):")
    for k, v in rep["layers"].items():
        print(f"  {k:18s} {v}")
    print("seen from inside the sandbox (probe program):")
    for k, v in rep["probe"].items():
        print(f"  {k:18s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
