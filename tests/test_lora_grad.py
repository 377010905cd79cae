"""grpo.lora_grad: the fused LoRA layer's written-out backward gives autograd's gradients."""

import pytest
import torch

import grpo.fused_lora as fused_lora
from grpo.fused_lora import use_fused_lora
from grpo.lora_grad import FusedLoRALinear, applies


def _autograd(x, weight, bias, lora_a, lora_b, scale):
    """The fused forward's ops left to autograd (what ran before FusedLoRALinear)."""
    out = torch.nn.functional.linear(x, weight, bias)
    h = torch.nn.functional.linear(x, lora_a.to(x.dtype))
    b = (lora_b * scale).to(out.dtype)
    return torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), b.t()).view(out.shape)


def _written_out(x, weight, bias, lora_a, lora_b, scale):
    with torch.no_grad():
        out = torch.nn.functional.linear(x, weight, bias)
    return FusedLoRALinear.apply(x, out, weight, lora_a, lora_b, scale)


def _run(fn, x, weight, bias, a, b, grad):
    x, a, b = (t.detach().clone().requires_grad_(t.requires_grad) for t in (x, a, b))
    y = fn(x, weight, bias, a, b, 2.0)
    y.backward(grad)
    return y.detach(), x.grad, a.grad, b.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("x_grad", [True, False], ids=["x-grad", "x-frozen"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_same_forward_and_gradients_as_autograd(dtype, x_grad, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 24, generator=g).to(dtype).requires_grad_(x_grad)  # (batch, tokens, in)
    weight = (torch.randn(40, 24, generator=g) * 0.2).to(dtype)
    b0 = (torch.randn(40, generator=g) * 0.1).to(dtype) if bias else None
    a = (torch.randn(4, 24, generator=g) * 0.2).requires_grad_()  # float32 masters
    b = (torch.randn(40, 4, generator=g) * 0.2).requires_grad_()
    grad = torch.randn(3, 7, 40, generator=g).to(dtype)
    ref = _run(_autograd, x, weight, b0, a, b, grad)
    got = _run(_written_out, x, weight, b0, a, b, grad)
    assert torch.equal(got[0], ref[0])  # the forward is the same ops: the rollout's numbers bit for bit
    assert (got[1] is None) == (not x_grad)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for mine, theirs in zip(got[1:], ref[1:]):
        if theirs is None:
            continue
        assert mine.dtype == theirs.dtype and mine.shape == theirs.shape
        torch.testing.assert_close(mine, theirs, **tol)
    assert got[2].dtype == got[3].dtype == torch.float32  # masters' gradients stay float32


def test_bf16_input_gradient_is_closer_to_float64():
    """x's two terms summed in one product: one bf16 rounding fewer than autograd's add."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 48, generator=g).bfloat16().requires_grad_()
    weight = (torch.randn(96, 48, generator=g) * 0.2).bfloat16()
    a = (torch.randn(8, 48, generator=g) * 0.5).requires_grad_()
    b = (torch.randn(96, 8, generator=g) * 0.5).requires_grad_()
    grad = torch.randn(64, 96, generator=g).bfloat16()
    exact = grad.double() @ weight.double() + (grad.double() @ (b.double() * 2.0).bfloat16().double()) @ a.double().bfloat16().double()
    ref = _run(_autograd, x, weight, None, a, b, grad)[1].double()
    got = _run(_written_out, x, weight, None, a, b, grad)[1].double()
    assert (got - exact).abs().mean() <= (ref - exact).abs().mean()


def test_model_training_pass_uses_it_and_matches_autograd(tiny_model_dir, monkeypatch):
    from test_fused_lora import _logprobs_and_grads, _policy

    model = _policy(tiny_model_dir)
    use_fused_lora(model, "fused")
    calls = []
    real = FusedLoRALinear.apply
    monkeypatch.setattr(FusedLoRALinear, "apply", lambda *a: calls.append(1) or real(*a))
    lp_new, g_new = _logprobs_and_grads(model)
    assert len(calls) >= 14  # every LoRA linear of the 2-layer model, at least once
    monkeypatch.setattr(fused_lora, "applies", lambda *a: False)  # autograd's path, as before
    lp_old, g_old = _logprobs_and_grads(model)
    assert torch.equal(lp_new, lp_old)
    assert g_new.keys() == g_old.keys()
    for name in g_old:
        torch.testing.assert_close(g_new[name], g_old[name], rtol=1e-5, atol=1e-6)


def test_falls_back_where_it_does_not_apply():
    base = torch.nn.Linear(8, 4)
    base.requires_grad_(False)
    x = torch.randn(2, 8)
    identity = torch.nn.Identity()
    assert applies(x, base, identity)
    assert not applies(x, base, torch.nn.Dropout(0.1))  # dropout on the adapter's input: autograd's path
    with torch.no_grad():
        assert not applies(x, base, identity)  # no gradients: the decode paths
    assert not applies(x.bfloat16(), base, identity)  # dtypes differ
    base.bias.requires_grad_(True)
    assert not applies(x, base, identity)  # a trained bias
    base.bias.requires_grad_(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not applies(x, base, identity)

    class Sub(torch.nn.Linear):
        pass
    sub = Sub(8, 4)
    sub.requires_grad_(False)
    assert not applies(x, sub, identity)  # a subclass (quantized, ...) may compute something else
