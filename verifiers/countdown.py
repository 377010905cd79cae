"""The ``countdown`` verifier: a safe, exact checker for countdown expressions.

It extracts the model's expression (the last ``<answer>`` block, else the last
``\\boxed{}``, else the last ``... = n`` equation, else the expression ending the last line), parses it with a
whitelist over Python's ``ast`` (integers, + - * /, unary minus, parentheses; nothing
else), checks which numbers it uses, and evaluates it exactly with
``fractions.Fraction`` (any exact path counts, fractional intermediates included).

Safety: the text is capped at ``max_expression_chars`` and to a small alphabet before
``ast.parse`` sees it, the tree depth is capped, and the numbers are checked against
the given ones *before* evaluation, so evaluation only ever combines a handful of
given numbers. ``**``, ``//``, names, calls, attributes, floats and other literals never
reach evaluation. Extraction is ``rfind`` plus a bounded backwards scan (no regex),
linear in the completion.
"""

from __future__ import annotations

import ast
from collections import Counter
from fractions import Fraction
from typing import Any, Sequence

from grpo.errors import UserError
from grpo.registry import VERIFIERS
from verifiers.base import Score, Verifier
from verifiers.format import matching_brace

class ExpressionError(ValueError):
    """The text is not an expression the checker accepts (the message is the reason)."""


_ALLOWED_CHARS = frozenset("0123456789+-*/() ")
_REPLACEMENTS = (("\\times", "*"), ("\\cdot", "*"), ("\\div", "/"), ("×", "*"), ("·", "*"), ("÷", "/"),
                 ("−", "-"), ("–", "-"), ("\\left", ""), ("\\right", ""), ("\\(", ""), ("\\)", ""),
                 ("$", ""), ("\t", " "), ("\n", " "))
_EQUATION_CHARS = _ALLOWED_CHARS | {"×", "÷", "·", "−"}
_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
           ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}


def parse_expression(text: str, *, max_chars: int = 200, max_depth: int = 32) -> ast.expr:
    """Parse an arithmetic expression safely; raise ``ExpressionError`` with a reason."""
    if len(text) > 4 * max_chars:  # before any rewriting, so the work below stays bounded
        raise ExpressionError(f"expression longer than {max_chars} characters")
    for old, new in _REPLACEMENTS:
        text = text.replace(old, new)
    text = text.strip().rstrip(".")
    if not text:
        raise ExpressionError("empty expression")
    if len(text) > max_chars:
        raise ExpressionError(f"expression longer than {max_chars} characters")
    bad = sorted(set(text) - _ALLOWED_CHARS)
    if bad:
        raise ExpressionError(f"not an arithmetic expression (found {''.join(bad)[:10]!r})")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise ExpressionError("not a well-formed expression") from None
    _check_node(tree.body, 0, max_depth)
    return tree.body


def _check_node(node: ast.AST, depth: int, max_depth: int) -> None:
    if depth > max_depth:
        raise ExpressionError(f"expression nested deeper than {max_depth}")
    if isinstance(node, ast.Constant):
        if type(node.value) is not int:
            raise ExpressionError("only whole numbers are allowed")
    elif isinstance(node, ast.BinOp):
        if type(node.op) not in _BINOPS:
            raise ExpressionError("only + - * / are allowed")
        _check_node(node.left, depth + 1, max_depth)
        _check_node(node.right, depth + 1, max_depth)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        _check_node(node.operand, depth + 1, max_depth)
    else:
        raise ExpressionError(f"{type(node).__name__} is not allowed")


def literals(node: ast.expr) -> list[int]:
    """The integers written in a checked expression, left to right."""
    if isinstance(node, ast.Constant):
        return [node.value]
    if isinstance(node, ast.BinOp):
        return literals(node.left) + literals(node.right)
    return literals(node.operand)  # USub, the only unary operator _check_node admits


def evaluate(node: ast.expr) -> Fraction:
    """Exact value of a checked expression; ``ZeroDivisionError`` on division by zero."""
    if isinstance(node, ast.Constant):
        return Fraction(node.value)
    if isinstance(node, ast.BinOp):
        return _BINOPS[type(node.op)](evaluate(node.left), evaluate(node.right))
    return -evaluate(node.operand)


def usage_problem(used: Sequence[int], numbers: Sequence[int], use_all: bool) -> str | None:
    """Why ``used`` breaks the rules for ``numbers`` (None when it does not)."""
    have, want = Counter(numbers), Counter(used)
    for n, k in want.items():
        if n not in have:
            return f"used {n}, which is not given"
        if k > have[n]:
            return f"used {n} {_times(k)} (given {_times(have[n])})"
    if use_all:
        missing = sorted((have - want).elements())
        if missing:
            return f"did not use {', '.join(map(str, missing))}"
    return None


