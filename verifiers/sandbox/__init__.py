"""Run model-written Python in a sandbox, and prove test results the program cannot forge.

Processes of one execution (``docs/sandbox.md`` has the threat model)::

    caller (Sandbox, in the trainer)          -- enforces the wall clock from outside:
      |                                          kills the harness's process group
      +-- zygote    one per Sandbox, a pre-imported `python -I -S` that only forks harnesses
          +-- harness   fresh process per run, trusted code: reads the job from stdin,
              |         forks init, confines itself (own uid, allow-listed view, seccomp),
              |         runs the dataset's TESTS, writes the verdict to its stdout.
              +-- init  pid 1 of a new PID namespace, trusted: allow-listed view, seccomp,
                  |     forks the program, times it, kills every process in the namespace.
                  +-- program   untrusted: unprivileged uid, rlimits, no sockets, a read-only
                                root holding only the stdlib and its libraries, a private
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
namespace; otherwise rlimits, seccomp and process groups only (the host filesystem then
stays visible). A seccomp filter (x86_64, aarch64) refuses socket() and connect() of
every family, Unix sockets included, in every mode.

Layout: ``runner.py`` (limits, jobs, results, the worker pool) and ``launch.py`` (starting
harnesses, reading verdicts) run in the caller; ``inside/`` holds the code of the sandbox's
own processes (``zygote``, ``harness``, ``pid1``, ``program``, with ``proxy``, ``view``,
``linux`` and ``wire``), standard library only, loaded by the boot stub on its own;
``allowlist.py`` computes the filesystem view the program and the tests get.
"""

from __future__ import annotations

from verifiers.sandbox.runner import IOJob, Limits, Result, Sandbox, TestsJob

__all__ = ["IOJob", "Limits", "Result", "Sandbox", "TestsJob", "main"]


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m verifiers.sandbox",
                                 description="Sandbox for model-written Python (see docs/sandbox.md).")
    ap.add_argument("--report", action="store_true", help="print the isolation layers in effect here")
    ap.add_argument("--mode", choices=Sandbox.MODES, default="auto",
                    help="force a weaker mode to see what it keeps (auto: the strongest available)")
    args = ap.parse_args(argv)
    if not args.report:
        ap.print_help()
        return 0
    with Sandbox(workers=1, mode=args.mode) as sb:
        rep = sb.report()
    print("isolation layers (harness/init):")
    for k, v in rep["layers"].items():
        print(f"  {k:20s} {v}")
    print("seen from inside the sandbox (probe program):")
    for k, v in rep["probe"].items():
        print(f"  {k:20s} {v}")
    return 0
