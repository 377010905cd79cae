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
import dataclasses
import datetime
import json
import re
import shlex
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from grpo.config import (ModelConfig, RolloutConfig, RunConfig, ToolsConfig, from_dict, json_object_arg, opt,
                         to_dict, validate_tools)
from grpo.errors import UserError

_MODEL, _ROLLOUT = ModelConfig(), RolloutConfig()  # one source of truth for the shared defaults


@dataclass
class EvalSettings:
    task: str = opt("", "registered task name (`grpo list tasks`) or module:attr")
    split: Literal["train", "heldout"] = opt("heldout", "task split to evaluate")
    model: str = opt("", "base model spec: embedded name (smollm2-135m), .gguf file, HF directory or hub id")
    adapter: list[str] = opt([], "LoRA adapter directory (or a `grpo train` run directory holding adapter/); "
                                 "one table row each")
    base: bool = opt(True, "also evaluate the base model (adapters off) as the first row")
    n: int = opt(16, "samples per problem (pass@k needs n >= k)")
    k: list[int] = opt([], "k values for pass@k (default: 1, the powers of 4 below n, and n)")
    temperature: float = opt(_ROLLOUT.temperature, "sampling temperature (> 0; --greedy adds greedy pass@1)")
    top_p: float = opt(_ROLLOUT.top_p, "nucleus sampling threshold")
    top_k: int = opt(_ROLLOUT.top_k, "top-k sampling (0 = off)")
    greedy: bool = opt(False, "also report greedy pass@1 (one temperature-0 completion per problem)")
    max_new_tokens: int = opt(_ROLLOUT.max_new_tokens, "completion length limit in tokens")
    num_problems: int = opt(0, "evaluate the first N problems of the split (0 = all)")
    seed: int = opt(0, "sampling seed, the same for every row (fixes the hf engine's samples)")
    output: str | None = opt(None, "eval directory (default runs/eval-<task>-<timestamp>)")
    plugins: list[str] = opt([], "python file registering tasks/verifiers")
    task_args: dict[str, Any] = opt({}, "task keyword arguments")
    verifier_args: dict[str, dict[str, Any]] = opt({}, "per-verifier constructor arguments")
    verifier_weights: dict[str, float] = opt({}, "override the rows' verifier weights (as task.verifier_weights)")
    system_prompt: str | None = opt(_MODEL.system_prompt, "system message prepended to chat prompts (match training)")
    engine: Literal["hf", "vllm", "auto"] = opt(_ROLLOUT.engine, "rollout engine")
    vllm: dict[str, Any] = opt({}, "vllm engine options (as rollout.vllm)")
    device: str = opt(_MODEL.device, "auto, cpu, cuda, cuda:N")
    dtype: str = opt(_MODEL.dtype, "auto, float32, bfloat16, float16")
    max_batch_size: int = opt(_ROLLOUT.max_batch_size, "most sequences decoded at once by the hf engine")
    workers: int = opt(2, "worker processes for isolated verifiers")
    threads: int = opt(0, "torch CPU threads (0 = torch default)")
    tools: dict[str, Any] = opt({}, "multi-turn tool episodes, the keys of a training config's tools section "
                                    "(docs/tools.md), e.g. '{\"enabled\": [\"calculator\"]}'")


_FLAG_TYPES = {"n": int, "temperature": float, "top_p": float, "top_k": int, "max_new_tokens": int, "num_problems": int,
               "seed": int, "max_batch_size": int, "workers": int, "threads": int}
_JSON_FLAGS = ("task_args", "verifier_args", "verifier_weights", "vllm", "tools")
_ALIASES = {"num_problems": ["--limit"], "max_batch_size": ["--batch-size"], "output": ["--out"]}
_METAVARS = {"task": "NAME", "model": "SPEC", "n": "N", "temperature": "T", "top_p": "P", "top_k": "K",
             "max_new_tokens": "TOKENS",
             "num_problems": "N", "seed": "SEED", "output": "DIR", "system_prompt": "TEXT", "device": "DEVICE",
             "dtype": "DTYPE", "max_batch_size": "N", "workers": "N", "threads": "N"}
