"""model.lora_kernel: the fused LoRA forward computes peft's function, falls back to peft where it must."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from grpo.errors import UserError
from grpo.fused_lora import fused_lora_forward, use_fused_lora
from grpo.logprobs import grouped_logprobs, pack_grouped, set_update_mode
from grpo.models import add_lora

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = [[1, 10, 11, 12, 13], [1, 20]]
GROUP_INDEX = [0, 0, 1]
COMPLETIONS = [[40, 41, 42], [50, 51, 52, 53, 54], [60]]


def _policy(model_dir, dtype=torch.float32, dropout=0.0):
    torch.manual_seed(0)
    model = add_lora(AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype), 4, 8, dropout, TARGETS)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # non-zero adapters, so that lora_A gets a gradient too
            torch.nn.init.normal_(p, std=0.2)
    set_update_mode(model)
    return model


def _fused_policy_for_decode(model_dir, dtype):
    """(fused-LoRA policy, tokenizer); skips a bf16 case where oneDNN has no bf16 path."""
    from transformers import AutoTokenizer

    if dtype == torch.bfloat16 and not (torch.backends.mkldnn.is_available()
                                        and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        pytest.skip("oneDNN has no bf16 path on this CPU")
    model = _policy(model_dir, dtype)
    use_fused_lora(model, "fused")
    return model, AutoTokenizer.from_pretrained(model_dir)


def _logprobs_and_grads(model):
    batch = pack_grouped(PROMPTS, GROUP_INDEX, COMPLETIONS, 0)
    lp = grouped_logprobs(model, batch, 0.8)
    lp.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return lp.detach(), grads


def _fused_count(model):
    return sum(m.__dict__.get("forward") is not None for m in model.modules())


def test_fused_equals_peft_in_float32(tiny_model_dir):
    model = _policy(tiny_model_dir)
    lp_peft, g_peft = _logprobs_and_grads(model)
    assert use_fused_lora(model, "fused") == 2 * len(TARGETS)  # every LoRA linear of the 2-layer model
    lp_fused, g_fused = _logprobs_and_grads(model)
    torch.testing.assert_close(lp_fused, lp_peft, rtol=1e-5, atol=1e-5)
    assert g_fused.keys() == g_peft.keys() and len(g_peft) == 4 * len(TARGETS)  # A and B of every layer
    for name in g_peft:
        torch.testing.assert_close(g_fused[name], g_peft[name], rtol=1e-4, atol=1e-5)
    assert all(g.dtype == torch.float32 for g in g_fused.values())


def test_fused_under_bf16_base_stays_close_to_peft(tiny_model_dir):
    """LoRA matmuls in the base's bf16 from float32 masters (as autocast): log-probs within bf16
    rounding of peft's float32 LoRA path, gradients float32 and close in direction."""
    model = _policy(tiny_model_dir, torch.bfloat16)
    lp_peft, g_peft = _logprobs_and_grads(model)
    use_fused_lora(model)
    lp_fused, g_fused = _logprobs_and_grads(model)
    assert (lp_fused - lp_peft).abs().max() < 0.05
    for name in g_peft:
        assert g_fused[name].dtype == torch.float32
        cos = torch.nn.functional.cosine_similarity(g_fused[name].flatten(), g_peft[name].flatten(), dim=0)
        assert cos > 0.99, name
    assert any(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)


def test_disabled_adapters_and_peft_kernel_fall_back(tiny_model_dir):
    model = _policy(tiny_model_dir)
    batch = pack_grouped(PROMPTS, GROUP_INDEX, COMPLETIONS, 0)
    with torch.no_grad(), model.disable_adapter():
        ref_peft = grouped_logprobs(model, batch)
    with torch.no_grad():
        policy = grouped_logprobs(model, batch)
    use_fused_lora(model)
    with torch.no_grad(), model.disable_adapter():  # the reference pass: the base model, bit for bit
        assert torch.equal(grouped_logprobs(model, batch), ref_peft)
    with torch.no_grad():
        assert not torch.equal(grouped_logprobs(model, batch), ref_peft)  # adapters on again
    assert use_fused_lora(model, "peft") == 0 and _fused_count(model) == 0
    with torch.no_grad():
        assert torch.equal(grouped_logprobs(model, batch), policy)  # peft's forward is back
    with pytest.raises(UserError, match="model.lora_kernel"):
        use_fused_lora(model, "triton")


