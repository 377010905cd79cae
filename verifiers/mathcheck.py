"""The ``math`` verifier: extract a final answer, normalise it, compare it with the reference.

Pipeline (each step is a pure function, tested on its own)::

    completion --extract_answer--> candidates --normalize--> text --parse--> Node --equivalent--> Score

* **Extraction** (``extract_answer``) tries named strategies in order and keeps the
  first that finds anything (``DEFAULT_FALLBACKS``):

  ``boxed``       every ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces), all of them, so
                  that several different boxed values can be caught as hedging;
  ``answer_tag``  the content of the last ``<answer>...</answer>``;
  ``answer_is``   the clause after the last "the answer is", "Answer:", "final answer:"
                  or GSM8K's "#### ";
  ``final_math``  the ``$...$`` / ``\\(...\\)`` math that ends the text ("So $y = 2x+1$.");
  ``last_number`` the last number in the text (small models rarely box their answers).

* **Normalisation** (``normalize``) removes presentation: ``$``/``\\(``/``\\[``, ``\\left``/
  ``\\right``, spacing macros, ``\\dfrac``/``\\tfrac``, degrees, ``\\%``, currency, thousands
  separators (``1,000``, ``1{,}000``, ``1\\,000``), trailing units (``5 cm``,
  ``5\\text{ cm}^2``, ``12 apples``), "approximately", trailing punctuation.

* **Parsing** is our own small recursive-descent parser for the LaTeX/plain-text subset
  that final answers use (numbers, ``\\frac``, ``\\sqrt[n]{}``, ``^``, ``!``, ``\\pi``, ``e``,
  ``i``, ``\\infty``, functions, implicit multiplication, mixed numbers ``2\\frac{1}{2}`` /
  ``2 1/2``, scientific notation ``1.5e3`` / ``1.5\\times10^{3}``, ``\\pm``, sets, tuples,
  intervals, unions, ``pmatrix``, equations and inequalities). We do not hand model text
  to ``eval``, ``sympify`` or ``latex2sympy``: latex2sympy2 hangs on 3000 nested
  parentheses and sympy evaluates ``9^{9^{9}}`` eagerly, and neither can be interrupted in a
  worker thread (``signal.alarm`` only works in the main thread). math-verify (built on
  latex2sympy2) is our reference in ``tests/test_mathcheck_differential.py`` instead.

* **Equivalence** (``equivalent``):

  - exact rational arithmetic (``fractions.Fraction``) when both sides are rational;
  - otherwise high-precision numeric evaluation with mpmath (sympy's numeric engine, 50
    digits) at fixed sample points for free variables (a Schwartz-Zippel style identity
    test: ``(x+1)^2`` equals ``x^2+2x+1``; variables are sampled in (0.35, 1.65), so
    ``\\sqrt{x^2}`` equals ``x`` as for positive reals);
  - **tolerance policy**: if either side is written with a decimal point (or ``1.5e3``),
    values must agree within ``rel_tol`` of the larger magnitude, bound included (default
    1e-6, so ``0.333333`` = ``1/3`` but ``0.3333`` does not); with no decimal on either side
    the comparison is exact for rationals (``1000000`` != ``1000001``) and within 1e-30
    relative at 50 digits otherwise (``\\frac{1393}{985}`` != ``\\sqrt{2}``);
  - ``e`` is Euler's number and ``i`` the imaginary unit (``e^{i\\pi}`` = ``-1``);
    ``\\log``/``\\ln`` are natural logarithms, ``\\lg`` base 10, ``\\log_b`` base b;
    odd roots of negatives are real (``\\sqrt[3]{-8}`` = ``-2``);
  - ``50\\%`` equals ``50`` and ``0.5``; ``90^\\circ`` equals ``90``;
  - ``x=3`` equals ``3`` (an equation against a value compares its right-hand side, or
    its left when only the right is a bare variable); ``y=2x+3`` equals ``2x-y+3=0``
    (proportional equations);
  - sets and bare lists compare unordered, tuples ordered, intervals by endpoints and
    openness (``(1,2)`` may also be a point), ``x<3`` equals ``(-\\infty,3)``, ``\\{3\\}``
    equals ``3``; ``a \\pm b`` is the list ``a+b, a-b``;
  - text answers (``\\text{(C)}``, ``C``, ``Monday``) compare case-insensitively; a word
    of several letters is text, not a product (``no`` != ``on``; inside an expression
    ``2xy`` is a product and equals ``2yx``).

* **Reference answers** are normalised like predictions; a full solution keeps its last
  ``\\boxed{}``, or what follows GSM8K's ``####``.

* **Hedging** scores 0: several different boxed values (several boxes are read as one list
  when the reference is a list, "\\boxed{1} and \\boxed{2}"), ``3 or 4``, "either 3 or 4",
  ``\\pm 3`` or a list/set when the reference is a single value.

* **Bounds** (the trainer also isolates this verifier in a process, but it must be safe on
  its own, in a thread): completion and answer length caps, a bracket-nesting cap, a parser
  recursion cap, list-size cap, at most 8 ``\\pm`` variants, guards before every
  power/factorial/exp/trig so that ``9^{9^{9}}``, ``(10^9)!`` or 3000 nested parentheses
  return 0 in milliseconds, and a 1 s budget per comparison as a backstop. Answers too
  large to evaluate score 0 unless their text equals the reference's.
"""

from __future__ import annotations

import hashlib
import math
import re
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from typing import Any, Sequence

from grpo.errors import UserError
from grpo.registry import VERIFIERS, closest
from verifiers.base import Score, Verifier

__all__ = ["DEFAULT_FALLBACKS", "FALLBACKS", "MathVerifier", "Node", "check", "equivalent",
           "extract_answer", "extract_boxed", "normalize", "parse"]

# ---------------------------------------------------------------------------- limits
# Defaults of the options below; each is a constructor/`check` keyword.
DEFAULT_REL_TOL = 1e-6           # relative tolerance when a decimal is involved
DEFAULT_MAX_COMPLETION_CHARS = 200_000
DEFAULT_MAX_ANSWER_CHARS = 1_000
DEFAULT_MAX_DEPTH = 30           # bracket nesting of one answer

# Internal guards (not options: they keep evaluation bounded, not policy).
_MAX_PARSE_DEPTH = 60            # recursive-descent nesting (brackets, unary and ^ chains)
_MAX_ITEMS = 50                  # items in a list/set/tuple/matrix
_MAX_CANDIDATES = 8              # different extracted answers before we call it hedging
_MAX_EXACT_BITS = 100_000        # size of an exact rational before we go numeric
_MAX_FACTORIAL_EXACT = 2_000
_MAX_FACTORIAL_NUMERIC = 20_000
_MAX_LOG_MAGNITUDE = 700_000     # |ln x| bound for numeric values (about 10**300000)
_MAX_TRIG_ARG = 1e6              # argument reduction cost grows with the argument
_MAX_SCI_EXPONENT = 1_000        # 1e999999999 would be built as an exact integer
_EXACT_TOL = 1e-30               # "exact" comparison at 50 digits of working precision
_ABS_FLOOR = 1e-35               # values this small count as zero (cancellation noise)

# ------------------------------------------------------------------------ extraction
FALLBACKS: tuple[str, ...] = ("boxed", "answer_tag", "answer_is", "final_math", "last_number")
DEFAULT_FALLBACKS: tuple[str, ...] = FALLBACKS


