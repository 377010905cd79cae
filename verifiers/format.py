"""The ``format`` verifier: a shaping reward for answer layout, not for correctness.

Two styles:

* ``tags`` (default): ``<think>...</think>`` then ``<answer>...</answer>`` (tag names
  configurable). The policy, chosen so a small model cannot collect the reward with
  a degenerate layout:

  - exactly one answer block, and it must hold non-whitespace text
    (``<answer></answer>`` earns nothing);
  - with ``require_think`` exactly one non-empty think block, placed before the
    answer; without it a think block is optional (and may be empty, as chat
    templates with thinking switched off emit), but at most one and before the answer;
  - no nesting (``<think><answer>..</answer></think>`` fails), no unmatched or stray
    opening/closing tags, no repeated blocks;
  - with ``allow_outside=False`` only whitespace may surround the blocks.

  ``partial_credit`` turns the all-or-nothing reward into the share of these checks
  passed: answer block, think block (when required), structure, nothing outside.
  The last two only count once an answer block exists, so an empty completion
  still scores 0.
* ``boxed``: exactly one ``\\boxed{...}`` with balanced braces and non-empty content;
  the reasoning around it is free text.

Every check is a linear scan: one ``re.finditer`` over a pattern of literal
alternatives (no nested quantifiers, so no backtracking blow-up) plus string
slicing, and the brace matcher is a single pass.
"""

from __future__ import annotations

import re
from typing import Sequence

from grpo.errors import UserError
from grpo.registry import VERIFIERS
from verifiers.base import Score, Verifier

_TAG_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,31}")


