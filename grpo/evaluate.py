"""Held-out evaluation: sample n completions per problem, score, accuracy and pass@k.

``evaluate`` is shared by the trainer (before/after training and every
``eval.every_n_steps``) and ``grpo eval``. It only calls ``engine.generate``, so it
works with any rollout engine. The reporting helpers below (``summarize``,
``results_table``, ``plot_pass_at_k``) turn its flat metrics into the structured
record, the markdown table and the plot that ``grpo eval`` writes.

pass@k is the unbiased estimator of Chen et al. 2021 computed from n >= k samples
per problem (``grpo.passk``); every "±" is the standard error of the mean over
problems, so it says how much the number would move with another draw of problems.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from grpo.engines.base import Completion, SamplingParams, stream_seed
from grpo.errors import UserError
from grpo.passk import mean_and_stderr, pass_at_k
from grpo.rewards import RewardRunner
from grpo.tools.episodes import episode_metrics

# In-training evaluations sample with seed ``cfg.seed + EVAL_SEED_OFFSET``, apart from the
# rollout stream; ``grpo eval --config RUN/config.yaml`` uses the same seed, so it
# reproduces the run's before/after numbers.
EVAL_SEED_OFFSET = 777


@dataclass
class EvalResult:
    metrics: dict[str, float]
    samples: list[dict[str, Any]] = field(default_factory=list)  # one per completion


def check_ks(ks: Sequence[int], n: int) -> None:
    """pass@k from n samples per problem is only defined for 1 <= k <= n."""
    if n < 1:
        raise UserError(f"evaluation needs n >= 1 samples per problem, got n={n}")
    for k in ks:
        if not 1 <= k <= n:
            raise UserError(f"pass@{k} needs 1 <= k <= n, but n={n} samples per problem: "
                            f"raise n to at least {k} or drop k={k}")


def evaluate(engine, encode: Callable[[Any], list[int]], rows: Sequence[dict[str, Any]],
             rewards: RewardRunner, *, n: int, temperature: float, max_new_tokens: int,
             ks: Sequence[int] = (1,), greedy: bool = True, seed: int = 1234, top_p: float = 1.0,
             top_k: int = 0, prefix: str = "heldout/", first_index: int = 0) -> EvalResult:
    """Sample ``n`` completions per row at ``temperature``, score them, and report (keys get ``prefix``):

    * ``accuracy`` (= pass@1: mean over problems of the fraction of correct samples) and
      ``accuracy_stderr``; ``pass@k`` and ``pass@k_stderr`` for each k in ``ks``;
    * ``greedy_accuracy`` (+ ``_stderr``) from one greedy completion per problem, if ``greedy``;
    * ``reward`` (weighted total) and ``reward/<verifier>`` means over sampled completions;
    * ``completion_length`` (mean tokens), ``_median``, ``_max``, and ``truncated_fraction``
      (completions cut at ``max_new_tokens``).

    Sampling uses a fixed ``seed`` so evaluations before and after training, or of a base
    model and its adapter, draw with the same random numbers (less noise in the difference).
    Problem i draws from its own stream ``stream_seed(seed, first_index + i)``, so a slice of
    the rows evaluated on one rank (``first_index`` = its offset) samples what the whole list
    would; ``metrics_from_samples`` recomputes the metrics from the gathered samples.
    """
    check_ks(ks, n)
    if not rows:
        raise UserError("evaluation needs at least one problem (the split is empty)")
    prompts = [encode(r["prompt"]) for r in rows]
    samples: list[dict[str, Any]] = []
    # the greedy row decoded in the sampled rows' batch where the engine can (one prefill, one decode)
    alongside = greedy and temperature > 0 and getattr(engine, "samples_greedy_alongside", False)
    groups = engine.generate(prompts, SamplingParams(n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                                                     top_p=top_p, top_k=top_k, plus_greedy=alongside),
                             prompt_seeds=[stream_seed(seed, first_index + i) for i in range(len(rows))])
    if alongside:
        groups, greedy_groups = [g[:n] for g in groups], [g[n:] for g in groups]
    correct, batch = _score(groups, rows, rewards, samples, "sampled", first_index)
    metrics = {f"{prefix}{k}": v for k, v in sampled_metrics(correct, ks).items()}
    metrics[f"{prefix}reward/mean"] = _mean(batch.total)  # not "reward": a path prefix of reward/<name>
    for name, values in batch.per_verifier.items():
        metrics[f"{prefix}reward/{name}"] = _mean([v for v in values if v is not None])
    metrics.update({f"{prefix}{k}": v for k, v in length_stats([c for g in groups for c in g]).items()})
    metrics.update(episode_metrics([c for g in groups for c in g], prefix))  # tool episodes only
    if greedy:
        if not alongside:
            greedy_groups = engine.generate(prompts, SamplingParams(n=1, max_new_tokens=max_new_tokens,
                                                                    temperature=0.0), seed=seed)
        g_correct, _ = _score(greedy_groups, rows, rewards, samples, "greedy", first_index)
        mean, stderr = mean_and_stderr([float(c[0]) for c in g_correct])
        metrics[f"{prefix}greedy_accuracy"], metrics[f"{prefix}greedy_accuracy_stderr"] = mean, stderr
    metrics.update({f"{prefix}errors/{k}": v for k, v in error_counts(samples).items()})
    return EvalResult(metrics, samples)


def sampled_metrics(correct: Sequence[Sequence[bool]], ks: Sequence[int]) -> dict[str, float]:
    """``correct[i]``: the verdicts of problem i's samples. accuracy and pass@k with stderr over problems."""
    out: dict[str, float] = {}
    out["accuracy"], out["accuracy_stderr"] = mean_and_stderr([sum(c) / len(c) for c in correct])
    for k in ks:
        out[f"pass@{k}"], out[f"pass@{k}_stderr"] = mean_and_stderr([pass_at_k(len(c), sum(c), k) for c in correct])
    return out


