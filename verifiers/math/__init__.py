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
    test: ``(x+1)^2`` equals ``x^2+2x+1``; variables are sampled in (0.35, 1.65) and, where
    both sides are real, in (1.65, 9), so ``\\sqrt{x^2}`` equals ``x`` as for positive reals
    but ``2-x`` is not ``|x-2|``);
  - **tolerance policy**: if either side is written with a decimal point (or ``1.5e3``),
    values must agree within ``rel_tol`` of the larger magnitude, bound included (default
    1e-6, so ``0.333333`` = ``1/3`` but ``0.3333`` does not), and an answer that is one plain
    decimal within half its last written place (``1000001.0`` != ``1000000``); with no decimal on either side
    the comparison is exact for rationals (``1000000`` != ``1000001``) and within 1e-30
    relative at 50 digits otherwise (``\\frac{1393}{985}`` != ``\\sqrt{2}``);
  - ``e`` is Euler's number and ``i`` the imaginary unit (``e^{i\\pi}`` = ``-1``);
    ``\\log``/``\\ln`` are natural logarithms, ``\\lg`` base 10, ``\\log_b`` base b;
    odd roots of negatives are real (``\\sqrt[3]{-8}`` = ``-2``);
  - ``50\\%`` equals ``50`` and ``0.5`` (two percentages compare as written); ``90^\\circ`` equals ``90``;
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

Layout: one module per concern, each importing only modules listed before it, none this one:
``limits`` (option defaults, guards), ``nodes`` (the parse tree, errors, tree helpers),
``latex`` (braces, tokenizer, command tables), ``extraction``, ``normalization``, ``parser``,
``evaluation`` (exact and numeric values), ``equivalence``, ``scoring`` (``check``). This
front module registers the ``math`` verifier and exposes the public names;
``verifiers.mathcheck``, the earlier import path, re-exports them.
"""

from __future__ import annotations

from typing import Any, Sequence

from grpo.errors import UserError
from grpo.registry import VERIFIERS
from verifiers.base import Score, Verifier
from verifiers.math.equivalence import equivalent
from verifiers.math.extraction import DEFAULT_FALLBACKS, FALLBACKS, extract_answer, extract_boxed
from verifiers.math.limits import (DEFAULT_MAX_ANSWER_CHARS, DEFAULT_MAX_COMPLETION_CHARS, DEFAULT_MAX_DEPTH,
                                   DEFAULT_REL_TOL)
from verifiers.math.nodes import Node, ParseError
from verifiers.math.normalization import normalize
from verifiers.math.parser import parse
from verifiers.math.scoring import _check, _Options, check

__all__ = ["DEFAULT_FALLBACKS", "DEFAULT_MAX_ANSWER_CHARS", "DEFAULT_MAX_COMPLETION_CHARS", "DEFAULT_MAX_DEPTH",
           "DEFAULT_REL_TOL", "FALLBACKS", "MathVerifier", "Node", "ParseError", "check", "equivalent",
           "extract_answer", "extract_boxed", "normalize", "parse"]


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
