"""Equivalence: whether a predicted answer and the reference are the same answer.

Equations, memberships, inequalities (as intervals), text answers, collections (sets and bare
lists unordered, tuples ordered, intervals by endpoints and openness), ``\\pm`` variants, then
scalars by value (``evaluation``). The package docstring states the whole policy.
"""

from __future__ import annotations

import re
from typing import Sequence

from verifiers.math.evaluation import _Ctx, _proportional, _scalar_equal
from verifiers.math.limits import _MAX_PM_VARIANTS, DEFAULT_REL_TOL
from verifiers.math.nodes import (_COLLECTIONS, _INF, _ZERO, Node, _free_symbols, _has_pm, _Incomparable,
                                  _strip_paren, _TooLarge)
from verifiers.math.normalization import normalize
from verifiers.math.parser import parse


_TEXTY = ("word", "letters", "sym")
_MULTI = ("list", "set")


def _text_key(node: Node) -> str | None:
    """Canonical text of an answer that is a word or a letter (``\\text{(C)}``, ``C``, ``Monday``)."""
    node = _strip_paren(node)
    if node.kind in _TEXTY:
        return re.sub(r"[^0-9a-z]+", "", str(node.value).lower()) or None
    if node.kind == "const" and node.value in ("e", "i"):
        return node.value
    return None


def _expand_pm(node: Node) -> list[Node]:
    """The variants of a tree with ``a ± b`` replaced by ``a + b`` and ``a - b``."""
    if node.kind == "pm":
        left, right = node.args
        out = []
        for lv in _expand_pm(left):
            for rv in _expand_pm(right):
                out.append(Node("add", (lv, rv)) if lv != _ZERO else rv)
                out.append(Node("add", (lv, Node("neg", (rv,)))) if lv != _ZERO else Node("neg", (rv,)))
                if len(out) > _MAX_PM_VARIANTS:
                    raise _TooLarge("too many ± signs")
        return out
    if not node.args or not _has_pm(node):
        return [node]
    variants: list[tuple[Node, ...]] = [()]
    for child in node.args:
        variants = [v + (c,) for v in variants for c in _expand_pm(child)]
        if len(variants) > _MAX_PM_VARIANTS:
            raise _TooLarge("too many ± signs")
    return [Node(node.kind, v, node.value) for v in variants]


def _symbol_name(node: Node) -> str | None:
    node = _strip_paren(node)
    if node.kind == "sym" or (node.kind == "letters" and len(node.value) <= 3):
        return node.value
    return None


def _as_interval(node: Node) -> Node | None:
    """``x < 3`` as ``(-inf, 3)``, ``1 < x \\le 2`` as ``(1, 2]`` (one variable, ordered chain)."""
    exprs, ops = node.args, node.value
    syms = [i for i, e in enumerate(exprs) if _symbol_name(e) is not None]
    if len(syms) != 1 or len(exprs) not in (2, 3) or "!=" in ops:
        return None
    i = syms[0]
    neg_inf = Node("neg", (_INF,))
    if len(exprs) == 2:
        op = ops[0]
        if i == 1:  # "3 > x" reads as "x < 3"
            op = {"<": ">", ">": "<", "<=": ">=", ">=": "<="}[op]
        c = exprs[1 - i]
        if op in ("<", "<="):
            return Node("interval", (neg_inf, c), (True, op == "<"))
        return Node("interval", (c, _INF), (op == ">", True))
    if i != 1:
        return None
    (o1, o2), (lo, hi) = ops, (exprs[0], exprs[2])
    if o1 in ("<", "<=") and o2 in ("<", "<="):
        return Node("interval", (lo, hi), (o1 == "<", o2 == "<"))
    if o1 in (">", ">=") and o2 in (">", ">="):
        return Node("interval", (hi, lo), (o2 == ">", o1 == ">"))
    return None


def _unordered_equal(xs: Sequence[Node], ys: Sequence[Node], ctx: _Ctx) -> bool:
    """Set equality: every item of each side equals some item of the other."""
    return (all(any(_equiv(x, y, ctx) for y in ys) for x in xs)
            and all(any(_equiv(x, y, ctx) for x in xs) for y in ys))


def _ordered_equal(xs: Sequence[Node], ys: Sequence[Node], ctx: _Ctx) -> bool:
    return len(xs) == len(ys) and all(_equiv(x, y, ctx) for x, y in zip(xs, ys))


