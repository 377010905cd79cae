"""grpo.rms_norm: transformers' RMSNorm forward bit for bit, autograd's gradient, less kept."""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from grpo.rms_norm import RMSNormFunction, computes_the_same, rms_norm_forward, use_rms_norm_function


def _norm(dtype, width=48):
    norm = LlamaRMSNorm(width, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(width, generator=torch.Generator().manual_seed(1)))
    return norm.requires_grad_(False)


def _grad(fn, x, up):
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    y.backward(up)
    return y.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_forward_and_gradient_as_transformers(dtype):
    norm = _norm(dtype)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 9, 48, generator=g) * 2).to(dtype)
    up = torch.randn(4, 9, 48, generator=g).to(dtype)
    y_ref, dx_ref = _grad(norm, x, up)
    y, dx = _grad(lambda t: RMSNormFunction.apply(t, norm.weight, norm.variance_epsilon), x, up)
    assert torch.equal(y, y_ref)  # the same ops: bit for bit
    assert dx.dtype == dtype
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(dx, dx_ref, **tol)
    # and against float64
    xd = x.double().requires_grad_()
    (norm.weight.double() * xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5)).backward(up.double())
    err, ref_err = (dx.double() - xd.grad).abs().max(), (dx_ref.double() - xd.grad).abs().max()
    assert err <= 1.5 * ref_err + 1e-12


def test_keeps_the_input_in_its_own_dtype():
    """Autograd kept the float32 copy of a bf16 input; the function keeps the input itself."""
    norm = _norm(torch.bfloat16, 64)
    x = torch.randn(128, 64).bfloat16().requires_grad_()
    kept = {}

    def keep(t):
        kept.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    for name, fn in (("transformers", norm), ("function", lambda t: RMSNormFunction.apply(t, norm.weight, 1e-5))):
        kept.clear()
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            fn(x)
        activations = sum(n for n in kept.values() if n >= 128 * 64)  # leave out the weight and rsqrt
        assert activations == (128 * 64 * 4 if name == "transformers" else 128 * 64 * 2), name


def test_bound_to_every_norm_of_a_model_and_training_matches(tiny_model_dir):
    from test_fused_lora import _logprobs_and_grads, _policy

    model = _policy(tiny_model_dir)
    lp_old, g_old = _logprobs_and_grads(model)
    calls = []
    real = RMSNormFunction.apply
    RMSNormFunction.apply = lambda *a: calls.append(1) or real(*a)
    try:
        assert use_rms_norm_function(model) == 2 * 2 + 1  # two per block, two blocks, the final norm
        lp_new, g_new = _logprobs_and_grads(model)
    finally:
        RMSNormFunction.apply = real
    assert calls  # layer 0's first norm reads the frozen embedding: transformers' forward there
    assert torch.equal(lp_new, lp_old)
    for name in g_old:
        torch.testing.assert_close(g_new[name], g_old[name], rtol=1e-5, atol=1e-6)
    assert use_rms_norm_function(model, enabled=False) == 0
    assert not any("forward" in m.__dict__ for m in model.modules() if type(m).__name__.endswith("RMSNorm"))


def test_another_formula_is_left_alone_and_fallbacks():
    class GemmaLikeRMSNorm(torch.nn.Module):  # scales by 1 + w
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(8), requires_grad=False)
            self.variance_epsilon = 1e-6

        def forward(self, x):
            x32 = x.float()
            return ((1 + self.weight) * x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)

    model = torch.nn.Sequential(GemmaLikeRMSNorm(), _norm(torch.float32, 8))
    assert not computes_the_same(model[0]) and computes_the_same(model[1])
    assert use_rms_norm_function(model) == 1 and "forward" not in model[0].__dict__

    norm = model[1]
    seen = []
    real = RMSNormFunction.apply
    RMSNormFunction.apply = lambda *a: seen.append(1) or real(*a)
    try:
        rms_norm_forward(norm, torch.randn(2, 8))  # input without gradient: transformers' forward
        with torch.no_grad():
            rms_norm_forward(norm, torch.randn(2, 8, requires_grad=True))
        norm.weight.requires_grad_(True)  # a trained norm: transformers' forward (and its weight gradient)
        x = torch.randn(2, 8, requires_grad=True)
        rms_norm_forward(norm, x).sum().backward()
        assert norm.weight.grad is not None and not seen
        norm.weight.requires_grad_(False)
        rms_norm_forward(norm, x)
        assert seen == [1]
    finally:
        RMSNormFunction.apply = real