_REPEATED = {"adapter": "DIR", "plugins": "FILE"}
_BOOLEAN = ("base", "greedy")


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    # Flags default to SUPPRESS so that only the ones given on the command line override --config.
    p = subparsers.add_parser(
        "eval", help="pass@k of a model and its adapters on a task split (table, plot, samples)",
        argument_default=argparse.SUPPRESS,
        description="Sample n completions per problem, score them with the task's verifiers, and report "
                    "unbiased pass@k (Chen et al. 2021) +- standard error over problems, one row per model.")
    p.add_argument("--config", metavar="FILE",
                   help="YAML file: eval settings (these names) or a training config; flags override it")
    for f in fields(EvalSettings):
        flags = ["--" + f.name.replace("_", "-"), *_ALIASES.get(f.name, [])]
        help_ = f.metadata["help"]
        if f.name in _REPEATED:
            p.add_argument(*flags, action="append", metavar=_REPEATED[f.name], help=help_ + " (repeatable)")
        elif f.name in _BOOLEAN:
            p.add_argument(*flags, action=argparse.BooleanOptionalAction, help=f"{help_} (default {f.default})")
        elif f.name == "k":
            p.add_argument(*flags, metavar="K[,K...]", help=help_ + "; e.g. 1,4,16")
        elif f.name == "split":
            p.add_argument(*flags, choices=["train", "heldout"], help=f"{help_} (default {f.default})")
        elif f.name == "engine":
            p.add_argument(*flags, choices=["hf", "vllm", "auto"], help=f"{help_} (default {f.default})")
        elif f.name in _JSON_FLAGS:
            p.add_argument(*flags, metavar="JSON", help=help_ + ", as a JSON object")
        else:
            default = f" (default {f.default!r})" if f.default not in ("", None) else ""
            p.add_argument(*flags, type=_FLAG_TYPES.get(f.name, str), metavar=_METAVARS.get(f.name),
                           help=help_ + default)
    return p


# ---------------------------------------------------------------------- settings
def resolve_settings(args: argparse.Namespace) -> EvalSettings:
    """Defaults, then the --config file, then command-line flags; validated."""
    data: dict[str, Any] = {}
    config = getattr(args, "config", None)
    if config:
        data = _normalise(_read_config_file(config), config)
        _build(data, config)  # report a bad file as the file's fault
    cli = {f.name: getattr(args, f.name) for f in fields(EvalSettings) if hasattr(args, f.name)}
    for name in _JSON_FLAGS:
        if name in cli:
            cli[name] = json_object_arg(cli[name], "--" + name.replace("_", "-"))
    settings = _build({**data, **_normalise(cli, "command line")}, "command line")
    default_ks = {1, settings.n, *(4 ** i for i in range(1, 16) if 4 ** i < settings.n)}
    settings.k = sorted(set(settings.k) or default_ks)
    _validate(settings)
    return settings


def _build(data: dict[str, Any], source: str) -> EvalSettings:
    try:
        return from_dict(EvalSettings, data)
    except UserError as exc:
        message = str(exc).replace("unknown config key", "unknown setting").replace("config key", "setting")
        raise UserError(f"{source}: {message}") from exc


def _read_config_file(path: str) -> dict[str, Any]:
    from grpo.config import read_yaml_mapping

    data = read_yaml_mapping(path, "eval config", "eval settings (task, model, n, k, ...) or a training config")
    if _is_training_config(data):
        return _from_training_config(path)
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _is_training_config(data: dict[str, Any]) -> bool:
    training_only = {f.name for f in fields(RunConfig)} - {f.name for f in fields(EvalSettings)}
    return (any(k in training_only for k in data)
            or isinstance(data.get("model"), dict) or isinstance(data.get("task"), dict))


def _from_training_config(path: str) -> dict[str, Any]:
    """The settings of the trainer's held-out evaluation, from a training config."""
    from grpo.config import load_config
    from grpo.evaluate import EVAL_SEED_OFFSET

    try:
        cfg = load_config(path)
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from exc
    return {
        "task": cfg.task.name, "task_args": cfg.task.args, "verifier_args": cfg.task.verifier_args,
        "verifier_weights": cfg.task.verifier_weights, "plugins": cfg.plugins,
        "model": cfg.model.name, "system_prompt": cfg.model.system_prompt, "device": cfg.model.device,
        "dtype": cfg.model.dtype, "engine": cfg.rollout.engine, "vllm": cfg.rollout.vllm,
        "max_batch_size": cfg.rollout.max_batch_size, "temperature": cfg.rollout.temperature,
        "top_p": cfg.rollout.top_p, "top_k": cfg.rollout.top_k, "max_new_tokens": cfg.rollout.max_new_tokens,
        "n": cfg.eval.num_samples, "k": cfg.eval.k, "greedy": cfg.eval.greedy,
        "num_problems": cfg.eval.num_problems, "seed": cfg.seed + EVAL_SEED_OFFSET,
        "workers": cfg.verifier_workers, "threads": cfg.threads, "tools": to_dict(cfg.tools),
    }


def _normalise(data: dict[str, Any], source: str) -> dict[str, Any]:
    """Accept the forms people write: ``k: "1,4,16"`` or ``k: 4``, ``adapter: DIR``."""
    out = dict(data)
    if "k" in out:
        out["k"] = _parse_ks(out["k"], source)
    for name in _REPEATED:
        if isinstance(out.get(name), str):
            out[name] = [out[name]]
    return out


