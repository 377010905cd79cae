"""``grpo eval``'s outputs: the reproduction record and the files of an eval directory.

``results.json`` (per row: pass@k ± stderr, greedy pass@1, mean reward per verifier, length
stats; plus the record needed to reproduce it), ``samples.jsonl`` (every completion with its
rewards and reasons), ``results.md`` (the table, also printed) and ``pass_at_k.png``.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import re
from pathlib import Path
from typing import Any

from grpo.eval_settings import EvalSettings, command_line
from grpo.evaluate import plot_pass_at_k, results_table


def default_output(task: str) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"eval-{re.sub(r'[^A-Za-z0-9_.-]+', '_', task)}-{stamp}"


def run_record(s: EvalSettings, model_path: str, adapters: list[Path], num_problems: int,
                config_file: str | None) -> dict[str, Any]:
    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return {
        "package": "grpo-lora", "version": version("grpo-lora"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(s), "config_file": config_file,
        "model": s.model, "model_path": model_path,
        "adapters": [str(a.resolve()) for a in adapters],
        "task": s.task, "split": s.split, "num_problems": num_problems,
        "sampling": {"n": s.n, "k": s.k, "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k,
                     "max_new_tokens": s.max_new_tokens, "seed": s.seed, "greedy": s.greedy},
        "settings": dataclasses.asdict(s),
        "versions": {d: version(d) for d in ("torch", "transformers", "peft")},
        "estimator": "unbiased pass@k (Chen et al. 2021) from n samples per problem; stderr over problems",
    }


def write_outputs(out_dir: Path, record: dict[str, Any], models: list[dict], samples: list[dict],
                   s: EvalSettings) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    # strict JSON: a mean over nothing (NaN) is null
    (out_dir / "results.json").write_text(json.dumps(_no_nan({"run": record, "models": models}), indent=2) + "\n")
    with (out_dir / "samples.jsonl").open("w", encoding="utf-8") as f:
        for sample in samples:
            f.write(json.dumps(sample, ensure_ascii=False) + "\n")
    heading = (f"task `{s.task}` ({s.split} split, {record['num_problems']} problems), model `{s.model}`: "
               f"n={s.n} samples per problem at T={s.temperature:g}, top_p={s.top_p:g}, top_k={s.top_k}, "
               f"max_new_tokens={s.max_new_tokens}, seed={s.seed}")
    table = results_table(models, s.k)
    note = ("pass@k: unbiased estimator (Chen et al. 2021) from n samples per problem; "
            "± is the standard error over problems. Lengths are in tokens; truncated = cut at max_new_tokens.")
    (out_dir / "results.md").write_text(f"{heading}\n\n{table}\n{note}\n")
    plot_pass_at_k(models, s.k, out_dir / "pass_at_k.png", title=f"{s.task} ({s.split}), n={s.n}, T={s.temperature:g}")
    print(heading)
    print()
    print(table, end="")
    print(f"eval directory: {out_dir}")


def _no_nan(value: Any) -> Any:
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_no_nan(v) for v in value]
    return value
