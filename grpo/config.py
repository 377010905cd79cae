"""Typed run configuration: dataclasses with a help string per field, YAML files, dotted overrides.

``load_config("configs/arith.yaml", ["loss.beta=0.1"])`` returns a validated
``RunConfig``. Unknown keys are rejected with the closest valid key suggested; wrong
types name the key, the expected type and the value. ``grpo train --help-config``
prints every field with its help.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import yaml

from grpo.errors import UserError
from grpo.presets import expand_preset
from grpo.registry import closest


def opt(default: Any, help: str, **check: Any) -> Any:
    """A dataclass field with a help string (mutable defaults are copied per instance).

    ``check`` declares the valid values, enforced by ``from_dict`` for every key read
    from a file or override: ``ge``/``gt``/``le``/``lt`` bounds (for a list: each
    element), ``pattern`` (a regular expression a string must match in full, with
    ``expect`` describing it). Every number must also be finite (no nan/inf).
    """
    unknown = set(check) - {"ge", "gt", "le", "lt", "pattern", "expect"}
    if unknown:
        raise TypeError(f"opt(): unknown checks {sorted(unknown)}")
    metadata = {"help": help, "check": check} if check else {"help": help}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=metadata)
    return field(default=default, metadata=metadata)


_BOUNDS = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b),
           "le": ("<=", lambda v, b: v <= b), "lt": ("<", lambda v, b: v < b)}


def _check_text(check: dict[str, Any]) -> str:
    """``check`` in words for ``describe``: '>= 0 and < 1', 'auto, cpu, ...'."""
    bounds = [f"{sign} {check[name]}" for name, (sign, _) in _BOUNDS.items() if name in check]
    return " and ".join(bounds) or check.get("expect", check.get("pattern", ""))


def check_value(value: Any, check: dict[str, Any], key: str) -> None:
    """Enforce a field's declared ``check`` (see ``opt``) and finiteness; one-line UserError."""
    import math
    import re

    if isinstance(value, list):
        for i, v in enumerate(value):
            check_value(v, check, f"{key}[{i}]")
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"config key {key} must be a finite number, got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not all(ok(value, check[name]) for name, (_, ok) in _BOUNDS.items() if name in check):
            raise UserError(f"config key {key} must be {_check_text(check)}, got {value!r}")
    if isinstance(value, str) and "pattern" in check and not re.fullmatch(check["pattern"], value):
        raise UserError(f"config key {key}: expected {check.get('expect', check['pattern'])}, got {value!r}")


DEVICE_PATTERN, DEVICE_EXPECT = r"auto|cpu|mps|cuda(:[0-9]+)?", "a device: auto, cpu, mps, cuda or cuda:N"


