"""``reward_model``: a learned reward, the score a trained reward model gives prompt + completion.

It lives here, beside the model it loads (``grpo.rm.model``) and the encoding it was
trained with (``grpo.rm.data``), rather than in ``verifiers/``, which uses ``grpo`` only
through ``grpo.errors`` and ``grpo.registry``. It is still a built-in verifier: the
``VERIFIERS`` registry lists this module beside ``verifiers.builtin`` (``grpo/registry.py``).

It runs inline (in the trainer process) and scores a step's completions in batches on
its own device and dtype, reading each row's ``prompt`` the way the model was trained
(``grpo.rm.data.encode_conversation``: the chat template for chat prompts). Scores can
be used raw or normalised:

* ``none``: the raw score (unbounded; its scale depends on the RM's training);
* ``running``: ``(score - mean) / std`` with mean and std running over every score so
  far (this call's included), so the scale stays comparable to 0/1 rule rewards
  when mixed with them; with rewards from this verifier alone, GRPO's group
  normalisation makes the choice irrelevant;
* ``sigmoid``: ``sigmoid(score)``, in (0, 1); the Bradley-Terry probability that
  the completion beats one scored 0.

Mix it with rule verifiers through the rows' weights (e.g. arith's
``task.args.verifiers: {math: 1.0, reward_model: 0.5}``; ``task.verifier_weights``
overrides them). A learned reward can be gamed: the trainer logs the per-step Pearson
correlation between this verifier's rewards and each correctness verifier's on the same
completions (``reward_corr/reward_model~math``); a correlation that falls while the
learned reward rises is the reward-hacking signal. Give the correctness verifier weight
0 to measure it without training on it. Torch and transformers load on the first call.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from grpo.errors import UserError
from grpo.registry import VERIFIERS
from verifiers.base import REJECTED, Score, Verifier

NORMALIZATIONS = ("none", "running", "sigmoid")


class RunningStats:
    """Mean and (population) standard deviation of every value seen (Welford's update)."""

    def __init__(self) -> None:
        self.count, self.mean, self._m2 = 0, 0.0, 0.0

    def update(self, values: Sequence[float]) -> None:
        for x in values:
            self.count += 1
            delta = x - self.mean
            self.mean += delta / self.count
            self._m2 += delta * (x - self.mean)

    @property
    def std(self) -> float:
        return math.sqrt(self._m2 / self.count) if self.count else 0.0


@VERIFIERS.register("reward_model")
class RewardModelVerifier(Verifier):
    """Learned reward: a trained reward model's score of prompt + completion (grpo rm train); batched, inline.

    Args (``task.verifier_args.reward_model``):
        path: the reward model: ``model/`` of a ``grpo rm train`` run, the run directory,
            or any one-output ``*ForSequenceClassification`` directory or hub id.
        device / dtype: where and in what precision the RM runs ("auto": CUDA and bf16 when
            available, else CPU in the precision ``model.dtype: auto`` measures faster there,
            grpo.precision); independent of the policy's.
        batch_size: sequences per forward.
        normalize: "none", "running" (running mean/std) or "sigmoid".
        max_length: tokens per prompt + completion (default: the RM's training max_length).
        system_prompt: system message for chat prompts (default: the one the RM was trained
            with; set it when the policy's differs).
    """

    fields = ("prompt",)
    correctness = False  # a preference score, not a pass/fail check
    isolation = "inline"  # batches on its device; a crash costs this call's rewards only
    report_correlation = True  # grpo.rewards logs its correlation with the correctness verifiers

    _UNSET: Any = object()

    def __init__(self, path: str, device: str = "auto", dtype: str = "auto", batch_size: int = 16,
                 normalize: str = "none", max_length: int | None = None, system_prompt: Any = _UNSET):
        # grpo.rm.model and grpo.rm.data import torch: imported on use, because the registry imports
        # this module for `grpo list` / `grpo verify`, which must not pay torch's start-up time
        from grpo.rm.model import check_reward_model

        if normalize not in NORMALIZATIONS:
            raise UserError(f"reward_model: normalize must be one of {', '.join(NORMALIZATIONS)}, got {normalize!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"reward_model: batch_size must be a positive integer, got {batch_size!r}")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 8):
            raise UserError(f"reward_model: max_length must be an integer >= 8, got {max_length!r}")
        self.path = check_reward_model(str(path))  # fails now (config only), not at the first step
        from grpo.models import resolve_device, resolve_dtype

        resolve_device(device)  # an unknown device, or CUDA where there is none: now, not at the first step
        if dtype != "auto":
            resolve_dtype(dtype, "cpu")
        self.device, self.dtype, self.batch_size, self.normalize = device, dtype, batch_size, normalize
        self._max_length, self._system_prompt = max_length, system_prompt
        self.stats = RunningStats()
        self._model = self._tokenizer = None

    def _load(self) -> None:
        from grpo.rm.model import load_reward_model

        self._model, self._tokenizer, info = load_reward_model(self.path, self.device, self.dtype)
        if self._max_length is None:
            self._max_length = int(info.get("max_length", 1024))
        if self._system_prompt is self._UNSET:
            self._system_prompt = info.get("system_prompt")

    def raw_scores(self, completions: Sequence[str], prompts: Sequence[Any]) -> list[float]:
        """The reward model's scores, unnormalised."""
        from grpo.rm.data import encode_conversation
        from grpo.rm.model import score_sequences

        if self._model is None:
            self._load()
        sequences = []
        for prompt, completion in zip(prompts, completions):
            if not isinstance(prompt, (str, list)):
                raise ValueError(f"row prompt must be text or chat messages, got {type(prompt).__name__}")
            ids, _ = encode_conversation(self._tokenizer, prompt, completion, self._system_prompt, self._max_length)
            sequences.append(ids)
        return score_sequences(self._model, sequences, self.batch_size)

    def score(self, completions: Sequence[str], prompt: Sequence[Any] = ()) -> list[Score]:
        if len(prompt) != len(completions):
            raise ValueError("reward_model needs each row's prompt (the 'prompt' field)")
        if not completions:
            return []
        raw = self.raw_scores(completions, prompt)
        finite = [r for r in raw if math.isfinite(r)]  # a NaN (fp16 overflow) must not enter the running stats
        if self.normalize == "sigmoid":
            values = [1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, r)))) for r in raw]
        elif self.normalize == "running":
            self.stats.update(finite)
            std = self.stats.std if self.stats.std > 1e-6 else 1.0
            values = [(r - self.stats.mean) / std for r in raw]
        else:
            values = list(raw)
        # a non-finite score is an error for that completion (reward 0, counted), never a reward
        return [Score(v, f"rm score {r:+.3f}") if math.isfinite(r)
                else Score(0.0, f"{REJECTED}{r} (the reward model's score)") for v, r in zip(values, raw)]

    def close(self) -> None:
        self._model = self._tokenizer = None
