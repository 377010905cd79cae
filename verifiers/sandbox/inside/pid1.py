"""init: pid 1 of the sandbox's PID namespace (trusted). Sets up the program's view of
the filesystem and seccomp, forks the program on request (``program.py``), times it and
kills every process of the namespace after each run.
"""

from __future__ import annotations

import os
import select
import signal
import time
from typing import Any

from .linux import PR_SET_DUMPABLE, PR_SET_PDEATHSIG, drop_capabilities, install_seccomp, prctl, set_rlimit
from .program import run_io, serve
from .view import setup_mounts
from .wire import exit_info, recv, send


def main(hdr: dict[str, Any], mode: str, ctl: int, rpc: int) -> None:
    """pid 1 of the sandbox's PID namespace: set up mounts and seccomp, then run the
    program on request and kill every process in the namespace after each run."""
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    try:  # the harness's death ends the namespace: every process the program started goes with it
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass
    try:
        prctl(PR_SET_DUMPABLE, 0)  # no ptrace or /proc/1/mem from a program with the same uid
    except OSError:
        pass
    layers: dict[str, Any] = {}
    workdir = setup_mounts(hdr, mode, layers)
    hdr["private_proc"] = layers.get("private_proc", False)  # the runs' process budget reads it
    layers["seccomp"] = install_seccomp()
    layers["rlimits"] = ["AS", "CPU", "FSIZE", "NPROC", "NOFILE", "CORE"]
    send(ctl, {"op": "ready", "layers": layers})
    try:
        while True:
            try:
                req = recv(ctl)
            except (EOFError, OSError):
                break
            if req.get("op") == "serve":
                _init_serve(hdr, mode, ctl, rpc, workdir)
                break
            if req.get("op") == "io":
                send(ctl, _init_io(hdr, mode, workdir, hdr["inputs"][int(req["case"])], int(req["cap"])))
    finally:
        _kill_all(mode, hdr)
        if mode == "none" or not layers.get("mountns"):
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)


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


class _Budget:
    """The program's processes together: resident memory within ``memory_mb`` and CPU time
    within ``cpu_s`` (RLIMIT_AS and RLIMIT_CPU hold per process: ten forked children held 2 GB
    at memory_mb=256, and thirty busy ones starved the runs beside them). Read from this PID
    namespace's own /proc every 0.1 s, so only where init mounted one (``private_proc``)."""

    def __init__(self, hdr: dict[str, Any]):
        lim = hdr["limits"]
        self.active = bool(hdr.get("private_proc")) and os.getpid() == 1
        self.memory = lim["memory_mb"] * 1024 * 1024
        self.cpu = float(lim["cpu_s"])
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.tick = os.sysconf("SC_CLK_TCK")
        self.next = 0.0
        self.exceeded = ""

    def check(self) -> bool:
        """True (and ``exceeded`` says which) once the processes together are over budget."""
        now = time.monotonic()
        if not self.active or now < self.next:
            return False
        self.next = now + 0.1
        rss = cpu = 0.0
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or entry == "1":
                continue
            try:
                rss += self._memory(entry)
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                cpu += (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / self.tick
            except (OSError, IndexError, ValueError):
                continue  # exited meanwhile
        if rss > self.memory:
            self.exceeded = f"its processes together held {rss / 2**20:.0f} MB, over memory_mb ({self.memory // 2**20})"
        elif cpu > self.cpu * 1.5 + 0.5:  # slack: each process also has RLIMIT_CPU = cpu_s
            self.exceeded = f"its processes together used {cpu:.1f}s of CPU, over cpu_s ({self.cpu:g}s)"
        return bool(self.exceeded)

    def _memory(self, pid: str) -> float:
        """A process's proportional resident memory (Pss: pages shared copy-on-write with its
        forks count once in all, not once per process); for a process whose main thread has
        exited (its own files read empty), what one of its live threads sees."""
        for where in [pid] + [f"{pid}/task/{tid}" for tid in _listdir(f"/proc/{pid}/task") if tid != pid][:4]:
            try:
                with open(f"/proc/{where}/smaps_rollup") as f:
                    for line in f:
                        if line.startswith("Pss:"):
                            return int(line.split()[1]) * 1024
            except OSError:
                pass
            try:
                with open(f"/proc/{where}/statm") as f:
                    resident = int(f.read().split()[1]) * self.page
                if resident:
                    return resident
            except (OSError, IndexError, ValueError):
                pass
        return 0.0


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _init_serve(hdr: dict[str, Any], mode: str, ctl: int, rpc: int, workdir: str) -> None:
    stdio = (os.open(os.devnull, os.O_RDONLY), os.open(os.devnull, os.O_WRONLY), os.open(os.devnull, os.O_WRONLY))
    pid = _spawn_program(hdr, mode, workdir, stdio, rpc, lambda: serve(hdr["program"]))
    for fd in (*stdio, rpc):
        os.close(fd)
    # Wait for the harness to finish (ctl closes) or the backstop deadline; tell the
    # harness how the program ended if it ends first.
    deadline = time.monotonic() + hdr["limits"]["wall_s"] + 2.0
    status = None
    budget = _Budget(hdr)
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or select.select([ctl], [], [], min(left, 0.02 if status is None else left))[0]:
            break
        if status is None and budget.check():
            _kill_all(mode, hdr, pgid=pid)
            status = 0
            send(ctl, {"op": "exited", "exit": None, "signal": signal.SIGKILL, "over_budget": budget.exceeded})
        if status is None:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                send(ctl, {"op": "exited", **exit_info(status)})
            else:
                status = None
    _kill_all(mode, hdr, pgid=pid)


def _init_io(hdr: dict[str, Any], mode: str, workdir: str, text: str, cap: int) -> dict[str, Any]:
    lim = hdr["limits"]
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = _spawn_program(hdr, mode, workdir, (in_r, out_w, err_w), -1,
                         lambda: run_io(hdr["program"]))
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
    budget = _Budget(hdr)
    while readers or status is None:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        if budget.check():
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
    info = exit_info(status) if status is not None else {"exit": None, "signal": None}
    if budget.exceeded:
        info = {"exit": None, "signal": signal.SIGKILL, "over_budget": budget.exceeded}
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
        set_rlimit("RLIMIT_AS", lim["memory_mb"] * mb)
        set_rlimit("RLIMIT_CPU", max(1, int(lim["cpu_s"] + 0.999)), max(1, int(lim["cpu_s"] + 0.999)) + 1)
        set_rlimit("RLIMIT_FSIZE", lim["file_size_mb"] * mb)
        set_rlimit("RLIMIT_NOFILE", lim["max_open_files"])
        set_rlimit("RLIMIT_CORE", 0)
        if mode == "root":
            uid = hdr["uid"]
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            set_rlimit("RLIMIT_NPROC", lim["max_processes"])
            os.setresuid(uid, uid, uid)
        else:
            # the limit counts every process of the (shared) uid, not only the sandbox's
            set_rlimit("RLIMIT_NPROC", lim["max_processes"] + hdr.get("own_processes", 1024))
            if mode == "userns":
                drop_capabilities()  # uid 0 of the user namespace, but without its capabilities
        try:
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # init's death takes the program with it
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