def test_merged_and_multi_adapter_layers_take_peft_forward(tiny_model_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False)
    model = get_peft_model(base, LoraConfig(**cfg), adapter_name="first")
    model.add_adapter("second", LoraConfig(**cfg))
    layer = next(m for n, m in model.named_modules() if n.endswith("q_proj") and hasattr(m, "lora_A"))
    x = torch.randn(2, 3, layer.in_features)
    with torch.no_grad():
        for active in (["first"], ["second"], ["first", "second"]):
            layer.set_adapter(active)
            assert torch.allclose(fused_lora_forward(layer, x), type(layer).forward(layer, x), atol=1e-5)
        layer.set_adapter(["first"])
        layer.merge()
        assert torch.equal(fused_lora_forward(layer, x), type(layer).forward(layer, x))


def test_dora_layer_takes_peft_forward(tiny_model_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True,
                                            init_lora_weights=False))
    layer = next(m for n, m in model.named_modules() if n.endswith("q_proj") and hasattr(m, "lora_A"))
    x = torch.randn(2, 3, layer.in_features)
    with torch.no_grad():
        assert torch.equal(fused_lora_forward(layer, x), type(layer).forward(layer, x))


def test_lora_dropout_applies_and_replays(tiny_model_dir):
    """With lora_dropout the fused path draws masks from the global RNG like peft: the same seed
    gives the same output, another seed another one, and no dropout differs from both."""
    model = _policy(tiny_model_dir, dropout=0.5)
    use_fused_lora(model)
    batch = pack_grouped(PROMPTS, GROUP_INDEX, COMPLETIONS, 0)

    def run(seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            return grouped_logprobs(model, batch)

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def _base_calls(model):
    """Count the calls of every LoRA layer's base ``nn.Linear`` (its own forward, i.e. F.linear)."""
    calls = []
    for m in model.modules():
        if hasattr(m, "base_layer") and isinstance(m.base_layer, torch.nn.Linear):
            m.base_layer.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_base_weights_decode_the_same_and_only_without_gradients(tiny_model_dir, dtype):
    """rollout.packed_weights: the HF engine decodes through the base weights' packed copies in
    their own dtype (no F.linear call of a base layer), with the tokens and log-probs of the plain
    path; anything recording gradients inside the same context still runs the base layers."""
    from grpo.engines.base import SamplingParams
    from grpo.engines.hf import HFEngine
    from grpo.fused_lora import cached_lora_casts

    model, tok = _fused_policy_for_decode(tiny_model_dir, dtype)
    calls = _base_calls(model)
    params = SamplingParams(n=3, max_new_tokens=6, temperature=1.0)
    out = {}
    for packed in (False, True):
        calls.clear()
        out[packed] = HFEngine(model, tok, packed_weights=packed).generate(PROMPTS, params, prompt_seeds=[1, 2])
        assert (len(calls) == 0) == packed
    for g_plain, g_packed in zip(out[False], out[True]):
        for a, b in zip(g_plain, g_packed):
            assert a.token_ids == b.token_ids
            torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(a.logprobs), rtol=0, atol=1e-4)
    calls.clear()
    with cached_lora_casts(model, packed_base=True):
        _logprobs_and_grads(model)  # a training pass: gradients on
    assert len(calls) > 0


@pytest.mark.parametrize("packed", [False, True])
def test_merged_weights_decode_the_same_and_only_without_gradients(tiny_model_dir, packed, monkeypatch):
    """rollout.merged_weights: the HF engine decodes through one float32 copy of W + s B A per
    layer (neither the base layer nor the adapter runs), with the plain path's tokens and
    log-probs to float rounding; a pass recording gradients inside the context runs both."""
    from grpo.engines.base import SamplingParams
    from grpo.engines.hf import HFEngine
    from grpo.fused_lora import cached_lora_casts
    from transformers import AutoTokenizer

    model = _policy(tiny_model_dir)
    use_fused_lora(model, "fused")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    from grpo import fused_lora

    base_calls, lora_calls = _base_calls(model), []
    cached_casts = fused_lora._cached_casts  # every no-grad adapter product fetches its casts here

    def counted(*args):
        lora_calls.append(1)
        return cached_casts(*args)

    monkeypatch.setattr(fused_lora, "_cached_casts", counted)
    params = SamplingParams(n=3, max_new_tokens=6, temperature=1.0)
    out = {}
    for merged in (False, True):
        base_calls.clear(), lora_calls.clear()
        engine = HFEngine(model, tok, packed_weights=packed, merged_weights=merged)
        out[merged] = engine.generate(PROMPTS, params, prompt_seeds=[1, 2])
        assert (len(lora_calls) == 0) == merged and (len(base_calls) == 0) == (merged or packed)
    for g_plain, g_merged in zip(out[False], out[True]):
        for a, b in zip(g_plain, g_merged):
            assert a.token_ids == b.token_ids
            torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(a.logprobs), rtol=0, atol=1e-4)
    base_calls.clear()
    with cached_lora_casts(model, packed_base=packed, merged=True):
        _logprobs_and_grads(model)  # a training pass: gradients on
    assert len(base_calls) > 0


