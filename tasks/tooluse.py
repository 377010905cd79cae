"""Arithmetic a 135M model gets wrong by heart but right with a calculator tool.

Rows ask for two-digit products (``23 * 47``), sums of two products (``23 * 47 + 12 * 34``,
two calls or one longer one) or, as a share of the mix, one-digit sums the model can do
without the tool. The system message describes the ``<calc>EXPR</calc>`` call format;
``shots`` worked example dialogues precede the question (the README has the measured
base-model call rates). Train with ``tools.enabled: [calculator]``.
"""

from __future__ import annotations

import hashlib
import random
import sys
from typing import Any

from grpo.errors import UserError
from grpo.registry import TASKS
from tasks.base import Split, Task

SYSTEM_PROMPT = ("You can use a calculator. Write <calc>EXPRESSION</calc> and the result appears as "
                 "<output>RESULT</output>.")
# Worked example dialogues placed before the question (``shots`` of them).
EXAMPLES = [("What is 12 * 11?", "<calc>12 * 11</calc><output>132</output> The answer is 132."),
            ("What is 31 * 25 + 14 * 16?", "<calc>31 * 25</calc><output>775</output> <calc>14 * 16</calc>"
                                           "<output>224</output> <calc>775 + 224</calc><output>999</output> "
                                           "The answer is 999.")]
_KINDS = ("product", "sum_of_products", "small_sum")


@TASKS.register("calc_arith")
class CalcArith(Task):
    """Products of two-digit numbers (and sums of two such products) to solve with the calculator tool.

    Args:
        mix: share of each problem kind, from ``product`` (a * b), ``sum_of_products``
            (a * b + c * d) and ``small_sum`` (a + b with one digit each: no tool needed).
        shots: worked example dialogues (user question, assistant answer with calls) before
            the question, 0 to 2.
        system_prompt: replace the system message describing the tool.
        train_size / heldout_size: rows per split; the split of a problem is a hash of it.
        seed: problem sampling and the split hash salt.
    Rows: chat prompt (system + user), ``answer`` (integer text), verifiers ``{"math": 1.0}``.
    """

    def __init__(self, mix: dict[str, float] | None = None, shots: int = 1, system_prompt: str | None = None,
                 train_size: int = 1000, heldout_size: int = 100, heldout_fraction: float = 0.3, seed: int = 0):
        self.mix = dict(mix or {"product": 0.5, "sum_of_products": 0.5})
        bad = sorted(set(self.mix) - set(_KINDS))
        if bad or not self.mix or any(v < 0 for v in self.mix.values()) or sum(self.mix.values()) <= 0:
            raise UserError(f"calc_arith: mix maps {list(_KINDS)} to non-negative shares, got {self.mix}")
        if not 0 < heldout_fraction < 1:
            raise UserError("calc_arith: heldout_fraction must be in (0, 1)")
        if not 0 <= shots <= len(EXAMPLES):
            raise UserError(f"calc_arith: shots must be between 0 and {len(EXAMPLES)}, got {shots}")
        self.shots = shots
        self.system_prompt = SYSTEM_PROMPT if system_prompt is None else system_prompt
        self.seed, self.heldout_fraction = seed, heldout_fraction
        self.sizes = {"train": train_size, "heldout": heldout_size}

    def split_of(self, expression: str) -> Split:
        h = int(hashlib.sha256(f"{self.seed}:{expression}".encode()).hexdigest()[:8], 16)
        return "heldout" if h / 0xFFFFFFFF < self.heldout_fraction else "train"

    def _problem(self, rng: random.Random) -> tuple[str, int]:
        kinds, weights = zip(*self.mix.items())
        kind = rng.choices(kinds, weights)[0]
        if kind == "small_sum":
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            return f"{a} + {b}", a + b
        a, b = rng.randint(11, 99), rng.randint(11, 99)
        if kind == "product":
            return f"{a} * {b}", a * b
        c, d = rng.randint(11, 99), rng.randint(11, 99)
        return f"{a} * {b} + {c} * {d}", a * b + c * d

    def rows(self, split: Split) -> list[dict[str, Any]]:
        rng = random.Random(f"calc_arith:{self.seed}:{split}")
        seen: set[str] = set()
        out: list[dict[str, Any]] = []
        for _ in range(self.sizes[split] * 50):
            if len(out) == self.sizes[split]:
                break
            expression, value = self._problem(rng)
            if expression in seen or self.split_of(expression) != split:
                continue
            seen.add(expression)
            out.append({"id": f"calc_arith-{split}-{len(out)}",
                        "prompt": self._messages(f"What is {expression}?"),
                        "answer": str(value), "verifiers": {"math": 1.0}})
        if len(out) < self.sizes[split]:  # the mix's kinds have fewer distinct problems than asked for
            print(f"warning: calc_arith: {len(out)} distinct {split} problems for mix {self.mix}, not the "
                  f"{self.sizes[split]} asked for ({split}_size)", file=sys.stderr)
        return out

    def _messages(self, question: str) -> list[dict[str, str]]:
        messages = [{"role": "system", "content": self.system_prompt}]
        for q, a in EXAMPLES[:self.shots]:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return messages + [{"role": "user", "content": question}]
