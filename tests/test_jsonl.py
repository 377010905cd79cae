"""tasks.loaders.read_jsonl: the one JSONL reader (task data, grpo verify input, preference data, HumanEval)."""

from __future__ import annotations

import gzip
import io
import json

import pytest

from grpo.cli import main
from grpo.errors import UserError
from tasks.loaders import InvalidLine, read_jsonl


def test_line_numbers_skip_blank_lines_and_strict_errors_name_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n\n  \n{"a": 2}\n')
    assert read_jsonl(path) == [(1, {"a": 1}), (4, {"a": 2})]
    path.write_text('{"a": 1}\n{oops\n')
    with pytest.raises(UserError, match=r"d.jsonl:2: not valid JSON"):
        read_jsonl(path)
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(UserError, match=r"d.jsonl:2: expected a JSON object, got list"):
        read_jsonl(path)
    with pytest.raises(UserError, match=r"input file not found: .*missing.jsonl"):
        read_jsonl(tmp_path / "missing.jsonl", what="input file")


def test_lenient_mode_keeps_bad_lines_for_the_caller_to_report(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n{oops\n3\n')
    rows = read_jsonl(path, strict=False)
    assert rows[0] == (1, {"a": 1}) and rows[2] == (3, 3)
    assert rows[1][0] == 2 and isinstance(rows[1][1], InvalidLine) and "not valid JSON" in rows[1][1].problem


def test_gzip_and_stdin(tmp_path, monkeypatch):
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write('{"task_id": "t"}\n')
    assert read_jsonl(path) == [(1, {"task_id": "t"})]
    monkeypatch.setattr("sys.stdin", io.StringIO('{"b": 2}\n'))
    assert read_jsonl("-") == [(1, {"b": 2})]


def test_a_line_separator_inside_a_string_does_not_split_the_row(tmp_path, capsys):
    # json.dumps(..., ensure_ascii=False) writes U+2028 raw; str.splitlines() would cut the row in two
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"completion": "a\u2028b"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert read_jsonl(path) == [(1, {"completion": "a\u2028b"})]
    assert main(["verify", "--verifier", "format", "--input", str(path), "--workers", "1"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1  # one reward for the one row