def extract_boxed(text: str) -> list[str]:
    """Contents of every top-level ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``, in order.

    Braces nest; ``\\{`` and ``\\}`` are escaped and do not count. ``\\boxed 5`` (no brace)
    takes the next whitespace-delimited token. A box that never closes ends the scan:
    everything after it would be inside it, and rescanning would make this quadratic.
    """
    out: list[str] = []
    pos = 0
    pattern = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
    while True:
        m = pattern.search(text, pos)
        if not m:
            return out
        i = m.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            end = _matching_brace(text, i)
            if end < 0:
                return out
            out.append(text[i + 1:end])
            pos = end + 1
        else:
            j = i
            while j < len(text) and not text[j].isspace() and text[j] not in "$\\":
                j += 1
            if j > i:
                out.append(text[i:j])
            pos = max(j, m.end())


def _matching_brace(text: str, open_at: int) -> int:
    """Index of the ``}`` closing the ``{`` at ``open_at`` (-1 if none); skips ``\\{``/``\\}``."""
    depth = 0
    i = open_at
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return -1


def _extract_answer_tag(text: str) -> list[str]:
    # str.find rather than a lazy regex: many unclosed tags would make ".*?" quadratic.
    last = None
    pos = 0
    while True:
        start = text.find("<answer>", pos)
        if start < 0:
            break
        end = text.find("</answer>", start + 8)
        if end < 0:
            break
        last = text[start + 8:end]
        pos = end + 9
    return [last.strip()] if last is not None and last.strip() else []


_ANSWER_IS = re.compile(r"(?i)(?:\b(?:final\s+)?answer\s*(?:is\s*[:=]?|[:=])|####)[ \t*]*")
_CLAUSE_STOP_WORDS = ("because", "since", "which", "so", "as", "where", "when", "for", "from",
                      "after", "that", "then", "thus", "therefore", "hence", "but")


def _extract_answer_is(text: str) -> list[str]:
    last = None
    for m in _ANSWER_IS.finditer(text):
        last = m
    if last is None:
        return []
    clause = _take_clause(text, last.end())
    return [clause] if clause else []


def _take_clause(text: str, start: int, limit: int = 300) -> str:
    """The answer clause starting at ``start``: up to a newline, a sentence-ending period,
    or a comma/word that starts a prose continuation (", because ..."), outside brackets
    and ``$...$``. Lists such as "3, 4" or "3 or 4" are kept whole, for hedging checks."""
    depth = 0
    in_math = False
    i = start
    end = min(len(text), start + limit)
    while i < end:
        c = text[i]
        if c == "\\" and i + 1 < end:
            i += 2
            continue
        if c == "$":
            in_math = not in_math
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth = max(0, depth - 1)
        elif c == "\n" and not in_math:
            break
        elif depth == 0 and not in_math:
            if c == "." and (i + 1 >= len(text) or text[i + 1].isspace()):
                break
            # "The answer is 12!" is an exclamation, "5! = 120" a factorial.
            if c == "!" and (i + 1 >= len(text) or re.match(r"\s*(?:\n|[A-Z]|$)", text[i + 1:i + 4])):
                break
            if c in ",;" or c == " ":
                m = re.match(r"[,;]?\s+([A-Za-z]+)\b", text[i:i + 40])
                if m and m.group(1).lower() in _CLAUSE_STOP_WORDS:
                    break
                if c in ",;" and m and len(m.group(1)) > 1 and m.group(1).lower() not in ("and", "or", "either"):
                    break
                # "12 and I am sure" is prose; "3 or 4", "x = 1 or x = 2" stay whole (hedging).
                m = re.match(r"\s+(?:and|or)\s+([A-Za-z]+)\b", text[i:i + 40])
                if m and (m.group(1) == "I" or (len(m.group(1)) > 1 and m.group(1).lower() not in _MATH_WORDS)):
                    break
        i += 1
    return text[start:i].strip()


_LAST_NUMBER = re.compile(
    r"\\[dt]?frac\{-?\d+\}\{\d+\}"
    r"|(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+(?![\d.]))?")


def _extract_last_number(text: str) -> list[str]:
    last = None
    for m in _LAST_NUMBER.finditer(text):
        last = m
    if last is None:
        return []
    s = last.group(0)
    # A minus glued to a preceding word or digit ("5-3", "x-2") is an operator, not a sign.
    if s.startswith("-") and last.start() > 0 and (text[last.start() - 1].isalnum()
                                                   or text[last.start() - 1] in ")}"):
        s = s[1:]
    return [s]


def _extract_final_math(text: str) -> list[str]:
    """The math that ends the text ("So $y = 2x + 1$."), when nothing but punctuation follows.
    Math earlier in the text is more often a definition ("Let $x$ be ...") than the answer."""
    end = len(text.rstrip().rstrip(".,;:!").rstrip())
    for opener, closer in (("$$", "$$"), ("$", "$"), (r"\(", r"\)"), (r"\[", r"\]")):
        if text.endswith(closer, 0, end) and not text.endswith("\\" + closer, 0, end):
            start = text.rfind(opener, 0, end - len(closer))
            if start >= 0:
                inner = text[start + len(opener):end - len(closer)].strip()
                return [inner] if inner and "$" not in inner else []
    return []


_EXTRACTORS = {
    "boxed": extract_boxed,
    "answer_tag": _extract_answer_tag,
    "answer_is": _extract_answer_is,
    "final_math": _extract_final_math,
    "last_number": _extract_last_number,
}


def _check_fallbacks(fallbacks: Sequence[str]) -> tuple[str, ...]:
    if isinstance(fallbacks, str):
        fallbacks = (fallbacks,)
    out = tuple(fallbacks)
    if not out:
        raise UserError(f"math verifier: fallbacks is empty; use some of {list(FALLBACKS)}")
    for name in out:
        if name not in _EXTRACTORS:
            raise UserError(f"math verifier: unknown answer extraction {name!r}."
                            f"{closest(str(name), list(FALLBACKS))} Known: {', '.join(FALLBACKS)}")
    return out


def extract_answer(text: str, fallbacks: Sequence[str] = DEFAULT_FALLBACKS) -> list[str]:
    """Candidate final answers in ``text``: those of the first strategy in ``fallbacks``
    that finds any (see the module docstring for the strategies). Several candidates come
    only from ``boxed``; the caller decides whether they agree."""
    for name in _check_fallbacks(fallbacks):
        found = [c for c in _EXTRACTORS[name](text) if c.strip()]
        if found:
            return found
    return []


# --------------------------------------------------------------------- normalisation
_UNICODE = {"\u2212": "-", "\u2013": "-", "\u00d7": r"\times ", "\u00b7": r"\cdot ", "\u22c5": r"\cdot ",
            "\u00f7": r"\div ", "\u03c0": r"\pi ", "\u221e": r"\infty ", "\u221a": r"\sqrt ",
            "\u2264": r"\le ", "\u2265": r"\ge ", "\u2260": r"\ne ", "\u2248": "=", "\u222a": r"\cup ",
            "\u2205": r"\emptyset ", "\u00b0": "", "\u20ac": "", "\u00a3": "", "\u00a5": "",
            "\u00a0": " ", "\u2009": "", "\u202f": ""}
_SIMPLE_REPLACEMENTS = [
    (r"\left.", ""), (r"\right.", ""), (r"\dfrac", r"\frac"), (r"\tfrac", r"\frac"),
    (r"\cfrac", r"\frac"), (r"\dbinom", r"\binom"), (r"\tbinom", r"\binom"),
    (r"\lbrace", r"\{"), (r"\rbrace", r"\}"), (r"\langle", "("), (r"\rangle", ")"),
    (r"\lvert", "|"), (r"\rvert", "|"), (r"\vert", "|"), (r"\mid", "|"),
    (r"\approx", "="), (r"\simeq", "="), (r"\doteq", "="), (r"\%", "%"),
    ("{,}", ","), (r"\,", ""), (r"\!", ""), (r"\;", ""), (r"\:", ""), (r"\ ", " "), ("~", " "),
]
_SIZING = re.compile(r"\\(?:left|right|[bB]igg?[lr]?|middle|displaystyle|textstyle|quad|qquad|"
                     r"limits|nolimits|mathrm|mathbf|mathit|mathsf|boldsymbol|bm|rm|bf)(?![A-Za-z])")
