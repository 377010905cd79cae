"""HF engine and trainer log-probs agree; grouped (shared-prompt) log-probs equal the flat ones."""

import math
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo.engines.base import SamplingParams
from grpo.engines.hf import HFEngine, filter_logits
from grpo.logprobs import grouped_logprobs, pack, pack_grouped, sampled_logprobs
from grpo.models import add_lora


@pytest.fixture()
def policy(tiny_model_dir):
    torch.manual_seed(0)
    model = add_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), 4, 8, 0.0, ["q_proj", "v_proj"])
    for name, p in model.named_parameters():
        if "lora_B" in name:  # non-zero adapters, so "adapters on" differs from the base
            torch.nn.init.normal_(p, std=0.2)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.padding_side = "left"
    return model, tok


PROMPTS = [[1, 10, 11, 12, 13], [1, 20], [1, 30, 31]]


def test_engine_returns_groups_with_logprobs_and_finish_reasons(policy):
    model, tok = policy
    engine = HFEngine(model, tok, seed=0)
    out = engine.generate(PROMPTS, SamplingParams(n=3, max_new_tokens=6, temperature=1.0))
    assert len(out) == 3 and all(len(g) == 3 for g in out)
    for group in out:
        for c in group:
            assert 1 <= len(c.token_ids) <= 6 and len(c.logprobs) == len(c.token_ids)
            assert all(lp <= 0 for lp in c.logprobs)
            assert c.finish_reason == ("stop" if c.token_ids[-1] == tok.eos_token_id else "length")
            if c.finish_reason == "length":
                assert len(c.token_ids) == 6


def test_engine_logprobs_match_trainer_logprobs(policy):
    """The rollout's sampled-token log-probs equal a full forward's at the same temperature."""
    model, tok = policy
    engine = HFEngine(model, tok, seed=3)
    groups = engine.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=8, temperature=0.7))
    assert_engine_logprobs_match_trainer(model, tok, PROMPTS, groups, 0.7)


def assert_engine_logprobs_match_trainer(model, tok, prompts, groups, temperature):
    """Each completion's engine log-probs equal a full forward's (the trainer's definition)."""
    rows = [p for p, g in zip(prompts, groups) for _ in g]
    comps = [c for g in groups for c in g]
    model.eval()
    with torch.no_grad():
        lp = sampled_logprobs(model, pack(rows, [c.token_ids for c in comps], tok.pad_token_id), temperature)
    for i, c in enumerate(comps):
        assert torch.allclose(lp[i, :len(c.logprobs)], torch.tensor(c.logprobs), atol=1e-4)


def test_seeded_generation_is_reproducible_and_seed_param_leaves_stream(policy):
    model, tok = policy
    params = SamplingParams(n=2, max_new_tokens=6)
    a = HFEngine(model, tok, seed=7)
    b = HFEngine(model, tok, seed=7)
    b.generate(PROMPTS, params, seed=123)  # an evaluation with its own seed
    assert [c.token_ids for g in a.generate(PROMPTS, params) for c in g] == \
           [c.token_ids for g in b.generate(PROMPTS, params) for c in g]
    state = a.state_dict()
    x = a.generate(PROMPTS, params)
    a.load_state_dict(state)
    assert [c.token_ids for g in x for c in g] == [c.token_ids for g in a.generate(PROMPTS, params) for c in g]


def test_batched_greedy_equals_one_at_a_time(policy):
    """Left padding and dropping finished rows do not change what each prompt decodes."""
    model, tok = policy
    engine = HFEngine(model, tok)
    greedy = SamplingParams(n=1, max_new_tokens=10, temperature=0.0)
    batched = [g[0].token_ids for g in engine.generate(PROMPTS, greedy)]
    single = [engine.generate([p], greedy)[0][0].token_ids for p in PROMPTS]
    assert batched == single


def test_ignore_eos_generates_exact_length(policy):
    model, tok = policy
    out = HFEngine(model, tok).generate(PROMPTS[:1], SamplingParams(n=4, max_new_tokens=7, ignore_eos=True))
    assert all(len(c.token_ids) == 7 and c.finish_reason == "length" for c in out[0])


def test_filter_logits_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    # top_p 0.7: 0.5 < 0.7 keeps the second token (mass before it 0.5), drops the third (mass before it 0.8)
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.4)).tolist() == [[False, True, True, True]]


def test_grouped_logprobs_and_gradients_equal_flat(policy):
    model, _ = policy
    prompts = [[1, 10, 11, 12], [1, 20, 21]]
    comps = [[30, 31, 32], [33], [40, 41, 42, 43, 44], [45, 46]]
    group_index = [0, 0, 1, 1]
    flat = sampled_logprobs(model, pack([prompts[g] for g in group_index], comps, 0), 0.7)
    grouped = grouped_logprobs(model, pack_grouped(prompts, group_index, comps, 0), 0.7)
    assert torch.allclose(flat, grouped, atol=1e-5)
    flat.sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    grouped.sum().backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(p.grad, ref[n], atol=1e-5), n


