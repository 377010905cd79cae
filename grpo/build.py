"""Build the run's parts from settings: task rows, policy model + tokenizer, rollout engine."""

from __future__ import annotations

import importlib.util
import inspect
import os
import sys
import types
from typing import Any

from grpo.config import LossConfig, ModelConfig, RolloutConfig, RunConfig, ToolsConfig, vllm_options
from grpo.errors import UserError
from grpo.registry import ENVIRONMENTS, TASKS, TOOLS, VERIFIERS, load_plugin
from grpo.rewards import RewardRunner
from tasks.base import Task


def load_plugins(specs: list[str]) -> None:
    """Import each plugin (a .py file or a module name); the only way a config imports code."""
    for spec in specs:
        load_plugin(spec, TASKS, VERIFIERS, TOOLS, ENVIRONMENTS)


def build_task(name: str, args: dict[str, Any]) -> Task:
    obj = TASKS.get(name)
    _check_argument_types(f"task {name!r}", obj, args, "task.args")
    try:
        task = obj(**args) if (inspect.isclass(obj) or callable(obj)) and not isinstance(obj, Task) else obj
    except TypeError as exc:
        raise UserError(f"task {name!r}: bad arguments in task.args: {exc}") from exc
    if not hasattr(task, "rows"):
        raise UserError(f"task {name!r} did not produce a Task (an object with rows(split)); got {type(task).__name__}")
    return task


_SIMPLE = {int: "an integer", float: "a number", str: "text", bool: "true or false"}


def _check_argument_types(what: str, obj: Any, args: dict[str, Any], where: str) -> None:
    """Arguments whose parameter is annotated a plain int, float, str or bool (or that or None) must be
    one: ``digits=abc`` is a one-line error naming the key, not a comparison failing inside the task."""
    import typing

    try:
        hints = typing.get_type_hints(obj.__init__ if inspect.isclass(obj) else obj)
    except Exception:  # unresolvable annotations, builtins, callables without them: nothing to check
        return
    for key, value in args.items():
        hint = hints.get(key)
        allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        simple = [t for t in allowed if t in _SIMPLE]
        if not simple or len(simple) + (type(None) in allowed) < len(allowed):  # not only simple types: unchecked
            continue
        if value is None and type(None) in allowed:
            continue
        if not any(_fits(value, t) for t in simple):
            kinds = " or ".join(_SIMPLE[t] for t in simple)
            raise UserError(f"{what}: {where}.{key} must be {kinds}, got {value!r}")


def _fits(value: Any, kind: type) -> bool:
    if isinstance(value, bool):  # a bool is an int to isinstance, not to a config
        return kind is bool
    return isinstance(value, (int, float) if kind is float else kind)


def build_task_rows(cfg: RunConfig, rewards: RewardRunner) -> tuple[list[dict], list[dict]]:
    load_plugins(cfg.plugins)
    task = build_task(cfg.task.name, cfg.task.args)
    train, heldout = task.rows("train"), task.rows("heldout")
    if not train:
        raise UserError(f"task {cfg.task.name!r}: the train split is empty (check task.args)")
    rewards.check_rows(train, f"task {cfg.task.name!r} train split")
    if heldout:
        rewards.check_rows(heldout, f"task {cfg.task.name!r} heldout split")
    else:
        print(f"warning: task {cfg.task.name!r} has no held-out split; no evaluation", file=sys.stderr)
    rewards.check_settings_names("task.")
    return train, heldout


def build_policy(cfg: RunConfig):
    """Base model + LoRA adapters (the reference is the same model with adapters disabled)."""
    import torch

    from grpo.attention import apply_attention_dtype
    from grpo.fused_lora import use_fused_lora
    from grpo.models import add_lora, load_causal_lm, load_tokenizer, resolve_device, resolve_model_path
    from grpo.rms_norm import use_rms_norm_function

    device = resolve_device(cfg.model.device)
    path = resolve_model_path(cfg.model.name)
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path, _auto_dtype(path, cfg.model.dtype, device), device)
    apply_attention_dtype(model, cfg.model.attention_dtype, device)  # engine, reference and update alike
    model.config.use_cache = False
    targets: Any = cfg.model.lora_target_modules
    if targets == ["all-linear"]:
        targets = "all-linear"
    # LoRA's initial weights depend on the seed alone, not on what drew random numbers before (a first
    # run converting the embedded GGUF initialises a model of its own, which used to shift them)
    devices = [torch.device(device)] if str(device).startswith("cuda") else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.seed)
        model = add_lora(model, cfg.model.lora_rank, cfg.model.lora_alpha, cfg.model.lora_dropout, targets)
    use_fused_lora(model, cfg.model.lora_kernel)  # engine, reference and update alike
    # with the fused kernel, the RMSNorms' backward written out too (the forward is bit for bit theirs)
    use_rms_norm_function(model, cfg.model.lora_kernel == "fused")
    return model, tokenizer