@VERIFIERS.register("format")
class FormatVerifier(Verifier):
    """Shaping reward for layout: <think>..</think><answer>..</answer> tags, or one \\boxed{}.

    Args:
        style: ``"tags"`` or ``"boxed"``.
        think_tag / answer_tag: tag names for the ``tags`` style.
        require_think: the think block is mandatory (else optional).
        allow_outside: text outside the blocks is allowed (else only whitespace).
        partial_credit: reward the share of checks passed instead of 0/1 (``tags`` only).
    """

    fields = ()
    correctness = False
    isolation = "inline"  # bounded str/regex work, no reason to pay for a worker process

    def __init__(self, style: str = "tags", think_tag: str = "think", answer_tag: str = "answer",
                 require_think: bool = True, allow_outside: bool = False, partial_credit: bool = False):
        if style not in ("tags", "boxed"):
            raise UserError(f"format: style must be 'tags' or 'boxed', got {style!r}")
        for tag in (think_tag, answer_tag):
            if not isinstance(tag, str) or not _TAG_NAME.fullmatch(tag):
                raise UserError(f"format: tag names must be letters/digits/_/- (starting with a letter), got {tag!r}")
        if think_tag == answer_tag:
            raise UserError("format: think_tag and answer_tag must differ")
        if partial_credit and style != "tags":
            raise UserError("format: partial_credit applies to style 'tags' only")
        self.style = style
        self.think, self.answer = think_tag, answer_tag
        self.require_think = bool(require_think)
        self.allow_outside = bool(allow_outside)
        self.partial_credit = bool(partial_credit)
        names = "|".join(re.escape(t) for t in (think_tag, answer_tag))
        self._tag_re = re.compile(rf"<(/?)({names})>")

    def score(self, completions: Sequence[str], **fields) -> list[Score]:
        check = self._check_boxed if self.style == "boxed" else self._check_tags
        return [check(c if isinstance(c, str) else "") for c in completions]

    # ------------------------------------------------------------------ boxed
    def _check_boxed(self, text: str) -> Score:
        n = text.count("\\boxed")
        if n == 0:
            return Score(0.0, "no \\boxed{}")
        if n > 1:
            return Score(0.0, f"{n} \\boxed{{}} found (want exactly 1)")
        start = text.index("\\boxed") + len("\\boxed")
        while start < len(text) and text[start].isspace():  # "\\boxed {5}", as the math verifier reads it
            start += 1
        if start >= len(text) or text[start] != "{":
            return Score(0.0, "\\boxed not followed by {")
        end = matching_brace(text, start)
        if end < 0:
            return Score(0.0, "unbalanced braces in \\boxed{}")
        if _blank(text[start + 1:end]):
            return Score(0.0, "empty \\boxed{}")
        return Score(1.0, "ok")

    # ------------------------------------------------------------------- tags
    def _check_tags(self, text: str) -> Score:
        problem = None  # first structural problem found, as a reason
        blocks: dict[str, list[tuple[int, int, int, int]]] = {self.think: [], self.answer: []}
        open_tag: tuple[str, int, int] | None = None  # (name, tag start, content start)
        for m in self._tag_re.finditer(text):
            closing, name = m.group(1) == "/", m.group(2)
            if not closing:
                if open_tag is not None:
                    problem = problem or f"<{name}> nested inside <{open_tag[0]}>"
                    continue
                open_tag = (name, m.start(), m.end())
            elif open_tag is None:
                problem = problem or f"stray </{name}>"
            elif open_tag[0] != name:
                problem = problem or f"</{name}> closes <{open_tag[0]}>"
            else:
                blocks[name].append((open_tag[1], open_tag[2], m.start(), m.end()))
                open_tag = None
        if open_tag is not None:
            problem = problem or f"unclosed <{open_tag[0]}>"

        answers, thinks = blocks[self.answer], blocks[self.think]
        answer_ok, answer_why = self._one_block(text, self.answer, answers)
        think_ok, think_why = self._one_block(text, self.think, thinks)
        if problem is None and thinks and answers and thinks[0][0] > answers[0][0]:
            problem = f"<{self.answer}> before <{self.think}>"
        outside_why = ""
        if not self.allow_outside and answers:
            spans = sorted((b[0], b[3]) for b in answers + thinks)
            pos, outside = 0, []
            for start, end in spans:
                outside.append(text[pos:start])
                pos = max(pos, end)
            outside.append(text[pos:])
            if any(part.strip() for part in outside):
                outside_why = f"text outside the <{self.think}>/<{self.answer}> blocks"

        checks = [(answer_ok, answer_why)]
        if self.require_think:
            checks.append((think_ok, think_why))
        elif len(thinks) > 1:  # an optional think block may be empty, but not repeated
            checks[0] = (False, answer_why or think_why)
        if answers:  # structure and cleanliness only count once there is an answer block
            checks.append((problem is None, problem or ""))
            if not self.allow_outside:
                checks.append((not outside_why, outside_why))
        else:
            checks += [(False, "")] * (1 + (not self.allow_outside))
        passed = sum(ok for ok, _ in checks)
        if passed == len(checks):
            return Score(1.0, "ok")
        reasons = [problem] if problem else []  # the structural cause first: it explains the rest
        reasons += [why for ok, why in checks if not ok and why and why not in reasons]
        reward = passed / len(checks) if self.partial_credit else 0.0
        return Score(reward, "; ".join(reasons))

    @staticmethod
    def _one_block(text: str, name: str, blocks: list[tuple[int, int, int, int]]) -> tuple[bool, str]:
        if not blocks:
            return False, f"no <{name}>...</{name}> block"
        if len(blocks) > 1:
            return False, f"{len(blocks)} <{name}> blocks (want exactly 1)"
        _, content_start, content_end, _ = blocks[0]
        if _blank(text[content_start:content_end]):
            return False, f"empty <{name}> block"
        return True, ""


_INVISIBLE = re.compile(r"[\s\u200b-\u200f\u2060-\u2064\ufeff{}~.]|\\(?:[,;:! ]|quad|qquad|left|right|"
                        r"displaystyle|textstyle)(?![A-Za-z])|\\[A-Za-z]+\*?(?=\s*\{)")
_SPACE_WITH_ARGUMENT = re.compile(r"\\(?:[hv]space\*?|[hv]?phantom)\s*\{[^{}]*\}")


def _blank(content: str) -> bool:
    """Nothing a reader would see: whitespace, zero-width characters, LaTeX spacing, phantoms,
    commands with empty arguments (``\\text{ }``, ``\\texttt{}``), an empty ``\\boxed{}``."""
    return not _INVISIBLE.sub("", _SPACE_WITH_ARGUMENT.sub("", content))


def matching_brace(text: str, open_at: int) -> int:
    """Index of the ``}`` matching the ``{`` at ``open_at`` (-1 if unbalanced); one pass."""
    depth = 0
    for i in range(open_at, len(text)):
        ch = text[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
    return -1
