"""The HF engine's cheaper generation paths sample what the plain arithmetic samples.

Each fast path (one softmax pass in ``sample_tokens``) is checked against the arithmetic it
replaces, kept here as the reference: same tokens for the same seeds, log-probs equal up to
float rounding.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import grpo.engines.hf as hf
from grpo.engines.base import SamplingParams, stream_seed
from grpo.engines.hf import HFEngine, PromptStreams, filter_logits, sample_tokens
from grpo.models import add_lora

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = [[1, 10, 11, 12, 13], [1, 20], [1, 30, 31]]


def reference_sample_tokens(logits, params, generator, streams=None, owner=None):
    """``sample_tokens`` before the one-pass change: divide, log-softmax, softmax, CDF."""
    logits = logits.float()
    if params.greedy:
        tokens = logits.argmax(-1)
        return tokens, logits.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)
    scaled = logits / params.temperature
    logprobs_all = scaled.log_softmax(-1)
    probs = filter_logits(scaled, params.top_k, params.top_p).softmax(-1)
    tokens = hf._inverse_cdf_sample(probs, generator, streams, owner)
    return tokens, logprobs_all.gather(-1, tokens[:, None]).squeeze(-1)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 0, 1.0),
                                                     (1.0, 50, 1.0), (0.8, 0, 0.9), (0.0, 0, 1.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sample_tokens_draws_the_reference_tokens(temperature, top_k, top_p, dtype):
    torch.manual_seed(0)
    logits = (torch.randn(64, 3000) * 4).to(dtype)  # peaked enough that log-probs span ~-1e-3 .. -30
    params = SamplingParams(n=8, temperature=temperature, top_k=top_k, top_p=top_p)
    owner = torch.arange(64) // 8
    tok, lp = sample_tokens(logits, params, None, PromptStreams(range(8), torch.device("cpu")), owner)
    ref_tok, ref_lp = reference_sample_tokens(logits, params, None, PromptStreams(range(8), torch.device("cpu")), owner)
    assert torch.equal(tok, ref_tok)
    assert (lp - ref_lp).abs().max() < 2e-6  # float rounding; log-probs here reach -30
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    tok, lp = sample_tokens(logits, params, g1)
    ref_tok, ref_lp = reference_sample_tokens(logits, params, g2)
    assert torch.equal(tok, ref_tok) and (lp - ref_lp).abs().max() < 2e-6


def _policy(model_dir, dtype=torch.float32):
    torch.manual_seed(0)
    model = add_lora(AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype), 4, 8, 0.0, TARGETS)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    return model, AutoTokenizer.from_pretrained(model_dir)


def _generate(model, tok, params):
    seeds = [stream_seed(7, 0, i) for i in range(len(PROMPTS))]
    out = HFEngine(model, tok, seed=0).generate(PROMPTS, params, prompt_seeds=seeds)
    return [c.token_ids for g in out for c in g], [c.logprobs for g in out for c in g]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_engine_samples_the_reference_tokens(tiny_model_dir, monkeypatch, temperature):
    """A whole generation (rows finishing at different steps) with the fast sampler and with
    the reference one: same tokens, same log-probs to float rounding."""
    model, tok = _policy(tiny_model_dir)
    params = SamplingParams(n=4, max_new_tokens=12, temperature=temperature)
    tokens, logprobs = _generate(model, tok, params)
    monkeypatch.setattr(hf, "sample_tokens", reference_sample_tokens)
    ref_tokens, ref_logprobs = _generate(model, tok, params)
    assert tokens == ref_tokens
    assert len({len(t) for t in tokens}) > 1  # some rows stopped early: the row-dropping path ran
    for lp, ref in zip(logprobs, ref_logprobs):
        assert torch.allclose(torch.tensor(lp), torch.tensor(ref), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- cached LoRA casts (grpo/fused_lora.py)
def _fused_bf16_policy(model_dir):
    from grpo.fused_lora import use_fused_lora

    model, tok = _policy(model_dir, torch.bfloat16)
    assert use_fused_lora(model, "fused") == 2 * len(TARGETS)
    return model, tok


def _first_fused_layer(model):
    from grpo.fused_lora import fused_lora_forward

    return next(m for m in model.modules()
                if getattr(m.__dict__.get("forward"), "__func__", None) is fused_lora_forward)


def test_cached_casts_are_reused_inside_the_context_and_dropped_after(tiny_model_dir):
    from grpo.fused_lora import _CAST_CACHE, cached_lora_casts

    model, _ = _fused_bf16_policy(tiny_model_dir)
    layer = _first_fused_layer(model)
    x = torch.randn(3, layer.in_features, dtype=torch.bfloat16)
    with torch.no_grad():
        plain = layer(x)
        with cached_lora_casts(model):
            first = layer(x)
            (stamp, a, b), = layer.__dict__[_CAST_CACHE].values()
            again = layer(x)
            (_, a2, b2), = layer.__dict__[_CAST_CACHE].values()
    assert a2 is a and b2 is b  # cast once, served from the cache the second time
    assert a.dtype == b.dtype == torch.bfloat16
    assert torch.equal(first, plain) and torch.equal(again, plain)  # the same arithmetic as without the cache
    assert _CAST_CACHE not in layer.__dict__  # nothing kept after the generation


def test_cached_casts_never_stale_after_an_optimizer_step_or_a_weight_load(tiny_model_dir):
    """An in-place update of the adapters inside the context (AdamW, ``load_state_dict``, a
    replaced ``.data``) is seen by the next call, exactly as without the cache."""
    from grpo.fused_lora import cached_lora_casts

    model, _ = _fused_bf16_policy(tiny_model_dir)
    ids = torch.tensor([[1, 10, 11, 12, 13]])
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    opt = torch.optim.AdamW(lora, lr=0.1)
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}

    def logits():
        with torch.no_grad():
            return model(input_ids=ids).logits

    with cached_lora_casts(model):
        before = logits()
        model(input_ids=ids).logits.float().pow(2).mean().backward()  # grad enabled: the cache is not used
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
        opt.step()
        after_step = logits()
    assert not torch.equal(after_step, before)  # the step changed the model ...
    assert torch.equal(after_step, logits())  # ... and the cached path saw exactly the new weights
    with cached_lora_casts(model):
        logits()  # fill the cache
        model.load_state_dict(saved, strict=False)
        assert torch.equal(logits(), before)  # the loaded (original) weights, not the stepped ones
        layer = _first_fused_layer(model)
        name = layer.active_adapters[0]
        layer.lora_B[name].weight.data = torch.zeros_like(layer.lora_B[name].weight)  # new storage, no version bump
        zeroed = logits()
    assert torch.equal(zeroed, logits())
    assert not torch.equal(zeroed, before)


def test_engine_with_cached_casts_samples_as_without(tiny_model_dir, monkeypatch):
    import contextlib

    model, tok = _fused_bf16_policy(tiny_model_dir)
    params = SamplingParams(n=4, max_new_tokens=10, temperature=1.0)
    tokens, logprobs = _generate(model, tok, params)
    monkeypatch.setattr(hf, "cached_lora_casts", lambda *args, **kwargs: contextlib.nullcontext())
    ref_tokens, ref_logprobs = _generate(model, tok, params)
    assert tokens == ref_tokens and logprobs == ref_logprobs  # bit-identical: the same casts, made once


def test_float32_cpu_engine_takes_its_logits_from_the_prepared_head(tiny_model_dir):
    """A float32 head on CPU goes through ``float32_linear`` (oneDNN's packed weight, kept for the
    trainer's log-prob head too) instead of the model's own ``F.linear``: same tokens, log-probs
    equal to float rounding."""
    model, tok = _policy(tiny_model_dir)
    params = SamplingParams(n=4, max_new_tokens=12, temperature=1.0)
    seeds = [stream_seed(7, 0, i) for i in range(len(PROMPTS))]
    runs = {}
    for prepared in (True, False):
        engine = HFEngine(model, tok, seed=0, float32_head=prepared)
        out = engine.generate(PROMPTS, params, prompt_seeds=seeds)
        assert (engine._head is not None) == prepared
        runs[prepared] = ([c.token_ids for g in out for c in g], [c.logprobs for g in out for c in g])
    assert runs[True][0] == runs[False][0]
    for lp, ref in zip(runs[True][1], runs[False][1]):
        assert torch.allclose(torch.tensor(lp), torch.tensor(ref), atol=1e-5, rtol=0)