def test_chunking_does_not_change_logprobs(policy):
    model, _ = policy
    batch = pack([[1, 10, 11], [1, 12]], [[30, 31, 32, 33], [40, 41]], 0)
    whole = sampled_logprobs(model, batch, 1.0, chunk_tokens=1024)
    tiny_chunks = sampled_logprobs(model, batch, 1.0, chunk_tokens=2)
    assert torch.allclose(whole, tiny_chunks, atol=1e-6)
    assert (whole[1, 2:] == 0).all()  # padding positions are 0


def test_reference_is_base_model_with_adapters_off(policy, tiny_model_dir):
    model, _ = policy
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    batch = pack([[1, 10, 11]], [[30, 31, 32]], 0)
    with torch.no_grad(), model.disable_adapter():
        ref = sampled_logprobs(model, batch)
    with torch.no_grad():
        expected = sampled_logprobs(base, batch)
        on = sampled_logprobs(model, batch)
    assert torch.allclose(ref, expected, atol=1e-6)
    assert not torch.allclose(on, expected, atol=1e-4)


def test_inverse_cdf_sampler_matches_the_distribution_and_skips_zero_mass():
    import torch
    from grpo.engines.hf import _inverse_cdf_sample

    g = torch.Generator().manual_seed(0)
    probs = torch.tensor([[0.0, 0.2, 0.0, 0.5, 0.3, 0.0]]).repeat(100_000, 1)
    tokens = _inverse_cdf_sample(probs, g)
    freq = torch.bincount(tokens, minlength=6).float() / len(tokens)
    assert freq[[0, 2, 5]].sum() == 0  # zero-probability tokens are never drawn
    assert torch.allclose(freq, probs[0], atol=0.01)  # 4 sigma of a 100k-sample frequency is < 0.007


SHARED = [1] + list(range(40, 60))  # a 21-token common prefix (a system message, a few-shot example)
SHARED_PROMPTS = [SHARED + [10, 11, 12], SHARED + [20], SHARED + [30, 31, 32, 33, 34], SHARED[:-1] + [25]]


def _record_inputs(model):
    """Shapes of the engine's cached forwards (prefill and decode), through the backbone it calls
    (a float32 CPU model: the backbone and the prepared head), not the fast-head check's."""
    from grpo.logprobs import split_head

    seen = []
    module = split_head(model)[0]
    forward = module.forward

    def spy(*args, **kwargs):
        if kwargs.get("use_cache"):
            seen.append(tuple(kwargs["input_ids"].shape))
        return forward(*args, **kwargs)
    module.forward = spy
    return seen


def test_common_prefix_is_encoded_once_and_decodes_as_without_sharing(policy):
    """Prompts sharing a long prefix: the prefix is prefilled once (one row), each prompt's
    suffix on top of it, and every prompt decodes the same tokens with the same log-probs as
    when it is generated alone (no sharing possible)."""
    model, tok = policy
    engine = HFEngine(model, tok)
    seen = _record_inputs(model)
    greedy = SamplingParams(n=2, max_new_tokens=8, temperature=0.0)
    batched = engine.generate(SHARED_PROMPTS, greedy)
    assert seen[0] == (1, len(SHARED) - 1)  # the prefix common to all four, once
    assert seen[1] == (4, 6)  # the suffixes: the longest is 6 tokens
    seen.clear()
    single = [engine.generate([p], greedy)[0] for p in SHARED_PROMPTS]
    assert seen[0] == (1, len(SHARED_PROMPTS[0]))  # one prompt: nothing to share, one prefill
    for g, s in zip(batched, single):
        for c in g:
            assert c.token_ids == s[0].token_ids
            assert torch.allclose(torch.tensor(c.logprobs), torch.tensor(s[0].logprobs), atol=1e-5)


def test_shared_prefix_sampling_matches_trainer_logprobs_and_per_prompt_streams(policy):
    """Sampled with per-prompt streams: each prompt's tokens do not depend on its batch, and the
    engine's log-probs equal a full forward's (the trainer's definition)."""
    model, tok = policy
    engine = HFEngine(model, tok)
    params = SamplingParams(n=3, max_new_tokens=8, temperature=1.0)
    seeds = [11, 12, 13, 14]
    together = engine.generate(SHARED_PROMPTS, params, prompt_seeds=seeds)
    for i, p in enumerate(SHARED_PROMPTS):
        alone = engine.generate([p], params, prompt_seeds=[seeds[i]])[0]
        assert [c.token_ids for c in alone] == [c.token_ids for c in together[i]]
    assert_engine_logprobs_match_trainer(model, tok, SHARED_PROMPTS, together, 1.0)


def test_a_prompt_that_is_the_common_prefix_keeps_one_token_to_start_from(policy):
    model, tok = policy
    engine = HFEngine(model, tok)
    seen = _record_inputs(model)
    greedy = SamplingParams(n=1, max_new_tokens=4, temperature=0.0)
    out = engine.generate([SHARED, SHARED + [7, 8]], greedy)
    assert seen[0] == (1, len(SHARED) - 1) and seen[1] == (2, 3)
    assert out[0][0].token_ids == engine.generate([SHARED], greedy)[0][0].token_ids


