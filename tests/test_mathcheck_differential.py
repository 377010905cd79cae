"""Differential test of the ``math`` verifier against math-verify (HuggingFace).

Each case is a completion and a reference answer. Both checkers score it; they must
agree except on the cases listed in ``DISAGREEMENTS``, each with the reason we differ
on purpose. math-verify runs in pebble worker processes: its sympy evaluation of
``9^{9^{9}}`` cannot be interrupted by its own signal-based timeout, so a case it does
not finish within ``MV_ADVERSARIAL_KILL_S`` seconds is killed and counts as "not equivalent" (what
math-verify returns on its own timeouts).

    .venv/bin/python -m pytest tests/test_mathcheck_differential.py -q -s   # prints the rate
    .venv/bin/python tests/test_mathcheck_differential.py                   # table of disagreements
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import sys

import pytest

from verifiers.mathcheck import check

MV_ADVERSARIAL_TIMEOUT_S = 1  # math-verify's own timeouts on ADVERSARIAL cases (signals, in the worker)
MV_ADVERSARIAL_KILL_S = 3.0   # hard wall-clock limit per ADVERSARIAL case
MV_KILL_S = 60.0              # other cases run without math-verify's timeouts (a loaded machine must
                              # not turn a slow "True" into a timeout); this only stops a real hang


def B(pred: str, gold: str) -> tuple[str, str]:
    """A boxed prediction (tests equivalence rather than extraction)."""
    return "\\boxed{" + pred + "}", gold


def T(text: str, gold: str) -> tuple[str, str]:
    """A raw completion (tests extraction too)."""
    return text, gold


CASES: list[tuple[str, str]] = [
    # integers and thousands separators
    B("7", "7"), B("12", "12"), B("7", "8"), B("-3", "-3"), B("-3", "3"), B("0", "0"),
    B("1000000", "1000001"), B("7.0", "7"), B("1,000", "1000"), B("1{,}000", "1000"),
    B("1\\,000", "1000"), B("100", "1000"), B("+5", "5"), B("10", "010"),
    # fractions
    B("\\frac{1}{2}", "1/2"), B("\\frac12", "\\frac{1}{2}"), B("\\dfrac{3}{4}", "0.75"),
    B("2/4", "1/2"), B("\\frac{2}{3}", "0.6667"), B("\\frac{-1}{2}", "-\\frac{1}{2}"),
    B("\\frac{1}{-2}", "-0.5"), B("-0.5", "-\\frac12"), B("\\frac{10}{4}", "\\frac{5}{2}"),
    B("\\tfrac{1}{3}", "\\frac13"), B("3/2", "1.5"), B("\\frac{1}{3}", "0.33"),
    B("\\frac{1}{3}", "\\frac{1}{4}"), B("\\frac{6}{8}", "\\frac{3}{4}"), B("\\frac{3}{4}", "\\frac{4}{3}"),
    B("\\frac{\\frac{1}{2}}{3}", "\\frac{1}{6}"), B("\\frac{100}{3}", "33\\frac{1}{3}"),
    # decimals
    B("0.5", "\\frac{1}{2}"), B("0.333333", "\\frac{1}{3}"), B("0.3333", "\\frac{1}{3}"),
    B("3.14", "\\pi"), B("3.14159265", "\\pi"), B("2.50", "2.5"), B(".5", "0.5"), B("1.0", "1"),
    B("0.1+0.2", "0.3"), B("1.41421356", "\\sqrt{2}"), B("12.0", "12"), B("2.4999999", "2.5"),
    B("0.25", "0.2"), B("3.5", "3.50"), B("-0.75", "-\\frac{3}{4}"), B("0.125", "\\frac{1}{8}"),
    # scientific notation
    B("1.5e3", "1500"), B("1.5\\times10^{3}", "1500"), B("3\\times 10^{8}", "300000000"),
    B("6.02\\times10^{23}", "6.02\\times 10^{23}"), B("1e-3", "0.001"), B("2.5 \\cdot 10^{-2}", "0.025"),
    B("2\\times10^3", "2000"), B("5\\times 10^{-1}", "\\frac12"),
    # percent
    B("50\\%", "50"), B("50\\%", "0.5"), B("25\\%", "\\frac{1}{4}"), B("12.5\\%", "12.5"),
    B("50", "50\\%"), B("30\\%", "0.3"), B("40\\%", "50\\%"), B("20 percent", "20"),
    # degrees
    B("90^\\circ", "90"), B("45^{\\circ}", "45"), B("30\u00b0", "30"), B("60^\\circ", "\\frac{\\pi}{3}"),
    B("120^\\circ", "120^\\circ"), B("90^\\circ", "45"),
    # units and currency
    B("5 \\text{ cm}", "5"), B("5\\text{ cm}^2", "5"), B("12 \\text{ apples}", "12"), B("\\$18", "18"),
    B("60 \\text{ km/h}", "60"), B("18 \\text{ dollars}", "18"), B("5\\text{ m}", "6"),
    B("3.5 \\text{ hours}", "3.5"),
    # text answers and multiple choice
    B("\\text{Monday}", "\\text{Monday}"), B("\\text{(C)}", "C"), B("(B)", "B"), B("B", "C"),
    B("\\text{monday}", "\\text{Monday}"), B("\\text{Tuesday}", "\\text{Monday}"), B("\\textbf{(A)}", "A"),
    # roots and powers
    B("\\sqrt{2}/2", "\\frac{\\sqrt2}{2}"), B("\\frac{1}{\\sqrt2}", "\\frac{\\sqrt{2}}{2}"),
    B("2\\sqrt{3}", "\\sqrt{12}"), B("\\sqrt[3]{8}", "2"), B("8^{1/3}", "2"), B("\\sqrt{8}", "2\\sqrt2"),
    B("2^{10}", "1024"), B("2^10", "1024"), B("3^{-2}", "\\frac{1}{9}"), B("\\sqrt{2}", "1.414"),
    B("4^{0.5}", "2"), B("(\\sqrt{3})^2", "3"), B("\\sqrt{50}", "5\\sqrt{2}"), B("\\sqrt{3}", "\\sqrt{2}"),
    B("\\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt{3}}"), B("\\frac{1393}{985}", "\\sqrt{2}"),
    B("3\\sqrt{2}", "\\sqrt{18}"), B("2^{-1}", "0.5"), B("\\sqrt{16}", "4"), B("27^{2/3}", "9"),
    # pi, e, complex numbers
    B("2\\pi", "2\\pi"), B("\\pi/2", "\\frac{\\pi}{2}"), B("\\frac{\\pi}{2}", "1.5708"), B("e^2", "e^{2}"),
    B("3+4i", "3+4i"), B("4i+3", "3+4i"), B("i^2", "-1"), B("\\frac{1}{i}", "-i"), B("3-4i", "3+4i"),
    B("\\pi", "\\frac{22}{7}"), B("2\\pi r", "2 \\pi r"), B("\\pi r^2", "r^2\\pi"),
    # algebraic expressions
    B("(x+1)^2", "x^2+2x+1"), B("x^2-1", "(x-1)(x+1)"), B("2x+3", "3+2x"), B("\\frac{x}{2}", "0.5x"),
    B("x^2", "x^3"), B("2(a+b)", "2a+2b"), B("\\frac{x^2-1}{x-1}", "x+1"), B("3x", "3y"),
    B("a^2 b", "b a^2"), B("\\sin^2 x + \\cos^2 x", "1"), B("x^2+x", "x(x+1)"), B("\\frac{1}{x}", "x^{-1}"),
    B("2x", "x+x"), B("x+1", "x-1"), B("\\frac{2}{x+1}", "\\frac{4}{2x+2}"), B("(a+b)^2", "a^2+b^2"),
    # functions
    B("\\sin(\\pi/6)", "\\frac{1}{2}"), B("\\cos 0", "1"), B("\\log_2 8", "3"), B("\\ln e", "1"),
    B("\\tan(\\pi/4)", "1"), B("\\binom{5}{2}", "10"), B("5!", "120"), B("|-3|", "3"),
    B("\\lfloor 2.5 \\rfloor", "2"), B("e^{i\\pi}", "-1"), B("\\arctan 1", "\\frac{\\pi}{4}"),
    B("\\log_{10} 1000", "3"), B("\\sin x", "\\cos x"), B("\\sqrt{x^2}", "x"), B("\\ln 8", "3\\ln 2"),
    B("\\binom{6}{3}", "20"), B("\\cos(\\pi)", "-1"),
    # equations
    B("x=3", "3"), B("x = 3", "x=3"), B("3", "x=3"), B("y=2x+3", "2x-y+3=0"), B("y = 2x+3", "y=3+2x"),
    B("x^2+y^2=1", "y^2+x^2=1"), B("2x+2y=2", "x+y=1"), B("x=2", "x=3"), B("k=5", "5"),
    B("y=x^2", "y=x^3"), B("x = \\frac{1}{2}", "0.5"), B("a = 4", "4"), B("y = -x + 1", "x + y = 1"),
    # inequalities and intervals
    B("x<3", "(-\\infty,3)"), B("x \\le 3", "(-\\infty, 3]"), B("x>2", "(2,\\infty)"), B("1<x<3", "(1,3)"),
    B("[1,3)", "[1,3)"), B("[1,3]", "[1,3)"), B("(1,3)", "(1,3)"),
    B("(-\\infty, 0) \\cup (1, \\infty)", "(-\\infty,0)\\cup(1,\\infty)"),
    B("(1, \\infty) \\cup (-\\infty, 0)", "(-\\infty,0)\\cup(1,\\infty)"),
    B("x \\ge 2", "[2, \\infty)"), B("(0, 1]", "(0,1)"), B("[0, \\frac{1}{2}]", "[0, 0.5]"),
    B("(-\\infty, \\infty)", "(-\\infty,\\infty)"), B("x<3", "x>3"), B("x<3", "x<3"),
    B("-2 < x \\le 5", "(-2, 5]"), B("\\left[ 2, 5 \\right)", "[2,5)"),
    # sets, tuples, lists
    B("\\{1,2,3\\}", "\\{3,2,1\\}"), B("\\{1,2\\}", "\\{1,2,3\\}"), B("(1,2)", "(2,1)"), B("(1,2)", "(1,2)"),
    B("1, 2", "2, 1"), B("(3, -1)", "(3,-1)"), B("\\{-1, 1\\}", "\\{1, -1\\}"), B("(1,2,3)", "(1,2,3)"),
    B("(1,2,3)", "(1,3,2)"), B("2, 3", "\\{2, 3\\}"), B("\\{3\\}", "\\{3\\}"),
    B("\\left( 1, \\dfrac{1}{2} \\right)", "(1, 0.5)"),
    B("1, 2, 3", "1, 2, 3"), B("\\{1, 2, 3\\}", "\\{1, 2, 4\\}"), B("(\\frac{1}{2}, 3)", "(0.5, 3)"),
    B("\\emptyset", "\\emptyset"),
    # matrices
    B("\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}"),
    B("\\begin{bmatrix}1&2\\\\3&4\\end{bmatrix}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}"),
    B("\\begin{pmatrix}1&2\\\\4&3\\end{pmatrix}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}"),
    B("\\begin{pmatrix}\\frac{1}{2}\\\\1\\end{pmatrix}", "\\begin{pmatrix}0.5\\\\1\\end{pmatrix}"),
    # mixed numbers
    B("2\\frac{1}{2}", "\\frac{5}{2}"), B("1\\frac{3}{4}", "1.75"), B("2\\frac12", "\\frac52"),
    B("3\\frac{1}{3}", "\\frac{10}{3}"),
    # hedging: several values when the reference is one
    T("\\boxed{3} or \\boxed{4}", "3"), B("3 \\text{ or } 4", "3"), B("\\pm 3", "3"), B("3, 4", "3"),
    T("The answer is 3 or 4.", "3"), T("\\boxed{3} so again \\boxed{3}", "3"), B("\\{3, 4\\}", "3"),
    B("x = \\pm 2", "2"), T("\\boxed{1} \\boxed{2} \\boxed{3}", "2"),
    # extraction from whole completions
    T("The answer is 7.", "7"), T("7 + 5 = 12", "12"), T("So 12 - 5 = 7. The answer is 7", "7"),
    T("<answer>42</answer>", "42"), T("The final answer is $\\frac{3}{4}$.", "\\frac34"),
    T("I have 3 apples and eat 1, so 2 are left.", "2"), T("No idea.", "5"),
    T("The total cost is \\$1,250.", "1250"), T("\\boxed{\\boxed{5}}", "5"), T("We get $x = 5$.", "5"),
    T("Adding: 3 + 4 = 7. Then 7 * 2 = 14.", "14"), T("The answer is $\\boxed{\\dfrac{9}{4}}$.", "2.25"),
    T("Therefore the answer is \\(\\frac{1}{3}\\).", "\\frac{1}{3}"), T("So $y = 2x + 1$.", "y=2x+1"),
    T("The probability is $\\frac{5}{36}$.", "\\frac{5}{36}"), T("Final answer: 0.2", "\\frac{1}{5}"),
    # (the ADVERSARIAL cases below are appended)
]

# Must be 0 in milliseconds here; math-verify may hang on them, so they run with its
# timeouts at 1 s and a hard kill after a few seconds (counted as not equivalent).
ADVERSARIAL: list[tuple[str, str]] = [
    B("9^{9^{9}}", "3"), B("(10^9)!", "3"), B("(" * 3000 + "1" + ")" * 3000, "1"), B("10^{10^{10}}", "1"),
    B("\\sin(10^{100})", "0"), B("2^{2^{2^{2^{2^{2}}}}}", "0"), T("1" * 100_000, "1"),
    B("1" + "\\pm 1" * 40, "1"),
]
CASES += ADVERSARIAL

# Cases where we differ from math-verify on purpose: case -> reason. Found with
# `python tests/test_mathcheck_differential.py`, each reviewed by hand.
_THOUSANDS = "thin-space thousands separator (1\\,000) is a number, as in typeset answers"
_SCI = "plain-text scientific notation (1.5e3) is a number; math-verify reads e as Euler's e"
_PCT = "documented policy: x% equals x and x/100 (math-verify accepts 50% = 50 but not 12.5% = 12.5)"
_IMAG = "i is the imaginary unit (math-verify reads i as a variable)"
_INTERVAL = "documented policy: a one-variable inequality equals its interval"
DISAGREEMENTS: dict[tuple[str, str], str] = {
    B("1\\,000", "1000"): _THOUSANDS,
    B("1.5e3", "1500"): _SCI,
    B("1e-3", "0.001"): _SCI,
    B("12.5\\%", "12.5"): _PCT,
    B("30\u00b0", "30"): "the Unicode degree sign is dropped like ^\\circ (math-verify does not parse it)",
    B("i^2", "-1"): _IMAG,
    B("\\frac{1}{i}", "-i"): _IMAG,
    B("e^{i\\pi}", "-1"): _IMAG,
    B("\\sqrt{x^2}", "x"): "variables are sampled as positive reals; math-verify keeps sqrt(x^2) = |x|",
    B("x<3", "(-\\infty,3)"): _INTERVAL,
    B("x>2", "(2,\\infty)"): _INTERVAL,
    B("1<x<3", "(1,3)"): _INTERVAL,
    B("x \\le 3", "(-\\infty, 3]"): _INTERVAL,
    B("x \\ge 2", "[2, \\infty)"): _INTERVAL,
    B("-2 < x \\le 5", "(-2, 5]"): _INTERVAL,
    T("The answer is 3 or 4.", "3"): "hedging: two values for one reference score 0; math-verify takes the first match",
    T("<answer>42</answer>", "42"): "we read <answer> tags (the format task's layout); math-verify finds no math there",
    T("The total cost is \\$1,250.", "1250"): "currency and thousands separator in prose; math-verify extracts nothing",
    B("1" + "\\pm 1" * 40, "1"): "hedging: 40 ± signs name many values for one reference (and over 8 "
                                  "variants is refused as too large); math-verify accepts it",
}


def _math_verify(completion: str, gold: str, timeout_s: int | None) -> bool:
    import logging

    from math_verify import parse, verify

    logging.disable(logging.CRITICAL)  # its timeout messages would flood the output
    g = parse("\\boxed{" + gold + "}", parsing_timeout=timeout_s)
    p = parse(completion, parsing_timeout=timeout_s)
    return bool(verify(g, p, timeout_seconds=timeout_s))


def math_verify_results(cases: list[tuple[str, str]], workers: int = 2) -> list[bool]:
    """math-verify on each case in killable worker processes (a hang counts as False)."""
    import pebble

    import math_verify  # noqa: F401  imported before forking so workers start warm

    results: list[bool] = []
    ctx = multiprocessing.get_context("fork")
    with pebble.ProcessPool(max_workers=workers, context=ctx) as pool:
        futures = []
        for case in cases:
            adversarial = case in ADVERSARIAL
            futures.append(pool.schedule(
                _math_verify, args=(*case, MV_ADVERSARIAL_TIMEOUT_S if adversarial else None),
                timeout=MV_ADVERSARIAL_KILL_S if adversarial else MV_KILL_S))
        for fut in futures:
            try:
                results.append(fut.result())
            except (concurrent.futures.TimeoutError, pebble.ProcessExpired, Exception):
                results.append(False)
    return results


def ours(cases: list[tuple[str, str]]) -> list[bool]:
    return [check(completion, gold).reward == 1.0 for completion, gold in cases]


def _label(case: tuple[str, str]) -> str:
    c, g = case
    c = c if len(c) <= 60 else c[:57] + "..."
    return f"{c!r} vs {g!r}"


def test_case_set_is_broad():
    assert len(CASES) >= 150
    assert len(set(CASES)) == len(CASES), "duplicate cases"
    assert set(DISAGREEMENTS) <= set(CASES), "a listed disagreement is not a case"


def test_agrees_with_math_verify():
    pytest.importorskip("math_verify")
    theirs = math_verify_results(CASES)
    mine = ours(CASES)
    unexpected, stale = [], []
    for case, a, b in zip(CASES, mine, theirs):
        if a != b and case not in DISAGREEMENTS:
            unexpected.append(f"{_label(case)}: ours={a} math-verify={b}")
        if a == b and case in DISAGREEMENTS:
            stale.append(_label(case))
    agree = sum(a == b for a, b in zip(mine, theirs))
    print(f"\nmath vs math-verify: {agree}/{len(CASES)} cases agree ({agree / len(CASES):.1%}); "
          f"{len(CASES) - agree} listed disagreements")
    assert not unexpected, "unlisted disagreements:\n" + "\n".join(unexpected)
    assert not stale, "listed disagreements that now agree (remove them):\n" + "\n".join(stale)


if __name__ == "__main__":
    theirs = math_verify_results(CASES)
    mine = ours(CASES)
    n = 0
    for case, a, b in zip(CASES, mine, theirs):
        if a != b:
            n += 1
            print(f"{'listed  ' if case in DISAGREEMENTS else 'UNLISTED'} ours={a!s:5} mv={b!s:5} {_label(case)}")
    print(f"{len(CASES) - n}/{len(CASES)} agree", file=sys.stderr)