def _parse_ks(value: Any, source: str) -> Any:
    if isinstance(value, bool):
        return value  # from_dict reports the type error
    if isinstance(value, int):
        return [value]
    if isinstance(value, str):
        try:
            return [int(part) for part in value.replace(" ", "").split(",") if part]
        except ValueError:
            raise UserError(f"{source}: k must be integers separated by commas, e.g. 1,4,16; got {value!r}") from None
    return value


def _validate(s: EvalSettings) -> None:
    if not s.task:
        raise UserError("grpo eval needs --task NAME (or `task:` in --config); see `grpo list tasks`")
    if not s.model:
        raise UserError("grpo eval needs --model SPEC (or `model:` in --config): an embedded name such as "
                        "smollm2-135m, a .gguf file, a Hugging Face directory or a hub id")
    if s.n < 1:
        raise UserError(f"--n must be >= 1, got {s.n}")
    for k in s.k:
        if k > s.n:
            raise UserError(f"pass@{k} needs at least {k} samples per problem but --n is {s.n}: "
                            f"raise --n to {k} or drop {k} from --k")
        if k < 1:
            raise UserError(f"--k values must be >= 1, got {k}")
    if s.temperature <= 0:
        raise UserError(f"--temperature must be > 0 for sampled pass@k (got {s.temperature:g}); "
                        "add --greedy for greedy pass@1")
    if not 0 < s.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {s.top_p:g}")
    if s.top_k < 0:
        raise UserError(f"--top-k must be >= 0 (0 = off), got {s.top_k}")
    if s.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {s.max_new_tokens}")
    if s.num_problems < 0:
        raise UserError(f"--limit/--num-problems must be >= 0 (0 = all), got {s.num_problems}")
    if s.max_batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {s.max_batch_size}")
    validate_tools(from_dict(ToolsConfig, dict(s.tools), "tools."))
    if not s.base and not s.adapter:
        raise UserError("--no-base leaves nothing to evaluate: give at least one --adapter")


