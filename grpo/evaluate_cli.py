"""``grpo eval``: honest pass@k of a model and its LoRA adapters on a task split, side by side.

    grpo eval --task arith --model smollm2-135m --adapter runs/arith --n 16 --k 1,4,16 --greedy
    grpo eval --config runs/arith/config.yaml --adapter runs/arith      # the run's own eval settings

The base model is loaded once; each ``--adapter`` is loaded onto it with peft, and the
base row is evaluated with the adapters disabled, so every row samples with the same
seed from the same base weights (common random numbers: less noise in the difference).

``--config FILE.yaml`` holds either eval settings (the flag names with underscores:
``task``, ``model``, ``adapter``, ``n``, ``k``, ``max_new_tokens`` ...) or a training
config (``configs/*.yaml``, a run's ``config.yaml``): then the task, its arguments and
verifier settings, the model, the sampling settings and the ``eval:`` section are
taken from it, with the seed the trainer's evaluations use, so the run's before/after
numbers are reproduced. Flags given on the command line override the file.

Writes into ``--out`` (default ``runs/eval-<task>-<timestamp>``): ``results.json`` (per
row: pass@k +- stderr, greedy pass@1, mean reward per verifier, length stats; plus the
record needed to reproduce it), ``samples.jsonl`` (every completion with its rewards and
reasons), ``results.md`` (the table, also printed) and ``pass_at_k.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

from grpo.config import ModelConfig, RolloutConfig, ToolsConfig, from_dict
from grpo.errors import UserError, state_dict_error_line
from grpo.eval_settings import EvalSettings, add_eval_parser, resolve_settings  # noqa: F401  (grpo.cli's entry)

# torch, transformers, peft and the modules that import them (grpo.build, grpo.evaluate, grpo.models ...)
# are imported inside the functions: grpo.cli imports this module to build its parser, and
# `grpo --help` must stay instant.


def resolve_adapter(path: str, what: str = "--adapter") -> Path:
    """A peft adapter directory, or a ``grpo train`` run directory whose adapter/ holds one;
    ``what`` names the path in the errors."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{what} {path}: no such directory")
    if not p.is_dir():
        raise UserError(f"{what} {path} is a file; give a peft adapter directory (e.g. runs/<name>/adapter)")
    if not (p / "adapter_config.json").is_file() and (p / "adapter" / "adapter_config.json").is_file():
        p = p / "adapter"  # a run directory
    config_file = p / "adapter_config.json"
    if not config_file.is_file():
        raise UserError(f"{what} {path} is not a peft adapter directory (no adapter_config.json); "
                        "give e.g. runs/<name>/adapter or the run directory")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{what} {path}: {config_file} is not valid JSON ({exc.msg})") from exc
    if not isinstance(config, dict) or "peft_type" not in config:
        raise UserError(f"{what} {path}: {config_file} has no peft_type (not a peft adapter config)")
    if not any((p / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin")):
        raise UserError(f"{what} {path}: no adapter_model.safetensors (the adapter weights) in {p}")
    return p


# ----------------------------------------------------------------------- command
def run_eval(args: argparse.Namespace) -> int:
    s = resolve_settings(args)
    adapters = [resolve_adapter(a) for a in s.adapter]
    labels = (["base"] if s.base else []) + _labels(s.adapter)
    from grpo.build import build_engine, build_task, engine_kind, load_plugins
    from grpo.eval_report import default_output, run_record, write_outputs
    from grpo.prompts import cached_encoder, check_prompts
    from grpo.rewards import RewardRunner

    kind = engine_kind(s.engine)
    if kind != "hf" and len(labels) > 1:
        raise UserError(f"side-by-side rows ({', '.join(labels)}) need --engine hf (it toggles adapters on the "
                        "shared model); with vllm evaluate one row per call: one --adapter and --no-base, "
                        "or no --adapter")

    # Cheap checks first: task, rows and verifiers fail before any model is loaded.
    load_plugins(s.plugins)
    task = build_task(s.task, s.task_args)
    rows = task.rows(s.split)
    if not rows:
        raise UserError(f"task {s.task!r} has no rows in the {s.split!r} split (check --task-args / --split)")
    if s.num_problems:
        rows = rows[:s.num_problems]
    out_dir = Path(s.output) if s.output else default_output(s.task)
    _check_output_dir(out_dir)  # before the evaluation, not after it

    with RewardRunner(s.verifier_args, s.verifier_weights, workers=s.workers) as rewards:
        rewards.check_rows(rows, f"task {s.task!r} {s.split} split")
        rewards.check_settings_names("")
        model, tokenizer, model_path = _load_model(s, adapters)
        engine = build_engine(model, tokenizer, *_engine_settings(s, kind, adapters), seed=s.seed,
                              tools=_tools_settings(s))
        try:
            # every prompt encodes, and fits the model's context with a whole completion, before any sampling
            encode = cached_encoder(tokenizer, s.system_prompt, engine)
            check_prompts({s.split: rows}, encode, s.task, *_context(model, engine, s))
            models, samples = _evaluate_rows(s, engine, model, encode, rows, rewards, labels, adapters)
        finally:
            engine.close()

    record = run_record(s, model_path, adapters, len(rows), getattr(args, "config", None))
    try:
        write_outputs(out_dir, record, models, samples, s)
    except OSError as exc:
        from grpo.rundir import describe_os_error

        raise UserError(describe_os_error(exc, f"eval results could not be written to {out_dir}")) from exc
    return 0


def _check_output_dir(out_dir: Path) -> None:
    """The eval directory can be made and written: a file in its place, or an unwritable parent, is an
    error now rather than after the evaluation."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--output {out_dir} is a file, not a directory")
    parent = next((p for p in [out_dir, *out_dir.parents] if p.exists()), None)
    if parent is not None and (not parent.is_dir() or not os.access(parent, os.W_OK)):
        raise UserError(f"--output {out_dir}: {parent} is not a writable directory")


def _load_model(s: EvalSettings, adapters: list[Path]):
    """The base model once; adapters loaded onto it by name (``adapter0``, ``adapter1``, ...)."""
    import torch

    from grpo.allocator import keep_freed_memory
    from grpo.attention import apply_attention_dtype
    from grpo.fused_lora import use_fused_lora
    from grpo.models import load_causal_lm, load_tokenizer, resolve_device, resolve_model_path

    if s.threads:
        torch.set_num_threads(s.threads)
    keep_freed_memory()  # grpo/allocator.py: faster decoding on CPU, same numbers
    device = resolve_device(s.device)
    path = resolve_model_path(s.model)
    for adapter in adapters:
        _warn_if_other_base(adapter, s.model, path)
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path, s.dtype, device)
    apply_attention_dtype(model, s.attention_dtype, device)  # as in training (grpo/build.py)
    if adapters:
        from peft import PeftModel
        from safetensors import SafetensorError

        adapter = adapters[0]
        try:
            model = PeftModel.from_pretrained(model, str(adapter), adapter_name="adapter0")
            for i, adapter in enumerate(adapters[1:], 1):
                model.load_adapter(str(adapter), adapter_name=f"adapter{i}")
        except SafetensorError as exc:  # truncated or not a safetensors file at all
            raise UserError(f"--adapter {adapter}: the adapter weights are corrupt or truncated ({exc})") from exc
        except (ValueError, RuntimeError, KeyError, OSError) as exc:
            raise UserError(f"cannot load an adapter onto {s.model}: {state_dict_error_line(exc)} "
                            "(was it trained on this base model?)") from exc
        use_fused_lora(model, s.lora_kernel)  # as in training (grpo/build.py)
    model.eval()
    return model, tokenizer, path


def _warn_if_other_base(adapter: Path, spec: str, path: str) -> None:
    base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base or base in (spec, path):
        return
    with contextlib.suppress(OSError):
        if Path(base).exists() and Path(path).exists() and Path(base).resolve() == Path(path).resolve():
            return
    print(f"warning: adapter {adapter} was trained on {base}, evaluating it on {spec}", file=sys.stderr)


def _engine_settings(s: EvalSettings, kind: str, adapters: list[Path] = ()) -> tuple[ModelConfig, RolloutConfig]:
    """The model and rollout settings the engine is built from, as in training; the LoRA rank is the
    largest of the adapters' (vLLM reserves its LoRA slots for it: a rank-32 adapter failed at 16)."""
    ranks = [16]
    for adapter in adapters:
        config = json.loads((adapter / "adapter_config.json").read_text())
        ranks += [int(config.get("r") or 0), *(int(r) for r in (config.get("rank_pattern") or {}).values())]
    return (ModelConfig(name=s.model, dtype=s.dtype, device=s.device, system_prompt=s.system_prompt,
                        lora_rank=max(ranks)),
            RolloutConfig(engine=kind,  # type: ignore[arg-type]
                          max_batch_size=s.max_batch_size, top_p=s.top_p, top_k=s.top_k,
                          max_new_tokens=s.max_new_tokens, temperature=s.temperature, vllm=dict(s.vllm)))


def _tools_settings(s: EvalSettings) -> ToolsConfig:
    return from_dict(ToolsConfig, dict(s.tools), "tools.")


def _labels(adapter_specs: list[str]) -> list[str]:
    labels, seen = [], {"base"}
    for spec in adapter_specs:
        label = spec.rstrip("/") or spec
        while label in seen:
            label += "'"
        labels.append(label)
        seen.add(label)
    return labels


def _context(model, engine, s: EvalSettings) -> tuple[int | None, int, str]:
    """check_prompts' context, completion tokens and the context's name."""
    from grpo.prompts import context_of

    context, name = context_of(model, engine)
    return context, _completion_tokens(s), name


def _completion_tokens(s: EvalSettings) -> int:
    tools = _tools_settings(s)
    return tools.max_episode_tokens if tools.enabled else s.max_new_tokens


def _evaluate_rows(s: EvalSettings, engine, model, encode, rows, rewards, labels, adapters):
    from grpo.evaluate import evaluate, summarize

    adapter_of = dict(zip(labels[1:] if s.base else labels, range(len(adapters))))
    models, samples = [], []
    for label in labels:
        index = adapter_of.get(label)
        if index is None:  # the base row: adapters off (when any are loaded)
            context = model.disable_adapter() if adapters else contextlib.nullcontext()
        else:
            model.set_adapter(f"adapter{index}")
            context = contextlib.nullcontext()
        start = time.perf_counter()
        with context:
            engine.sync_weights()
            result = evaluate(engine, encode, rows, rewards, n=s.n, temperature=s.temperature,
                              max_new_tokens=s.max_new_tokens, ks=s.k, greedy=s.greedy, seed=s.seed,
                              top_p=s.top_p, top_k=s.top_k, prefix="")
        seconds = time.perf_counter() - start
        row = {"label": label, "adapter": None if index is None else str(adapters[index].resolve()),
               **summarize(result.metrics, s.k), "seconds": round(seconds, 2), "metrics": result.metrics}
        models.append(row)
        samples.extend({"model": label, **sample} for sample in result.samples)
        passk = ", ".join(f"pass@{k} {row['pass_at_k'][str(k)]['mean']:.3f}" for k in s.k)
        print(f"[eval] {label}: {passk} ({seconds:.1f}s)", file=sys.stderr, flush=True)
        for name, count in sorted(row["verifier_errors"].items()):
            print(f"warning: [eval] {label}: verifier {name!r} failed on {count} of {len(result.samples)} samples "
                  "(counted incorrect; the reasons are in samples.jsonl)", file=sys.stderr)
    return models, samples


