"""Regression tests for the logit path (issue 12): scaled heads, LoRA on lm_head, dropout mode,
bf16 log-softmax, and the held-out evaluation's sampling settings."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from transformers import AutoModelForCausalLM, GraniteConfig, GraniteForCausalLM

from grpo.config import load_config
from grpo.logprobs import fast_head_agrees, grouped_logprobs, pack, pack_grouped, sampled_logprobs
from grpo.models import add_lora
from grpo.trainer import Trainer
from conftest import tiny_run_config

PROMPTS = [[1, 10, 11, 12], [1, 20, 21]]
COMPLETIONS = [[30, 31, 32], [40, 41], [50, 51, 52, 53]]
GROUP_INDEX = [0, 0, 1]


def _own_forward_logprobs(model, prompts, completions, temperature=1.0):
    """Reference: the model's own forward over each sequence, one at a time, full log-softmax."""
    out = []
    for p, c in zip(prompts, completions):
        ids = torch.tensor([p + c])
        logits = model(input_ids=ids).logits[0, len(p) - 1:len(p) - 1 + len(c)].double() / temperature
        out.append(logits.log_softmax(-1).gather(-1, torch.tensor(c)[:, None]).squeeze(-1))
    return out


def _random_lora_b(model, std=0.2):
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=std)


def _tiny_granite(logits_scaling: float):
    torch.manual_seed(0)
    config = GraniteConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, logits_scaling=logits_scaling,
                           tie_word_embeddings=False, pad_token_id=0)
    return GraniteForCausalLM(config).eval()


def test_scaled_logits_are_detected_and_the_models_forward_is_used():
    # Granite divides its logits by logits_scaling: the chunked head alone gets them wrong.
    model = add_lora(_tiny_granite(8.0), 4, 8, 0.0, ["q_proj", "v_proj"]).eval()
    agrees, diff = fast_head_agrees(model, [1, 5, 9, 13, 17])
    assert not agrees and diff > 0.1  # float32 agreement is ~1e-7
    prompts = [PROMPTS[g] for g in GROUP_INDEX]
    ref = _own_forward_logprobs(model, prompts, COMPLETIONS)
    batch = pack_grouped(PROMPTS, GROUP_INDEX, COMPLETIONS, 0)
    with torch.no_grad():
        fast = grouped_logprobs(model, batch, fast_head=True)
        safe = grouped_logprobs(model, batch, fast_head=False)
    for i, c in enumerate(COMPLETIONS):
        assert not torch.allclose(fast[i, :len(c)].double(), ref[i], atol=1e-3)
        assert torch.allclose(safe[i, :len(c)].double(), ref[i], atol=1e-5)


def test_unscaled_head_agrees():
    model = add_lora(_tiny_granite(1.0), 4, 8, 0.0, ["q_proj", "v_proj"]).eval()
    agrees, diff = fast_head_agrees(model, [1, 5, 9, 13, 17])
    assert agrees and diff < 1e-5


def test_trainer_setup_falls_back_for_a_scaled_head(tmp_path, toy_plugin, capsys):
    from conftest import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "granite-like")
    config = AutoModelForCausalLM.from_pretrained(model_dir).config
    # the same Llama, but its saved config asks for logits / 8 (Granite's convention)
    granite = GraniteConfig(**{k: v for k, v in config.to_dict().items() if k in GraniteConfig().to_dict()},
                            logits_scaling=8.0)
    weights = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    model = GraniteForCausalLM(granite)
    model.load_state_dict(weights, strict=False)
    model.save_pretrained(model_dir)
    cfg = load_config(None, tiny_run_config(model_dir, tmp_path / "run", toy_plugin))
    trainer = Trainer(cfg, progress=False)
    try:
        trainer.setup()
        assert trainer.fast_head is False
    finally:
        trainer.cleanup()
    assert "using the model's forward for every log-prob pass" in capsys.readouterr().err


