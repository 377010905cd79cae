"""The ``python_tests`` verifier: run model-written Python against tests in a sandbox.

Row fields (one of ``tests`` / ``io_cases`` is required):

* ``tests``: self-contained Python test code run against the program: plain
  ``assert`` statements, or HumanEval's ``def check(candidate): ...`` followed by
  ``check(entry_point)``. The tests run in a separate, trusted process; the program's
  functions and classes reach them as proxies (see ``verifiers/sandbox/`` and
  ``docs/sandbox.md``), so nothing the program does can make an assertion pass.
* ``prefix`` (optional): code placed before the completion (HumanEval's prompt: the
  signature, docstring and helper functions the completion continues or redefines).
* ``entry_point`` (optional): the function the tests check; used to pick the right
  fenced block when a completion has several.
* ``io_cases`` (optional): a list of ``{"input": str, "output": str}`` for stdin/stdout
  problems. The program runs once per case with ``input`` on stdin; its stdout must
  equal ``output`` line for line (trailing spaces on a line and trailing blank lines are
  ignored; a missing, extra or different line fails the case).

Code extraction (``extract_code``): if the completion has fenced blocks, the code is
the first ``python``/``py``/untagged block that defines ``entry_point`` (else the
longest such block); an unclosed fence (a truncated generation) runs to the end of
the text. Without fences the completion is used as is (a base model continuing the
prompt's function body). The program is ``prefix + code``.

Reward: 1.0 when every test passes (every io case matches), else 0.0; with
``partial_credit: true`` the fraction of assertions that passed (io: of cases).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from grpo.errors import UserError
from grpo.registry import VERIFIERS
from verifiers.base import Score, Verifier
from verifiers.io_compare import compare_output, output_lines  # noqa: F401  (public here too)
from verifiers.sandbox import IOJob, Limits, Sandbox, TestsJob

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PY_TAGS = {"", "python", "py", "python3", "py3"}


def extract_code(completion: str, entry_point: str | None = None) -> str:
    """The Python code in a completion: a fenced block if there is one, else the text."""
    blocks = [m.group(2) for m in _FENCE.finditer(completion) if m.group(1).lower() in _PY_TAGS]
    if not blocks:
        if "```" in completion:  # only non-Python fences (```text, ```bash): no code
            return completion.split("```", 1)[0]
        return completion
    if entry_point:
        defines = re.compile(rf"^\s*(?:async\s+)?def\s+{re.escape(entry_point)}\s*\(", re.MULTILINE)
        for block in blocks:
            if defines.search(block):
                return block
    return max(blocks, key=len)


def build_program(completion: str, prefix: str | None = None, entry_point: str | None = None) -> str:
    """``prefix`` + the extracted code; a raw continuation is appended without a line break."""
    code = extract_code(completion, entry_point)
    if not prefix:
        return code
    if code is completion:  # continuation of the prefix (e.g. a function body)
        return prefix + code
    return prefix.rstrip("\n") + "\n\n" + code


def _check_io_cases(cases: Any) -> list[dict[str, str]]:
    if not isinstance(cases, list) or not cases:
        raise UserError("python_tests: 'io_cases' must be a non-empty list of {input, output}")
    out = []
    for i, case in enumerate(cases):
        if not isinstance(case, dict) or not isinstance(case.get("output"), str) \
                or not isinstance(case.get("input", ""), str):
            raise UserError(f"python_tests: io_cases[{i}] must be {{\"input\": str, \"output\": str}}")
        out.append({"input": case.get("input", ""), "output": case["output"]})
    return out


@VERIFIERS.register("python_tests")
class PythonTests(Verifier):
    """Runs the completion's Python against the row's tests (or stdin/stdout cases) in a sandbox.

    Args (``task.verifier_args.python_tests``):
        timeout_s: wall-clock limit per execution (a test run, or one io case), enforced
            from outside by killing the sandbox's whole process tree.
        cpu_s: CPU-time limit per execution (default: ``timeout_s``).
        memory_mb: address-space limit of the program's process.
        workers: executions run in parallel (default: CPU count).
        partial_credit: reward = fraction of assertions (io cases) passed instead of all-or-nothing.
        max_output_kb: captured stdout per io case (more fails the case).
    """

    fields = ("tests", "prefix", "entry_point", "io_cases")
    required_fields: tuple[str, ...] = ()  # 'tests' or 'io_cases', checked per row
    correctness = True
    isolation = "inline"  # sandboxes itself: fresh processes, namespaces, rlimits

    def __init__(self, timeout_s: float = 10.0, cpu_s: float | None = None, memory_mb: int = 512,
                 workers: int | None = None, partial_credit: bool = False, max_output_kb: int = 1024):
        if timeout_s <= 0 or memory_mb < 64:
            raise UserError("python_tests: timeout_s must be > 0 and memory_mb >= 64")
        self.timeout_s = float(timeout_s)
        self.memory_mb = int(memory_mb)
        self.cpu_s = float(cpu_s) if cpu_s else self.timeout_s
        self.workers = workers
        self.partial_credit = bool(partial_credit)
        self.max_output_kb = int(max_output_kb)
        self._sandbox = None

    def sandbox(self):
        if self._sandbox is None:
            limits = Limits(wall_s=self.timeout_s, cpu_s=self.cpu_s, memory_mb=self.memory_mb,
                            max_output_bytes=self.max_output_kb * 1024)
            self._sandbox = Sandbox(limits, workers=self.workers)
        return self._sandbox

    def deadline_s(self, n: int, fields: dict[str, Sequence[Any]]) -> float:
        """The longest scoring ``n`` rows can take, each run one after another: a tests row
        one timeout, a stdin/stdout row one per case (the sandbox's own per-run budgets)."""
        cases = fields.get("io_cases") or [None] * n
        tests = fields.get("tests") or [None] * n
        return sum(self.timeout_s + 10.0 if tests[i] or not isinstance(cases[i], list)
                   else len(cases[i]) * (self.timeout_s + 1.0) + 10.0 for i in range(n))

    def score(self, completions: Sequence[str], **fields: Sequence[Any]) -> list[Score]:
        n = len(completions)
        tests = fields.get("tests") or [None] * n
        prefixes = fields.get("prefix") or [None] * n
        entry_points = fields.get("entry_point") or [None] * n
        io_cases = fields.get("io_cases") or [None] * n
        jobs: list[Any] = []
        for i, completion in enumerate(completions):
            program = build_program(completion or "", prefixes[i], entry_points[i])
            if tests[i]:
                if not isinstance(tests[i], str):
                    raise UserError("python_tests: 'tests' must be a string of Python code")
                jobs.append(TestsJob(program, tests[i], partial=self.partial_credit, prefix=prefixes[i] or "",
                                     entry_point=entry_points[i] or ""))
            elif io_cases[i]:
                jobs.append(IOJob(program, _check_io_cases(io_cases[i]), partial=self.partial_credit))
            else:
                raise UserError("python_tests: a row has neither 'tests' nor 'io_cases'")
        results = self.sandbox().run_many(jobs)
        scores = []
        for r in results:
            if self.partial_credit:
                reward = r.passed / r.total if r.total else 0.0
            else:
                reward = 1.0 if r.ok else 0.0
            scores.append(Score(reward, r.reason))
        return scores

    def close(self) -> None:
        if self._sandbox is not None:
            self._sandbox.close()
            self._sandbox = None