def test_merged_copy_is_kept_until_the_adapter_changes(tiny_model_dir):
    """The merged copy is made once and served until the base, A, B or the scale changes (an
    optimizer step, ``load_state_dict``, a replaced ``.data``); then the next call sees exactly
    the new adapter. The copy outlives the context (made once per step, not per generation)."""
    from grpo.fused_lora import _MERGED_COPY, cached_lora_casts, fused_layers

    model = _policy(tiny_model_dir)
    use_fused_lora(model, "fused")
    model.eval()
    layer = fused_layers(model)[0]
    name = layer.active_adapters[0]
    x = torch.randn(3, layer.in_features)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    opt = torch.optim.SGD(lora, lr=0.5)

    def plain():  # the unmerged product, outside the context
        with torch.no_grad():
            return layer(x)

    def merged():
        with torch.no_grad(), cached_lora_casts(model, merged=True):
            return layer(x)

    first = merged()
    copy = layer.__dict__[_MERGED_COPY]
    torch.testing.assert_close(first, plain(), rtol=1e-5, atol=1e-5)
    merged()
    assert layer.__dict__[_MERGED_COPY] is copy  # served, not made again
    model(input_ids=torch.tensor([[1, 10, 11]])).logits.pow(2).mean().backward()
    opt.step()
    stepped = merged()
    assert layer.__dict__[_MERGED_COPY] is not copy
    assert not torch.allclose(stepped, first)
    torch.testing.assert_close(stepped, plain(), rtol=1e-5, atol=1e-5)
    layer.lora_B[name].weight.data = torch.zeros_like(layer.lora_B[name].weight)  # new storage, no version bump
    torch.testing.assert_close(merged(), torch.nn.functional.linear(x, layer.base_layer.weight, layer.base_layer.bias),
                               rtol=1e-6, atol=1e-6)
    layer.lora_B[name].weight.data.fill_(0.1)
    filled = merged()
    torch.testing.assert_close(filled, plain(), rtol=1e-5, atol=1e-5)
    layer.scaling[name] *= 2  # a new scale alone: made again too
    assert not torch.allclose(merged(), filled)
    torch.testing.assert_close(merged(), plain(), rtol=1e-5, atol=1e-5)


def test_merged_weights_leave_dropout_in_training_mode_to_the_adapter(tiny_model_dir):
    """A model left in training mode with LoRA dropout keeps the stochastic adapter path (a merged
    weight cannot drop the adapter's inputs); in eval mode dropout is off and the copy applies."""
    from grpo.fused_lora import _MERGED_COPY, cached_lora_casts, fused_layers

    model = _policy(tiny_model_dir, dropout=0.5)
    use_fused_lora(model, "fused")
    layer = fused_layers(model)[0]
    x = torch.randn(4, layer.in_features)
    model.train()
    with torch.no_grad(), cached_lora_casts(model, merged=True):
        torch.manual_seed(1)
        a = layer(x)
        torch.manual_seed(2)
        b = layer(x)
    assert not torch.equal(a, b) and _MERGED_COPY not in layer.__dict__
    model.eval()
    with torch.no_grad(), cached_lora_casts(model, merged=True):
        layer(x)
    assert _MERGED_COPY in layer.__dict__


