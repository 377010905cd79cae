"""The verifier contract.

A verifier turns completions into rewards. It is a batched callable::

    verifier(completions: list[str], **fields: list[Any]) -> list[Score]

``fields`` are row columns (``answer=[...]``, ``tests=[...]``), one value per
completion, aligned with ``completions``. Each ``Score`` carries a reward (a float,
or ``None`` when the verifier does not apply to that row) and a short reason that
ends up in ``samples.jsonl`` so failures can be inspected.

Verifiers are plain objects: they know nothing about models or training, so they run
outside the trainer (``grpo verify``) and in isolated worker processes (see
``grpo.rewards``). Configuration arrives as constructor keyword arguments from the
YAML config (``task.verifier_args.<name>``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Sequence


# a Score whose reason starts with this is an error (reward 0), counted in errors/<verifier>
REJECTED = "error: rejected reward "


@dataclass(frozen=True)
class Score:
    """Reward for one completion. ``reward=None`` means 'not applicable'."""

    reward: float | None
    reason: str = ""
    # values the scoring function logged for the run's metrics (TRL's ``log_metric``), as
    # (name, value) pairs; averaged over a batch's scores (``grpo.rewards``)
    metrics: tuple[tuple[str, float], ...] = ()


class Verifier:
    """Base class for verifiers. Subclasses implement ``score``.

    Class attributes declare how the trainer treats the verifier:

    * ``fields``: the row fields it reads (documented in ``grpo list verifiers``).
    * ``correctness``: True if a reward of 1.0 means "solved" (accuracy, pass@k);
      shaping rewards such as ``format`` set it to False.
    * ``isolation``: ``"process"`` runs each completion in a worker process with
      ``timeout_s`` and ``memory_mb`` limits (for pure-Python checkers such as sympy
      that can hang); ``"inline"`` calls ``score`` in the trainer process for
      verifiers that sandbox themselves (``python_tests``) or batch on a device
      (``reward_model``).
    """

    name: ClassVar[str] = ""
    fields: ClassVar[tuple[str, ...]] = ()
    correctness: ClassVar[bool] = True
    isolation: ClassVar[Literal["process", "inline"]] = "process"
    timeout_s: float = 10.0
    memory_mb: int = 2048

    def score(self, completions: Sequence[str], **fields: Sequence[Any]) -> list[Score]:
        raise NotImplementedError

    def __call__(self, completions: Sequence[str], **fields: Sequence[Any]) -> list[Score]:
        return self.score(list(completions), **{k: list(v) for k, v in fields.items()})


class FunctionVerifier(Verifier):
    """Adapts a plain function (TRL's reward-function convention) to ``Verifier``.

    The function takes ``(completions, **fields)`` and returns a list of floats,
    ``None``s, ``Score``s or ``(reward, reason)`` pairs.
    """

    def __init__(self, fn, *, correctness: bool = True, isolation: str = "process",
                 timeout_s: float = 10.0, memory_mb: int = 2048):
        self.fn = fn
        self.correctness = correctness  # type: ignore[misc]
        self.isolation = isolation  # type: ignore[misc]
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb

    def score(self, completions, **fields):
        out = self.fn(completions, **fields)
        return [as_score(x) for x in out]


def as_score(value: Any) -> Score:
    """Normalise what a verifier function may return into a ``Score``."""
    if isinstance(value, Score):
        return value
    if value is None:
        return Score(None, "not applicable")
    if isinstance(value, tuple) and len(value) == 2:
        reward, reason = value
        return Score(None if reward is None else float(reward), str(reason))
    if isinstance(value, bool) or isinstance(value, (int, float)):
        return Score(float(value), "")
    raise TypeError(f"a verifier returned {type(value).__name__}; expected float, None, Score or (reward, reason)")


def build_verifier(obj: Any, **kwargs: Any) -> Verifier:
    """Instantiate a registered verifier object (class, factory or function) with config kwargs."""
    if isinstance(obj, Verifier):
        if kwargs:
            raise TypeError(f"verifier instance {obj!r} takes no arguments, got {sorted(kwargs)}")
        return obj
    if isinstance(obj, type) and issubclass(obj, Verifier):
        return obj(**kwargs)
    if callable(obj):
        return FunctionVerifier(obj, **kwargs)
    raise TypeError(f"cannot build a verifier from {obj!r}")
