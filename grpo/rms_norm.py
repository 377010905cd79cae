"""RMSNorm with its backward written out (installed with ``model.lora_kernel: fused``).

transformers' Llama-family RMSNorm (Llama, Qwen2/3, Mistral, SmolLM2, ...) computes
``w * (x32 * rsqrt(mean(x32^2) + eps)).to(dtype)`` with ``x32 = x.float()``; left to autograd,
its graph keeps the float32 copy ``x32`` of every norm's input for backward (4 bytes per
element: under a bf16 base about a fifth of what a decoder layer keeps per token,
``grpo.memory``) and its backward makes about ten passes over (tokens, hidden) float32 tensors.
``RMSNormFunction`` runs the same forward ops (bit for bit: each module is checked on a probe
before it is switched) and keeps the input in its own dtype plus the per-row ``rsqrt``; its
backward is the closed form

    d x = r * (g - x32 * r^2 * mean(g * x32)),   g = (d y * w).float(),  r = rsqrt(mean(x32^2) + eps)

in four passes. At 2,048 bf16 rows of 576 on one AMX core: 7.5 -> 5.6 ms per norm forward +
backward, 2 bytes per element kept instead of 4 (docs/benchmarks.md, "Session 12").

Only for a frozen weight (LoRA training never trains the norms; a trained weight keeps
transformers' forward), an input that needs a gradient (layer 0's first norm reads the frozen
embedding: transformers' forward, which keeps nothing there) and gradients on.
"""

from __future__ import annotations

import types

import torch


class RMSNormFunction(torch.autograd.Function):
    """``weight * (x32 * rsqrt(mean(x32^2, -1) + eps)).to(x.dtype)``, differentiable in ``x``."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        x32 = x.to(torch.float32)
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x32 * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        g = (grad * weight).to(torch.float32)  # through w * h, then h's cast
        x32 = x.to(torch.float32)
        coef = torch.linalg.vecdot(g, x32).unsqueeze(-1).mul_(rstd.pow(3)).div_(-x.shape[-1])
        return torch.addcmul(g * rstd, x32, coef).to(x.dtype), None, None


def rms_norm_forward(self, hidden_states):
    """``forward`` bound to a checked RMSNorm module by ``use_rms_norm_function``."""
    if torch.is_grad_enabled() and hidden_states.requires_grad and not self.weight.requires_grad:
        return RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)
    return type(self).forward(self, hidden_states)


def computes_the_same(module) -> bool:
    """Whether ``RMSNormFunction`` gives ``module``'s forward bit for bit on a probe in its dtype
    (a norm of another formula, e.g. Gemma's ``1 + w``, or a changed one, does not)."""
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or not isinstance(eps, float):
        return False
    g = torch.Generator().manual_seed(0)
    probe = (torch.randn(3, weight.shape[0], generator=g) * 3).to(weight.dtype).to(weight.device)
    with torch.no_grad():
        try:
            return torch.equal(type(module).forward(module, probe), RMSNormFunction.apply(probe, weight, eps))
        except (RuntimeError, TypeError):
            return False


def use_rms_norm_function(model, enabled: bool = True) -> int:
    """Bind ``rms_norm_forward`` to every RMSNorm of ``model`` (``enabled``) that
    ``computes_the_same``, or restore transformers' forward; returns how many are bound."""
    count = 0
    checked: dict[tuple, bool] = {}  # (class, weight dtype) -> computes_the_same, probed once per kind
    for module in model.modules():
        if not type(module).__name__.endswith("RMSNorm"):
            continue
        if not enabled:
            module.__dict__.pop("forward", None)
            continue
        kind = (type(module), getattr(getattr(module, "weight", None), "dtype", None))
        if kind not in checked:
            checked[kind] = computes_the_same(module)
        if checked[kind]:
            module.forward = types.MethodType(rms_norm_forward, module)
            count += 1
    return count
