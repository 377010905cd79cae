"""Normalisation: one extracted answer to canonical text (presentation, units, separators removed)."""

from __future__ import annotations

import re

from verifiers.math.latex import _MATH_WORDS, _unwrap_commands


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
# Units glued to a number ("5cm") are stripped only when known; spaced words always are.
# Scale words are a factor, not a unit ("1.5 million" is 1500000, not 1.5); "squared" or
# "cubed" straight after the number changes it ("3 squared"), so it stops the stripping (after a
# unit, "25 cm squared", it is part of the unit).
_SCALES = {"hundred": 100, "thousand": 1000, "million": 10 ** 6, "billion": 10 ** 9, "trillion": 10 ** 12,
           "dozen": 12}
_POWER_WORDS = {"squared", "cubed"}
# "\mathrm{cm}" at the end is a unit in upright type: read it as "\text{cm}" before the
# generic rule deletes "\mathrm" (which left "5{cm}"); a single letter only when it is a unit
# symbol ("\mathrm{e}" is Euler's number).
_MATHRM_TAIL = re.compile(r"\\mathrm\s*\{(\s*~?\s*(?:[A-Za-z]{2,}[^{}]*|[mgslhNJWVK]))\}"
                          r"((?:\s*\^\s*\{?\s*[23]\s*\}?)?\s*)$")
_PLAIN_NUMBER_END = re.compile(r"(?<![\w.])(-?\d+(?:\.\d+)?)$")
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
    # A row break "\\\\" is kept whole ("\\\\ 3" is not the spacing command "\\ " before a 3, and
    # "\\\\[4pt]" not the display math "\\["); its spacing argument is dropped.
    s = re.sub(r"\\\\(?:\[[^\]]{0,12}\])?", "\0", s)
    s = s.replace(r"\$", "")  # before "$": \$5 is five dollars, not the end of math mode
    s = s.replace("$", "").replace(r"\(", "").replace(r"\)", "").replace(r"\[", "").replace(r"\]", "")
    for old, new in _SIMPLE_REPLACEMENTS:
        s = s.replace(old, new)
    s = s.replace("\0", "\\\\")
    s = _MATHRM_TAIL.sub(r"\\text{\1}\2", s)
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
            prefix = (head + tail[:m.start()]).rstrip()
            inner = [w.lower() for w in re.findall(r"[A-Za-z]+", m.group(0).split("{", 1)[1])]
            if len(inner) == 1 and (inner[0] in _SCALES or inner[0] in _POWER_WORDS):
                return _scaled(prefix, inner[0]) if re.search(r"\d$", prefix) else s
            s = prefix
            continue
        m = _WORD_TAIL.search(tail)
        if not m:
            return s
        words = [w.lower() for w in re.split(r"[\s/.]+", m.group(1)) if w]
        prefix = (head + tail[:m.start()]).rstrip()
        if len(words) == 1 and (words[0] in _SCALES or words[0] in _POWER_WORDS) and re.search(r"\d$", prefix):
            return _scaled(prefix, words[0])
        glued = not (head + tail[:m.start()]).endswith((" ", "}", ")"))
        if (not prefix or not re.search(r"\d", prefix) or any(w in _MATH_WORDS for w in words)
                or (glued and not all(w in _KNOWN_UNITS for w in words))
                or (sum(len(w) for w in words) < 2 and words[0] not in _KNOWN_UNITS)
                or prefix.endswith(("^", "_", "\\"))):
            return s
        s = prefix
    return s


def _scaled(prefix: str, word: str) -> str:
    """``prefix`` (ending in a number) times a scale word: "1.5 million" -> "1500000" (exact, so a
    plain number's comparison applies, not a decimal's tolerance); a power word ("3 squared")
    is kept as written, which does not parse: it is not the number before it."""
    if word in _POWER_WORDS:
        return f"{prefix} {word}"
    m = _PLAIN_NUMBER_END.search(prefix)
    if m and m.start() == 0:
        from fractions import Fraction

        value = Fraction(m.group(1)) * _SCALES[word]
        return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
    return f"{prefix} \\times {_SCALES[word]}"