@dataclass
class ModelConfig:
    name: str = opt("smollm2-135m", "model spec: embedded name (smollm2-135m), a .gguf file, a local HF directory or a hub id")
    dtype: str = opt("auto", "dtype of the frozen base weights: auto (bf16 on CUDA when supported natively; on "
                             "CPU bf16 where a cached matmul probe measures it faster, or where float32 weights "
                             "would take over 60 % of the free memory; grpo/precision.py, GRPO_CPU_AUTO_DTYPE "
                             "pins it, GRPO_LORA_CACHE moves the cache), float32, bfloat16, float16; LoRA "
                             "weights and log-probs stay float32")
    attention_dtype: Literal["auto", "float32", "model"] = opt(
        "auto", "precision of attention (q, k, v, softmax) under a bf16/fp16 base, the same in rollout, reference "
                "and update: float32 (upcast for SDPA, output cast back), model (the weights' dtype), auto (float32 on "
                "CPU, where torch's bf16 SDPA is slow; model on CUDA, where bf16 flash/SDPA kernels are fast); "
                "under float32 weights on CPU auto and float32 still install grpo's SDPA function, for its "
                "grouped-query path (no per-head key/value copies); "
                "flash/flex attention implementations are left as they are (grpo/attention.py)")
    device: str = opt("auto", "auto, cpu, cuda, cuda:N", pattern=DEVICE_PATTERN, expect=DEVICE_EXPECT)
    lora_kernel: Literal["fused", "peft"] = opt(
        "fused", "how LoRA layers compute: fused (base(x) + (x A^T)(s B)^T in one addmm, in the base's compute dtype "
                 "from float32 master weights, as autocast would) or peft (peft's own forward, LoRA in float32); "
                 "disabled, merged, multi-adapter and DoRA layers always use peft's (grpo/fused_lora.py); fused "
                 "also runs the Llama-family RMSNorms' backward written out (grpo/rms_norm.py: same forward, "
                 "their input kept in the base dtype instead of float32)")
    lora_rank: int = opt(16, "LoRA rank r", ge=1)
    lora_alpha: float = opt(32.0, "LoRA alpha (scale = alpha / r)", gt=0)
    lora_dropout: float = opt(0.0, "LoRA dropout (0 keeps rollout and training log-probs identical)",
                               ge=0, lt=1)
    lora_target_modules: list[str] = opt(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                         "module names that get LoRA adapters (or ['all-linear'])")
    system_prompt: str | None = opt(None, "system message prepended to chat prompts (None: the template's default)")


@dataclass
class TaskConfig:
    name: str = opt("arith", "registered task name (`grpo list tasks`) or module:attr")
    args: dict[str, Any] = opt({}, "keyword arguments for the task (see its docstring)")
    verifier_args: dict[str, dict[str, Any]] = opt({}, "per-verifier constructor arguments, e.g. {math: {rel_tol: 1e-6}}")
    verifier_weights: dict[str, float] = opt({}, "override the rows' verifier weights, e.g. {format: 0.1}")


@dataclass
class VLLMOptions:
    """The keys of ``rollout.vllm`` (kept a mapping in RolloutConfig; checked against these fields)."""

    mode: Literal["colocate", "server"] = opt(
        "colocate", "colocate: vLLM inside the trainer's process, on its device; server: a separately started "
                    "`vllm serve` (other GPUs or machines; launch command in docs/vllm.md)")
    gpu_memory_utilization: float = opt(
        0.3, "colocate: share of the device's memory vLLM may take (its base weights + KV cache), the rest is "
             "the trainer's; on CPU a share of RAM (unless kv_cache_gb is set)", gt=0, le=1)
    kv_cache_gb: float = opt(0.0, "colocate: KV cache size in GiB instead of the memory share (0 = use the share)",
                              ge=0)
    sleep: bool = opt(False, "colocate, CUDA only: vLLM sleeps (level 1: base weights offloaded to CPU RAM, KV cache "
                             "freed) from the end of each generation until the next, so training gets the memory")
    max_model_len: int = opt(0, "colocate: longest prompt + completion vLLM reserves for (0 = the model's limit)", ge=0)
    enforce_eager: bool = opt(False, "colocate: no CUDA graphs / torch.compile (starts faster, decodes slower)")
    engine_args: dict[str, Any] = opt({}, "colocate: further vllm.LLM keyword arguments, passed through as given")
    server_url: str = opt("http://127.0.0.1:8000", "server: base URL of the vLLM OpenAI-compatible server")
    adapter_dir: str = opt("", "directory each update's adapter is written to for vLLM to load (server mode: a path "
                               "the server can read, e.g. a shared filesystem); empty = a temporary directory")
    request_timeout_s: float = opt(600.0, "server: seconds to wait for one HTTP request", gt=0)
    max_concurrent_requests: int = opt(64, "server: requests in flight at once (one per prompt, n = G each)",
                                      ge=1)


