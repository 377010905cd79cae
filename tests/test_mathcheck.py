"""The ``math`` verifier: extraction, normalisation, parsing, equivalence, hedging, guards, CLI."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import threading
import time

import pytest

from grpo.errors import UserError
from grpo.registry import VERIFIERS
from verifiers.base import Score
from verifiers.mathcheck import (FALLBACKS, MathVerifier, ParseError, check, equivalent, extract_answer,
                                 extract_boxed, normalize, parse)


# ------------------------------------------------------------------------ extraction
def test_extract_boxed_nested_multiple_and_unclosed():
    assert extract_boxed(r"so \boxed{\frac{1}{2}} and \fbox{3}") == [r"\frac{1}{2}", "3"]
    assert extract_boxed(r"\boxed{\{1, 2\}}") == [r"\{1, 2\}"]  # escaped braces do not nest
    assert extract_boxed(r"\boxed 5 is it") == ["5"]
    assert extract_boxed(r"\boxed{1} then \boxed{2") == ["1"]  # unclosed box ends the scan
    assert extract_boxed(r"\boxedx{3}") == []


@pytest.mark.parametrize("text, expected", [
    (r"First \boxed{3}. The answer is 4.", ["3"]),                 # boxed wins over "answer is"
    ("<answer> 42 </answer> The answer is 7", ["42"]),            # tag before "answer is"
    ("<answer>1</answer><answer>2</answer>", ["2"]),              # the last tag
    ("The answer is 7.", ["7"]),
    ("the answer is 5, because 2+3=5.", ["5"]),                   # prose continuation cut
    ("The answer is 3 or 4.", ["3 or 4"]),                        # kept whole for hedging
    ("The answer is x = 1 or x = 2.", ["x = 1 or x = 2"]),
    ("The answer is 12 and I am sure.", ["12"]),                  # "and" + prose ends the clause
    ("Final answer: $\\frac{3}{4}$", ["$\\frac{3}{4}$"]),
    ("blah\n#### 1,234", ["1,234"]),
    ("So $y = 2x + 1$.", ["y = 2x + 1"]),                         # final_math
    ("Let $x$ be the count; then x = 5 apples", ["5"]),           # math not at the end: last number
    ("7 + 5 = 12", ["12"]),
    ("It costs 1,250 dollars", ["1,250"]),
    ("x-2", ["2"]),                                               # a minus glued to a letter is an operator
    ("we get -3", ["-3"]),
    ("ratio \\frac{3}{4} here", ["\\frac{3}{4}"]),
    ("no digits here", []),
])
def test_extract_answer_order(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_fallbacks_option():
    assert extract_answer("The answer is 7, not 8", fallbacks=["last_number"]) == ["8"]
    assert extract_answer("The answer is 7", fallbacks=("boxed",)) == []
    with pytest.raises(UserError, match="Did you mean 'boxed'"):
        extract_answer("x", fallbacks=["boxd"])
    with pytest.raises(UserError, match="empty"):
        extract_answer("x", fallbacks=[])


# --------------------------------------------------------------------- normalisation
@pytest.mark.parametrize("raw, expected", [
    (r"$\$1{,}000.$", "1000"),
    (r"5\text{ cm}^2", "5"),
    (r"\left( 1, \dfrac{1}{2} \right)", r"(1, \frac{1}{2})"),
    ("12 apples", "12"),
    ("12 (twelve)", "12"),
    ("60 km/h", "60"),
    ("5cm", "5"),
    ("3 \\pi", "3 \\pi"),               # pi is not a unit
    ("2 sin x", "2 sin x"),
    ("90^\\circ", "90"),
    ("50\\%", "50%"),
    ("20 percent", "20%"),
    ("approximately 3.14", "3.14"),
    ("1,000,000", "1000000"),
    ("1, 2, 3", "1, 2, 3"),             # a list is not a thousands separator
    (r"\boxed{\boxed{5}}", "5"),
    ("\u2212 3 \u00d7 2", "- 3 \\times 2"),
])
def test_normalize(raw, expected):
    assert normalize(raw) == expected


# --------------------------------------------------------------------------- parsing
def test_parse_shapes():
    assert parse("2 1/2") == parse(r"2\frac{1}{2}") == parse("2\\frac12")  # mixed numbers
    assert parse("(1, 2)").kind == "tuple"
    assert parse("[1, 2)").kind == "interval"
    assert parse(r"\{1, 2\}").kind == "set"
    assert parse("3 or 4").kind == "list"
    assert parse("x = 3").kind == "eq"
    assert parse("1 < x \\le 2").kind == "rel"
    assert parse(r"\begin{pmatrix}1&2\\3&4\end{pmatrix}").value == (2, 2)
    assert parse("1.5e3").value[1] is True  # written with a decimal/exponent: tolerant comparison
    assert parse("1500").value[1] is False


@pytest.mark.parametrize("bad", ["", "1 +", "(1, 2", r"\unknowncmd{3}", "1e99999", "x = 1 < 2",
                                 "(" * 31 + "1" + ")" * 31, "-" * 100 + "1"])
def test_parse_errors(bad):
    with pytest.raises(ParseError):
        parse(bad)


# ----------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("pred, ref", [
    ("7", "7"), ("7.0", "7"), (r"\frac{1}{2}", "0.5"), ("2/4", r"\frac12"), ("0.333333", r"\frac13"),
    (r"\frac{10}{4}", r"2\frac{1}{2}"), ("1.5e3", "1500"), (r"1.5\times10^{3}", "1500"),
    (r"50\%", "50"), (r"50\%", "0.5"), ("90^\\circ", "90"), (r"\sqrt{8}", r"2\sqrt{2}"),
    (r"\sqrt[3]{-8}", "-2"), ("8^{1/3}", "2"), (r"\frac{1}{\sqrt2}", r"\frac{\sqrt2}{2}"),
    ("(x+1)^2", "x^2+2x+1"), (r"\sin^2 x + \cos^2 x", "1"), (r"\sqrt{x^2}", "x"), ("2xy", "2yx"),
    (r"\log_2 8", "3"), (r"\binom{5}{2}", "10"), ("5!", "120"), ("i^2", "-1"), (r"e^{i\pi}", "-1"),
    ("x=3", "3"), ("3", "x = 3"), ("y=2x+3", "2x-y+3=0"), ("2x+2y=2", "x+y=1"), ("f(x)=2x", "2x"),
    ("x<3", r"(-\infty,3)"), (r"x \ge 2", r"[2, \infty)"), ("1<x<3", "(1,3)"), ("3 > x", "x < 3"),
    (r"\mathbb{R}", r"(-\infty,\infty)"), (r"x \in [1,2]", "[1,2]"),
    (r"(1, \infty) \cup (-\infty, 0)", r"(-\infty,0)\cup(1,\infty)"),
    (r"\{3,1,2\}", r"\{1,2,3\}"), ("2, 1", "1, 2"), (r"\{3\}", "3"), (r"\pm 3", "3, -3"),
    (r"\frac{1\pm\sqrt5}{2}", r"\frac{1-\sqrt5}{2}, \frac{1+\sqrt5}{2}"), ("x = 1 or x = 2", r"\{1, 2\}"),
    ("(1, 2)", "(1,2)"), ("(3, -1)", "3, -1"),
    (r"\begin{bmatrix}1&2\\3&4\end{bmatrix}", r"\begin{pmatrix}1&2\\3&4\end{pmatrix}"),
    (r"\text{(C)}", "C"), ("(B)", r"\text{B}"), (r"\text{monday}", "Monday"), ("5 cm", "5"),
    (r"\$18", "18"), ("0.1+0.2", "0.3"), (r"\infty", r"\infty"),
])
def test_equivalent(pred, ref):
    assert equivalent(pred, ref)


@pytest.mark.parametrize("pred, ref", [
    ("7", "8"), ("-3", "3"), ("1000000", "1000001"), ("0.3333", r"\frac13"), ("3.14", r"\pi"),
    (r"\frac{1393}{985}", r"\sqrt2"), (r"\sqrt3", r"\sqrt2"), ("x+1", "x-1"), ("(a+b)^2", "a^2+b^2"),
    ("3x", "3y"), ("x^2", "x^3"), ("x=2", "x=3"), ("y=x^2", "y=x^3"), ("x=3", "y=3"), ("x<3", "x>3"),
    ("[1,3]", "[1,3)"), ("(0, 1]", "(0,1)"), ("(1,2)", "(2,1)"), (r"\{1,2\}", r"\{1,2,3\}"),
    ("(1,2,3)", "(1,3,2)"), (r"40\%", r"50\%"), ("B", "C"), (r"\text{Tuesday}", r"\text{Monday}"),
    ("no", "on"), (r"-\infty", r"\infty"), ("1/0", "2/0"), ("3-4i", "3+4i"), (r"\sin x", r"\cos x"),
    (r"\begin{pmatrix}1&2\\4&3\end{pmatrix}", r"\begin{pmatrix}1&2\\3&4\end{pmatrix}"),
])
def test_not_equivalent(pred, ref):
    assert not equivalent(pred, ref)


def test_tolerance_only_when_a_decimal_is_written():
    # rel_tol = 1e-6: 0.333333 vs 1/3 differ by exactly 1e-6 relative (inclusive bound).
    assert equivalent("0.333333", r"\frac{1}{3}")
    assert not equivalent("0.33333", r"\frac{1}{3}")
    assert equivalent("0.3333", r"\frac{1}{3}", rel_tol=1e-3)
    assert equivalent("3.14159265", r"\pi")                        # 1e-9 relative: within 1e-6
    assert not equivalent("1267650600228229401496703205377", "2^{100}")  # exact when no decimal
    assert equivalent("1267650600228229401496703205376", "2^{100}")
    assert not equivalent("2^{1000000}", "2^{1000001}")            # too big for exact: numeric, still apart
    assert check(r"\boxed{0.3333}", "1/3", rel_tol=1e-3).reward == 1.0


# --------------------------------------------------------------------- scoring/hedging
@pytest.mark.parametrize("completion, answer, reward, reason", [
    ("The answer is 7.", "7", 1.0, "correct"),
    ("7 + 5 = 12", "12", 1.0, "correct"),
    ("The answer is **12**.", "12", 1.0, "correct"),                     # markdown bold
    ("The answer is 12!", "12", 1.0, "correct"),                         # an exclamation...
    ("The answer is 4! = 24", "24", 1.0, "correct"),                     # ...or a factorial
    (r"\boxed{12}", 12, 1.0, "correct"),
    (r"\boxed{7}", "Solution ... so \\boxed{7}.", 1.0, "correct"),      # reference with a box
    ("... #### 72", "Janet has ... #### 72", 1.0, "correct"),             # GSM8K reference
    (r"\boxed{3} or \boxed{4}", "3", 0.0, "hedging: 2 different boxed answers"),
    (r"\boxed{3} again \boxed{3.0}", "3", 1.0, "correct"),                # same value twice
    (r"\boxed{1} and \boxed{2}", "1, 2", 1.0, "correct"),                 # one box per solution
    ("The answer is 3 or 4.", "3", 0.0, "hedging: several values"),
    (r"\boxed{\pm 3}", "3", 0.0, "hedging: several values"),
    (r"\boxed{x = \pm 3}", "3", 0.0, "hedging: several values"),
    (r"\boxed{3, 4}", "3", 0.0, "hedging: several values"),
    (r"\boxed{\{3, 4\}}", "3", 0.0, "hedging: several values"),
    (r"\boxed{3, 4}", "3, 4", 1.0, "correct"),
    ("".join(f"\\boxed{{{i}}}" for i in range(9)), "1", 0.0, "hedging: 9 different boxed answers"),
    ("I don't know.", "5", 0.0, "no answer found"),
    (r"\boxed{}", "5", 0.0, "no answer found"),
    (r"\boxed{8}", "7", 0.0, "wrong: got '8', expected '7'"),
    (r"\boxed{@@}", "7", 0.0, "wrong (compared as text, answer not parsed)"),
    (r"\boxed{7}", None, None, "no reference answer"),
])
def test_check_rewards_and_reasons(completion, answer, reward, reason):
    score = check(completion, answer)
    assert score.reward == reward
    assert score.reason.startswith(reason), score.reason


# ------------------------------------------- audit (session 15): each failed before its fix
@pytest.mark.parametrize("completion, answer, reward", [
    # A row break "\\\\" followed by a space was read as the spacing command "\\ ".
    (r"\boxed{\begin{pmatrix}1\\-2\end{pmatrix}}", r"\begin{pmatrix} 1 \\ -2 \end{pmatrix}", 1.0),
    (r"\boxed{\begin{pmatrix} 0.5 \\ 0 \end{pmatrix}}", r"\begin{pmatrix} \frac{1}{2} \\ 0 \end{pmatrix}", 1.0),
    (r"\boxed{\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}}", r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", 1.0),
    # Two percentages compare as written (a factor of 100 is the common mistake).
    (r"\boxed{0.12\%}", r"12\%", 0.0), (r"\boxed{1200\%}", r"12\%", 0.0),
    (r"\boxed{5\%}", r"0.05\%", 0.0), (r"\boxed{12\%}", r"12\%", 1.0),
    (r"\boxed{0.12}", r"12\%", 1.0), (r"\boxed{12}", r"12\%", 1.0),
    # A written ".00" is not a licence to be off by one on a large number.
    (r"\boxed{1000001.0}", "1000000", 0.0), (r"\boxed{\$1,000,001.00}", "1000000", 0.0),
    ("#### 2500001.00", "2500000", 0.0), ("The answer is $1,234,568.00", "1234567", 0.0),
    (r"\boxed{1000000.00}", "1000000", 1.0), (r"\boxed{0.333333}", r"\frac{1}{3}", 1.0),
    # "the answer is <prose>" leaves the answer to the number that follows.
    ("3 * 4 = 12. Let me check that the answer is correct.\nSo she has 12 apples.", "12", 1.0),
    ("Answer: Let's compute step by step. 3 * 4 = 12.\nSo she has 12 apples.", "12", 1.0),
    ("The final answer is the sum of both.\nTotal = 5 + 7 = 12.", "12", 1.0),
    ("The answer is (B). Because 3 > 2.", "B", 1.0),
    # An unbracketed function argument runs over what is glued to it.
    (r"\boxed{\sin(2x)}", r"\sin 2x", 1.0), (r"\boxed{2\sin x\cos x}", r"\sin 2x", 1.0),
    (r"\boxed{\sin 2x}", r"x\sin 2", 0.0), (r"\boxed{\cos(2\theta)}", r"\cos 2\theta", 1.0),
    (r"\boxed{\sin x \cos x}", r"\frac{\sin 2x}{2}", 1.0),
    # Variables are sampled beyond (0.35, 1.65) too, still positive.
    (r"\boxed{2-x}", "|x-2|", 0.0), (r"\boxed{5-x}", "|x-5|", 0.0),
    (r"\boxed{2-x}", r"\sqrt{x^2-4x+4}", 0.0), (r"\boxed{\frac{\pi}{2} - x}", r"\arccos(\sin x)", 0.0),
    (r"\boxed{x}", r"\sqrt{x^2}", 1.0), (r"\boxed{\sqrt{1-x^2}}", r"\cos(\arcsin x)", 1.0),
    # \mathrm units are units; scale words are factors; "squared" changes the number.
    (r"\boxed{5\mathrm{cm}}", "5", 1.0), (r"\boxed{6 \, \mathrm{cm}^2}", "6", 1.0),
    (r"\boxed{6\mathrm{~cm}^2}", "6", 1.0), (r"\boxed{\mathrm{e}}", "e", 1.0),
    (r"\boxed{1 million}", "1", 0.0), (r"\boxed{10 \text{ million}}", "10", 0.0),
    (r"\boxed{2 \text{ dozen}}", "24", 1.0), (r"\boxed{3 squared}", "3", 0.0),
    ("The answer is 1.5 million dollars.", "1500000", 1.0), (r"\boxed{3 thousand}", "3000", 1.0),
    # The same box again and again is not hedging.
    (r"\boxed{3} " * 9, "3", 1.0),
    # Second audit (regressions of the first fixes): a lone letter or a word answer is no prose...
    ("The answer is A because 3 > 2.", "A", 1.0), ("The answer is (A), since 3 > 2.", "(A)", 1.0),
    ("Answer: A\nExplanation: option A gives 12.", "A", 1.0),
    ("The answer is undefined, since x = 2 makes the denominator 0.", r"\text{undefined}", 1.0),
    ("The answer is 12. To check that the answer is right, note 12 * 3 = 36.", "36", 0.0),  # the earlier clause
    # ... "N times / more / less / cm squared" keep their number; "3 squared" is not 3 ...
    ("The answer is 3 times.", "3", 1.0), ("The answer is 5 more apples.", "5", 1.0),
    ("The answer is 25 meters squared.", "25", 1.0), (r"\boxed{25\text{ units squared}}", "25", 1.0),
    ("The answer is 1.5 million.", "1500001", 0.0), (r"\boxed{20\mathrm{m}}", "20", 1.0),
    (r"\boxed{\begin{pmatrix}1\\[4pt]2\end{pmatrix}}", r"\begin{pmatrix}1\\2\end{pmatrix}", 1.0),
    # ... cut-off decimals and float reprs are right within their last place or the tolerance ...
    (r"\boxed{0.666666}", r"\frac{2}{3}", 1.0), (r"\boxed{0.6666666666666666}", r"\frac23", 1.0),
    (r"\boxed{2.0000000000000004}", "2", 1.0), (r"\boxed{\frac{2}{3}}", "0.6666666666666666", 1.0),
    (r"\boxed{1000000.4}", "1000000", 0.0),
    # ... and a function's argument ends after a symbol: these are products.
    (r"\boxed{\cos x e^{\sin x}}", r"e^{\sin x}\cos x", 1.0), (r"\boxed{\sin x e^x}", r"e^x\sin x", 1.0),
    (r"\boxed{\sin x \, y}", r"y\sin x", 1.0), (r"\boxed{\ln |x| C}", r"C\ln|x|", 1.0),
])
def test_audit_grading_cases(completion, answer, reward):
    score = check(completion, answer)
    assert score.reward == reward, score.reason


# ---------------------------------------------------------------------------- guards
ADVERSARIAL = [
    r"\boxed{9^{9^{9}}}",
    r"\boxed{(10^9)!}",
    r"\boxed{" + "(" * 3000 + "1" + ")" * 3000 + "}",
    r"\boxed{" + "(" * 400 + "1" + ")" * 400 + "}",
    r"\boxed{" + "{" * 400 + "1" + "}" * 400 + "}",
    r"\boxed{10^{10^{10}}}",
    r"\boxed{2^{2^{2^{2^{2^{2}}}}}}",
    r"\boxed{e^{e^{e^{e^{10}}}}}",
    r"\boxed{\sin(10^{100})}",
    r"\boxed{(2^{100000})!}",
    r"\boxed{\binom{10^{9}}{5 \cdot 10^{8}}}",
    r"\boxed{1e999999}",
    r"\boxed{1" + r"\pm 1" * 40 + "}",
    r"\boxed{" + "-" * 500 + "1}",
    r"\boxed{" + "2^" * 300 + "2}",
    r"\boxed{" + r"\sqrt{" * 25 + "2" + "}" * 25 + "}",
    r"\boxed{" + ",".join(f"x^{{{i}}}" for i in range(200)) + "}",
    r"\boxed{" + "x" * 999 + "}",
    "1" * 150_000,
    "x" * 10_000_000,
    "<answer>" * 50_000,
    "The answer is " * 20_000,
    r"\boxed{" * 50_000,
    "$" * 100_000 + "1",
]


def _timed_in_thread(fn):
    """Run fn in a non-main thread (no signal-based timeouts possible there); return
    (result, CPU seconds of that thread, wall seconds)."""
    out = {}

    def run():
        cpu, wall = time.thread_time(), time.perf_counter()
        out["result"] = fn()
        out["cpu"], out["wall"] = time.thread_time() - cpu, time.perf_counter() - wall

    t = threading.Thread(target=run)
    t.start()
    t.join(timeout=30)
    assert not t.is_alive(), "the check did not return"
    return out["result"], out["cpu"], out["wall"]


@pytest.mark.parametrize("completion", ADVERSARIAL, ids=lambda c: c[:30])
def test_adversarial_inputs_score_zero_fast_in_a_thread(completion):
    check(r"\boxed{2}", "1")  # mpmath import and context creation are one-off
    score, cpu, wall = _timed_in_thread(lambda: check(completion, "3"))
    assert score.reward == 0.0
    # CPU time of the thread (robust to a loaded machine); wall clock only as a backstop.
    assert cpu < 0.2, f"{cpu * 1000:.0f} ms CPU: {score.reason}"
    assert wall < 5.0


def test_adversarial_reference_is_bounded_too():
    score, cpu, _ = _timed_in_thread(lambda: check(r"\boxed{3}", "9^{9^{9}}"))
    assert score.reward == 0.0 and cpu < 0.2


def test_huge_answers_equal_as_text():
    # The reference itself may be too large to evaluate; identical text is still correct.
    assert check(r"\boxed{9^{9^{9}}}", "9^{9^{9}}").reward == 1.0


def test_global_mpmath_precision_untouched():
    import mpmath

    before = mpmath.mp.dps
    check(r"\boxed{\sqrt{2}}", r"\frac{2}{\sqrt2}")
    assert mpmath.mp.dps == before


def test_threads_agree_with_serial():
    cases = [(r"\boxed{(x+1)^2}", "x^2+2x+1"), (r"\boxed{0.5}", r"\frac12"), (r"\boxed{\pi}", "3.14"),
             ("The answer is 7.", "7"), (r"\boxed{x<3}", r"(-\infty, 3)")] * 8
    serial = [check(c, a) for c, a in cases]
    results: list[Score | None] = [None] * len(cases)

    def work(i):
        results[i] = check(*cases[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == serial


# -------------------------------------------------------------------------- verifier
def test_registered_verifier():
    entry = VERIFIERS.entries()["math"]
    assert entry.obj is MathVerifier
    assert MathVerifier.fields == ("answer",)
    assert MathVerifier.isolation == "process" and MathVerifier.correctness is True
    v = MathVerifier(rel_tol=1e-3, fallbacks=["boxed", "last_number"], timeout_s=5, memory_mb=512)
    assert (v.timeout_s, v.memory_mb) == (5.0, 512)
    out = v(["The answer is 0.3333", r"\boxed{4}", "nothing"], answer=["1/3", "5", "2"])
    assert [s.reward for s in out] == [1.0, 0.0, 0.0]
    assert pickle.loads(pickle.dumps(v)).options == v.options  # sent to pebble workers


@pytest.mark.parametrize("kwargs, message", [
    ({"rel_tl": 1e-3}, "unknown option 'rel_tl'. Did you mean 'rel_tol'"),
    ({"rel_tol": -1}, "rel_tol must be a number in \\[0, 1\\)"),
    ({"rel_tol": "small"}, "rel_tol must be a number"),
    ({"fallbacks": ["boxed", "last_numbr"]}, "unknown answer extraction 'last_numbr'"),
    ({"fallbacks": []}, "fallbacks is empty"),
    ({"max_depth": 0}, "max_depth must be a positive integer"),
    ({"max_depth": 1000}, "max_depth must be at most"),
    ({"max_answer_chars": 2.5}, "max_answer_chars must be a positive integer"),
    ({"timeout_s": 0}, "timeout_s must be a positive number"),
    ({"memory_mb": 1}, "memory_mb must be an integer"),
])
def test_bad_options_are_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        MathVerifier(**kwargs)


def test_fallback_names_are_documented():
    import verifiers.math

    for name in FALLBACKS:
        assert f"``{name}``" in verifiers.math.__doc__


# ------------------------------------------------------------------------ package layout
def test_old_import_path_is_the_package():
    """``verifiers.mathcheck`` re-exports the package's objects themselves, not copies, and the
    registered ``math`` verifier is the package's class."""
    import verifiers.math
    import verifiers.mathcheck

    names = set(verifiers.math.__all__)
    assert names == set(verifiers.mathcheck.__all__)
    assert {"check", "equivalent", "extract_answer", "normalize", "parse", "ParseError", "MathVerifier"} <= names
    for name in names:
        assert getattr(verifiers.mathcheck, name) is getattr(verifiers.math, name), name
    assert VERIFIERS.get("math") is verifiers.math.MathVerifier


