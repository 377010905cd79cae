"""The caller side of the sandbox: limits, jobs, results, and ``Sandbox``, a pool of
workers each driving one sandboxed execution at a time.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from verifiers.io_compare import compare_output
from verifiers.sandbox.allowlist import filesystem_view
from verifiers.sandbox.inside.wire import FRAME, MAX_MESSAGE_BYTES, describe_exit, frame, io_message_bytes
from verifiers.sandbox.launch import Launcher, ZygoteLauncher, pump


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
    prefix: str = ""  # the row's trusted prefix: the helpers it defines are run from it for the tests
    entry_point: str = ""  # the function the program writes (never taken from the prefix)


@dataclass(frozen=True)
class IOJob:
    """Run ``program`` once per case with ``input`` on stdin; stdout must equal ``output``."""

    program: str
    cases: list[dict[str, str]]
    partial: bool = False  # run every case (partial credit); else stop at the first that times out


@dataclass
class Result:
    ok: bool  # every test passed / every case matched
    passed: int  # assertions (cases) that passed
    total: int  # assertions executed (+1 if the tests stopped on an error) / cases
    status: str  # passed | failed | error | timeout | crashed
    reason: str  # one short line for samples.jsonl
    isolation: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0


class Sandbox:
    """A pool of ``workers`` threads, each driving one sandboxed execution at a time.

    ``run_many`` scores a batch (G completions x P prompts) in parallel; every job gets
    a fresh harness process. Each worker slot has its own uid for the program and another
    for the tests (when run as root), so the process-count limit of one program never
    starves another, and the program and the tests cannot signal each other.
    ``hide_paths``: directories inside the allow-listed view (the stdlib) to cover anyway.
    """

    BASE_UID = 1_700_000_000
    MAX_WORKERS = 128  # uids per pool: [uid0, uid0 + 128) programs, [uid0 + 128, uid0 + 256) tests

    MODES = ("auto", "userns", "none")

    def __init__(self, limits: Limits | None = None, workers: int | None = None,
                 hide_paths: tuple[str, ...] = (), zygote: bool = True, mode: str = "auto"):
        import queue
        import random

        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode  # "userns" / "none" skip the stronger layers (for testing fallbacks)
        self.limits = limits or Limits()
        self.workers = min(self.MAX_WORKERS, max(1, workers or os.cpu_count() or 1))
        self._view = filesystem_view(tuple(hide_paths))
        block = random.Random().randrange(1 << 20)  # separate uid ranges for separate pools
        self._uid0 = self.BASE_UID + block * 2 * self.MAX_WORKERS
        self._slots: queue.SimpleQueue[int] = queue.SimpleQueue()
        for s in range(self.workers):
            self._slots.put(s)
        self._executor = None
        self._running: set = set()  # harnesses in flight (killed by close)
        # mode auto: the zygote builds the view once, each run's namespaces copy it (root only)
        template = self._view if mode == "auto" else None
        self._launcher: Launcher = ZygoteLauncher(template) if zygote else Launcher()

    # ---------------------------------------------------------------- public API
    @property
    def view(self) -> dict[str, Any]:
        """The allow-list the program's and the tests' filesystem views are built from."""
        return self._view

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
        """Stop: runs not started are cancelled and runs in flight killed (Ctrl-C waited for
        every sandboxed program to finish, up to its timeout)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            for harness in list(self._running):
                harness.kill()
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
            "tests_uid": self._uid0 + self.MAX_WORKERS + slot,
            "view": self._view,
            "mode": self.mode,
        }
        nonce = secrets.token_hex(16)
        second: dict[str, Any] = {"nonce": nonce}
        if io:
            header["inputs"] = [c.get("input", "") for c in job.cases]
            header["partial"] = job.partial
            # room for the expected output (plus slack), never less than the configured cap
            header["output_caps"] = [max(lim.max_output_bytes, 2 * len(c["output"].encode()) + 1024)
                                     for c in job.cases]
            budget = len(job.cases) * (lim.wall_s + 1.0) + 10.0
        else:
            second.update(tests=job.tests, partial=job.partial, prefix=job.prefix, entry_point=job.entry_point)
            budget = lim.wall_s + 10.0
        payload = frame(json.dumps(header).encode()) + frame(json.dumps(second).encode())
        t0 = time.monotonic()
        harness = self._launcher.start()
        self._running.add(harness)
        try:
            cap = MAX_MESSAGE_BYTES + (sum(io_message_bytes(c) for c in header["output_caps"]) if io else 0)
            out, err, killed = pump(harness, payload, deadline=t0 + budget, out_cap=cap)
        finally:
            self._running.discard(harness)
            harness.finish()
        wall = time.monotonic() - t0
        if killed:
            return Result(False, 0, 1, "timeout", f"timeout: sandbox killed after {budget:g}s", wall_s=wall)
        try:
            (n,) = FRAME.unpack(out[:4])
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
        """Isolation layers in effect, measured by running a probe program in the sandbox
        (and a trivial test run, for the tests' own confinement)."""
        res = self.run(IOJob(PROBE, [{"input": "", "output": ""}]))
        tests = self.run(TestsJob("x = 1\n", "assert x == 1\n"))
        try:
            probe = json.loads(res.isolation.get("stdout", "") or "{}")
        except ValueError:
            probe = {"error": res.reason}
        layers = {k: v for k, v in res.isolation.items() if k != "stdout"}
        layers.update((k, v) for k, v in tests.isolation.items() if k.startswith("tests_"))
        layers["view_libraries"] = self._view["libs"]
        return {"layers": layers, "probe": probe}


def _io_result(job: IOJob, res: dict[str, Any], iso: dict[str, Any], wall: float,
               lim: dict[str, Any]) -> Result:
    passed, first_fail = 0, ""
    cases = res.get("cases", [])
    for i, (case, got) in enumerate(zip(job.cases, cases)):
        if got.get("timed_out"):
            why = "timeout"
        elif got.get("truncated"):
            why = "output limit exceeded"
        elif got.get("signal"):
            why = describe_exit(got, lim)
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


PROBE = r'''
import json, os, resource, socket
out = {"uid": os.getuid(), "cwd": os.getcwd()}
try:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM); s.settimeout(2)
    s.connect(("1.1.1.1", 53)); out["network"] = "REACHABLE"
except OSError as e:
    out["network"] = f"blocked ({e.strerror or e})"
try:
    u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); out["unix_sockets"] = "ALLOWED"
except OSError as e:
    out["unix_sockets"] = f"blocked ({e.strerror or e})"
out["visible_processes"] = sum(p.isdigit() for p in os.listdir("/proc"))
out["root_entries"] = sorted(os.listdir("/"))
out["etc_passwd"] = "VISIBLE" if os.path.exists("/etc/passwd") else "absent"
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
