"""The rollout engine interface: prompts in, groups of completions out.

Engines know nothing about rewards or losses. The trainer hands them tokenised
prompts and ``SamplingParams``; they return, per prompt, ``n`` completions with
token ids, text, the sampled tokens' log-probabilities and a finish reason.

Log-probabilities are those of the distribution ``softmax(logits / temperature)``
at the sampled token, before top-k/top-p truncation, so they are comparable with
what the trainer computes (``grpo.logprobs``) at the same temperature.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, Sequence

STREAM_SEED_BITS = 48  # vLLM gives the n children of a request seed, seed + 1, ...: keep room above


def stream_seed(*key: int | str) -> int:
    """A seed for one prompt's random stream, a pure function of ``key`` (e.g. run seed, step,
    global prompt index), so the same prompt samples the same tokens whichever rank (and
    whichever batch) it lands in, and resuming at a step needs no saved generator state."""
    digest = hashlib.blake2b(":".join(map(str, key)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> (64 - STREAM_SEED_BITS)


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1  # completions per prompt (the group size G)
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks)
    # Stop strings (tool-call end markers): a completion ends with the token that completes
    # one; the string stays in the output and Completion.extra["stop"] names it.
    stop: tuple[str, ...] = ()
    # Also one greedy completion per prompt, decoded in the same batch as the sampled ones and
    # returned after them (n + 1 per prompt). Only for engines with ``samples_greedy_alongside``;
    # evaluation uses it to get pass@k and greedy accuracy from one decode.
    plus_greedy: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    logprobs: list[float]  # one per token in token_ids
    finish_reason: Literal["stop", "length"]
    extra: dict[str, Any] = field(default_factory=dict)
    # 1 where the token was written by the model (gets gradient), 0 for environment
    # observations inside a multi-turn episode (grpo.tools.episodes); None = all model tokens.
    loss_mask: list[int] | None = None


class RolloutEngine(Protocol):
    def generate(self, prompts: Sequence[list[int]], params: SamplingParams,
                 seed: int | None = None, prompt_seeds: Sequence[int] | None = None) -> list[list[Completion]]:
        """``prompts``: token ids per prompt. Returns ``params.n`` completions per prompt.

        With ``prompt_seeds`` (one per prompt, see ``stream_seed``), each prompt's group is
        drawn from its own stream, independent of the other prompts in the call: the
        data-parallel trainer relies on this for equal results at any world size. Otherwise,
        with ``seed``, sampling uses a fresh seeded stream (evaluation) and leaves the
        engine's own stream, which is checkpointed, untouched.
        """

    def sync_weights(self) -> None:
        """Make the engine sample from the trainer's current adapter weights."""

    def state_dict(self) -> dict[str, Any]:
        """RNG state etc., saved in checkpoints so a resumed run samples the same tokens."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def close(self) -> None: ...
