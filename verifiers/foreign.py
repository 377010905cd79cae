"""Reward functions written for TRL or verl, used unchanged as verifiers.

A config's verifier list (or ``grpo verify --verifier``) may name a function directly,
as ``path/to/file.py:function`` or ``package.module:function``. Two conventions are
understood, told apart by the function's signature (or stated with ``kind``):

* **TRL** (``GRPOTrainer(reward_funcs=...)``)::

      def reward(completions, **kwargs) -> list[float | None]

  called with ``prompts``, ``completions`` and every other row column as a keyword
  list (TRL passes the dataset's columns the same way). When the row's prompt is a chat
  (a list of messages), prompts stay message lists and each completion is
  ``[{"role": "assistant", "content": text}]``, as TRL does for conversational data.
  ``None`` means "not applicable". ``completion_ids`` is not available (verifiers see
  text only) and ``trainer_state``, ``log_extra``, ``log_metric`` are passed as ``None``
  only to functions that name them.
* **verl** (``reward_model.style: rule`` / ``custom_reward_function``)::

      def compute_score(data_source, solution_str, ground_truth, extra_info=None) -> float | dict

  called once per completion; ``ground_truth`` is the row's ``ground_truth`` column or
  else its ``answer``, ``data_source`` the row's ``data_source`` (else ``""``),
  ``extra_info`` the row's ``extra_info`` (else ``{}``). A dict result must hold a
  numeric ``"score"``; its other keys go into the reason.

The function runs isolated like any verifier (``isolation: process`` by default: a
crash or hang costs that completion's reward). A result that breaks the contract (a
string, a list of the wrong length, NaN or infinity, a dict without ``score``) is a
``RewardContractError`` naming the function: the run stops with one ``error:`` line
instead of training on garbage.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Sequence

from grpo.errors import UserError
from grpo.registry import VERIFIERS
from verifiers.base import Score, Verifier

KINDS = ("trl", "verl")
# Keyword arguments TRL's trainer adds beside the dataset columns; we have no value for them.
_TRL_TRAINER_ARGS = ("trainer_state", "log_extra", "log_metric")
_VERL_PARAMS = ("data_source", "solution_str", "ground_truth")


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
                        "state the convention with kind: trl or kind: verl") from exc
    names = list(params)
    if "solution_str" in names or all(p in names for p in ("data_source", "ground_truth")):
        return "verl"
    if "completions" in names:
        return "trl"
    raise UserError(f"reward function {spec}{inspect.signature(fn)}: neither TRL's (completions, **kwargs) nor "
                    "verl's (data_source, solution_str, ground_truth, extra_info=None); state it with "
                    "task.verifier_args.<name>.kind: trl or verl")


class ForeignRewardVerifier(Verifier):
    """Wraps a TRL- or verl-style reward function (see the module docstring).

    Args:
        kind: ``auto`` (from the signature), ``trl`` or ``verl``.
        correctness: True when a reward >= 1 means "solved" (accuracy, pass@k).
        isolation: ``process`` (default: one completion per worker call, with
            ``timeout_s`` and ``memory_mb``) or ``inline`` (one batched call in the trainer).
        ground_truth_field: verl: the row column passed as ``ground_truth``
            (default ``ground_truth`` when the row has it, else ``answer``).
    """

    all_fields = True  # the runner passes every row column (TRL passes all dataset columns)

    def __init__(self, fn: Callable, spec: str, *, kind: str = "auto", correctness: bool = True,
                 isolation: str = "process", timeout_s: float = 10.0, memory_mb: int = 2048,
                 ground_truth_field: str | None = None):
        if kind not in ("auto", *KINDS):
            raise UserError(f"reward function {spec}: kind must be auto, trl or verl, got {kind!r}")
        if isolation not in ("process", "inline"):
            raise UserError(f"reward function {spec}: isolation must be process or inline, got {isolation!r}")
        self.fn, self.spec = fn, spec
        self.kind = detect_kind(fn, spec) if kind == "auto" else kind
        self.correctness = bool(correctness)  # type: ignore[misc]
        self.isolation = isolation  # type: ignore[misc]
        self.timeout_s, self.memory_mb = float(timeout_s), int(memory_mb)
        self.ground_truth_field = ground_truth_field
        params = inspect.signature(fn).parameters
        self._takes_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        self._params = set(params)
        ids = params.get("completion_ids")
        if self.kind == "trl" and ids is not None and ids.default is inspect.Parameter.empty:
            raise UserError(f"reward function {spec} needs completion_ids, which grpo-lora does not pass "
                            "(verifiers see text only); give it a default or compute lengths from the text")
        required = [n for n, p in params.items() if p.default is inspect.Parameter.empty
                    and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if self.kind == "trl":
            skip = {"completions", "prompts", *_TRL_TRAINER_ARGS}
            self.required_fields = tuple(n for n in required if n not in skip)
        else:
            self.required_fields = () if ground_truth_field is None else (ground_truth_field,)
        self.fields = self.required_fields  # type: ignore[misc]

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
        if self.kind == "verl":
            return [self._verl_one(c, {k: v[i] for k, v in fields.items()}) for i, c in enumerate(completions)]
        return self._trl(list(completions), fields)

    def _trl(self, completions: list[str], fields: dict[str, Sequence[Any]]) -> list[Score]:
        prompts = list(fields.get("prompt", [None] * len(completions)))
        chat = [isinstance(p, list) for p in prompts]
        wrapped = [[{"role": "assistant", "content": c}] if is_chat else c for c, is_chat in zip(completions, chat)]
        kwargs: dict[str, Any] = {k: list(v) for k, v in fields.items() if k not in ("prompt", "verifiers")}
        kwargs.update(prompts=prompts, completions=wrapped)
        for name in _TRL_TRAINER_ARGS:
            if name in self._params:
                kwargs[name] = None
        if not self._takes_var_kw:
            kwargs = {k: v for k, v in kwargs.items() if k in self._params}
        out = self.fn(**kwargs)
        if isinstance(out, (str, bytes)) or not isinstance(out, (list, tuple)):
            raise RewardContractError(f"reward function {self.spec} returned {_show(out)}; a TRL reward function "
                                      f"returns a list of {len(completions)} floats or None")
        if len(out) != len(completions):
            raise RewardContractError(f"reward function {self.spec} returned {len(out)} rewards for "
                                      f"{len(completions)} completions")
        return [Score(None, "not applicable") if x is None else Score(self._number(x, i), "")
                for i, x in enumerate(out)]

    def _verl_one(self, completion: str, row: dict[str, Any]) -> Score:
        field = self.ground_truth_field or ("ground_truth" if row.get("ground_truth") is not None else "answer")
        kwargs = {"data_source": row.get("data_source") or "", "solution_str": completion,
                  "ground_truth": row.get(field), "extra_info": row.get("extra_info") or {}}
        if not self._takes_var_kw:
            kwargs = {k: v for k, v in kwargs.items() if k in self._params}
        out = self.fn(**kwargs)
        if isinstance(out, dict):
            if "score" not in out:
                raise RewardContractError(f"reward function {self.spec} returned a dict without a 'score' key "
                                          f"(keys: {sorted(out)[:8]})")
            extra = ", ".join(f"{k}={v}" for k, v in out.items() if k != "score")[:160]
            return Score(self._number(out["score"], 0), extra)
        return Score(self._number(out, 0), "")

    def _number(self, x: Any, index: int) -> float:
        if hasattr(x, "item") and not isinstance(x, (str, bytes)):  # numpy / torch scalars
            x = x.item()
        if not isinstance(x, (int, float)):  # bools count as 0 / 1, as in TRL
            raise RewardContractError(f"reward function {self.spec} returned {_show(x)} for completion {index}; "
                                      "expected a number (or None)")
        if not math.isfinite(x):
            raise RewardContractError(f"reward function {self.spec} returned {x} for completion {index}; "
                                      "rewards must be finite (return None for 'not applicable')")
        return float(x)


def _show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40] + ('...' if len(text) > 40 else '')}"


def foreign_verifier(obj: Any, spec: str, **kwargs: Any) -> ForeignRewardVerifier:
    """Build the adapter for the function ``spec`` names (config kwargs as above)."""
    try:
        return ForeignRewardVerifier(obj, spec, **kwargs)
    except TypeError as exc:
        raise UserError(f"verifier {spec!r}: bad arguments in task.verifier_args: {exc}") from exc
