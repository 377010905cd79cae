"""Score completions with the rows' verifiers, isolated from the trainer.

Each row names its verifiers and weights (``row["verifiers"]``). ``RewardRunner``
builds each verifier once, runs it on the completions whose row asks for it, and
sums the weighted rewards. Verifiers declared ``isolation = "process"`` run one
completion per task in a pool of worker processes (pebble) with a wall-clock
timeout and an address-space limit: a check that hangs, crashes or blows memory is
killed and costs that completion's reward (0, counted as an error), never the run.
The workers cannot signal the trainer (their own PID namespace; uid nobody as root:
``grpo.isolation``). ``"inline"`` verifiers run in the trainer's process and are for
trusted code: they sandbox themselves (``python_tests``) or batch on a device
(``reward_model``); an exception, or a call past its watchdog deadline, costs the
rewards of that call only.

A reward that is not finite or exceeds +-REWARD_LIMIT is rejected (0, counted as an
error). A verifier whose calls all fail in a batch gets a warning line; after
FAILED_BATCHES_LIMIT consecutive batches in which every call failed the run stops
with an error instead of training on zeros.
"""

from __future__ import annotations

import concurrent.futures
import math
import sys
import time
import traceback
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, Sequence

from grpo.errors import UserError
from grpo.isolation import WorkerError, WorkerPool, inline_deadline, worker_call
from grpo.registry import VERIFIERS, closest
from verifiers.base import REJECTED, Score, Verifier, build_verifier
from verifiers.foreign import foreign_verifier, is_foreign_function

CORRECT_THRESHOLD = 1.0 - 1e-6
REWARD_LIMIT = 1e6  # |reward| above this (or nan/inf) is rejected: an error, counted, reward 0
FAILED_BATCHES_LIMIT = 3  # consecutive batches in which every verifier call failed -> stop with an error


@dataclass
class RewardBatch:
    """Rewards for B completions."""

    total: list[float]  # (B,) weighted sum over the row's verifiers
    per_verifier: dict[str, list[float | None]]  # name -> (B,) reward, None where not applied
    reasons: dict[str, list[str]]  # name -> (B,) reason ('' where not applied)
    correct: list[bool]  # (B,) every correctness verifier that applied gave >= 1
    errors: dict[str, int] = field(default_factory=dict)  # name -> crashed/timed-out items
    # (learned, check) verifier pairs whose correlation is reported (RewardRunner._correlated)
    pairs: list[tuple[str, str]] = field(default_factory=list)
    logged: dict[str, tuple[float, int]] = field(default_factory=dict)  # metric -> (sum, count) reward fns logged
    calls: dict[str, int] = field(default_factory=dict)  # verifier with a weight -> completions it scored

    @property
    def correlations(self) -> dict[str, float]:
        """"learned~check" -> Pearson r over the completions both scored (in this batch as a whole)."""
        out = {}
        for a, b in self.pairs:
            r = pearson(self.per_verifier[a], self.per_verifier[b])
            if r is not None:
                out[f"{a}~{b}"] = r
        return out

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, values in self.per_verifier.items():
            applied = [v for v in values if v is not None]
            if applied:
                out[f"reward/{name}"] = sum(applied) / len(applied)
            out[f"errors/{name}"] = float(self.errors.get(name, 0))
        out.update({f"reward_corr/{pair}": r for pair, r in self.correlations.items()})
        out.update({f"reward_metric/{name}": total / n for name, (total, n) in self.logged.items() if n})
        return out


def _score_in_worker(verifier: Verifier, completion: str, fields: dict[str, Any]) -> Score:
    """Runs inside a pool worker: score one completion under ``worker_call`` (the address space
    capped at the worker's own plus the verifier's ``memory_mb``; a raise of any kind returns as
    a ``WorkerError``, a broken contract as the ``UserError`` that stops the run)."""
    with worker_call(verifier.memory_mb, keep=(UserError,)):
        scores = verifier([completion], **{k: [v] for k, v in fields.items()})
        if len(scores) != 1:
            raise RuntimeError(f"returned {len(scores)} scores for 1 completion")
        return scores[0]


