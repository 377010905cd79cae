"""Reward functions written for TRL, verl or prime-rl (verifiers), used unchanged as verifiers.

A config's verifier list (or ``grpo verify --verifier``) may name a function directly,
as ``path/to/file.py:function`` or ``package.module:function``. Three conventions are
understood, told apart by the function's signature (or stated with ``kind``):

* **TRL** (``GRPOTrainer(reward_funcs=...)``)::

      def reward(completions, **kwargs) -> list[float | None]

  called with ``prompts``, ``completions`` and every other row column as a keyword
  list (TRL passes the dataset's columns the same way). When the row's prompt is a chat
  (a list of messages), prompts stay message lists and each completion is
  ``[{"role": "assistant", "content": text}]``, as TRL does for conversational data.
  ``None`` means "not applicable". ``completion_ids`` are the completions' token ids,
  ``trainer_state`` a ``transformers.TrainerState`` with the run's ``global_step``,
  ``max_steps`` and ``epoch``; ``log_metric(name, value)`` adds to the run's metrics
  (``reward_metric/<name>``, averaged) and ``log_extra(column, values)`` to each
  completion's reason (``samples.jsonl``). A list, tuple, numpy array or tensor of
  rewards is accepted; an ``async def`` function is awaited.
* **verl** (``reward_model.style: rule`` / ``custom_reward_function``)::

      def compute_score(data_source, solution_str, ground_truth, extra_info=None) -> float | dict

  called once per completion; ``ground_truth`` is the row's ``ground_truth`` column, else
  ``reward_model.ground_truth`` (where verl's data-preparation scripts put it), else its
  ``answer``; a row with none of them stops the run before any model work.
  ``data_source`` is the row's ``data_source`` (else the ``data_source`` option, else
  ``""``), ``extra_info`` the row's ``extra_info`` (else ``{}``), and the ``reward_kwargs``
  option is merged into every call (verl's ``custom_reward_function.reward_kwargs``). A
  dict result must hold a numeric ``"score"``; its other keys go into the reason.

* **verifiers** (prime-rl's environments: a ``vf.Rubric``'s reward functions)::

      def reward(completion, answer, **kwargs) -> float

  called once per completion with any of ``prompt``, ``completion`` (a message list for a
  chat row, else text), ``answer`` (the row's; required when the function has no default
  for it), ``task`` (the row's, else ``"default"``), ``info`` (the row's, else ``{}``),
  ``state`` (a dict of those and ``completion_ids``). ``parser`` is not passed (prime's
  ``verifiers`` package and this one share a name, so its ``Parser`` is not importable
  here): give it a default or bind one with ``functools.partial``.

Any kind: ``columns`` maps a name the function reads to the row column that holds it
(``{solution: answer}`` for TRL's ``accuracy_reward`` on a task whose rows say
``answer``).

The function runs isolated like any verifier (``isolation: process`` by default: a
crash or hang costs that completion's reward). A result that breaks the contract (a
string, a list of the wrong length, a dict without ``score``) is a
``RewardContractError`` naming the function: the run stops with one ``error:`` line
instead of training on garbage. A single reward that is not a finite number (NaN, a
string in the list) costs that completion's reward, counted as an error.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import math
from typing import Any, Callable, Sequence

from grpo.errors import UserError
from grpo.registry import VERIFIERS
from verifiers.base import REJECTED, Score, Verifier

KINDS = ("trl", "verl", "verifiers")
# Keyword arguments TRL's trainer adds beside the dataset columns.
_TRL_TRAINER_ARGS = ("completion_ids", "trainer_state", "log_extra", "log_metric")
_VERL_PARAMS = ("data_source", "solution_str", "ground_truth")
# What the reward runner passes beside the row columns to verifiers that set ``run_inputs``
RUN_INPUTS = ("completion_ids", "trainer_state")
_GROUND_TRUTH_SOURCES = "ground_truth, reward_model.ground_truth or answer"


class RewardContractError(UserError):
    """A foreign reward function returned something that is not a reward."""


def is_foreign_function(obj: Any) -> bool:
    """A plain function or callable object that is not one of our ``Verifier`` types."""
    if isinstance(obj, Verifier) or (isinstance(obj, type)):
        return False
    return inspect.isfunction(obj) or inspect.ismethod(obj) or (callable(obj) and not inspect.isclass(obj))


def detect_kind(fn: Callable, spec: str) -> str:
    """``"trl"`` or ``"verl"`` from the parameter names; UserError when neither fits."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError) as exc:
        raise UserError(f"reward function {spec}: cannot read its signature ({exc}); "
                        "state the convention with kind: trl, verl or verifiers") from exc
    names = list(params)
    if "solution_str" in names or all(p in names for p in ("data_source", "ground_truth")):
        return "verl"
    if "completions" in names or "completion_ids" in names:
        return "trl"
    if "completion" in names:
        return "verifiers"
    raise UserError(f"reward function {spec}{inspect.signature(fn)}: neither TRL's (completions, **kwargs), "
                    "verl's (data_source, solution_str, ground_truth, extra_info=None) nor verifiers' "
                    "(completion, answer, **kwargs); state it with task.verifier_args.<name>.kind: trl, verl or "
                    "verifiers")


