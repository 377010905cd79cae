"""``grpo eval``'s settings: the flags, the ``--config`` file (eval settings or a training
config), their merge (defaults, then the file, then the flags) and validation.

``EvalSettings`` is the one list of settings: the parser's flags and ``command_line`` (the
command that reproduces an evaluation) are both derived from its fields.
"""

from __future__ import annotations

import argparse
import json
import shlex
from dataclasses import dataclass, fields
from typing import Any, Literal

from grpo.config import (ModelConfig, RolloutConfig, RunConfig, ToolsConfig, from_dict, json_object_arg,
                         load_config, opt, read_yaml_mapping, to_dict, validate_tools)
from grpo.errors import UserError
from grpo.evaluate import EVAL_SEED_OFFSET

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
    attention_dtype: Literal["auto", "float32", "model"] = opt(
        _MODEL.attention_dtype, "attention precision, as model.attention_dtype (match training)")
    lora_kernel: Literal["fused", "peft"] = opt(_MODEL.lora_kernel, "LoRA forward, as model.lora_kernel (match training)")
    max_batch_size: int = opt(_ROLLOUT.max_batch_size, "most sequences decoded at once by the hf engine "
                                                                 "(at least one problem's n samples, +1 greedy)")
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
             "dtype": "DTYPE", "attention_dtype": "DTYPE", "lora_kernel": "KIND", "max_batch_size": "N", "workers": "N", "threads": "N"}
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
    try:
        cfg = load_config(path)
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from exc
    return {
        "task": cfg.task.name, "task_args": cfg.task.args, "verifier_args": cfg.task.verifier_args,
        "verifier_weights": cfg.task.verifier_weights, "plugins": cfg.plugins,
        "model": cfg.model.name, "system_prompt": cfg.model.system_prompt, "device": cfg.model.device,
        "dtype": cfg.model.dtype, "attention_dtype": cfg.model.attention_dtype, "lora_kernel": cfg.model.lora_kernel,
        "engine": cfg.rollout.engine, "vllm": cfg.rollout.vllm,
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
    if s.workers < 1 or s.seed < 0 or s.threads < 0:  # as training's verifier_workers, seed and threads
        raise UserError(f"--workers must be >= 1, --seed and --threads >= 0; got {s.workers}, {s.seed}, {s.threads}")
    validate_tools(from_dict(ToolsConfig, dict(s.tools), "tools."))
    if not s.base and not s.adapter:
        raise UserError("--no-base leaves nothing to evaluate: give at least one --adapter")


def command_line(s: EvalSettings) -> str:
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


