"""The gsm8k and math tasks: loading local files, answers, splits, and every bad-input error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from grpo.build import build_task
from grpo.errors import UserError
from tasks.textmath import DEFAULT_TEMPLATE, GSM8K, MATH, last_boxed

DATA = Path(__file__).resolve().parent / "data"
GSM8K_SAMPLE = DATA / "gsm8k_sample.jsonl"
MATH_SAMPLE = DATA / "math_sample.jsonl"


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def all_rows(task):
    return task.rows("train") + task.rows("heldout")


# -------------------------------------------------------------------------- gsm8k
def test_gsm8k_sample_answers_and_prompt_shape():
    task = GSM8K(path=str(GSM8K_SAMPLE), heldout_fraction=0.25)
    rows = all_rows(task)
    assert len(rows) == 8
    answers = {r["prompt"][-1]["content"].split("\n")[0]: r["answer"] for r in rows}
    assert answers["A bakery sells muffins for $3 each. On Monday it sold 24 muffins. How many dollars did it earn?"] == "72"
    assert answers["Sara saves $250 a month. How much does she save in 6 months?"] == "1500"  # "1,500"
    assert answers["The temperature was 5 degrees in the morning and dropped 12 degrees by night. "
                   "What was the temperature at night?"] == "-7"
    for row in rows:
        assert row["verifiers"] == {"math": 1.0}
        assert row["prompt"][-1]["role"] == "user" and "\\boxed{}" in row["prompt"][-1]["content"]
        assert "####" not in row["prompt"][-1]["content"]  # the rationale never leaks into the prompt
        assert set(row) == {"id", "prompt", "answer", "verifiers"}


def test_gsm8k_hash_split_is_disjoint_deterministic_and_covers_the_file():
    task = GSM8K(path=str(GSM8K_SAMPLE), heldout_fraction=0.5, seed=1)
    train, held = task.rows("train"), task.rows("heldout")
    q = lambda rows: {r["prompt"][-1]["content"] for r in rows}
    assert q(train).isdisjoint(q(held)) and len(train) + len(held) == 8 and train and held
    assert train == GSM8K(path=str(GSM8K_SAMPLE), heldout_fraction=0.5, seed=1).rows("train")
    assert GSM8K(path=str(GSM8K_SAMPLE), heldout_fraction=0.0).rows("heldout") == []


def test_gsm8k_heldout_file_and_overlap_removed(tmp_path, capsys):
    held = write_jsonl(tmp_path / "test.jsonl", [
        {"question": "Maya has 12 pencils. She gives 5 to her brother and buys 8 more. How many pencils does she have now?",
         "answer": "#### 15"},
        {"question": "What is 2 + 2?", "answer": "2 + 2 = 4\n#### 4"}])
    task = GSM8K(path=str(GSM8K_SAMPLE), heldout_path=str(held))
    assert [r["answer"] for r in task.rows("heldout")] == ["15", "4"]
    assert len(task.rows("train")) == 7  # the question shared with the held-out file is dropped
    assert "dropped 1 train rows" in capsys.readouterr().err


def test_gsm8k_options_fields_template_system_sizes(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"q": f"What is {i} + 1?", "sol": f"{i}+1={i + 1}\n#### {i + 1}"}
                                              for i in range(20)])
    task = GSM8K(path=str(path), fields={"question": "q", "answer": "sol"}, heldout_fraction=0.3,
                 template="Q: {question}\nAnswer in \\boxed{}, e.g. \\boxed{{7}}.", system="Be brief.",
                 train_size=5, heldout_size=2, verifiers={"math": 1.0, "format": 0.1})
    train = task.rows("train")
    assert len(train) == 5 and len(task.rows("heldout")) == 2
    assert train[0]["prompt"][0] == {"role": "system", "content": "Be brief."}
    user = train[0]["prompt"][1]["content"]
    assert user.startswith("Q: What is ") and user.endswith("\\boxed{{7}}.")  # braces kept verbatim
    assert train[0]["verifiers"] == {"math": 1.0, "format": 0.1}
    assert train[0]["answer"] == str(int(user.split("What is ")[1].split(" ")[0]) + 1)


@pytest.mark.parametrize("lines, message", [
    (['{"question": "a", "answer": "#### 1"}', "{not json"], r"d.jsonl:2: not valid JSON"),
    (['["a", "b"]'], r"d.jsonl:1: expected a JSON object"),
    (['{"question": "a"}'], r"record 1 is missing \['answer'\]"),
    (['{"question": "a", "answer": "#### 1"}', '{"question": "", "answer": "#### 2"}'],
     r"record 2 is missing \['question'\]"),
    (['{"question": "a", "answer": "it is 5"}'], r"record 1: answer has no '#### <number>' final line"),
    (['{"question": "a", "answer": "so ####  "}'], r"record 1: nothing after '####'"),
    ([], r"no records \(the dataset is empty\)"),
])
def test_gsm8k_bad_input_errors(tmp_path, lines, message):
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    with pytest.raises(UserError, match=message):
        GSM8K(path=str(path), heldout_fraction=0.0).rows("train")


def test_gsm8k_missing_file_and_bad_args(tmp_path):
    with pytest.raises(UserError, match="data file not found: .*nowhere.jsonl"):
        GSM8K(path=str(tmp_path / "nowhere.jsonl")).rows("train")
    with pytest.raises(UserError, match="data file not found: .*held.jsonl"):
        GSM8K(path=str(GSM8K_SAMPLE), heldout_path=str(tmp_path / "held.jsonl")).rows("train")
    with pytest.raises(UserError, match="set task.args.path"):
        GSM8K(path="")
    with pytest.raises(UserError, match=r"template must contain \{question\}"):
        GSM8K(path=str(GSM8K_SAMPLE), template="Solve it.")
    with pytest.raises(UserError, match="heldout_fraction"):
        GSM8K(path=str(GSM8K_SAMPLE), heldout_fraction=1.0)
    with pytest.raises(UserError, match="train_size"):
        GSM8K(path=str(GSM8K_SAMPLE), train_size=0)
    with pytest.raises(UserError, match=r"record 1 has no column 'prompt'"):
        GSM8K(path=str(GSM8K_SAMPLE), fields={"question": "prompt"}).rows("train")
    with pytest.raises(UserError, match="no training rows left"):
        one = write_jsonl(tmp_path / "one.jsonl", [{"question": "a", "answer": "#### 1"}])
        GSM8K(path=str(one), heldout_path=str(one)).rows("train")


def test_gsm8k_built_from_config_args():
    task = build_task("gsm8k", {"path": str(GSM8K_SAMPLE), "heldout_fraction": 0.25})
    assert isinstance(task, GSM8K) and task.rows("train")
    with pytest.raises(UserError, match="bad arguments in task.args"):
        build_task("gsm8k", {"path": str(GSM8K_SAMPLE), "nosuch": 1})


# --------------------------------------------------------------------------- math
def test_math_sample_answers_from_answer_or_last_boxed():
    rows = all_rows(MATH(path=str(MATH_SAMPLE), heldout_fraction=0.25, seed=1))
    by_problem = {r["prompt"][-1]["content"].split("\n")[0]: r["answer"] for r in rows}
    assert len(rows) == 8
    assert by_problem["What is $\\frac{1}{2} + \\frac{1}{3}$?"] == "\\frac{5}{6}"  # nested braces
    assert by_problem["Simplify $\\sqrt{50}$."] == "5\\sqrt{2}"
    assert by_problem["What is the value of $\\sqrt{49} + 3^2$?"] == "16"  # answer column
    assert by_problem["Find the remainder when $2^{10}$ is divided by 7."] == "2"  # answer wins over solution
    assert by_problem["Write the interval of $x$ with $x^2 < 9$."] == "(-3, 3)"
    assert all(r["verifiers"] == {"math": 1.0} for r in rows)


def test_math_field_mapping(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "1+1?", "final": "2"}, {"prompt": "2+2?", "final": "4"}])
    task = MATH(path=str(path), fields={"problem": "prompt", "answer": "final"}, heldout_fraction=0.0)
    assert [r["answer"] for r in task.rows("train")] == ["2", "4"]
    assert task.rows("train")[0]["prompt"][0]["content"] == DEFAULT_TEMPLATE.replace("{question}", "1+1?")


@pytest.mark.parametrize("records, message", [
    ([{"problem": "p"}], r"record 1: needs an 'answer' or a 'solution'"),
    ([{"problem": "p", "answer": "1"}, {"problem": "q", "solution": "it is 3"}],
     r"record 2: no 'answer' and no complete \\boxed"),
    ([{"problem": "p", "solution": "so \\boxed{3"}], r"no complete \\boxed"),
    ([{"problem": "p", "solution": "so \\boxed{ }"}], r"is empty"),
    ([{"question": "p", "answer": "1"}], r"record 1 is missing \['problem'\]"),
    (["3"], r"expected a JSON object, got int"),
])
def test_math_bad_input_errors(tmp_path, records, message):
    path = write_jsonl(tmp_path / "m.jsonl", records)
    with pytest.raises(UserError, match=message):
        MATH(path=str(path), heldout_fraction=0.0).rows("train")


def test_math_reads_json_lists_too(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps([{"problem": "p", "answer": "1"}]))
    assert MATH(path=str(path), heldout_fraction=0.0).rows("train")[0]["answer"] == "1"
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(UserError, match="not valid JSON"):
        MATH(path=str(bad)).rows("train")


@pytest.mark.parametrize("text, expected", [
    ("\\boxed{1} then \\boxed{\\frac{a}{b}}", "\\frac{a}{b}"),
    ("\\fbox{7}", "7"),
    ("\\boxed{2} and \\fbox{3}", "3"),
    ("no box", None),
    ("\\boxed{unclosed", None),
    ("\\boxed{2} so $\\boxed 5$.", "5"),  # MATH's \boxed 5: no braces
    ("\\boxed {6}", "6"),
    ("\\boxedx{1}", None),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_gsm8k_answer_must_be_a_number(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "so #### banana"}) + "\n")
    with pytest.raises(UserError, match="the answer after '####' is not a number: 'banana'"):
        GSM8K(path=str(path), heldout_fraction=0.0).rows("train")
    path.write_text(json.dumps({"question": "q", "answer": "#### -1,234."}) + "\n"
                    + json.dumps({"question": "r", "answer": "#### 3/4"}) + "\n")
    assert [r["answer"] for r in GSM8K(path=str(path), heldout_fraction=0.0).rows("train")] == ["-1234", "3/4"]