def length_stats(completions: Sequence[Completion]) -> dict[str, float]:
    """Completion length in tokens (mean, median, max) and the fraction cut at the token limit."""
    lengths = [len(c.token_ids) for c in completions]
    if not lengths:
        return {"completion_length": math.nan, "completion_length_median": math.nan,
                "completion_length_max": math.nan, "truncated_fraction": math.nan}
    return {"completion_length": sum(lengths) / len(lengths),
            "completion_length_median": float(statistics.median(lengths)),
            "completion_length_max": float(max(lengths)),
            "truncated_fraction": sum(c.finish_reason == "length" for c in completions) / len(completions)}


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def metrics_from_samples(samples: Sequence[dict[str, Any]], ks: Sequence[int], prefix: str = "heldout/") -> dict[str, float]:
    """``evaluate``'s metrics from its samples (e.g. gathered from several ranks' slices of the rows).

    Equal to ``evaluate(...).metrics`` except that a verifier that applied to no sample has no
    ``reward/<name>`` key (instead of NaN)."""
    sampled = [s for s in samples if s["mode"] == "sampled"]
    per_problem: dict[int, list[bool]] = {}
    for s in sampled:
        per_problem.setdefault(s["problem"], []).append(bool(s["correct"]))
    metrics = {f"{prefix}{k}": v for k, v in sampled_metrics(list(per_problem.values()), ks).items()}
    metrics[f"{prefix}reward/mean"] = _mean([s["reward"] for s in sampled])
    names = list(dict.fromkeys(name for s in sampled for name in s["rewards"]))
    for name in names:
        metrics[f"{prefix}reward/{name}"] = _mean([s["rewards"][name] for s in sampled if name in s["rewards"]])
    shapes = [Completion([0] * s["num_tokens"], "", [], s["finish_reason"],
                         {"metrics": s["metrics"]} if "metrics" in s else {}) for s in sampled]
    metrics.update({f"{prefix}{k}": v for k, v in length_stats(shapes).items()})
    metrics.update(episode_metrics(shapes, prefix))  # tool episodes only
    greedy = [float(s["correct"]) for s in samples if s["mode"] == "greedy"]
    if greedy:
        metrics[f"{prefix}greedy_accuracy"], metrics[f"{prefix}greedy_accuracy_stderr"] = mean_and_stderr(greedy)
    metrics.update({f"{prefix}errors/{k}": v for k, v in error_counts(samples).items()})
    return metrics