WEIGHTS_MAX_SHARE = 0.6  # of this rank's MemAvailable, for model.dtype: auto choosing float32 on CPU


def _auto_dtype(path: str, setting: str, device: str) -> str:
    """``model.dtype`` with ``auto`` decided: the measured choice (``grpo.precision``), made on rank 0
    under a launcher and sent to every rank (each rank's own probe could decide otherwise, and the
    ranks' base weights must match), and bf16 where float32 weights would not fit (``_fitting``)."""
    from grpo import dist
    from grpo.models import resolve_dtype

    if setting != "auto":
        return setting

    def decide() -> str:
        return _fitting(path, str(resolve_dtype("auto", device)).removeprefix("torch."), device)

    if not dist.info().enabled:
        return decide()
    return dist.broadcast_object(decide() if dist.info().is_main else None)


def _fitting(path: str, dtype: str, device: str) -> str:
    """float32 chosen on CPU (bf16 not measured faster) but the float32 weights would take more than
    WEIGHTS_MAX_SHARE of the free memory: bf16 instead, with a line saying so (a 7B model at 28 GB on a
    24 GB machine was killed while loading, without a word). Weight bytes from the model directory's
    safetensors files and its config's dtype; anything unknown keeps ``dtype``."""
    import json
    from pathlib import Path

    from grpo.memory import free_bytes

    files = list(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []
    if dtype != "float32" or device != "cpu" or not files:
        return dtype
    try:
        stored = json.loads((Path(path) / "config.json").read_text())
        width = {"float32": 4, "bfloat16": 2, "float16": 2}[str(stored.get("torch_dtype") or stored.get("dtype"))]
        free = free_bytes("cpu", int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    except (OSError, ValueError, KeyError, UserError):
        return dtype
    fp32 = sum(f.stat().st_size for f in files) * 4 // width
    if fp32 <= WEIGHTS_MAX_SHARE * free:
        return dtype
    print(f"model.dtype auto: float32 weights would take {fp32 / 2**30:.1f} GiB of the {free / 2**30:.1f} GiB free; "
          "loading them in bfloat16 (set model.dtype to choose)", file=sys.stderr)
    return "bfloat16"


def engine_kind(engine: str) -> str:
    """The engine ``rollout.engine`` names: ``auto`` is vllm when it is importable, else hf."""
    if engine == "auto":
        return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"
    return engine


def build_engine(model, tokenizer, model_cfg: ModelConfig, rollout: RolloutConfig, *, seed: int,
                 loss: LossConfig | None = None, tools: ToolsConfig | None = None, sharded: bool = False):
    """The rollout engine for ``model`` from the model and rollout settings; ``loss`` when training
    (the vLLM engine checks how its log-probs enter it); wrapped in an ``EpisodeEngine`` when
    ``tools`` are enabled. ``sharded``: the weights will be FSDP2-sharded (no packed copies)."""
    engine = _build_base_engine(model, tokenizer, model_cfg, rollout, seed, loss, sharded)
    if tools is None or not tools.enabled:
        return engine
    from grpo.tools.episodes import build_episode_engine

    try:
        return build_episode_engine(tools, engine, tokenizer)
    except BaseException:
        engine.close()
        raise


def _build_base_engine(model, tokenizer, model_cfg: ModelConfig, rollout: RolloutConfig, seed: int,
                       loss: LossConfig | None, sharded: bool):
    engine = engine_kind(rollout.engine)
    if engine == "hf":
        from grpo.engines.hf import HFEngine

        return HFEngine(model, tokenizer, seed=seed, max_batch_size=rollout.max_batch_size,
                        packed_weights=use_packed_weights(rollout.packed_weights, model, sharded),
                        merged_weights=use_merged_weights(rollout.merged_weights, model, sharded))
    if engine == "vllm":
        if sharded and vllm_options(rollout).mode == "colocate":
            from grpo.dist import print0

            print0("warning: a colocated vLLM loads the whole base model on every rank beside FSDP2's shard of it; "
                   "where the model does not fit one device, use rollout.vllm.mode=server", file=sys.stderr)
        from grpo.engines.vllm import VLLMEngine  # raises a UserError naming the extra when vllm is missing

        return VLLMEngine.from_settings(model_cfg, rollout, seed, model, tokenizer, loss)
    raise UserError(f"unknown rollout.engine {engine!r}")


DECODE_COPY_MAX_SHARE = 0.1  # of MemAvailable, for rollout.packed_weights / merged_weights = auto


def use_packed_weights(setting: bool | str, model, sharded: bool = False) -> bool:
    """``rollout.packed_weights``: whether the HF engine decodes through copies of the LoRA layers'
    base weights in oneDNN's packed layout (``grpo.fused_lora.cached_lora_casts``). ``auto``: for
    float32 weights at 2 or more threads (at one, MKL's sgemm is as fast: docs/benchmarks.md,
    "Session 7"); for bf16 weights where a timing of the largest one at a decode step's rows
    says the packed product is faster (``grpo.prepared_linear.packing_pays``; 1.27x for
    SmolLM2's at one thread of a CPU with AMX, "Session 10"); either only when the copy fits."""
    import torch

    from grpo.fused_lora import packable_layers
    from grpo.prepared_linear import packing_pays

    layers = _decode_copy_layers("packed_weights", setting, model, sharded, packable_layers)
    if setting is True or not layers:
        return bool(layers)
    bf16 = [layer.base_layer.weight for layer in layers if layer.base_layer.weight.dtype == torch.bfloat16]
    if bf16:
        if not packing_pays(max(bf16, key=lambda w: w.numel())):
            return False
    elif torch.get_num_threads() < 2:
        return False
    return _decode_copy_fits(layers)


def use_merged_weights(setting: bool | str, model, sharded: bool = False) -> bool:
    """``rollout.merged_weights``: whether the HF engine decodes through float32 copies of the LoRA
    layers' weights with the adapter merged in (``grpo.fused_lora.merged_linear``)."""
    from grpo.fused_lora import mergeable_layers

    layers = _decode_copy_layers("merged_weights", setting, model, sharded, mergeable_layers)
    return bool(layers) and (setting is True or _decode_copy_fits(layers))


def _decode_copy_layers(key: str, setting: bool | str, model, sharded: bool, eligible) -> list:
    """The layers ``rollout.<key>`` would keep a decode copy of (``eligible(model)``); [] where it
    is off or cannot apply under ``auto``; a UserError where ``true`` cannot apply."""
    if setting is False:
        return []
    if sharded:
        if setting is True:
            raise UserError(f"rollout.{key}=true keeps whole copies of the base weights, which FSDP2 shards; "
                            f"set rollout.{key}=auto or false with distributed.strategy=fsdp2")
        return []
    layers = eligible(model)
    if setting is True and not layers:
        kind = "float32 or bfloat16" if key == "packed_weights" else "float32"
        raise UserError(f"rollout.{key}=true needs LoRA layers with {kind} base weights on CPU and "
                        f"model.lora_kernel=fused; set rollout.{key}=auto or false")
    return layers


def _decode_copy_fits(layers) -> bool:
    """The decode copy of these layers' weights takes at most DECODE_COPY_MAX_SHARE of the
    MemAvailable this rank may count on (torchrun's ranks on this machine share it)."""
    from grpo.fused_lora import decode_copy_bytes
    from grpo.memory import free_bytes

    try:
        ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        return decode_copy_bytes(layers) <= DECODE_COPY_MAX_SHARE * free_bytes("cpu", ranks_here)
    except UserError:  # MemAvailable unknown (not Linux): no extra copy
        return False