class ForeignRewardVerifier(Verifier):
    """Wraps a TRL-, verl- or verifiers-style reward function (see the module docstring).

    Args:
        kind: ``auto`` (from the signature), ``trl``, ``verl`` or ``verifiers``.
        correctness: True when a reward >= 1 means "solved" (accuracy, pass@k).
        isolation: ``process`` (default: one completion per worker call, with
            ``timeout_s`` and ``memory_mb``) or ``inline`` (one batched call in the trainer).
        ground_truth_field: verl: the row column passed as ``ground_truth`` (default: the
            row's ``ground_truth``, else ``reward_model.ground_truth``, else ``answer``).
        columns: {name the function reads: row column that holds it}.
        reward_kwargs: keyword arguments added to every call.
        data_source: verl: the ``data_source`` of rows that have none.
    """

    all_fields = True  # the runner passes every row column (TRL passes all dataset columns)
    run_inputs = True  # ... and RUN_INPUTS: the completions' token ids and the run's progress

    def __init__(self, fn: Callable, spec: str, *, kind: str = "auto", correctness: bool = True,
                 isolation: str = "process", timeout_s: float = 10.0, memory_mb: int = 2048,
                 ground_truth_field: str | None = None, columns: dict[str, str] | None = None,
                 reward_kwargs: dict[str, Any] | None = None, data_source: str = ""):
        if kind not in ("auto", *KINDS):
            raise UserError(f"reward function {spec}: kind must be auto, trl, verl or verifiers, got {kind!r}")
        if isolation not in ("process", "inline"):
            raise UserError(f"reward function {spec}: isolation must be process or inline, got {isolation!r}")
        for option, mapping in (("columns", columns), ("reward_kwargs", reward_kwargs)):
            if mapping is not None and (not isinstance(mapping, dict) or not all(isinstance(k, str) for k in mapping)):
                raise UserError(f"reward function {spec}: {option} must be a mapping with string keys, got "
                                f"{_show(mapping)}")
        if columns and not all(isinstance(v, str) for v in columns.values()):
            raise UserError(f"reward function {spec}: columns maps names to row column names (strings), got "
                            f"{columns!r}")
        self.fn, self.spec = fn, spec
        self.kind = detect_kind(fn, spec) if kind == "auto" else kind
        self.correctness = bool(correctness)  # type: ignore[misc]
        self.isolation = isolation  # type: ignore[misc]
        self.timeout_s, self.memory_mb = float(timeout_s), int(memory_mb)
        self.ground_truth_field = ground_truth_field
        self.columns, self.reward_kwargs = dict(columns or {}), dict(reward_kwargs or {})
        self.data_source = str(data_source)
        params = inspect.signature(fn).parameters
        self._takes_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        self._params = set(params)
        ids = params.get("completion_ids")
        self._needs_ids = ids is not None and ids.default is inspect.Parameter.empty
        unknown = [k for k in self.reward_kwargs if k not in self._params]
        if unknown and not self._takes_var_kw:
            raise UserError(f"reward function {spec}{inspect.signature(fn)} takes no argument named "
                            f"{', '.join(unknown)} (reward_kwargs)")
        required = [n for n, p in params.items() if p.default is inspect.Parameter.empty
                    and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in self.reward_kwargs]
        if self.kind == "trl":
            skip = {"completions", "prompts", *_TRL_TRAINER_ARGS}
            self.required_fields = tuple(self.columns.get(n, n) for n in required if n not in skip)
        elif self.kind == "verifiers":
            self.required_fields = (self.columns.get("answer", "answer"),) if "answer" in required else ()
            if "parser" in required:
                raise UserError(f"reward function {spec} needs a parser, which grpo-lora does not pass (prime's "
                                "verifiers package shares this one's name); bind one with "
                                "functools.partial(fn, parser=...) in the plugin file")
        else:
            gt = ground_truth_field or self.columns.get("ground_truth")
            self.required_fields = () if gt is None else (gt,)
        self.fields = self.required_fields  # type: ignore[misc]

    def missing_fields(self, row: dict[str, Any]) -> list[str]:
        """The columns ``row`` lacks that this function needs (checked before any model work)."""
        missing = [f for f in self.required_fields if f not in row]
        if self.kind == "verl" and not self.required_fields and _verl_ground_truth(row) is _MISSING:
            missing.append(_GROUND_TRUTH_SOURCES)
        return missing

    # Pickled into worker processes by name: the function is looked up again there.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["fn"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.fn is None:
            self.fn = VERIFIERS.get(self.spec)

    # ----------------------------------------------------------------- scoring
    def score(self, completions: Sequence[str], **fields: Sequence[Any]) -> list[Score]:
        ids = fields.pop("completion_ids", None)
        states = fields.pop("trainer_state", None)
        for name, column in self.columns.items():
            if column in fields:
                fields[name] = fields[column]
        if self.kind == "trl":
            return self._trl(list(completions), fields, ids, states[0] if states else None)
        one = self._verl_one if self.kind == "verl" else self._verifiers_one
        return [one(c, {k: v[i] for k, v in fields.items()}, ids[i] if ids else None)
                for i, c in enumerate(completions)]

    def _trl(self, completions: list[str], fields: dict[str, Sequence[Any]], ids: Sequence[Any] | None,
             state: dict[str, Any] | None) -> list[Score]:
        prompts = list(fields.get("prompt", [None] * len(completions)))
        chat = [isinstance(p, list) for p in prompts]
        wrapped = [[{"role": "assistant", "content": c}] if is_chat else c for c, is_chat in zip(completions, chat)]
        kwargs: dict[str, Any] = {k: list(v) for k, v in fields.items() if k not in ("prompt", "verifiers")}
        metrics: dict[str, list[float]] = {}
        extras: dict[str, list[Any]] = {}
        kwargs.update(prompts=prompts, completions=wrapped, trainer_state=trainer_state(state),
                      log_metric=lambda name, value: metrics.setdefault(str(name), []).append(float(value)),
                      log_extra=lambda column, values: extras.__setitem__(str(column), list(values)),
                      **self.reward_kwargs)
        if ids is not None:
            kwargs["completion_ids"] = [list(x) for x in ids]
        elif self._needs_ids:
            raise RewardContractError(f"reward function {self.spec} needs completion_ids, which this caller does "
                                      "not have (it scores text only: grpo verify, the audit)")
        if not self._takes_var_kw:
            kwargs = {k: v for k, v in kwargs.items() if k in self._params}
        out = _resolved(self.fn(**kwargs))
        if hasattr(out, "tolist") and not isinstance(out, (str, bytes)):  # a numpy array or a tensor
            out = out.tolist()
        if isinstance(out, (str, bytes)) or not isinstance(out, (list, tuple)):
            raise RewardContractError(f"reward function {self.spec} returned {_show(out)}; a TRL reward function "
                                      f"returns a list of {len(completions)} floats or None")
        if len(out) != len(completions):
            raise RewardContractError(f"reward function {self.spec} returned {len(out)} rewards for "
                                      f"{len(completions)} completions")
        logged = tuple((name, sum(v) / len(v)) for name, v in metrics.items() if v)
        return [Score(None, _extras_reason(extras, i), logged) if x is None
                else self._scored(x, _extras_reason(extras, i), logged) for i, x in enumerate(out)]

    def _verl_one(self, completion: str, row: dict[str, Any], _ids: Sequence[int] | None) -> Score:
        field = self.ground_truth_field
        kwargs = {"data_source": row.get("data_source") or self.data_source, "solution_str": completion,
                  "ground_truth": row.get(field) if field else _verl_ground_truth(row, None),
                  "extra_info": row.get("extra_info") or {}, **self.reward_kwargs}
        if not self._takes_var_kw:
            kwargs = {k: v for k, v in kwargs.items() if k in self._params}
        out = _resolved(self.fn(**kwargs))
        if isinstance(out, dict):
            if "score" not in out:
                raise RewardContractError(f"reward function {self.spec} returned a dict without a 'score' key "
                                          f"(keys: {sorted(out)[:8]})")
            extra = ", ".join(f"{k}={v}" for k, v in out.items() if k != "score")[:160]
            return self._scored(out["score"], extra)
        return self._scored(out)

    def _verifiers_one(self, completion: str, row: dict[str, Any], ids: Sequence[int] | None) -> Score:
        prompt = row.get("prompt")
        kwargs: dict[str, Any] = {
            "prompt": prompt, "answer": row.get("answer", ""), "task": row.get("task") or "default",
            "info": row.get("info") or {},
            "completion": [{"role": "assistant", "content": completion}] if isinstance(prompt, list) else completion}
        kwargs["state"] = {**kwargs, "completion_ids": list(ids) if ids is not None else None}
        kwargs.update(self.reward_kwargs)
        if not self._takes_var_kw:
            kwargs = {k: v for k, v in kwargs.items() if k in self._params}
        return self._scored(_resolved(self.fn(**kwargs)))

    def _scored(self, x: Any, reason: str = "", logged: tuple[tuple[str, float], ...] = ()) -> Score:
        """One completion's reward; one that is not a finite number is an error for that completion (reward 0,
        counted in errors/<name>) as for any verifier: the run stops only when every call fails, three
        batches running."""
        if hasattr(x, "item") and not isinstance(x, (str, bytes)):  # numpy / torch scalars
            x = x.item()
        if isinstance(x, (int, float)) and math.isfinite(x):  # bools count as 0 / 1, as in TRL
            return Score(float(x), reason, logged)
        return Score(0.0, f"{REJECTED}{_show(x)} from {self.spec} (a reward is a finite number, or None for "
                          "'not applicable')", logged)


