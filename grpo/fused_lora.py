"""``model.lora_kernel: fused``: one LoRA forward per linear layer instead of peft's five ops.

peft's ``lora.Linear`` computes ``(base(x) + B(A(dropout(x.float()))) * s).to(dtype)``: under a
bf16 base that is a float32 copy of ``x``, two float32 matmuls, a float32 ``(tokens, out)``
product with the scale, a float32 sum and a cast back, i.e. four full-size temporaries per
layer and as many again in backward. ``fused_lora_forward`` computes the same function as

    base(x) + (dropout(x) @ A^T) @ (s * B)^T         one ``addmm``: the add is in the GEMM

in the base layer's compute dtype, as ``torch.autocast`` would: the LoRA weights (and AdamW's
state) stay float32 masters, cast to the base dtype for the matmul (a few KB per layer), and
their gradients flow back through those casts in float32. Under a float32 base it is peft's
arithmetic with the scale folded into B (equal to rounding). On this project's CPU it cut the
policy forward+backward of a 4 x 8 x 64 GRPO step by 14 % and its peak RSS by 38 %
(docs/benchmarks.md, "Session 3").

Anything but plain single-adapter LoRA (adapters disabled or merged, several active adapters,
DoRA or another variant, a LoRA bias, extra call arguments) takes peft's own forward, so
``disable_adapter()`` (the reference pass), ``merge_and_unload`` (export) and multi-adapter
evaluation behave exactly as with peft.
"""

from __future__ import annotations

import types

LORA_KERNELS = ("fused", "peft")


def fused_lora_forward(self, x, *args, **kwargs):
    """``forward`` of a peft ``lora.Linear`` (bound to the instance by ``use_fused_lora``)."""
    import torch

    own = type(self).forward
    if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
        return own(self, x, *args, **kwargs)
    name = self.active_adapters[0]
    if name not in self.lora_A:
        return own(self, x, *args, **kwargs)
    lora_a, lora_b = self.lora_A[name], self.lora_B[name]
    if name in getattr(self, "lora_variant", {}) or lora_a.bias is not None or lora_b.bias is not None:
        return own(self, x, *args, **kwargs)
    out = self.base_layer(x)
    h = torch.nn.functional.linear(self.lora_dropout[name](x), lora_a.weight.to(x.dtype))  # (..., r)
    b = (lora_b.weight * self.scaling[name]).to(out.dtype)  # (out, r), the scale folded in
    flat = torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), b.t())
    return flat.view(out.shape)


def use_fused_lora(model, kernel: str = "fused") -> int:
    """Bind ``fused_lora_forward`` to every peft ``lora.Linear`` of ``model`` (``kernel="fused"``),
    or restore peft's forward (``"peft"``). Returns how many layers run the fused forward."""
    from peft.tuners.lora.layer import Linear

    from grpo.errors import UserError

    if kernel not in LORA_KERNELS:
        raise UserError(f"model.lora_kernel: {kernel!r} is not one of {', '.join(LORA_KERNELS)}")
    count = 0
    for module in model.modules():
        if not isinstance(module, Linear):
            continue
        if kernel == "fused":
            module.forward = types.MethodType(fused_lora_forward, module)
            count += 1
        elif "forward" in module.__dict__:
            del module.forward
    return count