def _package_imports(path) -> set[str]:
    """Modules of ``verifiers.math`` (and the front module itself) that the file at ``path``
    imports, anywhere in it (function-local imports included)."""
    import ast

    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            targets = [node.module]
            if node.module == "verifiers.math":
                targets = [f"verifiers.math.{a.name}" for a in node.names] + ["verifiers.math"]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        out.update(t for t in targets if t == "verifiers.math" or t.startswith("verifiers.math."))
    return out


def test_math_package_has_no_import_cycle_and_small_files():
    from pathlib import Path

    import verifiers.math

    package = Path(verifiers.math.__file__).parent
    files = {"verifiers.math" if p.stem == "__init__" else f"verifiers.math.{p.stem}": p
             for p in sorted(package.glob("*.py"))}
    graph = {name: _package_imports(path) & set(files) for name, path in files.items()}
    for path in files.values():
        assert len(path.read_text().splitlines()) <= 600, path
    assert len(graph) >= 8
    # Only the front module may import the front module's name; the concerns never do.
    assert not any("verifiers.math" in deps for name, deps in graph.items() if name != "verifiers.math")
    done: set[str] = set()

    def visit(name: str, stack: tuple[str, ...]) -> None:
        assert name not in stack, f"import cycle: {' -> '.join(stack + (name,))}"
        if name in done:
            return
        for dep in graph.get(name, ()):
            visit(dep, stack + (name,))
        done.add(name)

    for name in graph:
        visit(name, ())


def test_grpo_verify_end_to_end(tmp_path):
    rows = [
        {"completion": "The answer is 7.", "answer": "7"},
        {"completion": "7 + 5 = 12", "answer": 12},
        {"completion": r"\boxed{\frac{1}{2}}", "answer": "0.5"},
        {"completion": r"\boxed{3} or \boxed{4}", "answer": "3"},
        {"completion": r"\boxed{9^{9^{9}}}", "answer": "3"},
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    proc = subprocess.run([sys.executable, "-m", "grpo", "verify", "--verifier", "math", "--input", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [o["reward"] for o in out] == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert out[3]["reason"].startswith("hedging")
    assert "mean reward 0.600" in proc.stderr

    bad = subprocess.run([sys.executable, "-m", "grpo", "verify", "--verifier", "math", "--input", str(path),
                          "--args", '{"rel_tol": 2}'], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "error: math verifier: rel_tol" in bad.stderr
