"""Keep freed CPU memory in the process instead of handing it back to the kernel at once.

glibc serves each allocation above its mmap threshold (128 KiB at start, raised only to the
largest block freed so far) with a fresh ``mmap`` and returns it with ``munmap`` when the
tensor dies, so every new tensor of that size touches fresh pages, and each first touch is a
page fault. A decode step makes dozens of megabyte-sized temporaries per token (the logits
and the sampler's ``(rows, vocabulary)`` float tensors, 6 MB each at 32 rows x 49k; a KV cache
that grows by one position per token, so each new block is just larger than the last freed one).
``benchmarks/decode_profile.py`` measured ``sample_tokens`` at 32 rows (SmolLM2's 49k
vocabulary, one thread of a busy 2-core machine): 18.5 -> 5.7 ms per token in bf16 and
22.0 -> 5.0 ms in fp32 with these thresholds; at the level of a whole GRPO step the gain was
within that machine's noise and peak RSS rose by 70-420 MB (docs/benchmarks.md, "Generation").

The allocation policy changes no arithmetic: the same numbers come out, sooner.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 64 << 20  # blocks below 64 MiB come from the heap and are reused
TRIM_THRESHOLD = 256 << 20  # up to 256 MiB free at the heap's top stays with the process
ENV_KEYS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True when applied.

    Left alone where the C library is not glibc, and where the user set any ``MALLOC_*_``
    variable (their choice wins; e.g. ``MALLOC_TRIM_THRESHOLD_=131072`` restores glibc's trim
    threshold and with it this module's effect is off).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(key in os.environ for key in ENV_KEYS):
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