_HSPACE = re.compile(r"\\[hv]space\*?\{[^{}]*\}")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ\b|\\degree\b|\^\s*\{\s*\\text\{\s*o\s*\}\s*\}")
_THOUSANDS = re.compile(r"(?<![\d.])(\d{1,3})((?:,\d{3})+)(?![\d,])")
_TEXT_TAIL = re.compile(r"(?:\\(?:text|textrm|textit|textbf|mbox|textnormal|mathrm)\s*\{[^{}]*\}"
                        r"(?:\s*\^\s*\{?\s*[23]\s*\}?)?\s*)$")
_WORD_TAIL = re.compile(r"(?<![\\A-Za-z])((?:(?:sq|square|cubic)\.?\s+)?[A-Za-z]+(?:\s*/\s*[A-Za-z]+)*)"
                        r"\.?(?:\s*\^\s*\{?\s*[23]\s*\}?)?\s*$")
_PAREN_WORDS = re.compile(r"(?<=\d)\s*\([A-Za-z][A-Za-z ]{2,40}\)$")  # "12 (twelve)"
_LEADING_WORDS = re.compile(r"^(?:(?:approximately|approx\.?|about|around|roughly|exactly|"
                            r"either|only|just)\s+)+", re.I)
# Names that are mathematics, never a unit: keep "3 \pi", "2 sin x", "x or y".
_MATH_WORDS = {"pi", "sin", "cos", "tan", "cot", "sec", "csc", "log", "ln", "exp", "sqrt", "inf",
               "infty", "infinity", "or", "and", "arcsin", "arccos", "arctan", "sinh", "cosh",
               "tanh", "e", "i", "mod", "pmod", "frac", "cup"}
# Units glued to a number ("5cm") are stripped only when known; spaced words always are.
_KNOWN_UNITS = {"cm", "mm", "km", "m", "kg", "g", "mg", "lb", "lbs", "oz", "ft", "in", "yd", "mi",
                "mph", "kmh", "s", "sec", "min", "h", "hr", "hrs", "ml", "l", "cm2", "m2", "usd",
                "dollars", "cents", "degrees", "units", "inches", "feet", "meters", "percent"}


def normalize(answer: str) -> str:
    """Canonical text of one extracted answer (presentation removed, see module docstring).

    ``normalize(r"$\\$1{,}000.$")`` is ``"1000"``; ``normalize(r"5\\text{ cm}^2")`` is ``"5"``;
    ``normalize(r"\\left( 1, \\dfrac{1}{2} \\right)")`` is ``"(1, \\frac{1}{2})"``.
    """
    s = answer.strip()
    s = _unwrap_commands(s, ("boxed", "fbox"))
    for k, v in _UNICODE.items():
        s = s.replace(k, v)
    s = s.replace(r"\$", "")  # before "$": \$5 is five dollars, not the end of math mode
    s = s.replace("$", "").replace(r"\(", "").replace(r"\)", "").replace(r"\[", "").replace(r"\]", "")
    for old, new in _SIMPLE_REPLACEMENTS:
        s = s.replace(old, new)
    s = _HSPACE.sub("", s)
    s = _SIZING.sub("", s)
    s = _DEGREES.sub("", s)
    s = re.sub(r"\s*\bpercent\b", "%", s, flags=re.I)
    s = re.sub(r"\b(?:USD|Rs\.?|INR|EUR|GBP)\s*", "", s)
    s = _THOUSANDS.sub(lambda m: m.group(1) + m.group(2).replace(",", ""), s)
    s = _strip_punctuation(s)
    s = _PAREN_WORDS.sub("", s)
    s = _strip_units(s)
    s = _LEADING_WORDS.sub("", s)
    s = _strip_punctuation(s)
    s = re.sub(r"\s+", " ", s).strip()
    s = re.sub(r"(?<!\\)([(\[])\s+", r"\1", s)
    s = re.sub(r"\s+([)\]])", r"\1", s)
    return s


def _strip_punctuation(s: str) -> str:
    s = s.strip()
    while s and (s[-1] in ".,;:*" or s.endswith(r"\.")):  # "*": markdown bold, **12**
        s = s[:-2] if s.endswith(r"\.") else s[:-1]
        s = s.rstrip()
    while s and s[0] in ":=,*":
        s = s[1:].lstrip()
    return s


def _strip_units(s: str) -> str:
    """Drop trailing unit words when a number precedes them ("5 cm", "12 apples",
    "5\\text{ cm}^2", "60 km/h"). Only the last 80 characters are searched, so the
    anchored regexes stay linear."""
    for _ in range(4):
        if not re.search(r"\d", s):
            return s
        head, tail = s[:-80], s[-80:]
        m = _TEXT_TAIL.search(tail)
        if m and re.search(r"\d", head + tail[:m.start()]):
            s = (head + tail[:m.start()]).rstrip()
            continue
        m = _WORD_TAIL.search(tail)
        if not m:
            return s
        words = [w.lower() for w in re.split(r"[\s/.]+", m.group(1)) if w]
        prefix = (head + tail[:m.start()]).rstrip()
        glued = not (head + tail[:m.start()]).endswith((" ", "}", ")"))
        if (not prefix or not re.search(r"\d", prefix) or any(w in _MATH_WORDS for w in words)
                or (glued and not all(w in _KNOWN_UNITS for w in words))
                or (sum(len(w) for w in words) < 2 and words[0] not in _KNOWN_UNITS)
                or prefix.endswith(("^", "_", "\\"))):
            return s
        s = prefix
    return s


def _unwrap_commands(s: str, names: tuple[str, ...]) -> str:
    """Replace ``\\name{X}`` by ``X`` for the given command names (nested allowed)."""
    pattern = re.compile(r"\\(?:%s)\s*\{" % "|".join(names))
    for _ in range(10):  # nested \boxed{\boxed{..}}: a few passes, each linear
        m = pattern.search(s)
        if not m:
            return s
        out = []
        pos = 0
        while m:
            end = _matching_brace(s, m.end() - 1)
            if end < 0:
                break
            out.append(s[pos:m.start()])
            out.append(s[m.end():end])
            pos = end + 1
            m = pattern.search(s, pos)
        out.append(s[pos:])
        s = "".join(out)
    return s


# --------------------------------------------------------------------------- parsing
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


@dataclass
class _Tok:
    kind: str          # num, cmd, letters, op, text, end
    text: str
    space: bool = False  # whitespace before this token (mixed numbers "2 1/2")


