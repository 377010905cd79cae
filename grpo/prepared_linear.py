"""Frozen CPU linear maps prepared once and kept: oneDNN's packed weight layout.

torch's CPU ``F.linear`` hands each call to MKL's sgemm, which repacks the weight on every call;
oneDNN can pack it once (``torch.ops.mkldnn``, what ``torch.compile``'s CPU backend runs linears
with). For a frozen weight the packed copy is made once and kept on the module, keyed by the
weight's identity, storage and version (``weights_stamp``), so a replaced or in-place-updated
weight is never served stale. Used for the LM head's float32 logits (``grpo.logprobs``, the HF
engine) and, while decoding on CPU, for the base linears under LoRA or the merged LoRA weights
(``grpo.fused_lora``).
"""

from __future__ import annotations

import contextlib
import time
from functools import partial
from typing import Callable

import torch


def weights_stamp(*tensors) -> tuple:
    """What a cache of values derived from ``tensors`` must compare: each tensor's identity,
    storage and version, which change when it is replaced or written in place (None stays None)."""
    return tuple(None if t is None else (id(t), t.data_ptr(), t._version) for t in tensors)


def float32_linear(linear) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> x W^T + b`` in float32 for a frozen CPU linear, prepared once per weight; ``x`` float32
    or bfloat16 (upcast here), the result float32.

    The float32 copy of the weight is kept on the module until the weight changes (its
    identity, storage and version): in oneDNN's packed layout where torch has it
    (``torch.ops.mkldnn``, what torch.compile's CPU backend runs linears with), else plain.
    On this project's CPU (1 thread) a (512, 576) x (576, 49152) product took 358 ms packed vs
    525 ms through ``F.linear``, a 32-row one (a decode step) 24 vs 49-58 ms, with the same
    numbers to float rounding (docs/benchmarks.md). SmolLM2's head copy is 113 MB.

    A bf16 weight times a bf16 ``x`` (a bf16 backbone's hidden states) runs as oneDNN's bf16
    products with float32 accumulation and a float32 result (``bf16_products``) where that
    measured faster for this weight: the same float32 function, since the product of two bf16
    numbers is exact in float32, only the summation order differs. On a CPU with AMX (1 thread)
    SmolLM2's head took 7.9 instead of 14.6 ms at 32 rows and 60 instead of 152 ms at 512, and
    came closer to the float64 product (1.1e-6 vs 3e-6 off; ``benchmarks/decode_kernels.py``,
    docs/benchmarks.md, "Session 10")."""
    weight, bias = linear.weight, getattr(linear, "bias", None)
    key = weights_stamp(weight, bias)
    cached = linear.__dict__.get("_grpo_float32_linear")
    if cached is None or cached[0] != key:
        w32, b32 = weight.detach().float(), None if bias is None else bias.detach().float()
        fn32 = prepared_linear(w32, b32)
        exact_bf16 = weight.dtype == torch.bfloat16 and (bias is None or bias.dtype == torch.bfloat16)
        cached = (key, _with_bf16_products(fn32) if exact_bf16 and bf16_products_pay(fn32, w32) else _upcast(fn32))
        linear.__dict__["_grpo_float32_linear"] = cached  # a plain attribute: not a parameter, buffer or state
    return cached[1]


def packed_linear(linear) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> x W^T + b`` in the weight's own dtype (float32 or bfloat16) for a frozen CPU linear,
    through oneDNN's packed copy of the weight, prepared once per weight and kept like
    ``float32_linear`` (whose copy a float32 weight shares). The same numbers as ``F.linear``
    (bf16: bit for bit on a decode step's 32 rows, measured), without the per-call repacking; a
    bf16 copy of SmolLM2's decoder linears is 212 MB."""
    weight = linear.weight
    if weight.dtype == torch.float32:
        return float32_linear(linear)
    bias = getattr(linear, "bias", None)
    key = weights_stamp(weight, bias)
    cached = linear.__dict__.get("_grpo_packed_linear")
    if cached is None or cached[0] != key:
        cached = (key, prepared_linear(weight.detach(), None if bias is None else bias.detach()))
        linear.__dict__["_grpo_packed_linear"] = cached
    return cached[1]


PACKING_MIN_SPEEDUP = 1.1  # what ``packing_pays`` asks of the packed product


def packing_pays(weight: torch.Tensor, rows: int = 32) -> bool:
    """Whether oneDNN's packed copy of ``weight`` (a frozen CPU linear's, any dtype ``prepared_linear``
    takes) multiplies ``rows`` rows at least ``PACKING_MIN_SPEEDUP`` times faster than ``F.linear``:
    best of five after a warm-up each (tens of ms for a SmolLM2 layer), measured, not assumed."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    w = weight.detach()
    packed = prepared_linear(w, None)
    if isinstance(packed, partial):  # no packed path in this torch
        return False
    x = torch.linspace(-1, 1, rows * w.shape[1]).view(rows, -1).to(w.dtype)
    return _best_seconds(lambda: torch.nn.functional.linear(x, w), 5) >= PACKING_MIN_SPEEDUP * _best_seconds(
        lambda: packed(x), 5)


def _best_seconds(run: Callable[[], object], reps: int) -> float:
    """The fastest of ``reps`` timed calls of ``run``, after one untimed warm-up call (which
    picks and caches the kernel)."""
    run()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return min(times)


def _upcast(fn32):
    return lambda x: fn32(x.float())


def _with_bf16_products(fn32):
    def fn(x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.bfloat16:  # a float32 x need not be bf16-valued: plain float32 products
            return fn32(x.float())
        with bf16_products():
            return fn32(x.float())
    fn.bf16_products = True  # what uses_bf16_products reads
    return fn


def uses_bf16_products(linear) -> bool:
    """Whether ``float32_linear(linear)``, as prepared now, runs bf16 inputs as bf16 products
    (False before its first call): what a benchmark reports beside its floors."""
    cached = linear.__dict__.get("_grpo_float32_linear")
    return cached is not None and getattr(cached[1], "bf16_products", False)


BF16_PRODUCTS_MIN_SPEEDUP = 1.2  # what ``bf16_products`` must gain to be used (grpo.precision's margin)
BF16_PRODUCTS_MIN_WEIGHT = 1 << 20  # elements; below this the timing is noise and the gain nothing


@contextlib.contextmanager
def bf16_products():
    """Inside: oneDNN may run float32 CPU matmuls as bf16 products accumulated in float32
    (``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``), which is exact only when both
    operands are bf16 numbers, so callers enter it only for those. Process-wide while inside."""
    matmul = torch.backends.mkldnn.matmul
    old = matmul.fp32_precision
    matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        matmul.fp32_precision = old


def bf16_products_pay(fn32: Callable[[torch.Tensor], torch.Tensor], w32: torch.Tensor) -> bool:
    """Whether ``fn32`` (a prepared float32 linear of the bf16-valued ``w32``) runs at least
    ``BF16_PRODUCTS_MIN_SPEEDUP`` times faster on bf16-valued rows under ``bf16_products``, with
    the same numbers to float32 rounding: measured once per weight on a decode step's 32 rows
    (a few ms for SmolLM2's head), never assumed from CPU flags."""
    matmul = getattr(torch.backends.mkldnn, "matmul", None)
    if (w32.device.type != "cpu" or w32.numel() < BF16_PRODUCTS_MIN_WEIGHT or matmul is None
            or not hasattr(matmul, "fp32_precision") or not torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return False
    x = torch.linspace(-2, 2, 32 * w32.shape[1]).view(32, -1).bfloat16().float()

    def fast():
        with bf16_products():
            return fn32(x)
    try:
        ref, got = fn32(x), fast()
        if not torch.allclose(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max())):
            return False
        return _best_seconds(lambda: fn32(x), 3) >= BF16_PRODUCTS_MIN_SPEEDUP * _best_seconds(fast, 3)
    except (RuntimeError, NotImplementedError):  # a torch or oneDNN without the mode
        return False


def prepared_linear(w32: torch.Tensor, b32: torch.Tensor | None,
                    packed: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> x w32^T + b32``: through oneDNN's packed copy of ``w32`` where ``packed`` and torch
    has the ops (and they agree with ``F.linear`` on a probe), else ``F.linear`` on ``w32``.
    ``w32``, ``b32`` and ``x``: float32, or all bfloat16 (``packed_linear``)."""
    plain = partial(torch.nn.functional.linear, weight=w32, bias=b32)
    if not packed or w32.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return plain
    try:
        w_packed = torch.ops.mkldnn._reorder_linear_weight(w32, 512)

        def onednn(x: torch.Tensor) -> torch.Tensor:
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w_packed, b32, "none", [], "")

        probe = torch.linspace(-1, 1, 2 * w32.shape[1]).view(2, -1).to(w32.dtype)
        tol = 1e-4 if w32.dtype == torch.float32 else 1e-2
        if not torch.allclose(onednn(probe).float(), plain(probe).float(), rtol=tol, atol=tol):
            return plain
        return onednn
    except (AttributeError, RuntimeError, NotImplementedError):  # a torch without these ops
        return plain