def test_bf16_engine_samples_from_the_trainers_float32_logits(tiny_model_dir):
    """Under a bf16 model the engine samples from the float32 head the trainer scores with: its
    log-probs equal the trainer's to float rounding, where the model's own bf16 logits (the
    engine's old path, float32_head=False) are off by their rounding."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        model.model.norm.weight.mul_(6.0)  # logits of a few units (bf16 rounds them by ~0.01), not one-hot
        # Each layer adds exact zeros, so the hidden state is the embedding on every path: a bf16
        # backbone's one-row decode and full forward round differently on some CPUs (0.013 apart in
        # log-prob on an AVX2-only EPYC, whose bf16 matmuls have no hardware path), and this test is
        # about the head the engine samples from, not about the backbone.
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    model = add_lora(model.to(torch.bfloat16), 4, 8, 0.0, ["q_proj", "v_proj"])
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    params = SamplingParams(n=4, max_new_tokens=8, temperature=1.0)
    errors = {}
    for float32_head in (True, False):
        engine = HFEngine(model, tok, seed=5, float32_head=float32_head)
        groups = engine.generate(PROMPTS, params)
        assert (engine._head is not None) is float32_head and engine._logits is None  # copy dropped after
        rows = [p for p, g in zip(PROMPTS, groups) for _ in g]
        comps = [c for g in groups for c in g]
        with torch.no_grad():
            lp = sampled_logprobs(model, pack(rows, [c.token_ids for c in comps], tok.pad_token_id), 1.0)
        errors[float32_head] = max(float((lp[i, :len(c.logprobs)] - torch.tensor(c.logprobs)).abs().max())
                                   for i, c in enumerate(comps))
    assert errors[True] < 1e-4, errors
    assert errors[False] > 1e-3, errors  # what the float32 head removes


def test_plus_greedy_rows_equal_separate_sampled_and_greedy_calls(policy):
    """``plus_greedy``: one greedy row per prompt decoded in the sampled rows' batch. The sampled
    rows draw what they draw without it (the greedy rows take no random numbers), the greedy row
    is what a greedy call returns, and every log-prob is the trainer's."""
    model, tok = policy
    engine = HFEngine(model, tok)
    params = SamplingParams(n=3, max_new_tokens=8, temperature=0.8)
    seeds = [21, 22, 23, 24]
    merged = engine.generate(SHARED_PROMPTS, replace(params, plus_greedy=True), prompt_seeds=seeds)
    sampled = engine.generate(SHARED_PROMPTS, params, prompt_seeds=seeds)
    greedy = engine.generate(SHARED_PROMPTS, SamplingParams(n=1, max_new_tokens=8, temperature=0.0))
    assert all(len(g) == 4 for g in merged)
    assert [[c.token_ids for c in g[:3]] for g in merged] == [[c.token_ids for c in g] for g in sampled]
    assert [g[3].token_ids for g in merged] == [g[0].token_ids for g in greedy]
    assert len({tuple(c.token_ids) for g in merged for c in g}) > 4  # the rows really differ
    assert_engine_logprobs_match_trainer(model, tok, SHARED_PROMPTS, [g[:3] for g in merged], 0.8)
    assert_engine_logprobs_match_trainer(model, tok, SHARED_PROMPTS, [g[3:] for g in merged], 1.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        engine.generate(SHARED_PROMPTS, SamplingParams(n=2, temperature=0.0, plus_greedy=True))


def test_evaluate_decodes_greedy_rows_with_the_samples_and_reports_the_same(policy):
    """evaluate() asks the HF engine once (sampled + greedy rows in one decode) and reports what
    the two separate calls an engine without ``samples_greedy_alongside`` gets report."""
    from grpo.evaluate import evaluate
    from grpo.rewards import RewardRunner

    model, tok = policy

    class Separate:  # the same engine, without the capability
        def __init__(self, engine):
            self.engine, self.calls = engine, []

        def generate(self, prompts, params, **kw):
            self.calls.append(params)
            return self.engine.generate(prompts, params, **kw)

    class Merged(Separate):
        samples_greedy_alongside = True

    rows = [{"prompt": p, "answer": "7", "verifiers": {"math": 1.0}} for p in SHARED_PROMPTS]
    results = {}
    with RewardRunner(workers=1) as rewards:
        for cls in (Merged, Separate):
            engine = cls(HFEngine(model, tok))
            results[cls] = evaluate(engine, list, rows, rewards, n=3, temperature=1.0, max_new_tokens=6, ks=(1, 3))
            assert [p.plus_greedy for p in engine.calls] == ([True] if cls is Merged else [False, False])
    merged, separate = results[Merged], results[Separate]
    assert merged.metrics == separate.metrics and "heldout/greedy_accuracy" in merged.metrics
    assert [(s["mode"], s["problem"], s["sample"], s["completion"]) for s in merged.samples] == \
           [(s["mode"], s["problem"], s["sample"], s["completion"]) for s in separate.samples]
    assert sum(s["mode"] == "greedy" for s in merged.samples) == len(rows)
