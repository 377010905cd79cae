"""LaTeX handling: brace matching, command unwrapping, the tokenizer and the command vocabulary.

Shared by extraction (``\\boxed{}`` contents), normalisation (unwrapping, words that are
mathematics) and the parser (tokens, command tables). Everything here is a linear scan.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from verifiers.math.limits import _MAX_SCI_EXPONENT
from verifiers.math.nodes import ParseError, _TooLarge


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


# ------------------------------------------------------------------------ tokens
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


# -------------------------------------------------------------------- vocabulary
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
# Names that are mathematics, never a unit: keep "3 \pi", "2 sin x", "x or y".
_MATH_WORDS = {"pi", "sin", "cos", "tan", "cot", "sec", "csc", "log", "ln", "exp", "sqrt", "inf",
               "infty", "infinity", "or", "and", "arcsin", "arccos", "arctan", "sinh", "cosh",
               "tanh", "e", "i", "mod", "pmod", "frac", "cup"}
