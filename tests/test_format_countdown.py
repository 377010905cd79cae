"""The format verifier's policy, the countdown task (generation, splits) and its checker."""

from __future__ import annotations

import json
import time
from fractions import Fraction

import pytest

from grpo.cli import main
from grpo.errors import UserError
from grpo.rewards import RewardRunner
from tasks.countdown import Countdown
from verifiers.countdown import CountdownVerifier, evaluate, extract_expression, literals, parse_expression
from verifiers.format import FormatVerifier
from conftest import tiny_run_config

GOOD = "<think>3 + 4 is 7</think>\n<answer>7</answer>"


def fmt(text, **kw):
    return FormatVerifier(**kw)([text])[0]


# ------------------------------------------------------------------------- format
@pytest.mark.parametrize("text, reason", [
    ("<think>a</think><answer>  </answer>", "empty <answer> block"),
    ("<think>a</think><answer>\u200b\u2060</answer>", "empty <answer> block"),  # zero-width only
    ("<think>a</think><answer>1</answer><answer>2</answer>", "2 <answer> blocks (want exactly 1)"),
    ("<think>a<answer>1</answer></think>", "<answer> nested inside <think>"),
    ("<answer>1</answer><think>a</think>", "<answer> before <think>"),
    ("<think>a</think><answer>1", "unclosed <answer>"),
    ("<think>a</think></answer><answer>1</answer>", "stray </answer>"),
    ("Sure! <think>a</think><answer>1</answer>", "text outside the <think>/<answer> blocks"),
    ("<think>a</think><answer>1</answer> and more", "text outside"),
    ("<answer>1</answer>", "no <think>...</think> block"),
    ("<think></think><answer>1</answer>", "empty <think> block"),
    ("<think>a</think><think>b</think><answer>1</answer>", "2 <think> blocks"),
    ("The answer is 7.", "no <answer>...</answer> block"),
    ("", "no <answer>"),
])
def test_format_rejects_gameable_layouts_with_a_reason(text, reason):
    score = fmt(text)
    assert score.reward == 0.0
    assert reason in score.reason and "\n" not in score.reason


def test_format_accepts_the_layout_and_surrounding_whitespace():
    assert fmt(GOOD) == fmt("\n  " + GOOD + "\n\n") == fmt(GOOD, partial_credit=True)
    assert fmt(GOOD).reward == 1.0 and fmt(GOOD).reason == "ok"


def test_format_options():
    assert fmt("<answer>7</answer>", require_think=False).reward == 1.0
    # an optional think block may be empty (thinking switched off) but may not come after the answer
    assert fmt("<think></think><answer>7</answer>", require_think=False).reward == 1.0
    assert fmt("<answer>7</answer><think>x</think>", require_think=False).reward == 0.0
    assert fmt("Let me see. <think>a</think> so <answer>7</answer> done", allow_outside=True).reward == 1.0
    custom = "<reasoning>r</reasoning><final>7</final>"
    assert fmt(custom, think_tag="reasoning", answer_tag="final").reward == 1.0
    assert fmt(GOOD, think_tag="reasoning", answer_tag="final").reward == 0.0
    with pytest.raises(UserError, match="tag names"):
        FormatVerifier(answer_tag="a>b")
    with pytest.raises(UserError, match="style"):
        FormatVerifier(style="xml")
    with pytest.raises(UserError, match="partial_credit"):
        FormatVerifier(style="boxed", partial_credit=True)


def test_format_partial_credit_shares():
    # checks: answer block, think block, structure, nothing outside -> quarters
    assert fmt("<answer>7</answer>", partial_credit=True).reward == 0.75
    assert fmt("x <think>a</think><answer>7</answer>", partial_credit=True).reward == 0.75
    assert fmt("<think>a</think><answer></answer>", partial_credit=True).reward == 0.75
    assert fmt("<think>a</think>", partial_credit=True).reward == 0.25  # think only: no structure credit
    assert fmt("", partial_credit=True).reward == 0.0  # empty text earns nothing
    assert fmt("just text", partial_credit=True).reward == 0.0
    # without think required: answer, structure, outside -> thirds
    assert fmt("x <answer>7</answer>", partial_credit=True, require_think=False).reward == pytest.approx(2 / 3)


