"""The parsed answer (``Node``), the errors of parsing and evaluation, and small tree helpers."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any


@dataclass(frozen=True)
class Node:
    """A parsed answer. ``kind`` says how to read ``args`` (child nodes) and ``value``:

    ``num`` value=(Fraction, written_as_decimal) | ``const`` value in pi/e/i/inf |
    ``sym`` value=name | ``letters`` value=word (a product of one-letter symbols, or a
    word) | ``word`` value=text from ``\\text{}`` | ``add``/``mul`` n-ary | ``neg``/``recip``
    (unary minus, 1/x) | ``pow`` (base, exp) | ``fact`` | ``pct`` (x%) | ``func`` value=name,
    args=(x,) or (x, base/index) | ``paren`` (x) | ``pm`` (a, b) is a±b | ``tuple``
    value=opening bracket | ``interval`` value=(left_open, right_open) | ``set`` | ``list``
    (a bare top-level list, "3, 4" or "3 or 4") | ``union`` | ``eq`` (lhs, rhs) | ``rel``
    value=operators, args=chain | ``in`` (x, set) | ``matrix`` value=(rows, cols).
    """

    kind: str
    args: tuple["Node", ...] = ()
    value: Any = None


class ParseError(ValueError):
    """The answer is outside the grammar we understand."""


class _TooLarge(ArithmeticError):
    """Evaluating the answer would exceed the size guards."""


class _Undefined(ArithmeticError):
    """The value is undefined (division by zero, log 0, ...) at this point."""


class _Incomparable(ArithmeticError):
    """No sample point where both sides could be evaluated."""


_COLLECTIONS = {"tuple", "interval", "set", "list", "union", "matrix"}


def _num(text: str) -> Node:
    """A number token as ``(Fraction, decimal, place)``: ``decimal`` flags a decimal point or an
    exponent (``1.5``, ``2e3``), which selects the tolerant comparison; ``place`` is the last
    written place of a plain decimal with at most 6 decimals (``1000001.0``: 1/10), the most that
    rounding or cutting to what was written can explain, else None (a longer decimal is a
    float's repr, ``0.6666666666666666``, which the relative tolerance judges)."""
    decimal = any(c in text for c in ".eE")
    place = None
    if "." in text and not any(c in text for c in "eE") and len(text.split(".", 1)[1]) <= 6:
        place = Fraction(1, 10 ** len(text.split(".", 1)[1]))
    return Node("num", (), (Fraction(text), decimal, place))


def _written_place(node: Node) -> Fraction | None:
    """``place`` of an answer that is one plain decimal (``-1.50``, ``(0.333)``), else None."""
    while node.kind in ("paren", "neg"):
        node = node.args[0]
    return node.value[2] if node.kind == "num" and len(node.value) > 2 else None


def _letter_node(letter: str) -> Node:
    """One letter: ``e`` is Euler's number, ``i`` the imaginary unit, anything else a symbol."""
    if letter == "e":
        return Node("const", (), "e")
    if letter == "i":
        return Node("const", (), "i")
    return Node("sym", (), letter)


_ZERO = Node("num", (), (Fraction(0), False))
_INF = Node("const", (), "inf")


def _walk(node: Node):
    stack = [node]
    while stack:
        n = stack.pop()
        yield n
        stack.extend(n.args)


def _has_decimal(node: Node) -> bool:
    return any(n.kind == "num" and n.value[1] for n in _walk(node))


def _has_pm(node: Node) -> bool:
    return any(n.kind == "pm" for n in _walk(node))


def _free_symbols(node: Node) -> set[str]:
    out: set[str] = set()
    for n in _walk(node):
        if n.kind == "sym":
            out.add(n.value)
        elif n.kind == "letters":
            out.update(c for c in n.value if c not in "ei")
    return out


def _strip_paren(node: Node) -> Node:
    while node.kind == "paren":
        node = node.args[0]
    return node
