"""The task contract.

A task turns data into rows. A row is a plain dict::

    {
        "id": "arith-train-17",                 # stable id (optional, for logs)
        "prompt": "What is 3 + 4?" | [{"role": "user", "content": ...}, ...],
        "verifiers": {"math": 1.0, "format": 0.2},   # verifier name -> weight
        "answer": "7",                          # ...plus the fields those verifiers read
    }

``Task.rows(split)`` returns the rows of ``"train"`` or ``"heldout"``; the two splits
must be disjoint. Rows carry their verifiers, so the trainer never branches on a task
name, and task mixtures need no special code.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

Split = Literal["train", "heldout"]
SPLITS: tuple[str, ...] = ("train", "heldout")


class Task:
    """Base class for tasks: subclasses implement ``rows``. Configured by keyword arguments."""

    name: ClassVar[str] = ""

    def rows(self, split: Split) -> list[dict[str, Any]]:
        raise NotImplementedError