@pytest.mark.parametrize("text, reward, reason", [
    ("so the answer is \\boxed{42}.", 1.0, "ok"),
    ("\\boxed{\\frac{1}{2}}", 1.0, "ok"),
    ("no box here", 0.0, "no \\boxed{}"),
    ("\\boxed{1} or \\boxed{2}", 0.0, "2 \\boxed{} found"),
    ("\\boxed{ }", 0.0, "empty \\boxed{}"),
    ("\\boxed{\\text{ }}", 0.0, "empty \\boxed{}"),        # nothing a reader sees
    ("\\boxed{\\, \\quad ~}", 0.0, "empty \\boxed{}"),
    ("\\boxed{\u200b}", 0.0, "empty \\boxed{}"),
    ("\\boxed{\\phantom{5}}", 0.0, "empty \\boxed{}"),
    ("\\boxed{\\hspace{1cm}}", 0.0, "empty \\boxed{}"),
    ("\\boxed{\\left.\\right.}", 0.0, "empty \\boxed{}"),
    ("\\boxed{\\texttt{ }}", 0.0, "empty \\boxed{}"),
    ("\\boxed\t{42}", 1.0, "ok"),
    ("\\boxed {42}", 1.0, "ok"),                           # as the math verifier reads it
    ("\\boxed{\\text{yes}}", 1.0, "ok"),
    ("\\boxed{\\frac{1}{2}", 0.0, "unbalanced"),
    ("\\boxed 5", 0.0, "not followed by {"),
])
def test_format_boxed_style(text, reward, reason):
    score = fmt(text, style="boxed")
    assert score.reward == reward and reason in score.reason


def test_format_is_linear_on_adversarial_input():
    nasty = ["<think>" * 50_000, "<answer>" + "</think>" * 50_000, "<" * 200_000, "\\boxed{" * 100_000,
             "<think>a</think><answer>" + "x" * 500_000 + "</answer>"]
    start = time.perf_counter()
    scores = FormatVerifier()(nasty) + FormatVerifier(style="boxed")(nasty)
    assert time.perf_counter() - start < 2.0
    assert [s.reward for s in scores] == [0, 0, 0, 0, 1, 0, 0, 0, 0, 0]


def test_format_is_a_shaping_reward():
    assert FormatVerifier.correctness is False and FormatVerifier.fields == ()


# ----------------------------------------------------------------- countdown task
def test_countdown_instances_are_solvable_and_follow_the_ranges():
    task = Countdown(count=[3, 4], number_range=[1, 100], target_range=[1, 100], train_size=300, heldout_size=60)
    checker = CountdownVerifier()
    for row in task.rows("train") + task.rows("heldout"):
        assert 3 <= len(row["numbers"]) <= 4 and all(1 <= n <= 100 for n in row["numbers"])
        assert 1 <= row["target"] <= 100 and row["target"] not in row["numbers"]
        assert str(row["target"]) in row["prompt"][0]["content"]
        assert checker.check(f"<answer>{row['solution']}</answer>", row["numbers"], row["target"]).reward == 1.0
        assert row["verifiers"] == {"countdown": 1.0} and row["use_all"] is False


def test_countdown_use_all_solutions_use_every_number():
    task = Countdown(count=4, number_range=[1, 12], target_range=[1, 200], use_all=True, train_size=100)
    checker = CountdownVerifier()
    for row in task.rows("train"):
        tree = parse_expression(row["solution"])
        assert sorted(literals(tree)) == sorted(row["numbers"]) and evaluate(tree) == row["target"]
        assert checker.check(row["solution"], row["numbers"], row["target"], use_all=True).reward == 1.0
        assert "exactly once" in row["prompt"][0]["content"] and row["use_all"] is True


def test_countdown_splits_disjoint_and_deterministic():
    task = Countdown(train_size=500, heldout_size=100, seed=3)
    key = lambda r: (tuple(sorted(r["numbers"])), r["target"])
    train, held = task.rows("train"), task.rows("heldout")
    assert len(train) == 500 and len(held) == 100
    assert {key(r) for r in train}.isdisjoint({key(r) for r in held})
    assert len({key(r) for r in train}) == 500  # no duplicates within a split
    assert train == Countdown(train_size=500, heldout_size=100, seed=3).rows("train")
    assert train != Countdown(train_size=500, heldout_size=100, seed=4).rows("train")
    assert all(task.split_of(r["numbers"], r["target"]) == "heldout" for r in held)