def vllm_options(rollout: "RolloutConfig") -> VLLMOptions:
    """``rollout.vllm`` as a validated VLLMOptions (unknown keys and bad values raise UserError)."""
    opts = from_dict(VLLMOptions, dict(rollout.vllm), "rollout.vllm.")
    checks = [
        (opts.mode == "colocate" or not opts.sleep, "rollout.vllm.sleep applies to mode colocate only"),
        (opts.server_url.startswith(("http://", "https://")),
         f"rollout.vllm.server_url must start with http:// or https://, got {opts.server_url!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(f"config: {message}")
    return opts


@dataclass
class RolloutConfig:
    engine: Literal["hf", "vllm", "auto"] = opt("hf", "rollout engine: hf (transformers), vllm, or auto (vllm when importable)")
    prompts_per_step: int = opt(8, "prompts P sampled per step", ge=1)
    num_generations: int = opt(8, "completions G per prompt (the group)", ge=2)
    max_new_tokens: int = opt(64, "completion length limit", ge=1)
    temperature: float = opt(1.0, "sampling temperature (also used for training log-probs)", gt=0)
    top_p: float = opt(1.0, "nucleus sampling threshold", gt=0, le=1)
    top_k: int = opt(0, "top-k sampling (0 = off)", ge=0)
    ignore_eos: bool = opt(False, "always generate max_new_tokens tokens (fixed-length benchmarks)")
    max_batch_size: int = opt(256, "most sequences decoded at once by the hf engine (at least one prompt's whole "
                                   "group: G, +1 with a greedy row)", ge=1)
    packed_weights: bool | Literal["auto"] = opt(
        "auto", "hf engine on CPU: decode through a copy of the LoRA layers' base weights (float32 or bf16) kept in "
                "oneDNN's packed layout (faster small-batch products, same tokens to float rounding; one more copy of "
                "those weights in memory): true, false, or auto: on when the copy takes at most a tenth of MemAvailable "
                "(shared by this machine's ranks) and, for float32, with 2 or more threads (SmolLM2, AVX2 CPU, 2 threads: "
                "generation 1.13-1.16x faster for a 405 MB copy; 1 thread: 0.94x, MKL is as fast there), for bf16 where "
                "a timing of the largest weight says it pays (AMX CPU, 1 thread: 1.05x for a 212 MB copy; "
                "docs/benchmarks.md); model.lora_kernel=fused only, never under FSDP2")
    merged_weights: bool | Literal["auto"] = opt(
        "auto", "hf engine on CPU: decode through a float32 copy of each LoRA layer's weight with its adapter merged "
                "in (W + s B A: one product per layer and token instead of four ops), made again when the adapter "
                "changes (once per step; 0.3-0.5 s for SmolLM2), in oneDNN's packed layout when packed_weights is on "
                "(then it replaces that copy); same tokens to float rounding: true, false, or auto: on when the copy "
                "takes at most a tenth of MemAvailable (shared by this machine's ranks; SmolLM2, AVX2 CPU: "
                "generation 1.06x faster than plain at 1 thread, 1.1-1.3x at 2, docs/benchmarks.md); float32 CPU "
                "weights, plain LoRA and model.lora_kernel=fused only, never under FSDP2")
    dynamic_sampling: bool = opt(
        False, "DAPO dynamic sampling with backfill: roll out further rounds of prompts_per_step prompts until "
               "the batch holds prompts_per_step groups whose rewards differ (up to max_sampling_rounds)")
    max_sampling_rounds: int = opt(4, "dynamic_sampling: most rounds of prompts_per_step prompts per step; "
                                      "the step trains on what it has when they run out", ge=1)
    vllm: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "vllm engine options, the rollout.vllm.* keys below (docs/vllm.md)", "keys": VLLMOptions})


