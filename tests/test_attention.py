"""model.attention_dtype: float32 attention under a bf16 base, the same in engine and trainer."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo.attention import FLOAT32_ATTENTION, apply_attention_dtype, wants_float32
from grpo.engines.base import SamplingParams
from grpo.engines.hf import HFEngine
from grpo.errors import UserError
from grpo.logprobs import grouped_logprobs, pack, pack_grouped, sampled_logprobs, set_update_mode
from grpo.models import add_lora
from grpo.packing import pack_tree, tree_logprobs

PROMPTS = [[1, 10, 11, 12, 13], [1, 20], [1, 30, 31]]
GROUP_INDEX = [0, 0, 1, 2, 2, 2]
COMPLETIONS = [[40, 41], [50, 51, 52, 53, 54, 55, 56], [60], [70, 71, 72], [80, 81, 82, 83, 84], [90]]


def _policy(model_dir, dtype, attention="model"):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    apply_attention_dtype(base, attention, "cpu")
    model = add_lora(base, 4, 8, 0.0, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    for name, p in model.named_parameters():
        if "lora_B" in name:  # non-zero adapters: lora_A gets gradient too
            torch.nn.init.normal_(p, std=0.2)
    set_update_mode(model)
    return model


def _run(model, path, checkpoint=False):
    if path == "grouped":
        lp = grouped_logprobs(model, pack_grouped(PROMPTS, GROUP_INDEX, COMPLETIONS, 0), 0.8,
                              checkpoint_layers=checkpoint)
    elif path == "packed":
        lp = tree_logprobs(model, pack_tree(PROMPTS, GROUP_INDEX, COMPLETIONS, 0), 0.8, checkpoint_layers=checkpoint)
    else:
        lp = sampled_logprobs(model, pack([PROMPTS[g] for g in GROUP_INDEX], COMPLETIONS, 0), 0.8,
                              checkpoint_layers=checkpoint)
    loss = (lp * torch.linspace(-1.0, 1.0, lp.numel()).view_as(lp)).sum()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(loss, list(params.values()))
    return lp.detach(), dict(zip(params, grads))


def test_the_choice():
    bf16, fp32 = torch.bfloat16, torch.float32
    assert wants_float32("auto", "cpu", bf16) is True
    assert wants_float32("auto", "cpu", torch.float16) is True
    assert wants_float32("auto", "cuda", bf16) is False  # bf16 flash/SDPA kernels are fast there
    assert wants_float32("auto", "cuda:1", bf16) is False
    assert wants_float32("float32", "cuda", bf16) is True
    assert wants_float32("model", "cpu", bf16) is False
    # float32 weights: on CPU installed for its grouped-query path (no repeat_kv copies); on CUDA left alone
    assert wants_float32("auto", "cpu", fp32) is True and wants_float32("float32", "cpu", fp32) is True
    assert wants_float32("model", "cpu", fp32) is False
    assert wants_float32("auto", "cuda", fp32) is False and wants_float32("float32", "cuda", fp32) is False
    with pytest.raises(UserError, match="attention_dtype"):
        wants_float32("fp32", "cpu", bf16)


def test_applied_only_to_sdpa_and_eager(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    assert model.config._attn_implementation == "sdpa"
    assert apply_attention_dtype(model, "model", "cpu") == "sdpa"
    assert apply_attention_dtype(model, "auto", "cpu") == FLOAT32_ATTENTION
    model.config._attn_implementation = "flash_attention_2"
    assert apply_attention_dtype(model, "float32", "cpu") == "flash_attention_2"  # left as it is


def test_config_key():
    from grpo.config import load_config

    assert load_config(None).model.attention_dtype == "auto"
    assert load_config(None, ["model.attention_dtype=float32"]).model.attention_dtype == "float32"
    with pytest.raises(UserError, match="model.attention_dtype"):
        load_config(None, ["model.attention_dtype=fp16"])


@pytest.mark.parametrize("path", ["grouped", "packed", "flat"])
def test_float32_attention_is_closer_to_the_fp32_model(tiny_model_dir, path):
    exact, _ = _run(_policy(tiny_model_dir, torch.float32), path)
    lp_bf16, _ = _run(_policy(tiny_model_dir, torch.bfloat16, "model"), path)
    lp_f32att, _ = _run(_policy(tiny_model_dir, torch.bfloat16, "float32"), path)
    err_bf16 = (lp_bf16 - exact).abs().mean()
    err_f32att = (lp_f32att - exact).abs().mean()
    assert not torch.equal(lp_bf16, lp_f32att)  # the function really ran
    assert err_f32att < err_bf16


@pytest.mark.parametrize("path", ["grouped", "packed"])
def test_gradients_flow_and_match_with_checkpointing(tiny_model_dir, path):
    """LoRA gradients through the float32 attention: the same with checkpointing on the grouped
    (shared-prompt cache) and packed (explicit 4-D bias) paths as on the plain flat path."""
    model = _policy(tiny_model_dir, torch.bfloat16, "float32")
    assert model.config._attn_implementation == FLOAT32_ATTENTION
    lp_ref, g_ref = _run(model, "flat")
    lp, g = _run(model, path, checkpoint=True)
    torch.testing.assert_close(lp, lp_ref, rtol=0, atol=2e-2)  # bf16 base: different op orders
    _, g_exact = _run(_policy(tiny_model_dir, torch.float32), "flat")  # the all-float32 model
    for name in g_ref:
        assert (g[name] - g_ref[name]).norm() / g_ref[name].norm() < 5e-2, name
        # a cast that cut the graph would zero the q/k/v adapters' gradients (error 1.0); measured ~0.04
        assert (g[name] - g_exact[name]).norm() / g_exact[name].norm() < 0.1, name


def test_engine_logprobs_equal_the_trainers(tiny_model_dir):
    model = _policy(tiny_model_dir, torch.bfloat16, "float32")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [[1, 10, 11, 12], [1, 20, 21]]
    out = HFEngine(model, tok, seed=0).generate(prompts, SamplingParams(n=2, max_new_tokens=5, ignore_eos=True))
    assert model.config._attn_implementation == FLOAT32_ATTENTION
    comps = [c for g in out for c in g]
    lp = sampled_logprobs(model, pack([prompts[i // 2] for i in range(4)], [c.token_ids for c in comps],
                                      tok.pad_token_id))
    engine_lp = torch.tensor([c.logprobs for c in comps])
    assert (lp.detach() - engine_lp).abs().max() < 1e-2  # the bound of the bf16-attention test


def reference_float32_attention(module, query, key, value, attention_mask, **kwargs):
    """The function before grouped-query SDPA: transformers' own (``repeat_kv`` copies) on upcast tensors."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)
    return out.to(query.dtype), weights


