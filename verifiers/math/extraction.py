"""Answer extraction: the named strategies that find candidate final answers in a completion.

``extract_answer`` tries the strategies of ``fallbacks`` in order and keeps the first that
finds anything (the package docstring describes each strategy).
"""

from __future__ import annotations

import re
from typing import Sequence

from grpo.errors import UserError
from grpo.registry import closest
from verifiers.math.latex import _MATH_WORDS, _matching_brace


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


# A clause after "the answer is" that is prose, not an answer: a judgement ("... the answer is
# correct"), narration ("Answer: let's compute ..."), or a description of the result ("the final
# answer is the sum of both"). A lone letter ("A", "(B)"), a word answer ("yes", "undefined")
# and any clause with a digit or math are answers.
_PROSE_START = re.compile(
    r"^(?:correct|incorrect|right|wrong|below|above|following|clear|obvious|simple|straightforward|not|"
    r"this|that|as|in|to|let'?s|let us|we|first|now|then|the (?:sum|product|total|difference|number|"
    r"result|value|quotient|ratio|same|one|answer))\b", re.I)


def _extract_answer_is(text: str) -> list[str]:
    matches = list(_ANSWER_IS.finditer(text))
    if not matches:
        return []
    last = _take_clause(text, matches[-1].end())
    if not (last and _is_prose(last)):
        return [last] if last else []
    for m in reversed(matches[:-1]):  # "The answer is 12. To check that the answer is right, ..."
        clause = _take_clause(text, m.end())
        if clause and not _is_prose(clause):
            return [clause]
    if re.search(r"\d", text[matches[-1].end() + len(last):]):
        return []  # "Answer: let's compute ... = 12": the number that follows is the answer
    return [last]


def _is_prose(clause: str) -> bool:
    """True for a clause with no digit and no math that starts like a sentence (``_PROSE_START``)."""
    if re.search(r"[\d$\\^=+*/<>]", clause):
        return False
    return bool(_PROSE_START.match(clause.strip(" *(")))


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
