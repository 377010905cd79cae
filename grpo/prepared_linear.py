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

from functools import partial
from typing import Callable

import torch


def weights_stamp(*tensors) -> tuple:
    """What a cache of values derived from ``tensors`` must compare: each tensor's identity,
    storage and version, which change when it is replaced or written in place (None stays None)."""
    return tuple(None if t is None else (id(t), t.data_ptr(), t._version) for t in tensors)


def float32_linear(linear) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> x W^T + b`` in float32 for a frozen CPU linear (``x`` float32), prepared once per weight.

    The float32 copy of the weight is kept on the module until the weight changes (its
    identity, storage and version): in oneDNN's packed layout where torch has it
    (``torch.ops.mkldnn``, what torch.compile's CPU backend runs linears with), else plain.
    On this project's CPU (1 thread) a (512, 576) x (576, 49152) product took 358 ms packed vs
    525 ms through ``F.linear``, a 32-row one (a decode step) 24 vs 49-58 ms, with the same
    numbers to float rounding (docs/benchmarks.md). SmolLM2's head copy is 113 MB.
    """
    weight, bias = linear.weight, getattr(linear, "bias", None)
    key = weights_stamp(weight, bias)
    cached = linear.__dict__.get("_grpo_float32_linear")
    if cached is None or cached[0] != key:
        cached = (key, prepared_linear(weight.detach().float(), None if bias is None else bias.detach().float()))
        linear.__dict__["_grpo_float32_linear"] = cached  # a plain attribute: not a parameter, buffer or state
    return cached[1]


def prepared_linear(w32: torch.Tensor, b32: torch.Tensor | None,
                    packed: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> x w32^T + b32``: through oneDNN's packed copy of ``w32`` where ``packed`` and torch
    has the ops (and they agree with ``F.linear`` on a probe), else ``F.linear`` on ``w32``."""
    plain = partial(torch.nn.functional.linear, weight=w32, bias=b32)
    if not packed or w32.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return plain
    try:
        w_packed = torch.ops.mkldnn._reorder_linear_weight(w32, 512)

        def onednn(x: torch.Tensor) -> torch.Tensor:
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w_packed, b32, "none", [], "")

        probe = torch.linspace(-1, 1, 2 * w32.shape[1]).view(2, -1)
        if not torch.allclose(onednn(probe), plain(probe), rtol=1e-4, atol=1e-4):
            return plain
        return onednn
    except (AttributeError, RuntimeError, NotImplementedError):  # a torch without these ops
        return plain