@dataclass
class LossConfig:
    preset: Literal["none", "dr_grpo", "dapo", "gspo", "rloo"] = opt(
        "none", "named algorithm setting the keys it needs (docs/algorithms.md): dr_grpo, dapo, gspo, rloo; "
                "setting one of its keys to another value is an error")
    advantage_scale: Literal["group", "batch", "none", "rloo", "reinforce_pp", "reinforce_pp_baseline"] = opt(
        "group", "advantage estimator: group (GRPO), batch (group mean, batch std), none (Dr. GRPO), "
                 "rloo (leave-one-out), reinforce_pp (REINFORCE++ batch normalisation), "
                 "reinforce_pp_baseline (group mean, then batch normalisation)")
    ratio_level: Literal["token", "sequence", "sequence_token"] = opt(
        "token", "importance ratio: token (PPO/GRPO), sequence (GSPO: length-normalised sequence ratio), "
                 "sequence_token (GSPO-token)")
    advantage_eps: float = opt(1e-4, "added to the std before dividing", gt=0)
    drop_zero_variance: bool = opt(False, "drop groups whose rewards are all equal from the update (DAPO dynamic sampling)")
    epsilon_low: float = opt(0.2, "PPO clip: ratio lower bound 1 - epsilon_low", gt=0, lt=1)
    epsilon_high: float = opt(0.2, "PPO clip: ratio upper bound 1 + epsilon_high (DAPO clip-higher: 0.28)",
                               gt=0, lt=1)
    beta: float = opt(0.04, "KL(k3) penalty coefficient to the reference (adapters off); 0 skips the reference pass",
                      ge=0)
    update_passes: int = opt(1, "mu: optimisation passes over each batch (one optimizer step each)", ge=1)
    aggregation: Literal["seq_mean", "token_mean", "constant"] = opt(
        "seq_mean", "loss aggregation: seq_mean (GRPO), token_mean (DAPO), constant (Dr. GRPO)")
    mask_truncated: bool = opt(False, "exclude completions cut at max_new_tokens from the loss (DAPO overlong filtering)")
    overlong_buffer: int = opt(0, "DAPO soft overlong punishment: the last N tokens before max_new_tokens ramp a "
                                  "penalty from 0 to -overlong_penalty, added to the reward (0 = off)", ge=0)
    overlong_penalty: float = opt(1.0, "the soft overlong punishment at max_new_tokens (subtracted from the reward)",
                                  ge=0)
    old_logprobs: Literal["auto", "rollout", "recompute"] = opt(
        "auto", "ratio denominator: rollout (engine log-probs), recompute (a trainer pass), auto (ratio 1 "
        "with one pass: the current policy detached; recompute when update_passes > 1)")
    tis_cap: float = opt(0.0, "truncated importance sampling: weight each token by min(pi_trainer / pi_engine, "
                              "tis_cap) to correct engine/trainer mismatch (vLLM); 0 = off, typical 2.0", ge=0)


@dataclass
class OptimConfig:
    lr: float = opt(1e-4, "AdamW learning rate for the adapter", gt=0)
    weight_decay: float = opt(0.0, "AdamW weight decay", ge=0)
    betas: list[float] = opt([0.9, 0.99], "AdamW betas", ge=0, lt=1)
    warmup_steps: int = opt(0, "linear warmup optimizer steps", ge=0)
    schedule: Literal["constant", "linear", "cosine"] = opt("constant", "learning-rate schedule after warmup")
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0 = off)", ge=0)
    micro_batch_size: int = opt(16, "sequences per forward/backward (gradient accumulation over the batch); "
                                    "ignored when optim.memory_budget_gb is set", ge=1)
    memory_budget_gb: float | Literal["auto"] | None = opt(
        None, "size micro-batches to a memory budget instead of optim.micro_batch_size: GiB for the update's "
              "activations (estimated per micro-batch from the model's shape and its tokens, grpo/memory.py), or "
              "auto: 0.8 x free memory after the model is loaded (CUDA: the device's; CPU: MemAvailable shared by "
              "this machine's ranks); null = fixed optim.micro_batch_size", gt=0)
    logprob_chunk_tokens: int = opt(512, "tokens per LM-head chunk when computing log-probs (memory bound)",
                                    gt=0)
    packing: bool | Literal["auto"] = opt(
        "auto", "padding-free update passes: each group's prompt and completions packed into one row with a block "
                "attention mask (same log-probs): true, false, or auto: on CPU, each micro-batch packed when padding "
                "its completions to the longest would run >= 1.25x their real positions (SmolLM2, AVX2 CPU: 1.22-1.48x "
                "faster at lengths 4-31, 0.92-0.95x at equal lengths), unless a group's completions can exceed 1024 "
                "positions (rollout.num_generations x rollout.max_new_tokens), the run uses tools or the model "
                "sliding-window attention; never on CUDA, where the block mask rules out flash attention "
                "(docs/algorithms.md)")
    activation_checkpointing: bool | Literal["auto"] = opt(
        "auto", "recompute each decoder layer in backward instead of keeping its activations (less peak memory, "
                "more update time; works with the shared-prompt cache and packing): true, false, or auto: "
                "a micro-batch is checkpointed when its update without it is estimated (grpo/memory.py) above a "
                "quarter of the free memory read at setup (CUDA: the device's; CPU: MemAvailable shared by this "
                "machine's ranks), and every micro-batch is where free memory or the model's shape cannot be "
                "read (OPT, GPT-2, Falcon configs; there a memory budget is an error) or with "
                "optim.memory_budget_gb; without a budget a warning says when a micro-batch needs more than the "
                "free memory even checkpointed (SmolLM2 on CPU: peak -39..51 %, step time +7..9 %, "
                "docs/benchmarks.md)")