_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+(?![A-Za-z0-9]))?)
  | (?P<text>\\(?:text|textrm|textit|textbf|texttt|textnormal|mbox|operatorname)\s*\{)
  | (?P<cmd>\\[A-Za-z]+|\\[{}|\\])
  | (?P<letters>[A-Za-z]+)
  | (?P<op>[-+*/^_()\[\]{},=<>!|&;%':])
""", re.X)


def _tokenize(s: str) -> list[_Tok]:
    toks: list[_Tok] = []
    pos = 0
    space = False
    while pos < len(s):
        m = _TOKEN.match(s, pos)
        if not m:
            raise ParseError(f"unexpected character {s[pos]!r}")
        kind = m.lastgroup
        text = m.group(0)
        if kind == "ws":
            space = True
            pos = m.end()
            continue
        if kind == "text":
            end = _matching_brace(s, m.end() - 1)
            if end < 0:
                raise ParseError("unclosed \\text{")
            content = s[m.end():end].strip()
            pos = end + 1
            if content:
                toks.extend(_text_tokens(content, space))
            space = False
            continue
        if kind == "num" and re.search(r"[eE]", text):
            exponent = int(re.split(r"[eE]", text)[1])
            if abs(exponent) > _MAX_SCI_EXPONENT:
                raise _TooLarge(f"exponent {exponent} in {text}")
        toks.append(_Tok(kind, text, space))
        space = False
        pos = m.end()
    toks.append(_Tok("end", "", space))
    return toks


def _text_tokens(content: str, space: bool) -> list[_Tok]:
    """``\\text{...}`` content: a connective ("or", "and"), a number, or a word."""
    low = content.lower().strip(" ,")
    if low in ("or", "and", "either"):
        return [_Tok("letters", low, True)]
    if re.fullmatch(r"-?\d+(?:\.\d+)?", content):
        return [_Tok("num", content, space)]
    return [_Tok("text", content, space)]


_FUNCS = {"sin", "cos", "tan", "cot", "sec", "csc", "arcsin", "arccos", "arctan", "sinh", "cosh",
          "tanh", "log", "ln", "exp", "lg"}
_GREEK = {"alpha", "beta", "gamma", "delta", "epsilon", "varepsilon", "zeta", "eta", "theta",
          "vartheta", "iota", "kappa", "lambda", "mu", "nu", "xi", "rho", "sigma", "tau",
          "upsilon", "phi", "varphi", "chi", "psi", "omega", "Gamma", "Delta", "Theta", "Lambda",
          "Xi", "Sigma", "Phi", "Psi", "Omega"}
_REL_CMDS = {r"\le": "<=", r"\leq": "<=", r"\leqslant": "<=", r"\ge": ">=", r"\geq": ">=",
             r"\geqslant": ">=", r"\lt": "<", r"\gt": ">", r"\ne": "!=", r"\neq": "!=", r"\in": "in"}
_MUL_CMDS = {r"\cdot": "*", r"\times": "*", r"\ast": "*", r"\div": "/"}
_CONST_CMDS = {r"\pi": "pi", r"\infty": "inf", r"\infin": "inf", r"\e": "e", r"\imath": "i"}
_CONST_WORDS = {"pi": "pi", "inf": "inf", "infty": "inf", "infinity": "inf"}
_COLLECTIONS = {"tuple", "interval", "set", "list", "union", "matrix"}


class _Parser:
    """Recursive descent over the tokens; precedence low to high: list (``,`` ``or``),
    union (``\\cup``), relation (``= < \\le \\in``), sum (``+ - \\pm``), product (``* / \\cdot``
    and implicit), unary sign, power (``^``, right-associative), postfix (``! %``), primary.
    """

    def __init__(self, tokens: list[_Tok]):
        self.toks = tokens
        self.i = 0
        self.depth = 0

    # -- helpers
    @property
    def tok(self) -> _Tok:
        return self.toks[self.i]

    def peek(self, k: int = 1) -> _Tok:
        return self.toks[min(self.i + k, len(self.toks) - 1)]

    def take(self) -> _Tok:
        t = self.toks[self.i]
        self.i += 1
        return t

    def at(self, kind: str, *texts: str) -> bool:
        t = self.tok
        return t.kind == kind and (not texts or t.text in texts)

    def expect(self, kind: str, text: str) -> None:
        if not self.at(kind, text):
            raise ParseError(f"expected {text!r}, found {self.tok.text or 'end'!r}")
        self.i += 1

    def enter(self) -> None:
        self.depth += 1
        if self.depth > _MAX_PARSE_DEPTH:
            raise ParseError("nested too deeply")

    # -- grammar
    def parse(self) -> Node:
        while self.at("letters", "either"):
            self.take()
        node = self.parse_list(top=True)
        if not self.at("end"):
            raise ParseError(f"unexpected {self.tok.text!r}")
        return node

    def parse_list(self, top: bool = False) -> Node:
        items = [self.parse_union()]
        joiner = ","
        while True:
            if self.at("op", ",", ";"):
                self.take()
            elif top and self.at("letters", "or", "and"):
                joiner = self.take().text
            else:
                break
            while self.at("letters", "either"):
                self.take()
            if self.at("end"):
                break  # "1, 2, 3," trailing separator
            items.append(self.parse_union())
            if len(items) > _MAX_ITEMS:
                raise ParseError("too many items")
        return items[0] if len(items) == 1 else Node("list", tuple(items), joiner)

    def parse_union(self) -> Node:
        parts = [self.parse_relation()]
        while self.at("cmd", r"\cup") or self.at("letters", "U"):
            self.take()
            parts.append(self.parse_relation())
        return parts[0] if len(parts) == 1 else Node("union", tuple(parts))

    def _relop(self) -> str | None:
        t = self.tok
        if t.kind == "op" and t.text in "=<>":
            nxt = self.peek()
            if t.text in "<>" and nxt.kind == "op" and nxt.text == "=" and not nxt.space:
                return t.text + "="
            return t.text
        if self._not_equal_sign():
            return "!="
        if t.kind == "cmd" and t.text in _REL_CMDS:
            return _REL_CMDS[t.text]
        return None

    def _not_equal_sign(self) -> bool:
        """``!=`` written without a space (``4! = 24`` is a factorial then an equation)."""
        nxt = self.peek()
        return self.at("op", "!") and nxt.kind == "op" and nxt.text == "=" and not nxt.space

    def parse_relation(self) -> Node:
        exprs = [self.parse_sum()]
        ops: list[str] = []
        while (op := self._relop()) is not None:
            if self.take().kind == "op" and len(op) == 2:
                self.take()  # "<=" is two tokens, \le one
            ops.append(op)
            exprs.append(self.parse_sum())
        if not ops:
            return exprs[0]
        if ops == ["in"]:
            return Node("in", (exprs[0], exprs[1]))
        if all(o == "=" for o in ops):
            return Node("eq", (exprs[0], exprs[-1]))  # chains "x = 2+1 = 3" keep the ends
        if "in" in ops or "!=" in ops or "=" in ops:
            raise ParseError("mixed relation")
        return Node("rel", tuple(exprs), tuple(ops))

    def parse_sum(self) -> Node:
        terms = [self.parse_product()]
        pm: Node | None = None
        while True:
            if self.at("op", "+"):
                self.take()
                terms.append(self.parse_product())
            elif self.at("op", "-"):
                self.take()
                terms.append(Node("neg", (self.parse_product(),)))
            elif self.at("cmd", r"\pm", r"\mp"):
                self.take()
                left = terms[0] if len(terms) == 1 else Node("add", tuple(terms))
                right = self.parse_product()
                pm = Node("pm", (left, right))
                terms = [pm]
            else:
                break
            if len(terms) > _MAX_ITEMS:
                raise ParseError("too many terms")
        return terms[0] if len(terms) == 1 else Node("add", tuple(terms))

    def _starts_factor(self) -> bool:
        t = self.tok
        if t.kind in ("letters", "text"):
            return t.text not in ("or", "and", "either", "U")
        if t.kind == "cmd":
            return t.text not in _REL_CMDS and t.text not in _MUL_CMDS and t.text not in (
                r"\pm", r"\mp", r"\cup", r"\}", "\\\\", r"\end", r"\rfloor", r"\rceil")
        return t.kind == "op" and t.text in "({"

    def parse_product(self) -> Node:
        factors = [self.parse_unary()]
        while True:
            if self.at("op", "*", "/") or (self.tok.kind == "cmd" and self.tok.text in _MUL_CMDS):
                op = self.take().text
                rhs = self.parse_unary()
                factors.append(Node("recip", (rhs,)) if op in ("/", r"\div") else rhs)
            elif self._starts_factor():
                factors.append(self.parse_power())
            else:
                break
            if len(factors) > _MAX_ITEMS:
                raise ParseError("too many factors")
        return factors[0] if len(factors) == 1 else Node("mul", tuple(factors))

    def parse_unary(self) -> Node:
        self.enter()
        try:
            if self.at("op", "-"):
                self.take()
                return Node("neg", (self.parse_unary(),))
            if self.at("op", "+"):
                self.take()
                return self.parse_unary()
            if self.at("cmd", r"\pm", r"\mp"):
                self.take()
                return Node("pm", (_ZERO, self.parse_unary()))
            return self.parse_power()
        finally:
            self.depth -= 1

    def parse_power(self) -> Node:
        base = self.parse_postfix()
        if self.at("op", "^"):
            self.take()
            self.enter()
            try:
                exponent = self.parse_script()
            finally:
                self.depth -= 1
            base = Node("pow", (base, exponent))
            base = self.parse_postfix_ops(base)
        return base

    def parse_script(self) -> Node:
        """Argument of ``^``: a braced group, a signed script, or one token (whole numbers:
        plain-text answers write ``2^10`` for 2^{10})."""
        if self.at("op", "-", "+"):
            sign = self.take().text
            inner = self.parse_script()
            return Node("neg", (inner,)) if sign == "-" else inner
        if self.at("op", "{"):
            return self.parse_group()
        if self.at("letters"):
            return self._split_letters()
        return self.parse_power()

    def parse_postfix(self) -> Node:
        return self.parse_postfix_ops(self.parse_primary())

    def parse_postfix_ops(self, node: Node) -> Node:
        while True:
            if self.at("op", "!") and not self._not_equal_sign():
                self.take()
                node = Node("fact", (node,))
            elif self.at("op", "%"):
                self.take()
                node = Node("pct", (node,))
            else:
                return node

    def parse_group(self) -> Node:
        self.expect("op", "{")
        self.enter()
        try:
            node = self.parse_list()
        finally:
            self.depth -= 1
        self.expect("op", "}")
        return node

    def parse_arg(self) -> Node:
        """A LaTeX macro argument: ``{...}`` or one character (``\\frac12``, ``\\sqrt2``)."""
        if self.at("op", "{"):
            return self.parse_group()
        t = self.tok
        if t.kind == "num" and len(t.text) > 1 and t.text.isdigit():
            first, t.text = t.text[0], t.text[1:]
            return _num(first)
        if t.kind == "letters":
            return self._split_letters()
        return self.parse_primary()

    def _split_letters(self) -> Node:
        t = self.tok
        first = t.text[0]
        if len(t.text) == 1:
            self.take()
        else:
            t.text = t.text[1:]
        return _letter_node(first)

    def parse_primary(self) -> Node:
        t = self.tok
        if t.kind == "num":
            return self.parse_number()
        if t.kind == "letters":
            return self.parse_letters()
        if t.kind == "text":
            self.take()
            return Node("word", (), t.text)
        if t.kind == "cmd":
            return self.parse_command()
        if t.kind == "op":
            if t.text == "(" or t.text == "[":
                return self.parse_bracket()
            if t.text == "{":
                return self.parse_group()
            if t.text == "|":
                self.take()
                self.enter()
                try:
                    inner = self.parse_sum()
                finally:
                    self.depth -= 1
                self.expect("op", "|")
                return Node("func", (inner,), "abs")
        raise ParseError(f"unexpected {t.text or 'end'!r}")

    def parse_number(self) -> Node:
        t = self.take()
        node = _num(t.text)
        if t.text.isdigit():
            mixed = self._mixed_fraction()
            if mixed is not None:
                return Node("add", (node, mixed))
            if self.at("op", "_") and (self.peek().kind in ("num", "letters") or self.peek().text == "{"):
                self.take()  # a base subscript, 1011_2: keep the digits as written
                if self.at("op", "{"):
                    self.parse_group()
                else:
                    self.take()
        return node

    def _mixed_fraction(self) -> Node | None:
        """``2\\frac{1}{2}`` or ``2 1/2`` right after an integer: a mixed number (2 + 1/2)."""
        toks, i = self.toks, self.i
        t = toks[i]
        if t.kind == "cmd" and t.text == r"\frac":
            seq = toks[i + 1:i + 7]
            if (len(seq) == 6 and [seq[k].text for k in (0, 2, 3, 5)] == ["{", "}", "{", "}"]
                    and seq[1].kind == "num" and seq[4].kind == "num"
                    and seq[1].text.isdigit() and seq[4].text.isdigit()):
                self.i += 7
                return Node("mul", (_num(seq[1].text), Node("recip", (_num(seq[4].text),))))
            nxt = toks[i + 1]
            if nxt.kind == "num" and len(nxt.text) == 2 and nxt.text.isdigit():  # 2\frac12
                self.i += 2
                return Node("mul", (_num(nxt.text[0]), Node("recip", (_num(nxt.text[1]),))))
            return None
        if (t.kind == "num" and t.space and t.text.isdigit() and toks[i + 1].text == "/"
                and toks[i + 2].kind == "num" and toks[i + 2].text.isdigit()
                and not (toks[i + 3].kind == "op" and toks[i + 3].text in "^/")):
            self.i += 3
            return Node("mul", (_num(t.text), Node("recip", (_num(toks[i + 2].text),))))
        return None

    def parse_letters(self) -> Node:
        t = self.take()
        word = t.text
        if word in ("or", "and", "either", "U"):
            raise ParseError(f"unexpected {word!r}")
        low = word.lower()
        if low in _CONST_WORDS and word.islower():
            return Node("const", (), _CONST_WORDS[low])
        for name in sorted(_FUNCS | {"sqrt"}, key=len, reverse=True):
            if word.startswith(name):
                rest = word[len(name):]
                if rest:
                    self.i -= 1
                    self.toks[self.i] = _Tok("letters", rest, False)
                    self.toks.insert(self.i, _Tok("cmd", "\\" + name, t.space))
                else:
                    self.i -= 1
                    self.toks[self.i] = _Tok("cmd", "\\" + name, t.space)
                return self.parse_command()
        node = _letter_node(word) if len(word) == 1 else Node("letters", (), word)
        return self._subscript(node)

    def _subscript(self, node: Node) -> Node:
        if not self.at("op", "_") or node.kind not in ("sym", "letters", "const"):
            return node
        self.take()
        if self.at("op", "{"):
            start = self.i
            self.parse_group()
            sub = "".join(t.text for t in self.toks[start + 1:self.i - 1])
        else:
            sub = self.take().text
        name = node.value if node.kind != "const" else node.value
        return Node("sym", (), f"{name}_{sub}")

    def parse_command(self) -> Node:
        t = self.take()
        name = t.text
        if name == r"\frac":
            num = self.parse_arg()
            den = self.parse_arg()
            return Node("mul", (num, Node("recip", (den,))))
        if name == r"\binom":
            n = self.parse_arg()
            k = self.parse_arg()
            return Node("func", (n, k), "binom")
        if name == r"\sqrt":
            index = None
            if self.at("op", "["):
                self.take()
                index = self.parse_sum()
                self.expect("op", "]")
            arg = self.parse_arg()
            return Node("func", (arg,) if index is None else (arg, index), "sqrt")
        if name in _CONST_CMDS:
            return Node("const", (), _CONST_CMDS[name])
        if name[1:] in _GREEK:
            return self._subscript(Node("sym", (), name[1:]))
        if name[1:] in _FUNCS:
            return self.parse_function(name[1:])
        if name == r"\{":
            return self.parse_set()
        if name in (r"\emptyset", r"\varnothing"):
            return Node("set", ())
        if name == r"\mathbb":
            self.expect("op", "{")
            letter = self.take().text
            self.expect("op", "}")
            if letter == "R":
                return Node("interval", (Node("neg", (_INF,)), _INF), (True, True))
            return Node("word", (), "mathbb " + letter)
        if name in (r"\lfloor", r"\lceil"):
            inner = self.parse_sum()
            self.expect("cmd", r"\rfloor" if name == r"\lfloor" else r"\rceil")
            return Node("func", (inner,), name[2:])
        if name == r"\begin":
            return self.parse_matrix()
        raise ParseError(f"unsupported command {name}")

    def parse_function(self, fname: str) -> Node:
        power = None
        base = None
        if self.at("op", "_") and fname in ("log", "lg"):
            self.take()
            base = self.parse_group() if self.at("op", "{") else self.parse_primary()
        if self.at("op", "^"):
            self.take()
            power = self.parse_script()
        if self.at("op", "(") or self.at("op", "{"):
            arg = self.parse_primary()
        else:
            arg = self.parse_power()
        node = Node("func", (arg,) if base is None else (arg, base), fname)
        return node if power is None else Node("pow", (node, power))

    def parse_bracket(self) -> Node:
        opener = self.take().text
        self.enter()
        try:
            items = [self.parse_union()]
            while self.at("op", ","):
                self.take()
                items.append(self.parse_union())
                if len(items) > _MAX_ITEMS:
                    raise ParseError("too many items")
        finally:
            self.depth -= 1
        if not self.at("op", ")", "]"):
            raise ParseError(f"unclosed {opener!r}")
        closer = self.take().text
        if len(items) == 2 and not (opener == "(" and closer == ")"):
            return Node("interval", tuple(items), (opener == "(", closer == ")"))
        if len(items) == 2:
            return Node("tuple", tuple(items), "(")
        if len(items) == 1:
            if opener + closer not in ("()", "[]"):
                raise ParseError("mismatched brackets")
            return Node("paren", (items[0],))
        if opener + closer not in ("()", "[]"):
            raise ParseError("mismatched brackets")
        return Node("tuple", tuple(items), opener)

    def parse_set(self) -> Node:
        self.enter()
        try:
            items: list[Node] = []
            if not self.at("cmd", r"\}"):
                items.append(self.parse_union())
                while self.at("op", ","):
                    self.take()
                    items.append(self.parse_union())
                    if len(items) > _MAX_ITEMS:
                        raise ParseError("too many items")
        finally:
            self.depth -= 1
        self.expect("cmd", r"\}")
        return Node("set", tuple(items))

    def parse_matrix(self) -> Node:
        self.expect("op", "{")
        env = self.take().text
        self.expect("op", "}")
        if env not in ("pmatrix", "bmatrix", "matrix", "Bmatrix", "vmatrix", "smallmatrix", "array"):
            raise ParseError(f"unsupported environment {env}")
        if env == "array" and self.at("op", "{"):
            self.parse_group_raw()
        rows: list[list[Node]] = [[]]
        self.enter()
        try:
            while not self.at("cmd", r"\end"):
                if self.at("end"):
                    raise ParseError("unclosed matrix")
                rows[-1].append(self.parse_sum())
                if self.at("op", "&"):
                    self.take()
                elif self.at("cmd", "\\\\"):
                    self.take()
                    rows.append([])
                if sum(len(r) for r in rows) > _MAX_ITEMS:
                    raise ParseError("matrix too large")
        finally:
            self.depth -= 1
        self.take()
        self.parse_group_raw()
        if not rows[-1]:
            rows.pop()
        if not rows or any(len(r) != len(rows[0]) for r in rows):
            raise ParseError("ragged matrix")
        return Node("matrix", tuple(x for r in rows for x in r), (len(rows), len(rows[0])))

    def parse_group_raw(self) -> None:
        self.expect("op", "{")
        while not self.at("op", "}"):
            if self.at("end"):
                raise ParseError("unclosed {")
            self.take()
        self.take()


# ------------------------------------------------------------------- node helpers
def _num(text: str) -> Node:
    """A number token as an exact ``Fraction``, flagged when written with a decimal point or
    an exponent (``1.5``, ``2e3``): those select the tolerant comparison."""
    decimal = any(c in text for c in ".eE")
    return Node("num", (), (Fraction(text), decimal))


def _letter_node(letter: str) -> Node:
    """One letter: ``e`` is Euler's number, ``i`` the imaginary unit, anything else a symbol."""
    if letter == "e":
        return Node("const", (), "e")
    if letter == "i":
        return Node("const", (), "i")
    return Node("sym", (), letter)


_ZERO = Node("num", (), (Fraction(0), False))
_INF = Node("const", (), "inf")


def parse(text: str, max_depth: int = DEFAULT_MAX_DEPTH) -> Node:
    """Parse one *normalised* answer (see ``normalize``) into a ``Node``.

    Raises ``ParseError`` for text outside the grammar or nested deeper than ``max_depth``
    brackets. Parsing is linear in the input; nothing is evaluated here except the size
    check on written exponents (``1e99999`` raises ``ParseError`` as too large).
    """
    if _nesting_depth(text) > max_depth:
        raise ParseError(f"brackets nested deeper than {max_depth}")
    return _parse_cached(text)


@lru_cache(maxsize=4096)
def _parse_cached(text: str) -> Node:
    try:
        tokens = _tokenize(text)
    except _TooLarge as exc:
        raise ParseError(f"too large: {exc}") from None
    if len(tokens) == 1:
        raise ParseError("empty answer")
    return _Parser(tokens).parse()


def _nesting_depth(text: str) -> int:
    depth = best = 0
    for c in text:
        if c in "([{":
            depth += 1
            best = max(best, depth)
        elif c in ")]}":
            depth = max(0, depth - 1)
    return best


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


# ----------------------------------------------------------------------- evaluation
_MAX_SECONDS = 1.0               # wall-clock budget of one comparison (a backstop to the guards)
_SAMPLE_POINTS = 3               # points per identity test when free variables appear
_MAX_PM_VARIANTS = 8             # a ± b expands to 2 variants per ±


class _NotExact(Exception):
    """The value is not rational (or too large to keep exact): evaluate numerically."""


class _Ctx:
    """Per-comparison state: tolerance, the mpmath context (private, so the global
    ``mpmath.mp`` precision is never touched and threads do not interfere) and a deadline."""

    def __init__(self, rel_tol: float):
        import mpmath  # heavy-ish import at call time

        self.rel_tol = rel_tol
        self.rel_tol_exact = Fraction(repr(rel_tol))  # 1e-6 as 1/10**6, not a binary float
        self.mp = _mp_context(mpmath)
        self.deadline = time.monotonic() + _MAX_SECONDS
        self.steps = 0

    def tick(self) -> None:
        self.steps += 1
        if self.steps % 64 == 0 and time.monotonic() > self.deadline:
            raise _TooLarge(f"comparison took over {_MAX_SECONDS:g}s")


_THREAD = threading.local()


def _mp_context(mpmath):
    ctx = getattr(_THREAD, "mp", None)
    if ctx is None:
        ctx = mpmath.MPContext()
        ctx.dps = 50
        _THREAD.mp = ctx
    return ctx


def _bits(x: Fraction) -> int:
    return max(x.numerator.bit_length(), x.denominator.bit_length())


def _exact_guard(x: Fraction) -> Fraction:
    if _bits(x) > _MAX_EXACT_BITS:
        raise _NotExact("too many digits")
    return x


def _iroot(n: int, q: int) -> int:
    """Floor of the q-th root of a non-negative integer (Newton's method on integers)."""
    if n < 2:
        return n
    x = 1 << -(-n.bit_length() // q)
    while True:
        y = ((q - 1) * x + n // x ** (q - 1)) // q
        if y >= x:
            return x
        x = y


def _exact_root(x: Fraction, q: int) -> Fraction:
    """The exact q-th root of x when it is rational (odd roots of negatives are real)."""
    if q < 1 or q > 64:
        raise _NotExact("root index")
    if x < 0:
        if q % 2 == 0:
            raise _NotExact("even root of a negative")
        return -_exact_root(-x, q)
    p, d = _iroot(x.numerator, q), _iroot(x.denominator, q)
    if p ** q != x.numerator or d ** q != x.denominator:
        raise _NotExact("irrational root")
    return Fraction(p, d)


def _exact_pow(base: Fraction, exp: Fraction) -> Fraction:
    if exp.denominator != 1:
        if base < 0:
            raise _NotExact("fractional power of a negative")
        return _exact_pow(_exact_root(base, exp.denominator), Fraction(exp.numerator))
    n = exp.numerator
    if base == 0:
        if n < 0:
            raise _Undefined("0 to a negative power")
        return Fraction(1) if n == 0 else Fraction(0)
    if base in (1, -1):
        return base ** (n % 2) if base == -1 else Fraction(1)
    if _bits(base) * abs(n) > _MAX_EXACT_BITS:
        raise _NotExact("power too large to keep exact")
    return base ** n


def _exact(node: Node, ctx: _Ctx) -> Fraction:
    """The exact rational value of a variable-free node, or ``_NotExact``."""
    ctx.tick()
    k, a = node.kind, node.args
    if k == "num":
        return node.value[0]
    if k == "paren":
        return _exact(a[0], ctx)
    if k == "neg":
        return -_exact(a[0], ctx)
    if k == "add":
        total = Fraction(0)
        for x in a:
            total = _exact_guard(total + _exact(x, ctx))
        return total
    if k == "mul":
        prod = Fraction(1)
        for x in a:
            prod = _exact_guard(prod * _exact(x, ctx))
        return prod
    if k == "recip":
        x = _exact(a[0], ctx)
        if x == 0:
            raise _Undefined("division by zero")
        return 1 / x
    if k == "pct":
        return _exact(a[0], ctx) / 100
    if k == "pow":
        return _exact_guard(_exact_pow(_exact(a[0], ctx), _exact(a[1], ctx)))
    if k == "fact":
        x = _exact(a[0], ctx)
        if x.denominator != 1 or x < 0 or x > _MAX_FACTORIAL_EXACT:
            raise _NotExact("factorial")
        return Fraction(math.factorial(int(x)))
    if k == "func":
        name = node.value
        if name == "sqrt":
            q = _exact(a[1], ctx) if len(a) > 1 else Fraction(2)
            if q.denominator != 1:
                raise _NotExact("root index")
            return _exact_root(_exact(a[0], ctx), int(q))
        if name == "abs":
            return abs(_exact(a[0], ctx))
        if name in ("floor", "ceil"):
            x = _exact(a[0], ctx)
            return Fraction(math.floor(x) if name == "floor" else math.ceil(x))
        if name == "binom":
            n, r = _exact(a[0], ctx), _exact(a[1], ctx)
            if n.denominator != 1 or r.denominator != 1 or not 0 <= r <= n or n > 10 ** 6 \
                    or min(r, n - r) > _MAX_FACTORIAL_EXACT:
                raise _NotExact("binomial")
            return _exact_guard(Fraction(math.comb(int(n), int(r))))
    raise _NotExact(k)


def _sample(mp, name: str, point: int):
    """Deterministic pseudo-random value in (0.35, 1.65) for a variable at a sample point."""
    h = int.from_bytes(hashlib.blake2b(f"{name}:{point}".encode(), digest_size=24).digest(), "big")
    return mp.mpf("0.35") + mp.mpf("1.3") * (mp.mpf(h) / mp.mpf(2) ** 192)


def _checked(mp, v):
    """Reject NaN (undefined) and magnitudes beyond the guard (about 10**300000)."""
    if mp.isnan(v):
        raise _Undefined("not a number")
    if not mp.isinf(v) and v != 0 and abs(mp.mag(v)) > _MAX_LOG_MAGNITUDE * 1.45:
        raise _TooLarge("value out of range")
    return v


def _is_real(mp, v) -> bool:
    return not isinstance(v, mp.mpc) or v.imag == 0


def _real(mp, v, what: str):
    if not _is_real(mp, v):
        raise _Undefined(f"{what} of a complex number")
    return mp.mpf(v.real) if isinstance(v, mp.mpc) else v


def _numeric(node: Node, env: dict[str, Any], ctx: _Ctx):
    """High-precision value of a node (mpmath, 50 digits) with variables bound in ``env``."""
    ctx.tick()
    mp = ctx.mp
    k, a = node.kind, node.args
    if k == "num":
        f = node.value[0]
        return mp.mpf(f.numerator) / f.denominator
    if k == "const":
        return {"pi": mp.pi, "e": mp.e, "inf": mp.inf}.get(node.value) if node.value != "i" else mp.mpc(0, 1)
    if k == "sym":
        return env[node.value]
    if k == "letters":
        prod = mp.mpf(1)
        for c in node.value:
            prod *= mp.e if c == "e" else mp.mpc(0, 1) if c == "i" else env[c]
        return prod
    if k == "paren":
        return _numeric(a[0], env, ctx)
    if k == "neg":
        return -_numeric(a[0], env, ctx)
    if k == "add":
        total = mp.mpf(0)
        for x in a:
            total = _checked(mp, total + _numeric(x, env, ctx))
        return total
    if k == "mul":
        prod = mp.mpf(1)
        for x in a:
            prod = _checked(mp, prod * _numeric(x, env, ctx))
        return prod
    if k == "recip":
        x = _numeric(a[0], env, ctx)
        if x == 0:
            raise _Undefined("division by zero")
        return 1 / x
    if k == "pct":
        return _numeric(a[0], env, ctx) / 100
    if k == "pow":
        return _numeric_pow(mp, _numeric(a[0], env, ctx), _numeric(a[1], env, ctx))
    if k == "fact":
        x = _numeric(a[0], env, ctx)
        if not _is_real(mp, x) or mp.isinf(x):
            raise _Undefined("factorial")
        x = _real(mp, x, "factorial")
        if x > _MAX_FACTORIAL_NUMERIC or x < -_MAX_FACTORIAL_NUMERIC:
            raise _TooLarge("factorial too large")
        if x < 0 and x == mp.floor(x):
            raise _Undefined("factorial of a negative integer")
        return _checked(mp, mp.gamma(x + 1))
    if k == "func":
        return _numeric_func(node.value, [_numeric(x, env, ctx) for x in a], mp)
    raise _Incomparable(f"{k} has no numeric value")


def _numeric_pow(mp, base, exp):
    if mp.isinf(base) or mp.isinf(exp):
        raise _Undefined("power of infinity")
    if base == 0:
        if mp.re(exp) <= 0:
            raise _Undefined("0 to a non-positive power")
        return mp.mpf(0)
    # |base**exp| = exp(re(exp)*ln|base| - im(exp)*arg(base)): bound it before computing.
    size = abs(mp.re(exp) * mp.log(abs(base))) + abs(mp.im(exp)) * 4
    if size > _MAX_LOG_MAGNITUDE:
        raise _TooLarge("power too large")
    positive = _is_real(mp, base) and mp.re(base) > 0
    if abs(exp) > _MAX_TRIG_ARG and not positive:
        # (-1)^(10^100000): the phase needs argument reduction as costly as sin(10^100000).
        raise _TooLarge("power with a huge exponent")
    if _is_real(mp, exp) and exp == mp.floor(exp) and _is_real(mp, base) and abs(exp) <= _MAX_TRIG_ARG:
        return _checked(mp, mp.power(_real(mp, base, "power"), int(exp)))
    return _checked(mp, mp.power(base, exp))  # exp(exp * log(base)): cost independent of exp


def _numeric_func(name: str, args: list, mp):
    x = args[0]
    if mp.isinf(x):
        raise _Undefined(f"{name} of infinity")
    if name in ("sin", "cos", "tan", "cot", "sec", "csc"):
        if abs(x) > _MAX_TRIG_ARG:
            raise _TooLarge("trigonometric argument too large")
        v = {"sin": mp.sin, "cos": mp.cos, "tan": mp.tan, "cot": mp.tan, "sec": mp.cos, "csc": mp.sin}[name](x)
        if name in ("cot", "sec", "csc"):
            if abs(v) < _ABS_FLOOR:
                raise _Undefined(f"{name} pole")
            v = 1 / v
        elif name == "tan" and abs(v) > 1e40:
            raise _Undefined("tan pole")
        return _checked(mp, v)
    if name in ("sinh", "cosh", "tanh", "exp"):
        if abs(mp.re(x)) > _MAX_LOG_MAGNITUDE or abs(mp.im(x)) > _MAX_TRIG_ARG:
            raise _TooLarge(f"{name} argument too large")
        return _checked(mp, {"sinh": mp.sinh, "cosh": mp.cosh, "tanh": mp.tanh, "exp": mp.exp}[name](x))
    if name in ("arcsin", "arccos", "arctan"):
        return _checked(mp, {"arcsin": mp.asin, "arccos": mp.acos, "arctan": mp.atan}[name](x))
    if name in ("log", "ln", "lg"):
        if x == 0:
            raise _Undefined("log 0")
        value = mp.log(x)
        if name == "lg" or (name == "log" and len(args) > 1):
            base = args[1] if len(args) > 1 else mp.mpf(10)
            if base == 0 or base == 1 or mp.isinf(base):
                raise _Undefined("log base")
            value = value / mp.log(base)
        return _checked(mp, value)
    if name == "sqrt":
        if len(args) == 1:
            return mp.sqrt(x)
        n = args[1]
        if n == 0 or mp.isinf(n):
            raise _Undefined("root index")
        if _is_real(mp, n) and _is_real(mp, x) and n == mp.floor(n) and int(n) % 2 and x < 0:
            return -mp.root(-_real(mp, x, "root"), int(n))  # real odd root of a negative
        return _numeric_pow(mp, x, 1 / n)
    if name == "abs":
        return abs(x)
    if name in ("floor", "ceil"):
        x = _real(mp, x, name)
        return mp.floor(x) if name == "floor" else mp.ceil(x)
    if name == "binom":
        n, r = _real(mp, x, "binom"), _real(mp, args[1], "binom")
        if abs(n) > _MAX_FACTORIAL_NUMERIC * 50 or abs(r) > _MAX_FACTORIAL_NUMERIC * 50:
            raise _TooLarge("binomial too large")
        return _checked(mp, mp.binomial(n, r))
    raise _Incomparable(f"unknown function {name}")


def _close(mp, x, y, tol) -> bool:
    if mp.isinf(x) or mp.isinf(y):
        return x == y
    diff = abs(x - y)
    return diff <= _ABS_FLOOR or diff <= tol * max(abs(x), abs(y))


def _scalar_equal(a: Node, b: Node, ctx: _Ctx) -> bool:
    """Two expressions (no collections, no relations) have the same value."""
    decimal = _has_decimal(a) or _has_decimal(b)
    free = sorted(_free_symbols(a) | _free_symbols(b))
    if not free:
        try:
            x, y = _exact(a, ctx), _exact(b, ctx)
        except _NotExact:
            pass
        except _Undefined:
            return False
        else:
            if decimal:
                return abs(x - y) <= ctx.rel_tol_exact * max(abs(x), abs(y))
            return x == y
    mp = ctx.mp
    tol = mp.mpf(repr(ctx.rel_tol)) if decimal else mp.mpf(_EXACT_TOL)
    compared = 0
    for point in range(_SAMPLE_POINTS if free else 1):
        env = {name: _sample(mp, name, point) for name in free}
        try:
            x, y = _numeric(a, env, ctx), _numeric(b, env, ctx)
        except _Undefined:
            continue
        if not _close(mp, x, y, tol):
            return False
        compared += 1
    return compared > 0


def _proportional(f: Node, g: Node, ctx: _Ctx) -> bool:
    """``f = c*g`` for a constant ``c != 0`` (the equations ``f = 0`` and ``g = 0`` agree)."""
    mp = ctx.mp
    free = sorted(_free_symbols(f) | _free_symbols(g))
    tol = mp.mpf(repr(ctx.rel_tol)) if (_has_decimal(f) or _has_decimal(g)) else mp.mpf(_EXACT_TOL) * 1e6
    ratio = None
    for point in range(_SAMPLE_POINTS):
        env = {name: _sample(mp, name, point) for name in free}
        try:
            x, y = _numeric(f, env, ctx), _numeric(g, env, ctx)
        except _Undefined:
            continue
        if mp.isinf(x) or mp.isinf(y):
            return False
        if abs(x) <= _ABS_FLOOR and abs(y) <= _ABS_FLOOR:
            continue
        if abs(x) <= _ABS_FLOOR or abs(y) <= _ABS_FLOOR:
            return False
        r = x / y
        if ratio is None:
            ratio = r
        elif not _close(mp, r, ratio, tol):
            return False
    return ratio is not None


# ---------------------------------------------------------------------- equivalence
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
    # Scalars; a top-level percentage may be read as its number or as a fraction.
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


# ------------------------------------------------------------------------- scoring
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
    if len(candidates) > _MAX_CANDIDATES:
        return Score(0.0, f"hedging: {len(candidates)} boxed answers")
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


@VERIFIERS.register("math")
class MathVerifier(Verifier):
    """Final answer (boxed, "the answer is", last number) equivalent to the row's answer; rel_tol for decimals.

    Options (``task.verifier_args.math``): ``fallbacks`` (extraction strategies in order,
    from ``boxed``, ``answer_tag``, ``answer_is``, ``last_number``), ``rel_tol`` (relative
    tolerance when a decimal is involved, default 1e-6), ``max_completion_chars``,
    ``max_answer_chars``, ``max_depth`` (bracket nesting), ``timeout_s``/``memory_mb``
    (limits of the isolated worker). Rewards: 1.0 correct, 0.0 otherwise (wrong, no
    answer, hedging, too large), ``None`` when the row has no reference answer.
    """

    fields = ("answer",)
    correctness = True
    isolation = "process"

    def __init__(self, timeout_s: float = 10.0, memory_mb: int = 2048, **opts: Any):
        self.options = _Options.build(**opts)
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or timeout_s <= 0:
            raise UserError(f"math verifier: timeout_s must be a positive number, got {timeout_s!r}")
        if isinstance(memory_mb, bool) or not isinstance(memory_mb, int) or memory_mb < 64:
            raise UserError(f"math verifier: memory_mb must be an integer >= 64, got {memory_mb!r}")
        self.timeout_s = float(timeout_s)
        self.memory_mb = memory_mb

    def score(self, completions: Sequence[str], **fields: Sequence[Any]) -> list[Score]:
        answers = fields.get("answer")
        if answers is None:
            raise UserError("math verifier: rows need an 'answer' field")
        if len(answers) != len(completions):
            raise ValueError(f"math verifier: {len(completions)} completions but {len(answers)} answers")
        return [_check(c, a, self.options) for c, a in zip(completions, answers)]
