"""The harness: the trusted process that runs the tests and writes the verdict.

It starts init (and so the program) *before* it reads the tests, so the tests are never
in the program's memory; then it runs the tests, calling the program's functions through
proxies (``proxy.py``), counting every executed ``assert``, and writes the verdict to
its stdout, a pipe only it holds.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

from . import pid1, view
from .linux import CLONE_NEWIPC, CLONE_NEWNET, CLONE_NEWPID, CLONE_NEWUSER, PR_SET_DUMPABLE, PR_SET_PDEATHSIG, \
    count_own_processes, drop_capabilities, install_seccomp, prctl, set_rlimit, socketpair, unshare
from .proxy import Remote
from .wire import FRAME, ProgramGone, ProtocolError, Timeout, describe_exit, frame, io_message_bytes, read_exact, \
    recv, send, write_all

_TESTS_MAX_PROCESSES = 64  # RLIMIT_NPROC of the tests' own uid (processes + threads)


def main() -> None:
    """Entry point of the harness process (``python -I -S``), reading the job from stdin."""
    try:  # the caller's death (a killed trainer, or the zygote that forked us) ends this run
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass
    result_fd = os.dup(1)
    os.dup2(2, 1)  # test code's prints go to stderr, never into the verdict channel
    iso: dict[str, Any] = {}
    try:
        hdr = json.loads(read_exact(0, FRAME.unpack(read_exact(0, 4))[0]))
        # The harness itself is trusted but may run heavy test code: cap it too.
        set_rlimit("RLIMIT_AS", 4096 * 1024 * 1024)
        if os.geteuid() != 0 or hdr.get("mode", "auto") != "auto":
            hdr["own_processes"] = count_own_processes()  # before a PID namespace hides them
        mode = _enter_namespaces(iso, hdr.get("mode", "auto"))
        ctl_h, ctl_i = socketpair()
        rpc_h, rpc_c = socketpair() if hdr["kind"] == "tests" else (-1, -1)
        init_pid = os.fork()
        if init_pid == 0:  # -------- init: forked before the tests are read
            try:
                os.close(result_fd)
                os.close(ctl_h)
                if rpc_h >= 0:
                    os.close(rpc_h)
                pid1.main(hdr, mode, ctl_i, rpc_c)
            finally:
                os._exit(0)
        os.close(ctl_i)
        if rpc_c >= 0:
            os.close(rpc_c)
        second = json.loads(read_exact(0, FRAME.unpack(read_exact(0, 4))[0]))
        os.close(0)
        if hdr["kind"] == "tests":
            _confine_tests(hdr, mode, iso)
        ready = recv(ctl_h, time.monotonic() + 30)
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
        write_all(result_fd, frame(json.dumps(out).encode()))
    except BaseException:
        import traceback

        traceback.print_exc()
        os._exit(3)
    os._exit(0)


def _confine_tests(hdr: dict[str, Any], mode: str, iso: dict[str, Any]) -> None:
    """Test code comes from a dataset, trusted to judge but not to leave the host alone:
    it gets its own confinement, separate from the program's (init was forked before, with
    the harness's privileges). An allow-listed read-only root with a private ``/tmp`` and
    no ``/proc``; a uid of its own (``root``) or no capabilities (``userns``); no sockets
    (its network namespace has no interfaces either); file size and process caps."""
    lim = hdr["limits"]
    iso["tests_view"] = "host (no mount namespace)"
    if mode != "none":
        try:
            view.enter_view(hdr["view"], lim["tmpfs_mb"], False, {})
            iso["tests_view"] = "allow-list"
        except OSError as exc:
            iso["tests_view_error"] = str(exc)
    if mode == "root":
        uid = hdr["tests_uid"]
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        set_rlimit("RLIMIT_NPROC", _TESTS_MAX_PROCESSES)
        os.setresuid(uid, uid, uid)
    elif mode == "userns":
        drop_capabilities()
    iso["tests_uid_separation"] = mode == "root"
    set_rlimit("RLIMIT_FSIZE", lim["file_size_mb"] * 1024 * 1024)
    set_rlimit("RLIMIT_CORE", 0)
    try:
        prctl(PR_SET_DUMPABLE, 0)
    except OSError:
        pass
    try:  # a change of uid cleared the parent-death signal set at start: again
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass
    iso["tests_seccomp"] = install_seccomp()


def _enter_namespaces(iso: dict[str, Any], want: str) -> str:
    """New network + PID (+ IPC) namespaces for init and the program; returns the mode:
    ``root`` (also a separate uid), ``userns`` (inside a user namespace) or ``none``."""
    flags = CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC
    if want == "none":
        flags = 0
    if flags and want == "auto" and os.geteuid() == 0:
        try:
            unshare(flags)
            iso.update(mode="root", uid_separation=True, netns=True, pidns=True, ipcns=True)
            return "root"
        except OSError as exc:
            iso["unshare_error"] = str(exc)
    uid, gid = os.geteuid(), os.getegid()
    try:
        if not flags:
            raise OSError("namespaces not requested")
        unshare(CLONE_NEWUSER | flags)
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
        prctl(PR_SET_DUMPABLE, 0)  # same uid as the program: at least refuse ptrace//proc/pid/mem
    except OSError:
        pass
    iso.update(mode="none", uid_separation=False, netns=False, pidns=False, ipcns=False)
    return "none"


# ------------------------------------------------------------------- harness: stdin/stdout
def _harness_io(hdr: dict[str, Any], ctl: int) -> list[dict[str, Any]]:
    lim = hdr["limits"]
    results = []
    for case, cap in enumerate(hdr["output_caps"]):
        send(ctl, {"op": "io", "case": case, "cap": cap})  # init has the inputs (the header)
        try:  # stdout up to cap, JSON-escaped (up to 6 bytes a byte), and stderr's tail
            results.append(recv(ctl, time.monotonic() + lim["wall_s"] + 30, max_bytes=io_message_bytes(cap)))
        except (Timeout, EOFError, ProtocolError):
            break
        if results[-1].get("timed_out") and not hdr.get("partial"):
            break  # the run has failed: a slow program costs one timeout, not one per case
    return results


# --------------------------------------------------------------------- harness: the tests
def _harness_tests(hdr: dict[str, Any], second: dict[str, Any], ctl: int, rpc: int) -> dict[str, Any]:
    import ast
    import builtins
    import importlib

    lim = hdr["limits"]
    partial = bool(second.get("partial"))
    send(ctl, {"op": "serve"})  # the program loads while the tests compile
    deadline = time.monotonic() + lim["wall_s"]
    try:
        tree = ast.parse(second["tests"], "<tests>")
        written = sum(isinstance(node, ast.Assert) and not _constant_true(node) for node in ast.walk(tree))
        code = compile(_AssertCounter().visit(tree), "<tests>", "exec", dont_inherit=True)
    except SyntaxError as exc:
        return _verdict(False, 0, 1, "error", f"error: the tests do not parse: {exc.msg} (line {exc.lineno})")
    remote = Remote(rpc, deadline)
    tally = _Tally(partial)
    # A run stopped before its tests finished (exit, crash, timeout, an error outside an assert)
    # keeps no credit: with partial credit, stopping must not pay more than answering wrongly.
    kept = (lambda: 0) if partial else (lambda: tally.passed)
    try:
        hello = remote.recv()
        if not hello.get("ok"):
            msg = f"{hello.get('e', 'Error')}: {hello.get('msg', '')}"
            return _verdict(False, 0, 1, "failed", f"program failed to load: {msg}"[:200])
        ns: dict[str, Any] = {"__name__": "__tests__", "__builtins__": builtins}
        names = hello.get("names", {})
        if not isinstance(names, dict):
            raise ProtocolError("bad names")
        for name, enc in names.items():
            if not isinstance(name, str) or not name.isidentifier():
                raise ProtocolError("bad name")
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
        _bind_prefix(ns, second.get("prefix") or "", second.get("entry_point") or "", deadline)
        ns["_sandbox_record_"] = tally.record
        _run_with_alarm(code, ns, deadline)
    except Timeout:
        return _verdict(False, kept(), tally.total + 1, "timeout", f"timeout after {lim['wall_s']:g}s"
                        + _after(tally))
    except (ProgramGone, EOFError):
        why = f"program failed: {remote.broken}"
        if remote.broken in ("", "program process exited"):  # ask init how it ended
            why = "program exited before the tests finished"
            try:
                info = recv(ctl, time.monotonic() + 1.0)
                if isinstance(info, dict) and info.get("op") == "exited":
                    why = describe_exit(info, lim)
            except (Timeout, EOFError, OSError, ProtocolError):
                pass
        return _verdict(False, kept(), tally.total + 1, "crashed", why + _after(tally))
    except ProtocolError as exc:
        return _verdict(False, kept(), tally.total + 1, "failed", f"program sent bad data: {exc}")
    except BaseException as exc:  # noqa: BLE001 - any error in the tests is a failure
        line = "" if isinstance(exc, _AssertFailed) else _test_line(exc)
        stopped = not isinstance(exc, _AssertFailed)
        return _verdict(False, kept() if stopped else tally.passed, tally.total + stopped, "failed",
                        f"{_exc_text(exc)}{line}"[:200])
    if remote.broken:  # the tests swallowed a protocol error or a vanished program
        return _verdict(False, kept(), tally.total + 1, "crashed", f"program failed: {remote.broken}")
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
        raise Timeout()

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


def _constant_true(node) -> bool:
    import ast

    return isinstance(node.test, ast.Constant) and bool(node.test.value)


def _bind_prefix(ns: dict[str, Any], prefix: str, entry_point: str, deadline: float) -> None:
    """The functions the row's ``prefix`` defines (HumanEval's prompt: ``poly``, ``encode_cyclic``),
    run from the prefix itself, so the tests call the trusted helper, not a program's own
    version of it (redefining ``poly`` to return 0 passed HumanEval/32).

    Only self-contained helpers: a function that names the entry point, a stub (a docstring,
    ``pass``, ``...`` or ``raise NotImplementedError``) or another helper left to the program
    stays the program's, as before (run here it would call a stub). A prefix that defines
    classes (LeetCode's ``ListNode``/``TreeNode``) leaves every name the program's: its helpers
    take and build the program's objects, which the tests' side cannot test for truth; so
    those rows' comparison helpers can be redefined by the program (docs/sandbox.md). A prefix
    that does not run here leaves every name the program's too."""
    import ast
    import builtins

    if not prefix:
        return
    try:
        tree = ast.parse(prefix, "<prefix>")
    except SyntaxError:
        return
    defs = {node.name: node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    if any(isinstance(node, ast.ClassDef) for node in tree.body):
        return
    untrusted = {entry_point} | {name for name, node in defs.items() if _is_stub(node)}
    names = {name: {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} for name, node in defs.items()}
    functions = set(defs) - untrusted
    while True:  # a helper calling a helper left to the program is left to it too
        left = {name for name in functions if names[name] & (untrusted | (set(defs) - functions))}
        if not left:
            break
        functions -= left
    if not functions:
        return
    own: dict[str, Any] = {"__name__": "__prefix__", "__builtins__": builtins}
    try:
        _run_with_alarm(compile(tree, "<prefix>", "exec", dont_inherit=True), own, deadline)
    except Timeout:
        raise
    except Exception:
        return
    for name in functions:
        if callable(own.get(name)):
            ns[name] = own[name]


def _is_stub(node) -> bool:
    import ast

    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]  # the docstring
    return all(isinstance(b, ast.Pass) or isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)
               or isinstance(b, ast.Raise) and "NotImplementedError" in ast.unparse(b) for b in body)


class _AssertCounter:
    """AST pass: ``assert c, m`` -> record(bool(c)) so assertions can be counted.

    Strict mode keeps Python's semantics (an exception in ``c`` propagates); partial
    mode catches it, counts the assertion as failed and goes on.
    """

    def visit(self, tree):
        import ast

        class T(ast.NodeTransformer):
            def visit_Assert(self, node):
                if _constant_true(node):  # `assert True, "..."` tests nothing: no credit for it
                    return ast.copy_location(ast.Pass(), node)
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