@dataclass
class EvalConfig:
    every_n_steps: int = opt(0, "held-out evaluation every N steps (0: only before and after training)",
                             ge=0)
    at_start: bool = opt(True, "evaluate before the first step")
    at_end: bool = opt(True, "evaluate after the last step")
    num_problems: int = opt(64, "held-out problems evaluated (0 = all)", ge=0)
    num_samples: int = opt(4, "samples per problem at the training temperature (pass@k uses k <= this)",
                            ge=1)
    greedy: bool = opt(True, "also report greedy accuracy")
    k: list[int] = opt([1], "k values for pass@k", ge=1)


@dataclass
class ToolsConfig:
    """Multi-turn episodes with tools (docs/tools.md); off while ``enabled`` is empty."""

    enabled: list[str] = opt([], "tools the model may call (`grpo list tools`, or module:attr); empty = "
                                 "single-turn rollouts")
    environment: str = opt("tools", "environment that answers model turns (`grpo list environments`)")
    call_format: Literal["tagged", "json", "chat"] = opt(
        "tagged", "tagged: <TAG>ARG</TAG> (e.g. <calc>2*3</calc>); json: <tool_call>{\"name\": ..., "
                  "\"arguments\": {...}}</tool_call> (Hermes / Qwen); chat: the tokenizer's chat template renders "
                  "the tools into the prompt and the result as its tool message (json calls)")
    observation_template: str = opt("<output>{result}</output>", "text appended after a call (tagged, json); "
                                                                  "{result} is the tool's output or its error")
    max_turns: int = opt(4, "most model turns per episode (a call in the last turn is not run: cut)", ge=1)
    max_episode_tokens: int = opt(256, "token budget after the prompt: model turns + observations "
                                       "(rollout.max_new_tokens caps each model turn)", ge=1)
    timeout_s: float = opt(5.0, "wall-clock limit per tool call (a hang becomes an error observation)", gt=0)
    max_observation_chars: int = opt(400, "tool output is truncated to this many characters", ge=1)
    error_penalty: float = opt(0.0, "reward subtracted per failed tool call in an episode", ge=0)
    workers: int = opt(2, "tool calls run at once", ge=1)