def test_countdown_small_space_is_capped_not_hung():
    task = Countdown(count=2, number_range=[1, 3], target_range=[1, 9], train_size=1000, heldout_size=10)
    rows = task.rows("train")
    assert 0 < len(rows) < 20  # only a handful of distinct (pair, target) exist
    with pytest.raises(UserError, match="no solvable instance"):
        Countdown(count=2, number_range=[1, 3], target_range=[50, 60]).rows("train")


@pytest.mark.parametrize("kwargs, message", [
    ({"count": 1}, "count must be within 2..8"),
    ({"count": [4, 3]}, "count must be an integer or"),
    ({"number_range": [0, 5]}, "positive"),
    ({"operations": "+^"}, "operations"),
    ({"heldout_fraction": 0}, "heldout_fraction"),
    ({"template": "no placeholders"}, "{numbers}"),
])
def test_countdown_bad_args(kwargs, message):
    with pytest.raises(UserError, match=message.replace("{", r"\{").replace("}", r"\}")):
        Countdown(**kwargs)


# -------------------------------------------------------------- countdown checker
def check(text, numbers=(3, 5, 7, 8), target=24, use_all=False):
    return CountdownVerifier().check(text, list(numbers), target, use_all)


@pytest.mark.parametrize("text", [
    "<think>try 3 * 8</think><answer>3 * 8</answer>",
    "<answer>(8) * (3)</answer>",
    "<answer>3 * 8 = 24</answer>",
    "<answer>24 = 8 * 3</answer>",
    "<answer>$3 \\times 8$</answer>",
    "Let me think.\n3 × 8 = 24",
    "I get \\boxed{8 \\cdot 3}",
    "The expression is:\n8 * 3",
    "<answer>7 * 5 - 8 - 3</answer>",
    "<answer>-(5 - 8) * 7 + 3</answer>",
])
def test_countdown_checker_accepts(text):
    score = check(text)
    assert score.reward == 1.0, score.reason


def test_countdown_exact_fractions_and_use_all():
    # 8 / (3 - 8/3) = 24 only in exact arithmetic; floats give 23.99999999999999
    assert check("<answer>8 / (3 - 8 / 3)</answer>", numbers=(3, 3, 8, 8), use_all=True).reward == 1.0
    assert check("<answer>8 * 3 + 7 - 5</answer>", target=26, use_all=True).reward == 1.0
    assert evaluate(parse_expression("1/3 + 1/6")) == Fraction(1, 2)


@pytest.mark.parametrize("text, numbers, use_all, reason", [
    ("<answer>3 * 7</answer>", (3, 5, 7, 8), False, "value 21 != 24"),
    ("<answer>8 / 3</answer>", (3, 5, 7, 8), False, "value 8/3 != 24"),
    ("<answer>8 * 3 * 1</answer>", (3, 5, 7, 8), False, "used 1, which is not given"),
    ("<answer>7 * 7 - 25</answer>", (3, 5, 7, 8), False, "used 7 twice (given once)"),
    ("<answer>3 + 3 + 3 + 15</answer>", (3, 3, 15), False, "used 3 three times (given twice)"),
    ("<answer>3 * 8</answer>", (3, 5, 7, 8), True, "did not use 5, 7"),
    ("<answer>8 / (5 - 5)</answer>", (5, 5, 8), False, "division by zero"),
    ("<answer>8 / (7 - 7) * 0</answer>", (7, 7, 8, 0), False, "division by zero"),
    ("<answer></answer>", (3, 8), False, "empty expression"),
    ("", (3, 8), False, "no expression found"),
    ("<answer>3.0 * 8</answer>", (3, 8), False, "not an arithmetic expression"),
    ("<answer>3 ** 8</answer>", (3, 8), False, "only + - * / are allowed"),
    ("<answer>8 // 3</answer>", (3, 8), False, "only + - * / are allowed"),
    ("<answer>3(8)</answer>", (3, 8), False, "Call is not allowed"),
    ("<answer>(3 * 8</answer>", (3, 8), False, "not a well-formed expression"),
    ("<answer>03 * 8</answer>", (3, 8), False, "not a well-formed expression"),
    ("<answer>three times eight</answer>", (3, 8), False, "not an arithmetic expression"),
])
def test_countdown_checker_rejects_with_reason(text, numbers, use_all, reason):
    score = check(text, numbers=numbers, use_all=use_all)
    assert score.reward == 0.0 and reason in score.reason, score.reason


