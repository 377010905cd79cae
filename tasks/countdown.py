"""Countdown: reach a target with + - * / over given numbers (checked by ``verifiers/countdown.py``).

The task draws numbers, builds a random expression over them whose intermediate
values are positive integers, and uses its value as the target, so every instance
is solvable by construction (the expression is kept in the row as ``solution``).
"""

from __future__ import annotations

import hashlib
import random
from typing import Any, Sequence

from grpo.errors import UserError
from grpo.registry import TASKS
from tasks.base import Split, Task

DEFAULT_TEMPLATE = (
    "Using the numbers {numbers}, write an arithmetic expression that equals {target}. "
    "Use + - * / and parentheses; use each number {rule}. "
    "Put only the expression inside <answer></answer>, for example <answer>(1 + 2) * 3</answer>."
)
_OPERATIONS = "+-*/"


def _int_pair(value: Any, what: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value) and value[0] <= value[1]):
        return int(value[0]), int(value[1])
    raise UserError(f"countdown: {what} must be an integer or [low, high] with low <= high, got {value!r}")


@TASKS.register("countdown")
class Countdown(Task):
    """Countdown numbers game: combine 3-4 given numbers with + - * / to hit a target; always solvable.

    Args:
        count: how many numbers per instance, an integer or [low, high].
        number_range: [low, high] of each number (inclusive).
        target_range: [low, high] of the target (inclusive).
        use_all: each number exactly once (True) or at most once (False).
        operations: operators the generator combines with, from '+-*/' (the checker
            accepts all four either way).
        heldout_fraction: share of instances that belong to the held-out split, decided
            by a hash of (sorted numbers, target), so the splits never overlap.
        train_size / heldout_size: rows per split (fewer if the space runs out).
        template: the user message; ``{numbers}``, ``{target}`` and ``{rule}`` are replaced.
        seed: sampling and the split hash salt.
        verifiers: verifier name -> weight for every row (default ``{"countdown": 1.0}``).
    Rows: chat prompt, ``numbers`` (list of int), ``target`` (int), ``use_all``, ``solution``
    (one known expression, for logs only).
    """

    def __init__(self, count: int | list[int] = (3, 4), number_range: list[int] = (1, 100),
                 target_range: list[int] = (1, 100), use_all: bool = False, operations: str = _OPERATIONS,
                 heldout_fraction: float = 0.2, train_size: int = 2000, heldout_size: int = 200,
                 template: str = DEFAULT_TEMPLATE, seed: int = 0, verifiers: dict[str, float] | None = None):
        self.count = _int_pair(count, "count")
        self.number_range = _int_pair(number_range, "number_range")
        self.target_range = _int_pair(target_range, "target_range")
        if self.count[0] < 2 or self.count[1] > 8:
            raise UserError(f"countdown: count must be within 2..8, got {count!r}")
        if self.number_range[0] < 1:
            raise UserError("countdown: number_range must hold positive numbers")
        if not operations or any(op not in _OPERATIONS for op in operations):
            raise UserError(f"countdown: operations must be drawn from '+-*/', got {operations!r}")
        if not 0 < heldout_fraction < 1:
            raise UserError("countdown: heldout_fraction must be in (0, 1)")
        for key in ("{numbers}", "{target}"):
            if key not in template:
                raise UserError(f"countdown: template must contain {key}")
        if train_size < 1 or heldout_size < 0:
            raise UserError("countdown: train_size must be >= 1 and heldout_size >= 0")
        self.use_all, self.operations = bool(use_all), list(operations)
        self.heldout_fraction, self.template, self.seed = heldout_fraction, template, seed
        self.sizes = {"train": train_size, "heldout": heldout_size}
        self.verifiers = dict(verifiers or {"countdown": 1.0})

    def split_of(self, numbers: Sequence[int], target: int) -> Split:
        key = f"{self.seed}:{','.join(map(str, sorted(numbers)))}->{target}"
        h = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
        return "heldout" if h / 0xFFFFFFFF < self.heldout_fraction else "train"

    def instances(self, split: Split) -> list[tuple[list[int], int, str]]:
        """(numbers, target, solution) for a split, deterministic in (seed, split)."""
        rng = random.Random(f"countdown:{self.seed}:{split}")
        want = self.sizes[split]
        out: list[tuple[list[int], int, str]] = []
        seen: set[tuple[tuple[int, ...], int]] = set()
        for _ in range(200 * want + 1000):  # bounded: a tiny space yields fewer rows, not a hang
            if len(out) >= want:
                break
            made = self._draw(rng)
            if made is None:
                continue
            numbers, target, solution = made
            key = (tuple(sorted(numbers)), target)
            if key in seen or self.split_of(numbers, target) != split:
                continue
            seen.add(key)
            out.append(made)
        return out

    def _draw(self, rng: random.Random) -> tuple[list[int], int, str] | None:
        numbers = [rng.randint(*self.number_range) for _ in range(rng.randint(*self.count))]
        pool = [(n, str(n)) for n in numbers]
        if not self.use_all:  # at most once: the hidden solution may leave numbers out
            pool = rng.sample(pool, rng.randint(2, len(pool)))
        while len(pool) > 1:
            a, b = pool.pop(rng.randrange(len(pool))), pool.pop(rng.randrange(len(pool)))
            combined = _combine(a, b, rng.choice(self.operations))
            if combined is None:
                return None
            pool.append(combined)
        target, solution = pool[0]
        if not self.target_range[0] <= target <= self.target_range[1] or target in numbers:
            return None  # out of range, or trivial (the target is one of the numbers)
        return numbers, target, solution

    def rows(self, split: Split) -> list[dict[str, Any]]:
        rule = "exactly once" if self.use_all else "at most once"
        rows = []
        for i, (numbers, target, solution) in enumerate(self.instances(split)):
            # replace, not str.format: other braces in the template stay as written (\boxed{})
            text = (self.template.replace("{numbers}", ", ".join(map(str, numbers)))
                    .replace("{target}", str(target)).replace("{rule}", rule))
            rows.append({
                "id": f"countdown-{split}-{i}",
                "prompt": [{"role": "user", "content": text}],
                "numbers": numbers, "target": target, "use_all": self.use_all, "solution": solution,
                "verifiers": dict(self.verifiers),
            })
        if split == "train" and not rows:
            raise UserError("countdown: no solvable instance found for these ranges; "
                            "widen number_range/target_range or add operations")
        return rows


def _combine(a: tuple[int, str], b: tuple[int, str], op: str) -> tuple[int, str] | None:
    """Combine two (value, expression) pairs keeping values positive integers (None if not)."""
    (x, ex), (y, ey) = (a, b) if a[0] >= b[0] else (b, a)
    if op == "+":
        return x + y, f"({ex} + {ey})"
    if op == "*":
        return x * y, f"({ex} * {ey})"
    if op == "-":
        return (x - y, f"({ex} - {ey})") if x > y else None
    return (x // y, f"({ex} / {ey})") if x % y == 0 else None
