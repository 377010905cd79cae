"""The engine's reserved KV cache (grpo/kv_cache.py) holds what transformers' DynamicLayer holds,
and generation through it samples the same tokens with the same log-probs."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicLayer

from grpo.attention import apply_attention_dtype
from grpo.engines.base import SamplingParams, stream_seed
from grpo.engines.hf import HFEngine
from grpo.fused_lora import use_fused_lora
from grpo.kv_cache import reserved_cache, reserved_layer_class
from grpo.models import add_lora

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _states(batch, length, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 2, length, 8, generator=g, dtype=torch.float32).bfloat16(),
            torch.randn(batch, 2, length, 8, generator=g, dtype=torch.float32).bfloat16())


@pytest.mark.parametrize("dtype", [None, torch.float32])
def test_reserved_layer_holds_what_dynamic_layer_holds(dtype):
    """Prefill, repeat per sample, decode past the reserved capacity (it grows), drop rows,
    crop: after every operation the same keys and values (cast to the storage dtype)."""
    ours, theirs = reserved_layer_class()(capacity=6, dtype=dtype), DynamicLayer()

    def same(returned=None):
        assert ours.get_seq_length() == theirs.get_seq_length()
        assert ours.keys.dtype == (dtype or torch.bfloat16)
        assert torch.equal(ours.keys, theirs.keys.to(ours.keys.dtype))
        assert torch.equal(ours.values, theirs.values.to(ours.values.dtype))
        if returned is not None:
            assert torch.equal(returned[0], ours.keys) and torch.equal(returned[1], ours.values)

    k, v = _states(2, 4, 0)
    theirs.update(k, v)
    same(ours.update(k, v))
    ours.batch_repeat_interleave(3)
    theirs.batch_repeat_interleave(3)
    same()
    for step in range(5):  # 4 + 5 positions > capacity 6: the buffers grow
        k, v = _states(6, 1, step + 1)
        theirs.update(k, v)
        same(ours.update(k, v))
    keep = torch.tensor([0, 2, 5])
    ours.batch_select_indices(keep)
    theirs.batch_select_indices(keep)
    same()
    k, v = _states(3, 1, 9)
    theirs.update(k, v)
    same(ours.update(k, v))
    ours.crop(-2)
    theirs.crop(-2)
    same()
    assert ours.capacity >= ours.get_seq_length() == 8


def test_reserved_layer_grows_by_doubling_up_to_its_limit():
    layer = reserved_layer_class()(capacity=3, dtype=None, limit=10)
    sizes = []
    for step in range(12):
        layer.update(*_states(1, 1, step))
        sizes.append(layer.capacity)
    assert sizes == [3, 3, 3, 6, 6, 6, 10, 10, 10, 10, 11, 12]  # doubled, capped at 10, then as needed
    assert layer.get_seq_length() == 12


def test_reserved_cache_only_for_plain_full_attention(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cache = reserved_cache(model, 40)
    assert cache is not None and all(isinstance(layer, reserved_layer_class()) for layer in cache.layers)
    assert cache.layers[0].storage_dtype is None  # float32 model, stock attention: the keys' own dtype
    sliding = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1)
    sliding.layer_types = ["sliding_attention", "full_attention"]
    sliding.sliding_window = 8
    assert reserved_cache(LlamaForCausalLM(sliding), 40) is None  # transformers' own cache


def _policy(model_dir, dtype):
    torch.manual_seed(0)
    model = add_lora(AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype), 4, 8, 0.0, TARGETS)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    use_fused_lora(model)
    apply_attention_dtype(model, "auto", "cpu")  # bf16 on CPU: float32 attention, hence a float32 cache
    return model, AutoTokenizer.from_pretrained(model_dir)


@pytest.mark.parametrize("reserve", [128, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_samples_the_same_through_the_reserved_cache(tiny_model_dir, dtype, reserve, monkeypatch):
    """Whole generations (a shared prompt prefix, rows stopping at different steps, the cache
    growing past its first reservation) through the reserved cache and through transformers' own:
    the same tokens, bit-identical log-probs."""
    import grpo.engines.hf as hf

    monkeypatch.setattr(hf, "RESERVE_TOKENS", reserve)
    model, tok = _policy(tiny_model_dir, dtype)
    if dtype == torch.bfloat16:
        assert reserved_cache(model, 8).layers[0].storage_dtype == torch.float32
    shared = list(range(10, 30))  # a common prefix of 20 tokens: the prefix-once prefill path
    prompts = [[1, *shared, 40, 41], [1, *shared, 50], [1, *shared, 60, 61, 62]]
    params = SamplingParams(n=4, max_new_tokens=14)
    seeds = [stream_seed(3, 0, i) for i in range(len(prompts))]
    outs = []
    for reserved in (True, False):
        engine = HFEngine(model, tok, seed=0, reserved_kv=reserved)
        out = engine.generate(prompts, params, prompt_seeds=seeds)
        outs.append([(c.token_ids, c.logprobs) for g in out for c in g])
    assert outs[0] == outs[1]
    assert len({len(t) for t, _ in outs[0]}) > 1  # some rows stopped early: the row-dropping path ran