@pytest.mark.parametrize("text", [
    "<answer>__import__('os').system('echo pwned')</answer>",
    "<answer>9**9**9</answer>",
    "<answer>9 ** 9 ** 9 ** 9</answer>",
    "<answer>(lambda: 24)()</answer>",
    "<answer>[24][0]</answer>",
    "<answer>" + "(" * 10_000 + "24" + ")" * 10_000 + "</answer>",
    "<answer>" + "-" * 150 + "24</answer>",
    "<answer>" + "1+" * 500_000 + "1</answer>",
    "3 * 8 " * 300_000,
    "=" * 1_000_000,
    "\\boxed{" * 100_000,
    "<answer>" * 100_000,
])
def test_countdown_unsafe_or_huge_input_scores_zero_quickly(text):
    start = time.perf_counter()
    score = check(text, numbers=(3, 8, 24))
    assert time.perf_counter() - start < 1.0
    assert score.reward == 0.0


def test_parse_expression_depth_cap():
    assert evaluate(parse_expression("(" * 20 + "1" + ")" * 20)) == 1  # parentheses add no tree depth
    with pytest.raises(Exception, match="nested deeper than 3"):
        parse_expression("1 + (2 * (3 - (4 / 5)))", max_depth=3)
    with pytest.raises(Exception, match="nested deeper"):
        parse_expression("-" * 40 + "1")


def test_extract_expression_strategies():
    assert extract_expression("<answer>1+2</answer> then <answer>3*4</answer>") == "3*4"
    assert extract_expression("work\n<answer> 3 * 4 = 12 </answer>") == "3 * 4"
    assert extract_expression("so \\boxed{(1+2)*3}") == "(1+2)*3"
    assert extract_expression("first 1+1 = 2, then we get 6 * 4 = 24") == "6 * 4"
    assert extract_expression("no equation\n\n 5 * 5 \n") == "5 * 5"
    assert extract_expression("   ") is None
    assert extract_expression("I think it is (19 * 2).\n") == "(19 * 2)"
    assert extract_expression("I think it is thirty") == "I think it is thirty"  # kept whole for the reason


def test_countdown_verifier_batches_and_missing_target_is_not_applicable():
    v = CountdownVerifier()
    scores = v(["<answer>3*8</answer>", "<answer>3+8</answer>"], numbers=[[3, 8], [3, 8]], target=[24, 24])
    assert [s.reward for s in scores] == [1.0, 0.0]
    assert v(["3*8"], numbers=[[3, 8]], target=["n/a"])[0].reward is None
    assert CountdownVerifier.correctness is True
    with pytest.raises(UserError):
        CountdownVerifier(max_expression_chars=0)


def test_countdown_rows_plug_into_reward_runner():
    rows = Countdown(train_size=4, verifiers={"countdown": 1.0, "format": 0.5}).rows("train")
    runner = RewardRunner({"format": {"require_think": False}}, workers=1)
    runner.check_rows(rows, "test")
    completions = [f"<answer>{r['solution']}</answer>" for r in rows]
    batch = runner.score(rows, completions)
    assert batch.correct == [True] * 4 and batch.total == [1.5] * 4


def test_two_step_train_on_countdown(tiny_model_dir, toy_plugin, tmp_path):
    run_dir = tmp_path / "run"
    empty = tmp_path / "empty.yaml"
    empty.write_text("# settings come from overrides\n")
    task_args = ("{count: 3, number_range: [1, 9], target_range: [1, 30], train_size: 16, heldout_size: 4, "
                 "verifiers: {countdown: 1.0, format: 0.1}}")  # as configs/countdown.yaml: format_args apply
    args = tiny_run_config(tiny_model_dir, run_dir, toy_plugin, **{
        "task.name": "countdown", "task.args": task_args,
        "task.verifier_args": "{format: {require_think: false, allow_outside: true, partial_credit: true}}",
        "rollout.max_new_tokens": 12})
    assert main(["train", "--no-progress", str(empty), *args]) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "reward/mean" in r]
    assert [r["step"] for r in train] == [1, 2]
    assert "reward/countdown" in train[0] and train[0]["errors/countdown"] == 0
    samples = [json.loads(line) for f in sorted((run_dir / "eval").glob("samples-step*.jsonl"))
               for line in f.read_text().splitlines()]
    assert samples and all("countdown" in s["reasons"] for s in samples)