def test_lora_on_lm_head_is_applied(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base.config.tie_word_embeddings = False
    base.lm_head.weight = torch.nn.Parameter(base.lm_head.weight.detach().clone())
    model = add_lora(base, 4, 8, 0.0, ["q_proj", "lm_head"]).eval()
    _random_lora_b(model, std=0.5)
    prompts = [PROMPTS[g] for g in GROUP_INDEX]
    ref = _own_forward_logprobs(model, prompts, COMPLETIONS)
    batch = pack_grouped(PROMPTS, GROUP_INDEX, COMPLETIONS, 0)
    lp = grouped_logprobs(model, batch)
    for i, c in enumerate(COMPLETIONS):
        assert torch.allclose(lp[i, :len(c)].double(), ref[i], atol=1e-5)
    lp.sum().backward()  # the head's adapter gets a gradient
    head_b = [p for n, p in model.named_parameters() if "lm_head" in n and "lora_B" in n]
    assert head_b and head_b[0].grad is not None and head_b[0].grad.abs().sum() > 0


def test_bf16_logsoftmax_uses_float32_logits(tiny_model_dir):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        model.model.norm.weight.mul_(60.0)  # logits with std of a few units, as in a trained model
    model = model.to(torch.bfloat16)
    batch = pack([PROMPTS[g] for g in GROUP_INDEX], COMPLETIONS, 0)
    with torch.no_grad():
        lp = sampled_logprobs(model, batch)
        hidden = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             position_ids=batch.position_ids).last_hidden_state
        lp_len = batch.prompt_len
        t = batch.completion_ids.shape[1]
        # fp32 reference on the same bf16 hidden states: the head in float64
        logits = hidden[:, lp_len - 1:lp_len - 1 + t].double() @ model.lm_head.weight.double().T
        assert logits.std() > 1.0
        ref = logits.log_softmax(-1).gather(-1, batch.completion_ids[..., None]).squeeze(-1)
    mask = batch.completion_mask.bool()
    err = (lp.double() - ref)[mask].abs().max()
    assert err < 1e-4, err  # bf16-rounded logits give errors of ~1e-2 here


def _trainer(tmp_path, plugin, model_dir, **overrides):
    cfg = load_config(None, tiny_run_config(model_dir, tmp_path / "run", plugin, **overrides))
    trainer = Trainer(cfg, progress=False)
    trainer.setup()
    return trainer


def test_lora_dropout_ratio_is_exactly_one_at_policy_equals_old(tiny_model_dir, toy_plugin, tmp_path):
    trainer = _trainer(tmp_path, toy_plugin, tiny_model_dir, **{
        "model.lora_dropout": 0.5, "loss.update_passes": 2, "loss.old_logprobs": "recompute",
        "loss.beta": 0.1, "rollout.max_new_tokens": 6})
    try:
        _random_lora_b(trainer.model)
        trainer.scheduler.base_lrs = [0.0]  # the policy never moves: pi == pi_old in every pass
        for group in trainer.optimizer.param_groups:
            group["lr"] = 0.0
        m = trainer.train_step(trainer.sampling_params())
    finally:
        trainer.cleanup()
    assert m["sequences_in_loss"] > 0
    assert m["ratio"] == pytest.approx(1.0, abs=1e-6)
    assert m["clip_fraction"] == 0.0


def test_no_base_dropout_kl_zero_at_policy_equals_reference(tiny_model_dir, toy_plugin, tmp_path):
    # a base model with dropout everywhere; adapters at their zero init: policy == reference
    trainer = _trainer(tmp_path, toy_plugin, tiny_model_dir, **{"model.lora_dropout": 0.3, "loss.beta": 0.1})
    try:
        for module in trainer.model.modules():
            if hasattr(module, "attention_dropout"):
                module.attention_dropout = 0.5
        m = trainer.train_step(trainer.sampling_params())
    finally:
        trainer.cleanup()
    assert m["kl"] == 0.0


def test_heldout_evaluation_samples_with_top_k(tiny_model_dir, toy_plugin, tmp_path):
    trainer = _trainer(tmp_path, toy_plugin, tiny_model_dir, **{"rollout.top_k": 3, "rollout.top_p": 0.9})
    seen = []
    generate = trainer.engine.generate

    def recording(prompts, params, seed=None, **streams):  # streams: the engine's per-prompt seeds
        seen.append(params)
        return generate(prompts, params, seed=seed, **streams)

    trainer.engine.generate = recording
    try:
        trainer._evaluate(0)
    finally:
        trainer.cleanup()
    sampled = [p for p in seen if not p.greedy]
    assert sampled and all(p.top_k == 3 and p.top_p == 0.9 for p in sampled)


def test_entropy_metric_matches_full_softmax(tiny_model_dir):
    torch.manual_seed(0)
    model = add_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), 4, 8, 0.0, ["q_proj"]).eval()
    batch = pack_grouped(PROMPTS, GROUP_INDEX, COMPLETIONS, 0)
    with torch.no_grad():
        out = grouped_logprobs(model, batch, temperature=0.7, with_entropy=True)
        for i, (g, c) in enumerate(zip(GROUP_INDEX, COMPLETIONS)):
            p = PROMPTS[g]
            logits = model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1:len(p) - 1 + len(c)].double() / 0.7
            probs = logits.softmax(-1)
            expected = -(probs * probs.log()).sum(-1)
            assert torch.allclose(out.entropy[i, :len(c)].double(), expected, atol=1e-5)
            assert (out.entropy[i, len(c):] == 0).all()


