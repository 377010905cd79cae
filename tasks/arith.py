"""Procedurally generated arithmetic, the default task: no data files, any size, offline."""

from __future__ import annotations

import hashlib
import itertools
import random
import sys
from typing import Any

from grpo.errors import UserError
from grpo.registry import TASKS
from tasks.base import Split, Task

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


@TASKS.register("arith")
class Arith(Task):
    """Arithmetic like '7 + 5' (digits, operations, terms are knobs); held-out split disjoint by hash.

    Args:
        digits: digits per operand (1 -> 0..9, 2 -> 10..99, ...).
        operations: operators drawn per gap, from '+', '-', '*'.
        terms: operands per expression.
        heldout_fraction: share of all problems that belong to the held-out split,
            decided by a hash of the expression, so the splits never overlap.
        train_size / heldout_size: rows per split (capped by how many exist; when the
            space is small every problem of the split is used).
        template: the user message; ``{expression}`` is replaced.
        seed: problem sampling and the split hash salt.
    Rows: chat prompt, ``answer`` (the integer as text), verifiers ``{"math": 1.0}``.
    """

    def __init__(self, digits: int = 1, operations: list[str] | str = "+", terms: int = 2,
                 heldout_fraction: float = 0.3, train_size: int = 2000, heldout_size: int = 200,
                 template: str = "What is {expression}?", seed: int = 0,
                 verifiers: dict[str, float] | None = None):
        ops = list(operations)
        if digits < 1 or terms < 2:
            raise UserError("arith: digits must be >= 1 and terms >= 2")
        if any(op not in _OPS for op in ops):
            raise UserError(f"arith: operations must be among {list(_OPS)}, got {ops}")
        if not 0 < heldout_fraction < 1:
            raise UserError("arith: heldout_fraction must be in (0, 1)")
        if "{expression}" not in template:
            raise UserError("arith: template must contain {expression}")
        if train_size < 0 or heldout_size < 0:
            raise UserError(f"arith: train_size and heldout_size must be >= 0, got {train_size} and {heldout_size}")
        self.digits, self.ops, self.terms = digits, ops, terms
        self.heldout_fraction, self.seed, self.template = heldout_fraction, seed, template
        self.sizes = {"train": train_size, "heldout": heldout_size}
        self.verifiers = dict(verifiers or {"math": 1.0})

    def _operand_range(self) -> range:
        low = 0 if self.digits == 1 else 10 ** (self.digits - 1)
        return range(low, 10 ** self.digits)

    def split_of(self, expression: str) -> Split:
        h = int(hashlib.sha256(f"{self.seed}:{expression}".encode()).hexdigest()[:8], 16)
        return "heldout" if h / 0xFFFFFFFF < self.heldout_fraction else "train"

    def _expressions(self, split: Split) -> list[str]:
        values = self._operand_range()
        space = len(values) ** self.terms * len(self.ops) ** (self.terms - 1)
        want = self.sizes[split]
        if space <= 20_000:  # small space: enumerate, keep the split, shuffle deterministically
            out = []
            for nums in itertools.product(values, repeat=self.terms):
                for ops in itertools.product(self.ops, repeat=self.terms - 1):
                    expr = _render(nums, ops)
                    if self.split_of(expr) == split:
                        out.append(expr)
            random.Random(f"{self.seed}:{split}").shuffle(out)
            return out[:want]
        rng = random.Random(f"{self.seed}:{split}")
        seen: set[str] = set()
        out = []
        for _ in range(100 * want + 10_000):  # bounded: the split may hold fewer distinct problems than asked
            if len(out) == want:
                break
            expr = _render([rng.choice(values) for _ in range(self.terms)],
                           [rng.choice(self.ops) for _ in range(self.terms - 1)])
            if expr not in seen and self.split_of(expr) == split:
                seen.add(expr)
                out.append(expr)
        if len(out) < want:
            print(f"warning: arith: {len(out)} distinct {split} problems found, not the {want} asked for "
                  f"({split}_size; the {split} split holds about {space * self._share(split):.0f})", file=sys.stderr)
        return out

    def _share(self, split: Split) -> float:
        return self.heldout_fraction if split == "heldout" else 1 - self.heldout_fraction

    def rows(self, split: Split) -> list[dict[str, Any]]:
        return [{
            "id": f"arith-{split}-{i}",
            "prompt": [{"role": "user", "content": self.template.replace("{expression}", expr)}],
            "answer": str(evaluate(expr)),
            "verifiers": dict(self.verifiers),
        } for i, expr in enumerate(self._expressions(split))]


def _render(nums, ops) -> str:
    parts = [str(nums[0])]
    for op, n in zip(ops, nums[1:]):
        parts += [op, str(n)]
    return " ".join(parts)


def evaluate(expression: str) -> int:
    """Value of a rendered expression with the usual precedence (* before + and -)."""
    tokens = expression.split()
    # Fold multiplications first, then add/subtract left to right.
    terms: list[int] = [int(tokens[0])]
    signs: list[str] = []
    for op, tok in zip(tokens[1::2], tokens[2::2]):
        if op == "*":
            terms[-1] *= int(tok)
        else:
            signs.append(op)
            terms.append(int(tok))
    total = terms[0]
    for op, t in zip(signs, terms[1:]):
        total = _OPS[op](total, t)
    return total