def _times(k: int) -> str:
    return {1: "once", 2: "twice", 3: "three times"}.get(k, f"{k} times")


def extract_expression(text: str, max_scan: int = 400) -> str | None:
    """The model's expression: last <answer> block, else last \\boxed{}, else last equation, else last line.

    Inside the chosen text, an equation keeps its side that is not a bare number
    (``(6-2)*6 = 24`` and ``24 = (6-2)*6`` both give ``(6-2)*6``).
    """
    start = text.rfind("<answer>")
    if start >= 0:
        end = text.find("</answer>", start)
        chosen = text[start + len("<answer>"):end if end >= 0 else len(text)]
    else:
        chosen = None
        box = text.rfind("\\boxed{")
        if box >= 0:
            close = matching_brace(text, box + len("\\boxed"))
            if close >= 0:
                chosen = text[box + len("\\boxed{"):close]
        if chosen is None:
            chosen = _last_equation(text, max_scan) or _last_line(text, max_scan)
    if chosen is None:
        return None
    inner = chosen.rfind("\\boxed{")
    if inner >= 0:
        close = matching_brace(chosen, inner + len("\\boxed"))
        if close >= 0:
            chosen = chosen[inner + len("\\boxed{"):close]
    sides = [s.strip() for s in chosen.split("=")]
    non_numbers = [s for s in sides if s and not s.strip("$ .").lstrip("-").isdigit()]
    return non_numbers[0] if non_numbers else (sides[0] if sides else chosen.strip())


def _last_equation(text: str, max_scan: int) -> str | None:
    """``LHS = number`` ending the last equation in the text; the LHS scanned back at most max_scan chars."""
    eq = text.rfind("=")
    if eq < 0:
        return None
    i = eq
    floor = max(0, eq - max_scan)
    while i > floor and text[i - 1] in _EQUATION_CHARS:
        i -= 1
    lhs = text[i:eq].strip()
    return lhs or None


def _last_line(text: str, max_scan: int) -> str | None:
    """The expression ending the last non-empty line ("so it is 3 * 8." gives "3 * 8")."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip().rstrip(".")
        if line:
            i, floor = len(line), max(0, len(line) - max_scan)
            while i > floor and line[i - 1] in _EQUATION_CHARS:
                i -= 1
            tail = line[i:].strip()
            return tail if any(ch.isdigit() for ch in tail) else line
    return None


@VERIFIERS.register("countdown")
class CountdownVerifier(Verifier):
    """Countdown checker: the expression uses the given numbers (once each) and equals the target.

    Args:
        max_expression_chars: longer expressions score 0 ("expression longer than ...").
        max_depth: deeper expression trees score 0.
    Row fields: ``numbers`` (list of int), ``target`` (int), ``use_all`` (optional,
    default False: each number at most once; True: exactly once).
    """

    fields = ("numbers", "target", "use_all")
    required_fields = ("numbers", "target")
    correctness = True
    isolation = "inline"  # bounded by construction (see the module docstring); no worker needed

    def __init__(self, max_expression_chars: int = 200, max_depth: int = 32):
        if max_expression_chars < 1 or max_depth < 1:
            raise UserError("countdown: max_expression_chars and max_depth must be >= 1")
        self.max_chars, self.max_depth = int(max_expression_chars), int(max_depth)

    def score(self, completions: Sequence[str], numbers: Sequence[Sequence[int]] = (),
              target: Sequence[Any] = (), use_all: Sequence[Any] | None = None, **_: Any) -> list[Score]:
        use_all = use_all if use_all is not None else [False] * len(completions)
        return [self.check(c, n, t, bool(u)) for c, n, t, u in zip(completions, numbers, target, use_all)]

    def check(self, completion: str, numbers: Sequence[int], target: Any, use_all: bool = False) -> Score:
        try:
            want = Fraction(str(target).strip())
        except (ValueError, ZeroDivisionError):
            return Score(None, f"row target {target!r} is not a number")
        expression = extract_expression(completion if isinstance(completion, str) else "")
        if expression is None:
            return Score(0.0, "no expression found")
        try:
            tree = parse_expression(expression, max_chars=self.max_chars, max_depth=self.max_depth)
        except ExpressionError as exc:
            return Score(0.0, str(exc))
        problem = usage_problem(literals(tree), [int(n) for n in numbers], use_all)
        if problem:
            return Score(0.0, problem)
        try:
            value = evaluate(tree)
        except ZeroDivisionError:
            return Score(0.0, "division by zero")
        if value != want:
            return Score(0.0, f"value {value} != {target}")
        return Score(1.0, f"{expression} = {target}")
