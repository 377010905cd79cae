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

The update faults for the same two reasons at a larger scale. Each LM-head chunk's logits
(512 tokens x 49k x 4 bytes = 100 MB for SmolLM2) and its exponentials are above a 64 MiB
threshold, so they were fresh ``mmap``s on every chunk; and the gigabytes a policy
forward keeps for backward are freed at the heap's top when backward ends, where a 256 MiB
trim threshold handed them back to the kernel, so the next pass faulted them in again
(150-390 thousand faults, 0.5-1.5 s of kernel time per one-thread policy pass of 4 prompts x
G=8 x 64 tokens). Hence a 256 MiB mmap threshold (a chunk's logits for vocabularies up to
131k stay on the heap) and no trimming (mallopt(3): -1; it takes a C int, so no threshold
above 2 GiB could be given instead): the heap keeps the size the step reached, which a
training loop reaches again every step anyway. The step benchmark with the two settings in
alternating worker processes (``--prompts 4 --group 8 --tokens 64 --threads 1``; docs/benchmarks.md,
"Session 10"): 15.33 -> 14.61 s per step on a CPU with AMX (bf16 base), 38.51 -> 36.77 s on one
without bf16 (float32 base, Session 9, with the trim threshold at 8 GiB); peak RSS rose by
5-12 % (3950 -> 4411 MB, 6194 -> 6485 MB): blocks up to 256 MiB reused from the heap fragment it
more.

The allocation policy changes no arithmetic: the same numbers come out, sooner.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 256 << 20  # blocks below 256 MiB come from the heap and are reused
TRIM_THRESHOLD = -1  # never give the heap's free top back (mallopt(3): -1 disables trimming)
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