def validate_tools(tools: ToolsConfig) -> None:
    checks = [
        (tools.max_turns >= 1, "tools.max_turns must be >= 1"),
        (tools.max_episode_tokens >= 1, "tools.max_episode_tokens must be >= 1"),
        (tools.timeout_s > 0, "tools.timeout_s must be > 0"),
        (tools.max_observation_chars >= 1, "tools.max_observation_chars must be >= 1"),
        (tools.error_penalty >= 0, "tools.error_penalty must be >= 0 (it is subtracted)"),
        (tools.workers >= 1, "tools.workers must be >= 1"),
        ("{result}" in tools.observation_template, "tools.observation_template must contain {result}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(f"config: {message}")


@dataclass
class DistributedConfig:
    strategy: Literal["ddp", "fsdp2"] = opt(
        "ddp", "under torchrun: ddp (adapters' gradients all-reduced, base replicated on every rank) or fsdp2 "
               "(torch fully_shard: base weights sharded across ranks too, for models that do not fit one device)")
    timeout_s: float = opt(1800.0, "seconds any collective may wait for the other ranks before the job fails "
                                   "(must exceed the longest generation + scoring of a step)", gt=0)


@dataclass
class RunConfig:
    name: str = opt("run", "run name (used in the default output directory)")
    output_dir: str = opt("runs/{name}", "run directory ({name} is replaced)", pattern=r"[^{}]*(\{name\}[^{}]*)*",
                          expect="a path whose only {...} field is {name}")
    seed: int = opt(0, "seed for data order, sampling and LoRA init", ge=0, le=2**32 - 1)
    steps: int = opt(50, "training steps (one rollout batch and update each)", ge=0)
    checkpoint_every: int = opt(10, "save a resumable checkpoint every N steps (0 = only at the end)", ge=0)
    keep_checkpoints: int = opt(2, "checkpoints kept on disk (oldest deleted)", ge=1)
    threads: int = opt(0, "torch CPU threads (0 = torch default)", ge=0)
    verifier_workers: int = opt(2, "worker processes for isolated verifiers", ge=1)
    plugins: list[str] = opt([], "python files (path/x.py) or module names to import before building the task; "
                                 "the only code a config imports (module:attr names resolve only in these)")
    report_to: list[Literal["tensorboard", "wandb", "trackio", "mlflow"]] = opt(
        ["tensorboard"], "experiment trackers that get the metrics and the config (docs/trackers.md); [] = "
                         "metrics.jsonl only; wandb/trackio/mlflow are extras: pip install 'grpo-lora[wandb]'")
    tracker_project: str = opt("grpo-lora", "project (wandb, trackio) or experiment (mlflow) the run is logged under")
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "policy model and LoRA"})
    task: TaskConfig = field(default_factory=TaskConfig, metadata={"help": "task and its verifiers"})
    rollout: RolloutConfig = field(default_factory=RolloutConfig, metadata={"help": "sampling"})
    loss: LossConfig = field(default_factory=LossConfig, metadata={"help": "GRPO objective"})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"help": "optimizer"})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "held-out evaluation"})
    tools: ToolsConfig = field(default_factory=ToolsConfig, metadata={"help": "multi-turn tool episodes"})
    distributed: DistributedConfig = field(default_factory=DistributedConfig,
                                           metadata={"help": "data-parallel training under torchrun (docs/distributed.md)"})

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir.format(name=self.name))