class RewardRunner:
    def __init__(self, verifier_args: dict[str, dict[str, Any]] | None = None,
                 weight_overrides: dict[str, float] | None = None, workers: int = 2, watch: bool = True):
        """``watch``: each ``score`` call feeds ``watch_failures``; the trainer passes False and watches the
        batch all ranks gathered, so that every rank decides alike (and evaluations do not count)."""
        self.watch = watch
        self.verifier_args = dict(verifier_args or {})
        self.weight_overrides = dict(weight_overrides or {})
        self.workers = max(1, workers)
        self._verifiers: dict[str, Verifier] = {}
        self._pool = WorkerPool(self.workers)  # started on first use, rebuilt when it breaks
        self._names_in_rows: set[str] = set()  # every verifier named by rows given to check_rows
        self._failed_batches = 0  # consecutive score() calls in which every verifier call failed

    # -------------------------------------------------------------- verifiers
    def verifier(self, name: str) -> Verifier:
        if name not in self._verifiers:
            obj = VERIFIERS.get(name)
            args = self.verifier_args.get(name, {})
            if ":" in name and is_foreign_function(obj):  # a TRL / verl / prime-rl reward function named by path
                self._verifiers[name] = foreign_verifier(obj, name, **args)
                return self._verifiers[name]
            try:
                self._verifiers[name] = build_verifier(obj, **args)
            except TypeError as exc:
                raise UserError(f"verifier {name!r}: bad arguments in task.verifier_args.{name}: {exc}") from exc
            isolation = getattr(self._verifiers[name], "isolation", None)
            if isolation not in ("process", "inline"):
                raise UserError(f"verifier {name!r}: isolation must be 'process' or 'inline', got {isolation!r}")
        return self._verifiers[name]

    def check_rows(self, rows: Sequence[dict[str, Any]], source: str) -> None:
        """Fail early (before any model work) if rows name unknown verifiers or lack their fields."""
        for i, row in enumerate(rows):
            names = row.get("verifiers")
            if not isinstance(names, dict) or not names:
                raise UserError(f"{source}: row {i} has no 'verifiers' mapping (verifier name -> weight)")
            for name, weight in names.items():
                if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                    raise UserError(f"{source}: row {i} weighs verifier {name!r} by {weight!r}; a weight is a finite "
                                    "number")
                self._names_in_rows.add(name)
                v = self.verifier(name)
                check = getattr(v, "missing_fields", None)
                missing = check(row) if check else [f for f in getattr(v, "required_fields", v.fields) if f not in row]
                if missing:
                    raise UserError(f"{source}: row {i} lacks field(s) {missing} needed by verifier {name!r}")

    def check_settings_names(self, prefix: str = "task.") -> None:
        """After ``check_rows``: every verifier named in the verifier_args / verifier_weights settings
        must be one the rows use (a typo would otherwise be ignored); UserError with a did-you-mean."""
        used = sorted(self._names_in_rows)
        for key, mapping in (("verifier_args", self.verifier_args), ("verifier_weights", self.weight_overrides)):
            for name in mapping:
                if name not in self._names_in_rows:
                    raise UserError(f"{prefix}{key} names verifier {name!r}, which no row of the task uses."
                                    f"{closest(str(name), used)} The rows use: {', '.join(used) or '(none)'}")

    def _weights(self, row: dict[str, Any]) -> dict[str, float]:
        weights = dict(row["verifiers"])
        for name, w in self.weight_overrides.items():
            if name in weights:
                weights[name] = w
        return weights

    # ------------------------------------------------------------------ scoring
    def score(self, rows: Sequence[dict[str, Any]], completions: Sequence[str], *,
              completion_ids: Sequence[Sequence[int]] | None = None,
              progress: dict[str, Any] | None = None) -> RewardBatch:
        """``rows[i]`` is the row of ``completions[i]`` (repeat a row G times for a group).

        Verifiers that set ``run_inputs`` (TRL / verl / prime-rl reward functions) also get each completion's
        ``completion_ids`` and, as ``trainer_state``, ``progress`` (``global_step``, ``max_steps``,
        ``epoch``)."""
        if len(rows) != len(completions) or (completion_ids is not None and len(completion_ids) != len(completions)):
            raise ValueError("rows and completions must align")
        B = len(completions)
        weights = [self._weights(row) for row in rows]
        names = sorted({n for w in weights for n in w})
        per_verifier: dict[str, list[float | None]] = {}
        reasons: dict[str, list[str]] = {}
        errors: dict[str, int] = {}
        logged: dict[str, tuple[float, int]] = {}  # (sum, count) of what reward functions logged (log_metric)
        for name in names:
            idx = [i for i in range(B) if name in weights[i]]
            verifier = self.verifier(name)
            wanted = _wanted_fields(verifier, [rows[i] for i in idx])
            fields = [{f: rows[i].get(f) for f in wanted} for i in idx]
            if getattr(verifier, "run_inputs", False):
                for i, f in zip(idx, fields):
                    f["trainer_state"] = dict(progress or {})
                    if completion_ids is not None:
                        f["completion_ids"] = list(completion_ids[i])
            scores, n_err = self._run(verifier, name, [completions[i] for i in idx], fields)
            values: list[float | None] = [None] * B
            why = [""] * B
            for i, s in zip(idx, scores):
                values[i], why[i] = s.reward, s.reason
                for metric, value in s.metrics:
                    add_logged(logged, metric, value, 1)
            per_verifier[name], reasons[name], errors[name] = values, why, n_err
        # verifiers that weigh in somewhere: one at weight 0 (logged only) succeeding says nothing of the rewards
        calls = {n: sum(n in w for w in weights) for n in names if any(w.get(n) for w in weights)}
        total, correct = [], []
        for i in range(B):
            total.append(sum(w * (per_verifier[n][i] or 0.0) for n, w in weights[i].items()))
            checks = [per_verifier[n][i] for n in weights[i] if self.verifier(n).correctness]
            applied = [c for c in checks if c is not None]
            correct.append(bool(applied) and all(c >= CORRECT_THRESHOLD for c in applied))
        batch = RewardBatch(total, per_verifier, reasons, correct, errors, self._correlated(names), logged, calls)
        if self.watch:
            self.watch_failures(batch)
        return batch

    def watch_failures(self, batch: RewardBatch) -> None:
        """Warn for each verifier whose every call failed in this batch; stop after FAILED_BATCHES_LIMIT
        consecutive batches in which every call of every verifier with a weight failed (the rewards
        carry no signal)."""
        calls, errors, reasons = batch.calls, batch.errors, batch.reasons
        failed = [n for n in calls if calls[n] and errors.get(n, 0) == calls[n]]
        for name in failed:
            first = next(r for r in reasons[name] if r.startswith("error"))
            _warn(f"verifier {name!r}: all {calls[name]} calls failed in this batch (first: {first})")
        everything_failed = bool(calls) and len(failed) == len([n for n in calls if calls[n]])
        self._failed_batches = self._failed_batches + 1 if everything_failed else 0
        if self._failed_batches >= FAILED_BATCHES_LIMIT:
            name = failed[0]
            raise UserError(f"every verifier call failed in {self._failed_batches} consecutive batches, so the rewards "
                            f"carry no signal (verifier {name!r}: {next(r for r in reasons[name] if r)}); check it "
                            f"with `grpo verify --verifier {name} --input ROWS.jsonl`")

    def _correlated(self, names: list[str]) -> list[tuple[str, str]]:
        """(a, b): each verifier that asks for it (``report_correlation``, e.g. a learned reward model)
        with each correctness verifier; their Pearson r is logged (``RewardBatch.correlations``): a
        learned reward that rises while a check falls is being gamed (reward hacking)."""
        return [(a, b) for a in names if getattr(self.verifier(a), "report_correlation", False)
                for b in names if b != a and self.verifier(b).correctness]

    def _run(self, verifier: Verifier, name: str, completions: list[str],
             fields: list[dict[str, Any]]) -> tuple[list[Score], int]:
        if not completions:
            return [], 0
        if verifier.isolation == "inline":
            try:
                cols = {f: [row[f] for row in fields] for f in (fields[0] if fields else ())}
                with inline_deadline(inline_watchdog_s(verifier, len(completions), cols), f"verifier {name!r}"):
                    scores = verifier(completions, **cols)
                if len(scores) != len(completions):
                    raise RuntimeError(f"returned {len(scores)} scores for {len(completions)} completions")
                checked = [_checked(s) for s in scores]
                return checked, sum(_is_error(s) for s in checked)
            except UserError:  # a contract broken by the verifier's author stops the run (one error line)
                raise
            except Exception as exc:
                _warn(f"verifier {name!r} raised {type(exc).__name__}: {exc}; its {len(completions)} rewards are 0")
                return [Score(0.0, f"error: {type(exc).__name__}: {exc}"[:200])] * len(completions), len(completions)
        scores, failed, broken = self._run_in_workers(verifier, completions, fields)
        if broken:  # a worker was killed from outside (the OOM killer, an admin): a new pool, once
            self._pool.discard()
            again = self._run_in_workers(verifier, [completions[i] for i in broken], [fields[i] for i in broken])
            for i, score, error in zip(broken, again[0], again[1]):
                scores[i], failed[i] = score, error
        return scores, sum(failed)

    def _run_in_workers(self, verifier: Verifier, completions: list[str],
                        fields: list[dict[str, Any]]) -> tuple[list[Score], list[bool], list[int]]:
        """Each completion's Score, whether its call failed (counted in ``errors/<name>``), and
        the positions a broken pool cost (``BrokenProcessPool``)."""
        futures = [self._pool.schedule(_score_in_worker, (verifier, c, f), verifier.timeout_s)
                   for c, f in zip(completions, fields)]
        # a backstop beyond pebble's per-call timeout (which starts when a worker takes the call):
        # a worker killed as a call was handed over left its future unresolved forever
        timeout = verifier.timeout_s or 0
        deadline = time.monotonic() + timeout * (len(futures) / self.workers + 1) + 60 if timeout else None
        scores, broken, failed_at = [], [], set()
        for fut in futures:
            try:
                left = None if deadline is None else max(0.1, deadline - time.monotonic())
                scores.append(_checked(fut.result(timeout=left)))
                continue
            except concurrent.futures.TimeoutError:
                fut.cancel()  # still pending after the backstop: pebble stops its worker
                scores.append(Score(0.0, f"error: timeout after {verifier.timeout_s:g}s"))
            except UserError:
                raise
            except MemoryError:
                scores.append(Score(0.0, f"error: memory limit {verifier.memory_mb} MB"))
            except WorkerError as exc:  # the check raised (any exception, as text)
                scores.append(Score(0.0, f"error: {exc}"[:200]))
            except Exception as exc:  # the worker process died
                if isinstance(exc, BrokenProcessPool):
                    broken.append(len(scores))
                scores.append(Score(0.0, f"error: {type(exc).__name__}: {exc}"[:200]))
            failed_at.add(len(scores) - 1)
        return scores, [_is_error(s) or i in failed_at for i, s in enumerate(scores)], broken

    def close(self) -> None:
        self._pool.close()
        for v in self._verifiers.values():
            close = getattr(v, "close", None)
            if callable(close):
                close()

    def __enter__(self) -> RewardRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _wanted_fields(verifier: Verifier, rows: Sequence[dict[str, Any]]) -> list[str]:
    """The row columns a verifier reads: its ``fields``, or every column when it sets
    ``all_fields`` (TRL reward functions receive all dataset columns)."""
    if not getattr(verifier, "all_fields", False):
        return list(verifier.fields)
    return sorted({k for row in rows for k in row if k != "verifiers"})