_MISSING = object()


def _verl_ground_truth(row: dict[str, Any], default: Any = _MISSING) -> Any:
    """verl's ground truth for ``row``: its ``ground_truth`` column, else ``reward_model.ground_truth``
    (verl's data layout), else ``answer``; ``default`` when it has none of them."""
    if row.get("ground_truth") is not None:
        return row["ground_truth"]
    nested = row.get("reward_model")
    if isinstance(nested, dict) and nested.get("ground_truth") is not None:
        return nested["ground_truth"]
    return row["answer"] if row.get("answer") is not None else default


def trainer_state(state: dict[str, Any] | None):
    """The ``transformers.TrainerState`` TRL passes reward functions, from the runner's progress
    (``global_step``, ``max_steps``, ``epoch``); zeros outside a training run (``grpo verify``)."""
    from transformers import TrainerState

    return TrainerState(**(state or {}))


def _resolved(out: Any) -> Any:
    """``out``, awaited when the function was ``async`` (TRL and verl both accept those): in a fresh event
    loop, or in a thread of its own when this thread already runs one."""
    if not inspect.isawaitable(out):
        return out

    async def wait() -> Any:
        return await out

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(wait())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, wait()).result()


def _extras_reason(extras: dict[str, list[Any]], i: int) -> str:
    """What ``log_extra`` recorded for completion ``i``, as ``column=value`` pairs."""
    return ", ".join(f"{k}={v[i]}" for k, v in extras.items() if i < len(v))[:160]


def _show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40] + ('...' if len(text) > 40 else '')}"


def foreign_verifier(obj: Any, spec: str, **kwargs: Any) -> ForeignRewardVerifier:
    """Build the adapter for the function ``spec`` names (config kwargs as above)."""
    try:
        return ForeignRewardVerifier(obj, spec, **kwargs)
    except TypeError as exc:
        raise UserError(f"verifier {spec!r}: bad arguments in task.verifier_args: {exc}") from exc
