"""The fused LoRA layer's backward written out (``model.lora_kernel: fused``, with gradients).

``grpo.fused_lora`` computes ``y = x W^T + b + (x A^T) (s B)^T`` as a base product, the
rank-r product ``h = x A^T`` and one ``addmm``. Left to autograd, the backward of those three
ops reads and writes each (tokens, width) tensor more often than the arithmetic needs: ``x``
feeds two ops, so its two gradients (``g W`` and ``(g s B) A``) are made separately and then
added; the gradient of the transposed ``s B^T`` is formed as ``g^T h`` from a transposed copy of
the whole (tokens, out) gradient ``g``. ``FusedLoRALinear`` computes the same gradients with
``x``'s two terms in one output (``(g W).addmm_(dh, A)``: the rank-r product accumulates into
the base product's result) and ``s B``'s as ``(h^T g)^T`` (``g`` read as it lies). Its forward
is the fused forward's ops, unchanged, so the update's log-probs keep the rollout's numbers
bit for bit; the gradients agree to float rounding (one rounding fewer in ``x``'s under a bf16
base). At SmolLM2's widths, 2,048 bf16 rows on one AMX core, one layer's forward + backward
took 7.0 -> 3.7 ms (576 -> 576), 10.6 -> 8.5 ms (1536 -> 576); the whole policy pass of a
4 x 8 x 64 step: ``benchmarks/update_profile.py``, docs/benchmarks.md ("Session 12").

Only for a frozen plain base (``weight`` and ``bias`` without gradients), no LoRA dropout and
no autocast: anything else keeps autograd's path (``grpo.fused_lora.fused_lora_forward``).
"""

from __future__ import annotations

import torch

F = torch.nn.functional


class FusedLoRALinear(torch.autograd.Function):
    """``x W^T + b + (x A^T) (s B)^T`` with ``A`` (r, in) and ``B`` (out, r) float32 masters cast to
    ``x``'s dtype, as ``grpo.fused_lora.fused_lora_forward`` computes it; gradients for ``x``,
    ``A`` and ``B`` (the base ``W``, ``b`` are frozen: ``d x`` takes ``g W`` for the base's part)."""

    @staticmethod
    def forward(ctx, x, out, weight, lora_a, lora_b, scale: float):
        """``out``: the base layer's output ``x W^T + b``, computed by the caller's call of the base
        module without gradients (its hooks run as they would); ``weight``: its ``W``."""
        a = lora_a.to(x.dtype)  # (r, in)
        b = (lora_b * scale).to(out.dtype)  # (out, r), the scale folded in
        h = F.linear(x, a)  # (..., r)
        y = torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), b.t()).view(out.shape)
        # keep only what the gradients asked for need (what autograd itself would keep)
        need_x, need_a, need_b = x.requires_grad, lora_a.requires_grad, lora_b.requires_grad
        ctx.save_for_backward(x if need_a else None, weight if need_x else None, a if need_x else None,
                              b if need_x or need_a else None, h if need_b else None)
        ctx.scale, ctx.master_dtypes = scale, (lora_a.dtype, lora_b.dtype)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, a, b, h = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        need_x, need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        dh = g @ b if need_x or need_a else None  # (N, r): the gradient of h
        dx = (g @ weight).addmm_(dh, a).view(grad.shape[:-1] + a.shape[-1:]) if need_x else None
        da = (dh.t() @ x.reshape(-1, x.shape[-1])).to(ctx.master_dtypes[0]) if need_a else None
        # d(s B) = g^T h, formed as (h^T g)^T: g read as it lies, not transposed and copied
        db = (h.reshape(-1, h.shape[-1]).t() @ g).t().to(ctx.master_dtypes[1]) * ctx.scale if need_b else None
        return dx, None, None, da, db, None


def applies(x, base, dropout) -> bool:
    """Whether ``FusedLoRALinear`` computes this call: gradients recorded, a frozen plain
    ``nn.Linear`` base, no dropout on the adapter's input, no autocast."""
    if not torch.is_grad_enabled() or type(base) is not torch.nn.Linear or not isinstance(dropout, torch.nn.Identity):
        return False
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return False
    try:
        autocast = torch.is_autocast_enabled(x.device.type)
    except TypeError:  # a torch whose is_autocast_enabled takes no device
        autocast = torch.is_autocast_enabled()
    return not autocast and x.dtype == base.weight.dtype