def resolve_adapter(path: str) -> Path:
    """A peft adapter directory, or a ``grpo train`` run directory whose adapter/ holds one."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"--adapter {path}: no such directory")
    if not p.is_dir():
        raise UserError(f"--adapter {path} is a file; give a peft adapter directory (e.g. runs/<name>/adapter)")
    if not (p / "adapter_config.json").is_file() and (p / "adapter" / "adapter_config.json").is_file():
        p = p / "adapter"  # a run directory
    config_file = p / "adapter_config.json"
    if not config_file.is_file():
        raise UserError(f"--adapter {path} is not a peft adapter directory (no adapter_config.json); "
                        "give e.g. runs/<name>/adapter or the run directory")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"--adapter {path}: {config_file} is not valid JSON ({exc.msg})") from exc
    if not isinstance(config, dict) or "peft_type" not in config:
        raise UserError(f"--adapter {path}: {config_file} has no peft_type (not a peft adapter config)")
    if not any((p / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin")):
        raise UserError(f"--adapter {path}: no adapter_model.safetensors (the adapter weights) in {p}")
    return p


# ----------------------------------------------------------------------- command
def run_eval(args: argparse.Namespace) -> int:
    s = resolve_settings(args)
    adapters = [resolve_adapter(a) for a in s.adapter]
    labels = (["base"] if s.base else []) + _labels(s.adapter)
    engine_kind = _engine_kind(s.engine)
    if engine_kind != "hf" and len(labels) > 1:
        raise UserError(f"side-by-side rows ({', '.join(labels)}) need --engine hf (it toggles adapters on the "
                        "shared model); with vllm evaluate one row per call: one --adapter and --no-base, "
                        "or no --adapter")

    # Cheap checks first: task, rows and verifiers fail before any model is loaded.
    from grpo.build import build_task, load_plugins
    from grpo.rewards import RewardRunner

    load_plugins(s.plugins)
    task = build_task(s.task, s.task_args)
    rows = task.rows(s.split)
    if not rows:
        raise UserError(f"task {s.task!r} has no rows in the {s.split!r} split (check --task-args / --split)")
    if s.num_problems:
        rows = rows[:s.num_problems]
    out_dir = Path(s.output) if s.output else _default_output(s.task)

    with RewardRunner(s.verifier_args, s.verifier_weights, workers=s.workers) as rewards:
        rewards.check_rows(rows, f"task {s.task!r} {s.split} split")
        model, tokenizer, model_path = _load_model(s, adapters)
        from grpo.build import build_engine

        engine = build_engine(_engine_config(s, engine_kind), model, tokenizer)
        try:
            models, samples = _evaluate_rows(s, engine, model, tokenizer, rows, rewards, labels, adapters)
        finally:
            engine.close()

    record = _run_record(s, model_path, adapters, len(rows), getattr(args, "config", None))
    _write_outputs(out_dir, record, models, samples, s)
    return 0


def _engine_kind(engine: str) -> str:
    if engine == "auto":
        import importlib.util

        return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"
    return engine


def _default_output(task: str) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"eval-{re.sub(r'[^A-Za-z0-9_.-]+', '_', task)}-{stamp}"


def _load_model(s: EvalSettings, adapters: list[Path]):
    """The base model once; adapters loaded onto it by name (``adapter0``, ``adapter1``, ...)."""
    import torch

    from grpo.models import load_causal_lm, load_tokenizer, resolve_device, resolve_model_path

    if s.threads:
        torch.set_num_threads(s.threads)
    device = resolve_device(s.device)
    path = resolve_model_path(s.model)
    for adapter in adapters:
        _warn_if_other_base(adapter, s.model, path)
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path, s.dtype, device)
    if adapters:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, str(adapters[0]), adapter_name="adapter0")
            for i, adapter in enumerate(adapters[1:], 1):
                model.load_adapter(str(adapter), adapter_name=f"adapter{i}")
        except (ValueError, RuntimeError, KeyError, OSError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserError(f"cannot load an adapter onto {s.model}: {first} "
                            "(was it trained on this base model?)") from exc
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


def _engine_config(s: EvalSettings, engine_kind: str) -> RunConfig:
    """A RunConfig carrying the eval settings, so the engine is built exactly as in training."""
    return RunConfig(seed=s.seed, threads=s.threads,
                     model=ModelConfig(name=s.model, dtype=s.dtype, device=s.device, system_prompt=s.system_prompt),
                     rollout=RolloutConfig(engine=engine_kind,  # type: ignore[arg-type]
                                           max_batch_size=s.max_batch_size, top_p=s.top_p, top_k=s.top_k,
                                           max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                                           vllm=dict(s.vllm)),
                     tools=from_dict(ToolsConfig, dict(s.tools), "tools."))


def _labels(adapter_specs: list[str]) -> list[str]:
    labels, seen = [], {"base"}
    for spec in adapter_specs:
        label = spec.rstrip("/") or spec
        while label in seen:
            label += "'"
        labels.append(label)
        seen.add(label)
    return labels


def _evaluate_rows(s: EvalSettings, engine, model, tokenizer, rows, rewards, labels, adapters):
    from grpo.evaluate import evaluate, summarize
    from grpo.prompts import encode_prompt

    cache: dict[str, list[int]] = {}

    def encode(prompt: Any) -> list[int]:
        key = json.dumps(prompt, sort_keys=True)
        if key not in cache:
            cache[key] = encode_prompt(tokenizer, prompt, s.system_prompt, getattr(engine, "prompt_tools", None))
        return cache[key]

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
    return models, samples


def _run_record(s: EvalSettings, model_path: str, adapters: list[Path], num_problems: int,
                config_file: str | None) -> dict[str, Any]:
    import importlib.metadata

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return {
        "package": "grpo-lora", "version": version("grpo-lora"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": _command_line(s), "config_file": config_file,
        "model": s.model, "model_path": model_path,
        "adapters": [str(a.resolve()) for a in adapters],
        "task": s.task, "split": s.split, "num_problems": num_problems,
        "sampling": {"n": s.n, "k": s.k, "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k,
                     "max_new_tokens": s.max_new_tokens, "seed": s.seed, "greedy": s.greedy},
        "settings": dataclasses.asdict(s),
        "versions": {d: version(d) for d in ("torch", "transformers", "peft")},
        "estimator": "unbiased pass@k (Chen et al. 2021) from n samples per problem; stderr over problems",
    }


def _command_line(s: EvalSettings) -> str:
    """The command that reproduces this evaluation (every setting spelled out)."""
    argv = ["grpo", "eval"]
    for f in fields(EvalSettings):
        value = getattr(s, f.name)
        flag = "--" + f.name.replace("_", "-")
        if f.name in _REPEATED:
            for v in value:
                argv += [flag, v]
        elif f.name in _BOOLEAN:
            argv.append(flag if value else f"--no-{flag[2:]}")
        elif f.name == "k":
            argv += [flag, ",".join(map(str, value))]
        elif f.name in _JSON_FLAGS:
            if value:
                argv += [flag, json.dumps(value)]
        elif value is not None:
            argv += [flag, str(value)]
    return shlex.join(argv)


def _write_outputs(out_dir: Path, record: dict[str, Any], models: list[dict], samples: list[dict],
                   s: EvalSettings) -> None:
    from grpo.evaluate import plot_pass_at_k, results_table

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps({"run": record, "models": models}, indent=2) + "\n")
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
