"""Held-out evaluation: sample n completions per problem, score, accuracy and pass@k."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from grpo.engines.base import Completion, SamplingParams
from grpo.passk import mean_and_stderr, pass_at_k
from grpo.rewards import RewardRunner


@dataclass
class EvalResult:
    metrics: dict[str, float]
    samples: list[dict[str, Any]] = field(default_factory=list)  # one per completion


def evaluate(engine, encode: Callable[[Any], list[int]], rows: Sequence[dict[str, Any]],
             rewards: RewardRunner, *, n: int, temperature: float, max_new_tokens: int,
             ks: Sequence[int] = (1,), greedy: bool = True, seed: int = 1234, top_p: float = 1.0,
             prefix: str = "heldout/") -> EvalResult:
    """Accuracy = mean over problems of the fraction of correct samples (= pass@1).

    Sampling uses a fixed ``seed`` so evaluations before and after training draw
    with the same random numbers (less noise in the difference).
    """
    prompts = [encode(r["prompt"]) for r in rows]
    metrics: dict[str, float] = {}
    samples: list[dict[str, Any]] = []
    groups = engine.generate(prompts, SamplingParams(n=n, max_new_tokens=max_new_tokens,
                                                     temperature=temperature, top_p=top_p), seed=seed)
    correct = _score(groups, rows, rewards, samples, "sampled")
    per_problem = [sum(c) / n for c in correct]
    metrics[f"{prefix}accuracy"], metrics[f"{prefix}accuracy_stderr"] = mean_and_stderr(per_problem)
    for k in ks:
        metrics[f"{prefix}pass@{k}"] = mean_and_stderr([pass_at_k(n, sum(c), k) for c in correct])[0]
    lengths = [len(c.token_ids) for g in groups for c in g]
    metrics[f"{prefix}completion_length"] = sum(lengths) / max(1, len(lengths))
    if greedy:
        greedy_groups = engine.generate(prompts, SamplingParams(n=1, max_new_tokens=max_new_tokens, temperature=0.0))
        g_correct = _score(greedy_groups, rows, rewards, samples, "greedy")
        metrics[f"{prefix}greedy_accuracy"] = sum(c[0] for c in g_correct) / len(g_correct)
    return EvalResult(metrics, samples)


def _score(groups: list[list[Completion]], rows, rewards: RewardRunner, samples: list, mode: str) -> list[list[bool]]:
    flat_rows = [row for row, g in zip(rows, groups) for _ in g]
    flat = [c for g in groups for c in g]
    batch = rewards.score(flat_rows, [c.text for c in flat])
    out, i = [], 0
    for row, g in zip(rows, groups):
        out.append(batch.correct[i:i + len(g)])
        for j, c in enumerate(g):
            samples.append({"id": row.get("id"), "mode": mode, "completion": c.text, "reward": batch.total[i + j],
                            "correct": batch.correct[i + j], "finish_reason": c.finish_reason,
                            "rewards": {k: v[i + j] for k, v in batch.per_verifier.items() if v[i + j] is not None},
                            "reasons": {k: v[i + j] for k, v in batch.reasons.items() if v[i + j]}})
        i += len(g)
    return out
