"""DAPO dynamic sampling with backfill: fill a batch with groups whose rewards differ.

A group whose G completions all got the same reward has advantage 0 under GRPO: it adds
nothing to the gradient but still dilutes the batch, and as the model learns more groups
are all-correct. ``loss.drop_zero_variance`` only drops them, so batches shrink; DAPO
(Yu et al. 2025, section 3.2) instead keeps sampling until the batch holds the target
number of informative groups. ``fill_batch`` is that loop, independent of how a group is
produced (one rollout, a multi-turn episode) and of how many processes share the work:
``draw`` returns one round of scored groups, ``informative`` says which to keep.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generic, Sequence, TypeVar

T = TypeVar("T")


@dataclass
class Filled(Generic[T]):
    kept: list[T]  # at most ``target`` informative groups, in the order drawn
    drawn: list[T]  # every group drawn this step (for the rollout metrics)
    rounds: int  # calls to ``draw``
    full: bool  # False when the rounds ran out before ``target`` informative groups were found


def fill_batch(draw: Callable[[], Sequence[T]], target: int, max_rounds: int,
               informative: Callable[[T], bool] | None = None) -> Filled[T]:
    """Call ``draw()`` until ``target`` groups pass ``informative`` or ``max_rounds`` calls are spent.

    With ``informative=None`` every group counts (plain GRPO: one round, nothing dropped).
    Extra informative groups from the last round are discarded, as in DAPO, so the
    batch size stays ``target``; when the rounds run out the batch is what was found.
    """
    if target < 1 or max_rounds < 1:
        raise ValueError("target and max_rounds must be >= 1")
    kept: list[T] = []
    drawn: list[T] = []
    rounds = 0
    while len(kept) < target and rounds < max_rounds:
        groups = list(draw())
        rounds += 1
        drawn.extend(groups)
        kept.extend(g for g in groups if informative is None or informative(g))
    return Filled(kept[:target], drawn, rounds, len(kept) >= target)


def sampling_metrics(filled: Filled, group_size: int, target: int) -> dict[str, float]:
    """What the backfill cost this step: rounds, rollouts spent, and the fill of the batch."""
    return {"dynamic_sampling/rounds": float(filled.rounds),
            "dynamic_sampling/rollouts": float(len(filled.drawn) * group_size),
            "dynamic_sampling/kept_groups": float(len(filled.kept)),
            "dynamic_sampling/batch_fill": len(filled.kept) / target}