def test_merged_weights_setting_rules(tiny_model_dir, monkeypatch):
    from grpo import build

    model = _policy(tiny_model_dir)
    assert not build.use_merged_weights("auto", model)  # peft's own forward: nothing to merge into
    use_fused_lora(model, "fused")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # unlike packed_weights, it pays at one thread too
        assert build.use_merged_weights("auto", model) and build.use_merged_weights(True, model)
    finally:
        torch.set_num_threads(threads)
    assert not build.use_merged_weights(False, model)
    assert not build.use_merged_weights("auto", model, sharded=True)
    with pytest.raises(UserError, match="rollout.merged_weights=true .*FSDP2"):
        build.use_merged_weights(True, model, sharded=True)
    monkeypatch.setattr("grpo.memory.mem_available", lambda meminfo="/proc/meminfo": 1000)
    assert not build.use_merged_weights("auto", model) and build.use_merged_weights(True, model)
    bf16 = _policy(tiny_model_dir, dtype=torch.bfloat16)  # rounded to bf16, W + s B A loses the update
    use_fused_lora(bf16, "fused")
    assert not build.use_merged_weights("auto", bf16)
    with pytest.raises(UserError, match="rollout.merged_weights=true needs .*float32 base weights"):
        build.use_merged_weights(True, bf16)
    with model.disable_adapter():  # no plain active adapter: nothing to merge
        assert not build.use_merged_weights("auto", model)


