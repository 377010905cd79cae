"""Scoring: one completion against a reference answer, with the options, hedging rules and reasons."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from grpo.errors import UserError
from grpo.registry import closest
from verifiers.base import Score
from verifiers.math.equivalence import _MULTI, _equiv, _is_collection
from verifiers.math.evaluation import _Ctx
from verifiers.math.extraction import DEFAULT_FALLBACKS, _check_fallbacks, extract_answer, extract_boxed
from verifiers.math.limits import (_MAX_CANDIDATES, _MAX_PARSE_DEPTH, DEFAULT_MAX_ANSWER_CHARS,
                                   DEFAULT_MAX_COMPLETION_CHARS, DEFAULT_MAX_DEPTH, DEFAULT_REL_TOL)
from verifiers.math.nodes import Node, ParseError, _has_pm, _strip_paren, _TooLarge
from verifiers.math.normalization import normalize
from verifiers.math.parser import parse


@dataclass(frozen=True)
class _Options:
    fallbacks: tuple[str, ...] = DEFAULT_FALLBACKS
    rel_tol: float = DEFAULT_REL_TOL
    max_completion_chars: int = DEFAULT_MAX_COMPLETION_CHARS
    max_answer_chars: int = DEFAULT_MAX_ANSWER_CHARS
    max_depth: int = DEFAULT_MAX_DEPTH

    @classmethod
    def build(cls, **opts: Any) -> "_Options":
        unknown = sorted(set(opts) - set(cls.__dataclass_fields__))
        if unknown:
            known = list(cls.__dataclass_fields__)
            raise UserError(f"math verifier: unknown option {unknown[0]!r}.{closest(unknown[0], known)} "
                            f"Known: {', '.join(known)}")
        fallbacks = _check_fallbacks(opts.get("fallbacks", DEFAULT_FALLBACKS))
        rel_tol = opts.get("rel_tol", DEFAULT_REL_TOL)
        if isinstance(rel_tol, bool) or not isinstance(rel_tol, (int, float)) or not 0 <= rel_tol < 1:
            raise UserError(f"math verifier: rel_tol must be a number in [0, 1), got {rel_tol!r}")
        ints = {}
        for name in ("max_completion_chars", "max_answer_chars", "max_depth"):
            value = opts.get(name, getattr(cls, name))
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"math verifier: {name} must be a positive integer, got {value!r}")
            ints[name] = value
        if ints["max_depth"] > _MAX_PARSE_DEPTH // 2:
            raise UserError(f"math verifier: max_depth must be at most {_MAX_PARSE_DEPTH // 2}")
        return cls(fallbacks, float(rel_tol), **ints)


def _reference_text(answer: Any) -> str:
    """The reference as text; a full solution keeps its last ``\\boxed{}`` or GSM8K ``####`` part."""
    text = str(answer).strip()
    boxed = extract_boxed(text)
    if boxed:
        return boxed[-1]
    if "####" in text:
        return text.rsplit("####", 1)[1].strip()
    return text


def _loose_text(s: str) -> str:
    return re.sub(r"\s+", "", s).lower()


def _short(s: str, n: int = 60) -> str:
    s = " ".join(s.split())
    return s if len(s) <= n else s[:n - 3] + "..."


def _is_multi(node: Node) -> bool:
    """A prediction that names several values ("3, 4", "3 or 4", {3, 4}, ±3, x = ±3)."""
    node = _strip_paren(node)
    if node.kind in ("eq", "in"):
        return _is_multi(node.args[1])
    return (node.kind in _MULTI and len(node.args) > 1) or _has_pm(node)


def _candidate_nodes(candidates: list[str], opts: _Options) -> tuple[list[tuple[str, Node | None]], str]:
    """Normalised text and parse of each candidate (None where it does not parse)."""
    out: list[tuple[str, Node | None]] = []
    seen: set[str] = set()
    for raw in candidates:
        if len(raw) > opts.max_answer_chars:
            return [], f"answer longer than {opts.max_answer_chars} characters"
        text = normalize(raw)
        if not text or _loose_text(text) in seen:
            continue
        seen.add(_loose_text(text))
        try:
            node = parse(text, opts.max_depth)
        except ParseError:
            node = None
        out.append((text, node))
    return out, ""


def check(completion: str, answer: Any, **opts: Any) -> Score:
    """Score one completion against a reference answer: 1.0 when its final answer is
    equivalent, else 0.0 with the reason. ``opts``: ``fallbacks``, ``rel_tol``,
    ``max_completion_chars``, ``max_answer_chars``, ``max_depth`` (see the module docstring)."""
    return _check(completion, answer, _Options.build(**opts))


def _check(completion: str, answer: Any, opts: _Options) -> Score:
    if answer is None or not str(answer).strip():
        return Score(None, "no reference answer")
    if not isinstance(completion, str):
        completion = "" if completion is None else str(completion)
    if len(completion) > opts.max_completion_chars:
        return Score(0.0, f"completion longer than {opts.max_completion_chars} characters")
    candidates = extract_answer(completion, opts.fallbacks)
    if not candidates:
        return Score(0.0, "no answer found")
    candidates = list(dict.fromkeys(c.strip() for c in candidates))  # the same box again is no hedge
    if len(candidates) > _MAX_CANDIDATES:
        return Score(0.0, f"hedging: {len(candidates)} different boxed answers")
    parsed, problem = _candidate_nodes(candidates, opts)
    if problem:
        return Score(0.0, problem)
    if not parsed:
        return Score(0.0, "no answer found")
    ref_text = normalize(_reference_text(answer))
    try:
        ref: Node | None = parse(ref_text, DEFAULT_MAX_DEPTH)
    except ParseError:
        ref = None
    ctx = _Ctx(opts.rel_tol)
    try:
        return _judge(parsed, ref_text, ref, ctx)
    except _TooLarge as exc:
        return Score(0.0, f"too large to evaluate: {exc}")


def _judge(parsed: list[tuple[str, Node | None]], ref_text: str, ref: Node | None, ctx: _Ctx) -> Score:
    ref_multi = ref is not None and (_is_collection(_strip_paren(ref)) or _has_pm(ref))
    if len(parsed) > 1:
        nodes = [n for _, n in parsed]
        if ref_multi and all(n is not None for n in nodes):
            # One box per solution ("\boxed{1}, \boxed{2}") when the reference is a list.
            parsed = [(", ".join(t for t, _ in parsed), Node("list", tuple(nodes), ","))]
        elif None in nodes or not all(_equiv(n, nodes[0], ctx) for n in nodes[1:]):
            return Score(0.0, f"hedging: {len(parsed)} different boxed answers")
    text, node = parsed[0]
    got = f"got {_short(text)!r}, expected {_short(ref_text)!r}"
    if _loose_text(text) == _loose_text(ref_text) and not (node is not None and _is_multi(node) and not ref_multi):
        return Score(1.0, f"correct: {_short(text)!r}")
    if node is None or ref is None:
        return Score(0.0, f"wrong (compared as text, {'answer' if node is None else 'reference'} "
                          f"not parsed): {got}")
    if _is_multi(node) and not ref_multi:
        return Score(0.0, f"hedging: several values, {got}")
    if _equiv(node, ref, ctx):
        return Score(1.0, f"correct: {_short(text)!r}")
    return Score(0.0, f"wrong: {got}")