# ---------------------------------------------------------------------------- building
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    return {float: "number", int: "integer", str: "string", bool: "true/false"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints accepted as floats)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = UserError(f"config key {key}: expected {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if origin is Literal:
        if value not in args:
            raise UserError(f"config key {key}: expected {_type_name(tp)}, got {value!r}.{closest(str(value), [str(a) for a in args])}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except UserError:
                pass
        raise bad
    if origin is list:
        if not isinstance(value, list):
            raise bad
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return {k: _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()} if args else value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise bad
        return value
    raise TypeError(f"unsupported config annotation {tp} at {key}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, validating every key and type."""
    if not isinstance(data, dict):
        raise UserError(f"config section {prefix.rstrip('.') or '(top level)'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            raise UserError(f"unknown config key {full!r}.{closest(str(key), list(fields))} "
                            f"Valid keys{' in ' + prefix.rstrip('.') if prefix else ''}: {', '.join(fields)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value if value is not None else {}, f"{full}.")
        else:
            kwargs[key] = _coerce(value, tp, full)
            check_value(kwargs[key], fields[key].metadata.get("check", {}), full)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to a nested dict in place."""
    if "=" not in override:
        raise UserError(f"override {override!r}: expected key=value, e.g. loss.beta=0.0")
    key, _, raw = override.partition("=")
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise UserError(f"override {override!r}: value is not valid YAML ({exc.__class__.__name__})") from exc
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"override {override!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def json_object_arg(text: str, flag: str) -> dict[str, Any]:
    """A command-line flag's JSON object (``--task-args '{"digits": 2}'``); one-line UserError otherwise."""
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{flag} is not valid JSON ({exc.msg}): {text!r}") from exc
    if not isinstance(value, dict):
        raise UserError(f"{flag} must be a JSON object, e.g. '{{\"digits\": 2}}'; got {text!r}")
    return value


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key written twice in one mapping: YAML keeps the last,
    so a pasted second ``loss:`` block silently dropped the first one's settings."""

    def construct_mapping(self, node, deep=False):
        first_nodes: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *defaults" may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                first = first_nodes.setdefault(key, key_node)
            except TypeError:  # an unhashable key: SafeLoader says so itself
                continue
            if first is not key_node:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (lines {first.start_mark.line + 1} and "
                    f"{key_node.start_mark.line + 1}); keep one", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def read_yaml_mapping(path: str | Path, what: str = "config", expected: str = "config keys") -> dict[str, Any]:
    """The top-level mapping of a YAML file; a one-line UserError (with the line) otherwise."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
        if not text.strip():  # a file that says nothing (not even a comment): the wrong file, most likely
            raise UserError(f"{path} is empty; for every default, put a comment in it (# defaults)")
        data = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (at byte {exc.start}); convert the file to UTF-8") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}:{where} invalid YAML: {getattr(exc, 'problem', exc)}") from exc
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of {expected} at the top level")
    return data


def load_config(path: str | Path | None, overrides: Sequence[str] = (), cls: type = RunConfig,
                prepare: Callable[[dict[str, Any]], None] | None = expand_preset,
                check: Callable[[Any], None] | None = None) -> Any:
    """The one config loader: read a YAML file (or start from the defaults when ``path`` is None),
    apply dotted overrides, ``prepare`` the raw mapping, build dataclass ``cls``, ``check`` it.

    The defaults load ``grpo train``'s RunConfig (presets expanded, ``validate``); ``grpo rm train``
    passes its RMConfig with ``prepare=None`` and its own ``check``.
    """
    data: dict[str, Any] = read_yaml_mapping(path) if path is not None else {}
    for override in overrides:
        apply_override(data, override)
    if prepare is not None:
        prepare(data)
    cfg = from_dict(cls, data)
    (check or validate)(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Cross-field checks; single-key ranges are declared on the fields (``opt(..., ge=0)``)."""
    checks = [
        (cfg.rollout.num_generations >= 2, "rollout.num_generations must be >= 2 (group-relative advantages need a group)"),
        (cfg.rollout.temperature > 0, "rollout.temperature must be > 0 for training (greedy gives no exploration)"),
        (cfg.loss.tis_cap == 0 or cfg.loss.tis_cap >= 1, "loss.tis_cap must be 0 (off) or >= 1"),
        (not (cfg.loss.tis_cap and cfg.loss.old_logprobs == "rollout"),
         "loss.tis_cap with loss.old_logprobs=rollout would correct the engine/trainer difference twice "
         "(the ratio pi/pi_engine already does): use old_logprobs auto/recompute with tis_cap, or rollout alone"),
        (not (cfg.model.lora_dropout > 0 and cfg.loss.old_logprobs == "rollout"),
         "model.lora_dropout > 0 with loss.old_logprobs=rollout: the rollout samples without dropout, the update "
         "with it, so the ratio starts away from 1; use old_logprobs auto/recompute (same dropout masks) or "
         "lora_dropout 0"),
        (not (cfg.model.lora_dropout > 0 and cfg.loss.tis_cap),
         "loss.tis_cap with model.lora_dropout > 0: the weight min(pi_trainer / pi_engine, cap) would measure the "
         "dropout masks (the engine samples without dropout), not the engines' difference; use lora_dropout 0 "
         "with tis_cap"),
        (not (cfg.loss.advantage_scale == "reinforce_pp"
              and (cfg.loss.drop_zero_variance or cfg.rollout.dynamic_sampling)),
         "loss.advantage_scale=reinforce_pp normalises over the batch, so a group whose rewards are all equal still "
         "has advantages; loss.drop_zero_variance and rollout.dynamic_sampling would drop that signal: use them "
         "with group, rloo or reinforce_pp_baseline"),
        (cfg.loss.overlong_buffer <= cfg.rollout.max_new_tokens,
         "loss.overlong_buffer must be between 0 and rollout.max_new_tokens"),
        (len(cfg.optim.betas) == 2, "optim.betas must have two values"),
        (all(1 <= k <= cfg.eval.num_samples for k in cfg.eval.k),
         f"eval.k values must be between 1 and eval.num_samples ({cfg.eval.num_samples})"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(f"config: {message}")
    if cfg.rollout.engine == "vllm" and (conflict := truncated_logprobs_conflict(cfg.rollout, cfg.loss)):
        raise UserError(f"config: {conflict}")
    vllm_options(cfg.rollout)
    validate_tools(cfg.tools)
    if cfg.tools.enabled and cfg.optim.packing is True:
        raise UserError("config: optim.packing does not support tool episodes (their observation tokens need the "
                        "loss mask of the unpacked path); set optim.packing=false with tools.enabled")


def truncated_logprobs_conflict(rollout: RolloutConfig, loss: LossConfig) -> str | None:
    """Why vLLM's log-probs cannot enter this loss, or None.

    The log-prob of a sampled token is defined, for every engine and the trainer, under
    the full ``softmax(logits / T)`` (before top-k/top-p). vLLM can only return the log-prob
    after temperature *and* truncation (``processed_logprobs``) or before temperature
    (``raw_logprobs``); without truncation the first is exactly the definition. With
    ``top_p < 1`` or ``top_k > 0`` its numbers are ``log(p / Z)`` (Z the kept mass), so a loss
    that uses them (``old_logprobs: rollout``, ``tis_cap``) would be biased by ``log Z``.
    """
    r = rollout
    if r.top_p >= 1.0 and r.top_k == 0:
        return None
    if loss.old_logprobs == "rollout" or loss.tis_cap:
        use = "loss.old_logprobs=rollout" if loss.old_logprobs == "rollout" else "loss.tis_cap"
        return (f"{use} with rollout.top_p < 1 or rollout.top_k > 0 under vLLM: vLLM's log-probs are then those "
                "of the truncated distribution, not the full softmax(logits / T) the trainer uses; "
                "use old_logprobs auto/recompute without tis_cap, or no truncation (docs/algorithms.md)")
    return None


def describe(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """One line per config key: ``key (type, default): help``."""
    lines = []
    hints = typing.get_type_hints(cls)
    instance = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(f"{prefix}{f.name}: {f.metadata.get('help', '')}")
            lines.extend(describe(tp, f"{prefix}{f.name}."))
        else:
            valid = _check_text(f.metadata.get("check", {}))
            lines.append(f"  {prefix}{f.name} ({_type_name(tp)}, default {getattr(instance, f.name)!r}"
                         f"{', ' + valid if valid else ''}): {f.metadata.get('help', '')}")
            if "keys" in f.metadata:  # a mapping whose keys are described by a dataclass
                lines.extend(describe(f.metadata["keys"], f"{prefix}{f.name}."))
    return lines