@pytest.fixture()
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_packed_weights_setting_rules(tiny_model_dir, monkeypatch, two_threads):
    from grpo import build

    model = _policy(tiny_model_dir)
    assert not build.use_packed_weights("auto", model)  # peft's own forward: nothing to decode through
    use_fused_lora(model, "fused")
    assert build.use_packed_weights("auto", model) and build.use_packed_weights(True, model)
    assert not build.use_packed_weights(False, model)
    assert not build.use_packed_weights("auto", model, sharded=True)
    with pytest.raises(UserError, match="FSDP2"):
        build.use_packed_weights(True, model, sharded=True)
    torch.set_num_threads(1)  # one thread: MKL is as fast, no copy
    assert not build.use_packed_weights("auto", model) and build.use_packed_weights(True, model)
    torch.set_num_threads(2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # ranks on this machine share MemAvailable
    total = 4 * 10 * sum(p.numel() * 4 for n, p in model.named_parameters() if "base_layer" in n)
    monkeypatch.setattr("grpo.memory.mem_available", lambda meminfo="/proc/meminfo": total + 4096)
    assert build.use_packed_weights("auto", model)  # the copy just fits a tenth of a quarter
    monkeypatch.setattr("grpo.memory.mem_available", lambda meminfo="/proc/meminfo": total - 4096)
    assert not build.use_packed_weights("auto", model)
    monkeypatch.setattr("grpo.memory.mem_available", lambda meminfo="/proc/meminfo": 1000)
    assert not build.use_packed_weights("auto", model) and build.use_packed_weights(True, model)
    monkeypatch.setattr("grpo.memory.mem_available", lambda meminfo="/proc/meminfo": 1 << 40)
    bf16 = _policy(tiny_model_dir, dtype=torch.bfloat16)  # bf16: packed where a timing says it pays
    use_fused_lora(bf16, "fused")
    timed = []
    monkeypatch.setattr("grpo.prepared_linear.packing_pays", lambda w, rows=32: timed.append(w) or True)
    torch.set_num_threads(1)  # unlike float32, at one thread too
    assert build.use_packed_weights("auto", bf16) and build.use_packed_weights(True, bf16)
    largest = max((p for n, p in bf16.named_parameters() if "base_layer.weight" in n), key=lambda p: p.numel())
    assert len(timed) == 1 and timed[0] is largest
    monkeypatch.setattr("grpo.prepared_linear.packing_pays", lambda w, rows=32: False)
    assert not build.use_packed_weights("auto", bf16) and build.use_packed_weights(True, bf16)
    fp16 = _policy(tiny_model_dir, dtype=torch.float16)
    use_fused_lora(fp16, "fused")
    assert not build.use_packed_weights("auto", fp16)
    with pytest.raises(UserError, match="float32 or bfloat16 base weights"):
        build.use_packed_weights(True, fp16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_input_groups_decode_bit_for_bit(tiny_model_dir, dtype, monkeypatch):
    """Decoding through packed weights, a block's q/k/v and gate/up run as one product each
    (grpo.decode_groups): the same tokens and bit-identical log-probs as layer by layer, no
    packed copy of a grouped layer's own base, and each sibling served from its group."""
    from grpo import fused_lora
    from grpo.engines.base import SamplingParams
    from grpo.engines.hf import HFEngine

    model, tok = _fused_policy_for_decode(tiny_model_dir, dtype)
    groups = fused_lora.shared_input_groups(model)
    assert sorted(len(members) for members, _ in groups) == [2, 2, 3, 3]  # 2 blocks: q/k/v and gate/up each
    computed = []
    compute = fused_lora.SharedInputGroup._compute
    monkeypatch.setattr(fused_lora.SharedInputGroup, "_compute", lambda self, x: computed.append(1) or compute(self, x))
    params = SamplingParams(n=3, max_new_tokens=6, temperature=1.0)
    grouped = HFEngine(model, tok, packed_weights=True).generate(PROMPTS, params, prompt_seeds=[1, 2])
    assert computed and all("_grpo_packed_linear" not in m.base_layer.__dict__ and
                            "_grpo_float32_linear" not in m.base_layer.__dict__ for ms, _ in groups for m in ms)
    steps = len(computed) // len(groups)  # forwards that ran: one computation per group and forward
    assert len(computed) == steps * len(groups)
    monkeypatch.setattr(fused_lora, "shared_input_groups", lambda model: [])
    plain = HFEngine(model, tok, packed_weights=True).generate(PROMPTS, params, prompt_seeds=[1, 2])
    assert [[(c.token_ids, c.logprobs) for c in g] for g in grouped] == [[(c.token_ids, c.logprobs) for c in g]
                                                                        for g in plain]


def test_shared_input_group_computes_afresh_for_a_new_or_changed_input(tiny_model_dir):
    """A sibling called with another tensor, or with the same tensor written in place, or after
    its adapter changed inside the context, gets the product of what it is called with."""
    from grpo.fused_lora import cached_lora_casts

    def reference(layer, x):  # the layer's function, computed here from its parts
        return layer.base_layer(x) + layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"]

    model = _policy(tiny_model_dir)
    use_fused_lora(model, "fused")
    attn = model.base_model.model.model.layers[0].self_attn
    q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
    x, y = torch.randn(3, 64), torch.randn(3, 64)
    close = dict(rtol=0, atol=1e-5)
    with torch.no_grad(), cached_lora_casts(model, packed_base=True):
        assert "shared input group" in q.__dict__["_grpo_lora_cast_cache"]
        torch.testing.assert_close(q(x), reference(q, x), **close)
        torch.testing.assert_close(k(y), reference(k, y), **close)  # another input
        torch.testing.assert_close(v(x), reference(v, x), **close)
        q(x)
        x.mul_(2)  # written in place after q read it
        torch.testing.assert_close(k(x), reference(k, x), **close)
        v.lora_B["default"].weight.mul_(3)  # the adapter changes inside the context
        x.add_(1)
        torch.testing.assert_close(v(x), reference(v, x), **close)


def test_shared_input_groups_with_biases_decode_bit_for_bit(tmp_path, monkeypatch):
    """A Qwen2-style block (biases on q/k/v, none on gate/up): the grouped product carries the
    concatenated biases, and generation is bit for bit the per-layer one."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from grpo import fused_lora
    from grpo.engines.base import SamplingParams
    from grpo.engines.hf import HFEngine

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = add_lora(Qwen2ForCausalLM(config), 4, 8, 0.0, TARGETS)
    for name, p in model.named_parameters():
        if "lora_B" in name or name.endswith("bias"):
            torch.nn.init.normal_(p, std=0.2)
    use_fused_lora(model, "fused")
    groups = fused_lora.shared_input_groups(model)
    assert len(groups) == 4 and any(m.base_layer.bias is not None for ms, _ in groups for m in ms)

    class Tok:  # the engine needs ids in and text out only
        eos_token_id, pad_token_id = 1, 0

        def batch_decode(self, ids, skip_special_tokens=True):
            return [" ".join(map(str, row)) for row in ids]
    params = SamplingParams(n=3, max_new_tokens=6, temperature=1.0)
    grouped = HFEngine(model, Tok(), packed_weights=True).generate(PROMPTS, params, prompt_seeds=[1, 2])
    assert all("_grpo_float32_linear" not in m.base_layer.__dict__ for ms, _ in groups for m in ms)  # groups ran
    monkeypatch.setattr(fused_lora, "shared_input_groups", lambda model: [])
    plain = HFEngine(model, Tok(), packed_weights=True).generate(PROMPTS, params, prompt_seeds=[1, 2])
    assert [[(c.token_ids, c.logprobs) for c in g] for g in grouped] == [[(c.token_ids, c.logprobs) for c in g]
                                                                        for g in plain]
