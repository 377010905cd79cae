"""Which precision the frozen base weights use: measured, not assumed.

bf16 pays on some CPUs and loses on others (issue 14: on a CPU with AMX one-thread bf16
matmuls ran 5.7x faster than fp32; on one with AVX512-BF16 but no AMX they ran slower). So
``model.dtype: auto`` on CPU runs a short matmul probe (about a second), keeps bf16 only
when it beats fp32 by ``BF16_MIN_SPEEDUP``, and caches the verdict per machine (CPU model,
flags, torch version, thread count) under ``~/.cache/grpo-lora/precision.json``. On CUDA
``auto`` means bf16 where the device supports it. An explicit dtype is never probed;
``GRPO_CPU_AUTO_DTYPE=float32`` (or ``bfloat16``) pins what CPU ``auto`` means without a
probe (the test suite pins float32 so its tolerances do not depend on the machine).

Only the frozen base takes this dtype: peft keeps LoRA weights (and so the optimizer
state) in fp32, and ``grpo.logprobs`` upcasts hidden states and the head to fp32 for the
log-softmax; the engine samples from the same module, so rollout and update log-probs
come from the same precision.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Callable

import torch

from grpo.errors import UserError

CPU_AUTO_ENV = "GRPO_CPU_AUTO_DTYPE"  # probe (default) | float32 | bfloat16: pins what CPU `auto` means
BF16_MIN_SPEEDUP = 1.2  # bf16 must beat fp32 by this much to be worth its rounding
PROBE_SHAPE = (512, 576, 1536)  # (M, K, N): a batch of tokens through a SmolLM2-sized MLP


def matmul_gflops(dtype: torch.dtype, threads: int | None = None, shape: tuple[int, int, int] = PROBE_SHAPE,
                  seconds: float = 0.3, device: str = "cpu") -> float:
    """Sustained matmul rate (GFLOP/s) of ``(M, K) @ (K, N)`` in ``dtype``, best of three
    windows of about ``seconds`` each (after a warm-up), at ``threads`` torch threads."""
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        m, k, n = shape
        gen = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(m, k, generator=gen, device=device).to(dtype)
        b = torch.randn(k, n, generator=gen, device=device).to(dtype)
        a @ b  # warm-up (first call allocates, picks kernels)
        best = 0.0
        for _ in range(3):
            reps, t0 = 0, time.perf_counter()
            while True:
                a @ b
                reps += 1
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                if dt >= seconds:
                    break
            best = max(best, 2 * m * k * n * reps / dt / 1e9)
        return best
    finally:
        torch.set_num_threads(old)


# /proc/cpuinfo lines that tell CPUs apart: x86 (model name, flags), ARM (implementer, part, Features)
_CPU_LINES = ("model name", "flags", "Features", "CPU implementer", "CPU part", "CPU variant")


def machine_key(threads: int) -> str:
    """Identifies what the probe measured: CPU model and flags (ARM: implementer, part and
    features), torch version, threads."""
    cpu, seen = platform.machine(), {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            name = name.strip()
            if name in _CPU_LINES and name not in seen:  # the first processor's
                seen[name] = value.strip()
    except OSError:
        pass
    cpu = seen.pop("model name", cpu)
    digest = hashlib.sha256("|".join(f"{k}={v}" for k, v in sorted(seen.items())).encode()).hexdigest()[:10]
    return f"{cpu}|flags={digest}|torch={torch.__version__}|threads={threads}"


def cache_path() -> Path | None:
    """Where the probe's results are kept; None where there is no home directory to keep them in."""
    root = os.environ.get("GRPO_LORA_CACHE")
    if root is None:
        try:
            root = str(Path.home() / ".cache" / "grpo-lora")
        except RuntimeError:  # no HOME and no passwd entry (some containers): probe each time
            return None
    return Path(root).expanduser() / "precision.json"


def probe_bf16_speedup(threads: int) -> dict[str, float]:
    """Measure fp32 and bf16 matmul rates at ``threads``; return both and their ratio."""
    fp32 = matmul_gflops(torch.float32, threads)
    bf16 = matmul_gflops(torch.bfloat16, threads)
    return {"fp32_gflops": fp32, "bf16_gflops": bf16, "bf16_speedup": bf16 / fp32}


def cached_probe(threads: int, probe: Callable[[int], dict[str, float]] = probe_bf16_speedup,
                 path: Path | None = None) -> dict[str, float]:
    """The probe's result for this machine and thread count, measured once and cached."""
    path = path or cache_path()
    if path is None:
        return probe(threads)
    key = machine_key(threads)
    try:
        cache = json.loads(path.read_text())
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    hit = cache.get(key)
    speedup = hit.get("bf16_speedup") if isinstance(hit, dict) else None
    if isinstance(speedup, (int, float)) and not isinstance(speedup, bool) and math.isfinite(speedup):
        return hit
    result = probe(threads)
    cache[key] = result
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        tmp.replace(path)
    except OSError:
        pass  # an unwritable cache only costs a re-probe next time
    return result


def auto_dtype(device: str, threads: int | None = None,
               probe: Callable[[int], dict[str, float]] = probe_bf16_speedup,
               path: Path | None = None) -> torch.dtype:
    """``model.dtype: auto``: bf16 on CUDA when supported; on CPU bf16 only where the cached
    probe measured it at least ``BF16_MIN_SPEEDUP`` times faster than fp32, else fp32."""
    if device.startswith("cuda"):
        # without emulation: compute capability 7.x (T4, V100) reports emulated bf16, which vLLM refuses
        # and the HF engine runs slowly
        native = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if native else torch.float32
    if device != "cpu":
        return torch.float32
    forced = os.environ.get(CPU_AUTO_ENV, "probe")
    if forced in ("float32", "bfloat16"):
        return getattr(torch, forced)
    if forced != "probe":
        raise UserError(f"{CPU_AUTO_ENV}={forced!r}: use probe, float32 or bfloat16")
    result = cached_probe(threads or torch.get_num_threads(), probe, path)
    return torch.bfloat16 if result["bf16_speedup"] >= BF16_MIN_SPEEDUP else torch.float32