def error_counts(samples: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Per verifier, the samples (sampled and greedy) on which it failed (crashed, timed out, a rejected
    reward): each counted as incorrect, and reported, so a broken check is not read as a weak model."""
    out: dict[str, float] = {}
    for s in samples:
        for name, reason in s["reasons"].items():
            if reason.startswith("error"):
                out[name] = out.get(name, 0.0) + 1
    return out


def _score(groups: list[list[Completion]], rows, rewards: RewardRunner, samples: list, mode: str,
           first_index: int = 0):
    flat_rows = [row for row, g in zip(rows, groups) for _ in g]
    flat = [c for g in groups for c in g]
    batch = rewards.score(flat_rows, [c.text for c in flat], completion_ids=[c.token_ids for c in flat])
    out, i = [], 0
    for row, g in zip(rows, groups):
        out.append(batch.correct[i:i + len(g)])
        for j, c in enumerate(g):
            samples.append({"id": row.get("id"), "problem": first_index + len(out) - 1, "mode": mode, "sample": j,
                            "prompt": row.get("prompt"),
                            "completion": c.text, "reward": batch.total[i + j], "correct": batch.correct[i + j],
                            "finish_reason": c.finish_reason, "num_tokens": len(c.token_ids),
                            "rewards": {k: v[i + j] for k, v in batch.per_verifier.items() if v[i + j] is not None},
                            "reasons": {k: v[i + j] for k, v in batch.reasons.items() if v[i + j]},
                            **_episode_fields(c)})
        i += len(g)
    return out, batch


def _episode_fields(c: Completion) -> dict[str, Any]:
    """A tool episode's whole transcript, its segments (model turns, observations) and numbers."""
    return {k: c.extra[k] for k in ("transcript", "segments", "metrics") if k in c.extra}


# ------------------------------------------------------------------------ reporting
def summarize(metrics: dict[str, float], ks: Sequence[int], prefix: str = "") -> dict[str, Any]:
    """The flat metrics of one ``evaluate`` call -> the structured record of ``results.json``."""
    m = {k.removeprefix(prefix): v for k, v in metrics.items() if k.startswith(prefix)}
    greedy = None
    if "greedy_accuracy" in m:
        greedy = {"mean": m["greedy_accuracy"], "stderr": m["greedy_accuracy_stderr"]}
    return {
        "pass_at_k": {str(k): {"mean": m[f"pass@{k}"], "stderr": m[f"pass@{k}_stderr"]} for k in ks},
        "greedy_pass_at_1": greedy,
        "rewards": {"total": m["reward/mean"],
                    **{k.removeprefix("reward/"): v for k, v in m.items()
                       if k.startswith("reward/") and k != "reward/mean"}},
        "lengths": {"mean": m["completion_length"], "median": m["completion_length_median"],
                    "max": m["completion_length_max"], "truncated_fraction": m["truncated_fraction"]},
        "verifier_errors": {k.removeprefix("errors/"): int(v) for k, v in m.items() if k.startswith("errors/")},
    }


def results_table(models: Sequence[dict[str, Any]], ks: Sequence[int]) -> str:
    """Markdown: one row per model (``{"label", "pass_at_k", "greedy_pass_at_1", "rewards", "lengths"}``)."""
    verifiers = sorted({v for m in models for v in m["rewards"] if v != "total"})
    show_greedy = any(m["greedy_pass_at_1"] is not None for m in models)
    header = ["model", *(f"pass@{k}" for k in ks)]
    header += ["greedy pass@1"] if show_greedy else []
    header += ["reward", *(f"reward/{v}" for v in verifiers), "length mean", "length median", "length max",
               "truncated"]
    show_errors = any(m.get("verifier_errors") for m in models)
    header += ["verifier errors"] if show_errors else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in models:
        cells = [m["label"], *(_pm(m["pass_at_k"][str(k)]) for k in ks)]
        if show_greedy:
            cells.append(_pm(m["greedy_pass_at_1"]) if m["greedy_pass_at_1"] else "-")
        lengths = m["lengths"]
        cells += [_num(m["rewards"]["total"]), *(_num(m["rewards"].get(v, math.nan)) for v in verifiers),
                  f"{lengths['mean']:.1f}", f"{lengths['median']:g}", f"{lengths['max']:g}",
                  _num(lengths["truncated_fraction"])]
        if show_errors:  # samples a verifier failed on (counted incorrect)
            cells.append(", ".join(f"{k}: {n}" for k, n in sorted(m.get("verifier_errors", {}).items())) or "0")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _pm(value: dict[str, float]) -> str:
    return f"{value['mean']:.3f} ± {value['stderr']:.3f}"


def _num(value: float) -> str:
    return "-" if value != value else f"{value:.3f}"


def plot_pass_at_k(models: Sequence[dict[str, Any]], ks: Sequence[int], out: Path, title: str = "") -> Path:
    """pass@k against k (log x axis), one line per model, error bars = stderr over problems."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)  # the Agg canvas, without touching pyplot's global backend
    ax = fig.add_subplot()
    for m in models:
        values = [m["pass_at_k"][str(k)] for k in ks]
        ax.errorbar(list(ks), [v["mean"] for v in values], yerr=[v["stderr"] for v in values],
                    marker="o", capsize=3, label=m["label"])
    ax.set_xscale("log")
    ax.set_xticks(list(ks))
    ax.set_xticklabels([str(k) for k in ks])
    ax.minorticks_off()
    ax.set_xlabel("k (samples)")
    ax.set_ylabel("pass@k")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out
