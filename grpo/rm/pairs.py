"""``grpo rm build-pairs``: preference pairs from a verifiable task, offline.

Sample G completions per prompt from a model, score them with the task's own
verifiers, and pair a verified-correct completion (chosen) with an incorrect one
(rejected) of the same prompt; ``pair_by="reward"`` pairs by total reward instead
(chosen higher by at least ``min_gap``) for tasks without a pass/fail check. Rows
come out in TRL's preference shape (conversational when the task's prompts are chat
messages), ready for ``grpo rm train``, with the two rewards kept for inspection.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Literal, Sequence

from grpo.errors import UserError


def select_pairs(texts: Sequence[str], rewards: Sequence[float], correct: Sequence[bool],
                 pair_by: Literal["correct", "reward"], min_gap: float, max_pairs: int,
                 rng: random.Random) -> list[tuple[int, int]]:
    """(chosen index, rejected index) pairs among one prompt's completions.

    Candidates: correct x incorrect (``correct``), or every ordered pair whose rewards
    differ by at least ``min_gap`` (``reward``). Duplicate and empty texts are left
    out. Up to ``max_pairs`` are taken, each time the candidate whose two completions
    were used least so far (ties in a seeded random order), so the pairs spread over
    the distinct completions instead of repeating one of them.
    """
    seen: set[str] = set()
    unique = []
    for i, t in enumerate(texts):
        if t.strip() and t not in seen:
            seen.add(t)
            unique.append(i)
    if pair_by == "correct":
        candidates = [(i, j) for i in unique if correct[i] for j in unique if not correct[j]]
    elif pair_by == "reward":
        candidates = [(i, j) for i in unique for j in unique if rewards[i] - rewards[j] >= min_gap]
    else:
        raise UserError(f"pair_by must be 'correct' or 'reward', got {pair_by!r}")
    rng.shuffle(candidates)
    uses: Counter[int] = Counter()
    out = []
    while candidates and len(out) < max_pairs:
        best = min(range(len(candidates)), key=lambda c: uses[candidates[c][0]] + uses[candidates[c][1]])
        i, j = candidates.pop(best)
        uses[i] += 1
        uses[j] += 1
        out.append((i, j))
    return out


def build_pairs(task_name: str, model_spec: str, *, adapter: str | None = None, split: str = "train",
                num_prompts: int = 64, n: int = 8, max_new_tokens: int = 64, temperature: float = 1.0,
                top_p: float = 1.0, pair_by: Literal["correct", "reward"] = "correct", min_gap: float = 0.5,
                max_pairs_per_prompt: int = 4, seed: int = 0, task_args: dict[str, Any] | None = None,
                verifier_args: dict[str, dict[str, Any]] | None = None, system_prompt: str | None = None,
                plugins: Sequence[str] = (), device: str = "auto", dtype: str = "auto", prompts_per_batch: int = 16,
                workers: int = 2, threads: int = 0,
                progress: bool = True) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Preference rows and counts (prompts, completions, accuracy, prompts_with_pairs, empty)."""
    if pair_by == "reward" and not min_gap > 0:  # 0 pairs a completion with itself or with an equal one
        raise UserError(f"min_gap must be > 0 with pair_by=reward (a pair needs a preferred completion), got {min_gap}")
    import torch

    from grpo.build import build_task, load_plugins
    from grpo.engines.base import SamplingParams
    from grpo.engines.hf import HFEngine
    from grpo.models import load_causal_lm, load_tokenizer, resolve_device, resolve_model_path
    from grpo.prompts import encode_prompt
    from grpo.rewards import RewardRunner

    if n < 2 or max_new_tokens < 1 or max_pairs_per_prompt < 1 or num_prompts < 0 or prompts_per_batch < 1:
        raise UserError("build-pairs: need n >= 2, max_new_tokens >= 1, max_pairs_per_prompt >= 1, "
                        "num_prompts >= 0 and prompts_per_batch >= 1")
    if temperature <= 0:
        raise UserError("build-pairs: temperature must be > 0 (pairs need different completions)")
    if threads:
        torch.set_num_threads(threads)
    load_plugins(list(plugins))
    task = build_task(task_name, dict(task_args or {}))
    rows = task.rows(split)
    rows = rows[:num_prompts] if num_prompts else rows
    if not rows:
        raise UserError(f"task {task_name!r}: the {split} split is empty")
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    stats = {"prompts": len(rows), "completions": 0, "correct": 0, "prompts_with_pairs": 0, "empty": 0}
    with RewardRunner(verifier_args, workers=workers) as runner:
        runner.check_rows(rows, f"task {task_name!r} {split} split")
        if pair_by == "correct" and not any(runner.verifier(v).correctness for r in rows for v in r["verifiers"]):
            raise UserError(f"task {task_name!r}: its verifiers have no pass/fail (correctness) check; "
                            "use --pair-by reward")
        device = resolve_device(device)
        path = resolve_model_path(model_spec)
        tokenizer = load_tokenizer(path)
        model = load_causal_lm(path, dtype, device)
        if adapter:
            model = _with_adapter(model, adapter)
        engine = HFEngine(model, tokenizer, seed=seed)
        params = SamplingParams(n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
        chunks = [rows[s:s + prompts_per_batch] for s in range(0, len(rows), prompts_per_batch)]
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(rows), desc="build-pairs", unit="prompt", dynamic_ncols=True)
        for c, chunk in enumerate(chunks):
            prompt_ids = [encode_prompt(tokenizer, r["prompt"], system_prompt) for r in chunk]
            groups = engine.generate(prompt_ids, params, seed=seed * 1_000_003 + c)
            flat_rows = [r for r in chunk for _ in range(n)]
            scored = runner.score(flat_rows, [comp.text for g in groups for comp in g])
            for p, (row, group) in enumerate(zip(chunk, groups)):
                texts = [comp.text for comp in group]
                rewards, correct = scored.total[p * n:(p + 1) * n], scored.correct[p * n:(p + 1) * n]
                stats["completions"] += n
                stats["correct"] += sum(correct)
                stats["empty"] += sum(not t.strip() for t in texts)
                picked = select_pairs(texts, rewards, correct, pair_by, min_gap, max_pairs_per_prompt, rng)
                stats["prompts_with_pairs"] += bool(picked)
                for k, (i, j) in enumerate(picked):
                    out.append({"prompt": row["prompt"], "chosen": _response(row["prompt"], texts[i]),
                                "rejected": _response(row["prompt"], texts[j]),
                                "id": f"{row.get('id', f'{split}-{c * prompts_per_batch + p}')}-pair{k}",
                                "chosen_reward": rewards[i], "rejected_reward": rewards[j]})
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
    stats["accuracy"] = stats["correct"] / max(1, stats["completions"])
    stats["pairs"] = len(out)
    return out, stats


def _response(prompt: Any, text: str) -> Any:
    """Chat prompts get the completion as an assistant message (TRL's conversational shape)."""
    return text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]


def _with_adapter(model, adapter: str):
    from peft import PeftModel

    if not (Path(adapter) / "adapter_config.json").is_file():
        raise UserError(f"--adapter {adapter}: no adapter_config.json (give a LoRA adapter directory, "
                        "e.g. runs/arith/adapter)")
    return PeftModel.from_pretrained(model, adapter)


def write_jsonl(path: str | Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Write rows atomically (a killed run leaves no half file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".jsonl", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