def add_logged(into: dict[str, tuple[float, int]], metric: str, total: float, count: int) -> None:
    """Add ``count`` values summing to ``total`` to ``into[metric]`` (a (sum, count) pair)."""
    old_total, old_count = into.get(metric, (0.0, 0))
    into[metric] = (old_total + total, old_count + count)


def pearson(xs: Sequence[float | None], ys: Sequence[float | None]) -> float | None:
    """Pearson correlation over positions where both are scored; None when undefined
    (fewer than 2 such positions, or either side constant)."""
    pairs = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None]
    if len(pairs) < 2:
        return None
    mx = sum(x for x, _ in pairs) / len(pairs)
    my = sum(y for _, y in pairs) / len(pairs)
    sxy = sum((x - mx) * (y - my) for x, y in pairs)
    sxx = sum((x - mx) ** 2 for x, _ in pairs)
    syy = sum((y - my) ** 2 for _, y in pairs)
    if sxx <= 1e-12 or syy <= 1e-12:
        return None
    return sxy / (sxx * syy) ** 0.5


def inline_watchdog_s(verifier: Verifier, n: int, cols: dict[str, list[Any]] | None = None) -> float:
    """Deadline for one inline call over ``n`` completions: the verifier's own
    ``deadline_s(n, cols)`` when it has one (a row may run several timed cases), else each
    completion may take its ``timeout_s``; plus a minute for start-up (a reward model
    loading); 0 = none."""
    if callable(getattr(verifier, "deadline_s", None)):
        return 60.0 + verifier.deadline_s(n, cols or {})
    per_item = getattr(verifier, "timeout_s", 0) or 0
    return 60.0 + per_item * n if per_item > 0 else 0.0


def _checked(score: Any) -> Score:
    """A verifier's result as a Score; a reward that is not a finite number within +-REWARD_LIMIT becomes
    an error Score (reward 0, reason starting with 'error:'), counted by the caller (``_is_error``)."""
    if not isinstance(score, Score):
        from verifiers.base import as_score

        score = as_score(score)
    if score.reward is not None and not (math.isfinite(score.reward) and abs(score.reward) <= REWARD_LIMIT):
        return Score(0.0, REJECTED + f"{score.reward!r} (rewards must be finite, |r| <= {REWARD_LIMIT:g})")
    return score


def _is_error(score: Score) -> bool:
    return score.reason.startswith(REJECTED)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)
    if "--debug" in sys.argv:
        traceback.print_exc()