@pytest.fixture()
def reference_attention():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ALL_ATTENTION_FUNCTIONS.register("sdpa_float32_reference", reference_float32_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register("sdpa_float32_reference", sdpa_mask)
    return "sdpa_float32_reference"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("path", ["grouped", "packed", "flat"])
def test_grouped_query_sdpa_equals_repeated_keys(tiny_model_dir, reference_attention, path, dtype):
    """The tiny model has 4 query heads over 2 key/value heads: log-probs bit-identical to
    transformers' repeat_kv path on every update path (causal prefill, shared-prompt cache,
    packed 4-D float bias), gradients equal to float rounding. Under float32 weights the
    reference is transformers' stock SDPA, what ``model.attention_dtype: model`` runs."""
    model = _policy(tiny_model_dir, dtype, "auto")
    assert model.config._attn_implementation == FLOAT32_ATTENTION
    assert model.base_model.model.model.layers[0].self_attn.num_key_value_groups == 2
    lp, g = _run(model, path)
    model.config._attn_implementation = reference_attention if dtype == torch.bfloat16 else "sdpa"
    lp_ref, g_ref = _run(model, path)
    assert torch.equal(lp, lp_ref)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_engine_with_grouped_query_sdpa_samples_as_with_repeated_keys(tiny_model_dir, reference_attention, dtype):
    from grpo.engines.base import stream_seed

    model = _policy(tiny_model_dir, dtype, "auto")
    assert model.config._attn_implementation == FLOAT32_ATTENTION
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    params = SamplingParams(n=4, max_new_tokens=10)
    seeds = [stream_seed(3, 0, i) for i in range(len(PROMPTS))]

    def sample():
        out = HFEngine(model, tok).generate(PROMPTS, params, prompt_seeds=seeds)
        return [(c.token_ids, c.logprobs) for g in out for c in g]
    new = sample()
    model.config._attn_implementation = reference_attention if dtype == torch.bfloat16 else "sdpa"
    assert sample() == new  # same tokens, bit-identical log-probs (rows stop at different steps)
    assert len({len(t) for t, _ in new}) > 1