def test_hf_engine_logprobs_are_untruncated_under_top_p_top_k(tiny_model_dir):
    """One definition: the full softmax(logits / T), before truncation, as the trainer computes it."""
    from transformers import AutoTokenizer

    from grpo.engines.base import SamplingParams
    from grpo.engines.hf import HFEngine

    torch.manual_seed(0)
    model = add_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), 4, 8, 0.0, ["q_proj"]).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    groups = HFEngine(model, tok, seed=1).generate(PROMPTS, SamplingParams(n=2, max_new_tokens=6, temperature=0.7,
                                                                           top_p=0.5, top_k=5))
    prompts = [p for p, g in zip(PROMPTS, groups) for _ in g]
    comps = [c for g in groups for c in g]
    with torch.no_grad():
        lp = sampled_logprobs(model, pack(prompts, [c.token_ids for c in comps], tok.pad_token_id), 0.7)
    for i, c in enumerate(comps):
        assert torch.allclose(lp[i, :len(c.logprobs)], torch.tensor(c.logprobs), atol=1e-4)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprob_function_is_log_softmax_and_its_gradient(temperature):
    """grpo.logprobs.SampledLogProb: log softmax(z/T)[y], the entropy of softmax(z/T), and the
    analytic backward (checked against finite differences in float64)."""
    from grpo.logprobs import SampledLogProb

    g = torch.Generator().manual_seed(0)
    z = (torch.randn(6, 13, generator=g, dtype=torch.float64) * 4).requires_grad_()
    y = torch.randint(0, 13, (6,), generator=g)
    logp, entropy = SampledLogProb.apply(z, y, temperature, True)
    ref = (z / temperature).log_softmax(-1)
    torch.testing.assert_close(logp, ref.gather(-1, y[:, None]).squeeze(-1))
    torch.testing.assert_close(entropy, -(ref.exp() * ref).sum(-1))
    assert not entropy.requires_grad and SampledLogProb.apply(z, y, temperature, False)[1] is None
    assert torch.autograd.gradcheck(lambda x: SampledLogProb.apply(x, y, temperature, False)[0], (z,))


def _bf16_head_inputs(rows=24, vocab=97, hidden=16):
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(vocab, hidden, generator=g) * 0.5).bfloat16()
    h = (torch.randn(rows, hidden, generator=g) * 2).bfloat16()
    y = torch.randint(0, vocab, (rows,), generator=g)
    return w, h, y


def test_float32_head_forward_is_float32_linear_and_backward_is_bf16_matmul():
    """grpo.logprobs.Float32Head: float32 logits exactly as F.linear of the upcast inputs; the
    hidden-state gradient equals d logits @ W in bf16, within bf16 rounding of the float32 one."""
    from grpo.logprobs import Float32Head

    w, h, _ = _bf16_head_inputs()
    hx = h.detach().requires_grad_(True)
    logits = Float32Head.apply(hx, lambda x: torch.nn.functional.linear(x.float(), w.float()), w)
    assert logits.dtype == torch.float32
    assert torch.equal(logits, torch.nn.functional.linear(h.float(), w.float()))
    up = torch.randn(logits.shape, generator=torch.Generator().manual_seed(4))
    logits.backward(up)
    assert hx.grad.dtype == torch.bfloat16
    assert torch.equal(hx.grad, (up.bfloat16() @ w).bfloat16())
    ref = up.double() @ w.double()
    rel = (hx.grad.double() - ref).norm() / ref.norm()
    assert 0 < rel < 1e-2, rel  # bf16 rounding, not float32 arithmetic, and not wrong


def test_chunked_head_gradients_under_a_bf16_head(tiny_model_dir):
    """head_logprobs on a frozen bf16 head: float32 log-probs, hidden gradients within bf16 rounding of
    the float64 head's; a trainable head weight (e.g. modules_to_save) still gets its gradient."""
    from grpo.logprobs import head_logprobs

    w, h, y = _bf16_head_inputs()
    head = torch.nn.Linear(16, 97, bias=False).bfloat16()
    head.weight.data.copy_(w)
    head.weight.requires_grad_(False)
    mask = torch.ones(2, 12)
    hx = h.view(2, 12, 16).detach().requires_grad_(True)
    out = head_logprobs(hx, y.view(2, 12), mask, head, 1.0, chunk_tokens=5)  # 5 chunks
    out.logprobs.sum().backward()
    h64 = h.view(2, 12, 16).double().requires_grad_(True)
    ref = (h64 @ w.double().T).log_softmax(-1).gather(-1, y.view(2, 12, 1)).squeeze(-1)
    ref.sum().backward()
    assert out.logprobs.dtype == torch.float32
    assert (out.logprobs.double() - ref).abs().max() < 1e-5
    rel = (hx.grad.double() - h64.grad).norm() / h64.grad.norm()
    assert rel < 1e-2, rel
    head.weight.requires_grad_(True)  # a trained head: its own float32 autograd path, weight gradient included
    head_logprobs(h.view(2, 12, 16), y.view(2, 12), mask, head, 1.0, chunk_tokens=5).logprobs.sum().backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