def _equiv(a: Node, b: Node, ctx: _Ctx) -> bool:
    """``a`` (predicted) and ``b`` (reference) are the same answer. Raises ``_TooLarge``."""
    ctx.tick()
    a, b = _strip_paren(a), _strip_paren(b)
    if a == b and not _has_pm(a):
        return True
    for node, other, swap in ((a, b, False), (b, a, True)):
        if _has_pm(node):
            variants = _expand_pm(node)
            node = Node("list", tuple(variants), "pm") if len(variants) > 1 else variants[0]
            return _equiv(other, node, ctx) if swap else _equiv(node, other, ctx)
    # Equations and memberships: x = 3 is 3; y = 2x + 3 is 2x - y + 3 = 0.
    if a.kind == "eq" and b.kind == "eq":
        sa, sb = _symbol_name(a.args[0]), _symbol_name(b.args[0])
        if sa is not None and sa == sb:
            return _equiv(a.args[1], b.args[1], ctx)
        if _is_collection(a) or _is_collection(b):
            return False
        f = Node("add", (a.args[0], Node("neg", (a.args[1],))))
        g = Node("add", (b.args[0], Node("neg", (b.args[1],))))
        if not (_free_symbols(f) or _free_symbols(g)):
            return _equiv(a.args[1], b.args[1], ctx)
        try:
            return _proportional(f, g, ctx)
        except _Incomparable:
            return False
    for node, other, swap in ((a, b, False), (b, a, True)):
        if node.kind in ("eq", "in"):
            lhs, rhs = node.args
            value = lhs if (node.kind == "eq" and _symbol_name(rhs) is not None
                            and _symbol_name(lhs) is None) else rhs
            return _equiv(other, value, ctx) if swap else _equiv(value, other, ctx)
    # Inequalities as intervals.
    if a.kind == "rel" or b.kind == "rel":
        ia = _as_interval(a) if a.kind == "rel" else a
        ib = _as_interval(b) if b.kind == "rel" else b
        if ia is None or ib is None:
            if a.kind == "rel" and b.kind == "rel":
                return a.value == b.value and _ordered_equal(a.args, b.args, ctx)
            return False
        return _equiv(ia, ib, ctx)
    # Text answers.
    ta, tb = _text_key(a), _text_key(b)
    if a.kind == "word" or b.kind == "word" or (ta is not None and tb is not None):
        if ta is not None and ta == tb:
            return True
        if a.kind in ("word", "letters") or b.kind in ("word", "letters"):
            return False  # a word is not a product of symbols: "no" is not "on"
    # Collections.
    if _is_collection(a) or _is_collection(b):
        return _collections_equal(a, b, ctx)
    # Scalars; a top-level percentage against a plain number may be read as its number or
    # as a fraction ("50%" is 50 or 0.5). Two percentages compare as written: 0.12% is not 12%.
    if a.kind == "pct" and b.kind == "pct":
        alts_a, alts_b = [a.args[0]], [b.args[0]]
    else:
        alts_a = [a.args[0], a] if a.kind == "pct" else [a]
        alts_b = [b.args[0], b] if b.kind == "pct" else [b]
    for x in alts_a:
        for y in alts_b:
            try:
                if _scalar_equal(x, y, ctx):
                    return True
            except _Incomparable:
                continue
    return False


def _is_collection(node: Node) -> bool:
    return node.kind in _COLLECTIONS


def _collections_equal(a: Node, b: Node, ctx: _Ctx) -> bool:
    ka, kb = a.kind, b.kind
    if ka in _MULTI and kb in _MULTI:
        return _unordered_equal(a.args, b.args, ctx)
    # A one-element set or list is its element: {3} is 3.
    if ka == "set" and len(a.args) == 1 and not _is_collection(b):
        return _equiv(a.args[0], b, ctx)
    if kb == "set" and len(b.args) == 1 and not _is_collection(a):
        return _equiv(a, b.args[0], ctx)
    if ka == "tuple" and kb == "tuple" or {ka, kb} == {"tuple", "list"}:
        return _ordered_equal(a.args, b.args, ctx)
    if ka == kb == "matrix":
        return a.value == b.value and _ordered_equal(a.args, b.args, ctx)
    if ka in ("interval", "tuple") and kb in ("interval", "tuple"):
        # "(1, 2)" is a point or an open interval; it matches an interval only when open.
        oa = a.value if ka == "interval" else (True, True)
        ob = b.value if kb == "interval" else (True, True)
        return len(a.args) == len(b.args) == 2 and oa == ob and _ordered_equal(a.args, b.args, ctx)
    if ka in ("union", "list") and kb in ("union", "list"):
        return _unordered_equal(a.args, b.args, ctx)
    return False


def equivalent(predicted: Node | str, reference: Node | str, *, rel_tol: float = DEFAULT_REL_TOL) -> bool:
    """Whether two answers are the same (see the module docstring for the policy).

    Strings are normalised and parsed first (``ParseError`` if they cannot be). Answers
    too large to evaluate, or a comparison over its time budget, count as different.
    """
    a = parse(normalize(predicted)) if isinstance(predicted, str) else predicted
    b = parse(normalize(reference)) if isinstance(reference, str) else reference
    try:
        return _equiv(a, b, _Ctx(rel_tol))
    except _TooLarge:
        return False