def test_float32_linear_is_float32_linear_prepared_once_and_refreshed_when_the_weight_changes():
    """grpo.logprobs.float32_linear: F.linear of the float32 copy (oneDNN's packed layout on CPU)
    to float rounding, with and without bias, at decode and chunk row counts; the same prepared
    map while the weight is unchanged, a new one after an in-place update or a replaced weight."""
    from grpo.prepared_linear import float32_linear

    torch.manual_seed(0)
    head = torch.nn.Linear(24, 97, bias=True).bfloat16().requires_grad_(False)
    fn = float32_linear(head)
    for rows in (1, 7, 64):
        x = torch.randn(rows, 24).bfloat16().float()
        ref = torch.nn.functional.linear(x, head.weight.float(), head.bias.float())
        torch.testing.assert_close(fn(x), ref, rtol=1e-5, atol=1e-5)
    assert float32_linear(head) is fn
    if torch.backends.mkldnn.is_available():  # the packed path passed its own probe (not the fallback)
        assert not isinstance(fn, partial)
    with torch.no_grad():
        head.weight.mul_(2)  # an in-place update bumps the version
    x = torch.randn(3, 24)
    torch.testing.assert_close(float32_linear(head)(x), torch.nn.functional.linear(x, head.weight.float(),
                                                                                   head.bias.float()), rtol=1e-5, atol=1e-5)
    head.weight = torch.nn.Parameter(torch.randn(97, 24).bfloat16(), requires_grad=False)
    torch.testing.assert_close(float32_linear(head)(x), torch.nn.functional.linear(x, head.weight.float(),
                                                                                   head.bias.float()), rtol=1e-5, atol=1e-5)
    assert "_grpo_float32_linear" not in head.state_dict()


def test_bf16_products_give_the_float32_head_for_bf16_inputs_only(monkeypatch):
    """float32_linear of a bf16 head, where bf16 products are measured to pay: bf16 hidden states
    give the float32 product (float64's within float32 rounding); float32 hidden states that are
    not bf16 numbers still get plain float32 products, never rounded to bf16; the process-wide
    mode is restored after each call."""
    from grpo import prepared_linear as pl

    monkeypatch.setattr(pl, "bf16_products_pay", lambda fn32, w32: True)
    g = torch.Generator().manual_seed(5)
    head = torch.nn.Linear(64, 301, bias=False).bfloat16().requires_grad_(False)
    head.weight.data.copy_(torch.randn(301, 64, generator=g))
    assert not pl.uses_bf16_products(head)  # not prepared yet
    fn = pl.float32_linear(head)
    assert pl.uses_bf16_products(head)
    before = torch.backends.mkldnn.matmul.fp32_precision
    h = torch.randn(32, 64, generator=g).bfloat16()
    ref = h.double() @ head.weight.double().T
    got = fn(h)
    assert got.dtype == torch.float32 and torch.backends.mkldnn.matmul.fp32_precision == before
    assert (got.double() - ref).abs().max() <= 1e-6 * ref.abs().max()
    x = torch.randn(32, 64, generator=g)  # not bf16-valued: bf16 products would be off by ~1e-3
    ref = x.double() @ head.weight.double().T
    assert (fn(x).double() - ref).abs().max() <= 1e-6 * ref.abs().max()


def test_bf16_products_are_not_tried_on_small_weights():
    """bf16_products_pay says no below BF16_PRODUCTS_MIN_WEIGHT, where a timing would be noise:
    a tiny model's head keeps plain float32 products on every machine, so tests agree everywhere."""
    from grpo.prepared_linear import (BF16_PRODUCTS_MIN_WEIGHT, bf16_products_pay, float32_linear, prepared_linear,
                                      uses_bf16_products)

    w32 = torch.randn(97, 24).bfloat16().float()
    assert w32.numel() < BF16_PRODUCTS_MIN_WEIGHT
    assert not bf16_products_pay(prepared_linear(w32, None), w32)
    head = torch.nn.Linear(24, 97, bias=False).bfloat16().requires_grad_(False)
    float32_linear(head)
    assert not uses_bf16_products(head)
