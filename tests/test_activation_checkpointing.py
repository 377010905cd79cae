"""Activation checkpointing (``optim.activation_checkpointing``) on every update path.

Checkpointing recomputes each decoder layer in backward; it must change neither the
log-probs nor the gradients, and on the shared-prompt path the recomputed layers must read
the prompt's keys and values, not append them to the cache a second time.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from grpo.errors import UserError
from grpo.logprobs import (checkpointed_layers, decoder_layers, grouped_logprobs, head_logprobs, pack,
                           pack_grouped, sampled_logprobs, same_dropout, set_update_mode, split_head, use_activation_checkpointing)
from grpo.models import add_lora
from grpo.packing import pack_tree, tree_logprobs
from grpo.prompt_cache import SharedPromptCache

PROMPTS = [[1, 10, 11, 12, 13], [1, 20], [1, 30, 31]]
GROUP_INDEX = [0, 0, 1, 2, 2, 2]
COMPLETIONS = [[40, 41], [50, 51, 52, 53, 54, 55, 56], [60], [70, 71, 72], [80, 81, 82, 83, 84], [90]]


def _policy(model_dir, dropout=0.0, dtype=torch.float32):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model = add_lora(base, 4, 8, dropout, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"])
    for name, p in model.named_parameters():
        if "lora_B" in name:  # non-zero adapters: lora_A gets gradient too
            torch.nn.init.normal_(p, std=0.2)
    set_update_mode(model)
    return model


@pytest.fixture()
def policy(tiny_model_dir):
    return _policy(tiny_model_dir)


def _run(model, path: str, fast_head: bool, on: bool, dropout_seed=None):
    """(log-probs, loss, {lora param: grad}) of one pass on ``path``."""
    with same_dropout(dropout_seed, torch.device("cpu")):
        if path == "grouped":
            lp = grouped_logprobs(model, pack_grouped(PROMPTS, GROUP_INDEX, COMPLETIONS, 0), 0.8,
                                  fast_head=fast_head, checkpoint_layers=on)
        elif path == "packed":
            lp = tree_logprobs(model, pack_tree(PROMPTS, GROUP_INDEX, COMPLETIONS, 0), 0.8,
                               fast_head=fast_head, checkpoint_layers=on)
        else:
            flat = pack([PROMPTS[g] for g in GROUP_INDEX], COMPLETIONS, 0)
            lp = sampled_logprobs(model, flat, 0.8, fast_head=fast_head, checkpoint_layers=on)
    weights = torch.linspace(-1.0, 1.0, lp.numel()).view_as(lp)  # signed, position-dependent: a loss-like sum
    loss = (lp * weights).sum()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(loss, list(params.values()))
    return lp.detach(), loss.detach(), dict(zip(params, grads))


@pytest.mark.parametrize("fast_head", [True, False])
@pytest.mark.parametrize("path", ["grouped", "packed", "flat"])
def test_checkpointing_gives_the_same_loss_and_lora_gradients(policy, path, fast_head):
    lp_off, loss_off, g_off = _run(policy, path, fast_head, on=False)
    lp_on, loss_on, g_on = _run(policy, path, fast_head, on=True)
    assert torch.equal(lp_on, lp_off)  # the forward is the same computation
    assert loss_on == loss_off
    assert len(g_on) == len(g_off) == 2 * 7 * 2  # A and B of 7 targets in 2 layers
    for name in g_off:
        assert g_off[name].abs().sum() > 0, name  # every adapter gets gradient (prompt side included)
        torch.testing.assert_close(g_on[name], g_off[name], rtol=1e-5, atol=1e-7, msg=name)


def test_checkpointing_replays_lora_dropout_masks(tiny_model_dir):
    model = _policy(tiny_model_dir, dropout=0.3)
    lp_off, _, g_off = _run(model, "grouped", True, on=False, dropout_seed=7)
    lp_on, _, g_on = _run(model, "grouped", True, on=True, dropout_seed=7)
    lp_other, _, _ = _run(model, "grouped", True, on=False, dropout_seed=8)
    assert not torch.equal(lp_other, lp_off)  # dropout is really active
    assert torch.equal(lp_on, lp_off)
    for name in g_off:  # a recomputation with fresh masks would give other gradients
        torch.testing.assert_close(g_on[name], g_off[name], rtol=1e-5, atol=1e-7, msg=name)


def test_checkpointing_under_bf16_base_weights(tiny_model_dir):
    model = _policy(tiny_model_dir, dtype=torch.bfloat16)
    assert next(p for n, p in model.named_parameters() if "lora_A" in n).dtype == torch.float32
    lp_off, loss_off, g_off = _run(model, "grouped", True, on=False)
    lp_on, loss_on, g_on = _run(model, "grouped", True, on=True)
    assert lp_on.dtype == torch.float32 and loss_on == loss_off
    for name in g_off:
        torch.testing.assert_close(g_on[name], g_off[name], rtol=1e-3, atol=1e-5, msg=name)


def _saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for backward while ``fn`` runs."""
    total = 0

    def pack_hook(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        fn()
    return total


@pytest.mark.parametrize("path", ["grouped", "packed", "flat"])
def test_checkpointing_keeps_fewer_activations(policy, path):
    off = _saved_bytes(lambda: _run(policy, path, True, on=False))
    on = _saved_bytes(lambda: _run(policy, path, True, on=True))
    # the saved tensors of the forward: with checkpointing each layer keeps its inputs only
    # (the hooks see the recomputation too, so count the forward alone)
    assert on < off


def test_a_bf16_head_keeps_no_float32_weight_copy_for_backward(tiny_model_dir):
    """Backward needs only the bf16 weight (grpo.logprobs.Float32Head): no float32 copy of it is kept,
    neither one per chunk nor one for all chunks."""
    model = _policy(tiny_model_dir, dtype=torch.bfloat16)
    _, head = split_head(model)
    hidden = torch.randn(2, 5, head.weight.shape[1], dtype=torch.bfloat16, requires_grad=True)
    targets, mask = torch.randint(0, head.weight.shape[0], (2, 5)), torch.ones(2, 5, dtype=torch.long)
    float32_copies, bf16_weight = set(), set()

    def pack_hook(t):
        if t.shape in (head.weight.shape, head.weight.t().shape):
            ptr = t.untyped_storage().data_ptr()
            (float32_copies if t.dtype == torch.float32 else bf16_weight).add(ptr)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        out = head_logprobs(hidden, targets, mask, head, 1.0, chunk_tokens=2)  # 5 chunks
    assert not float32_copies
    assert bf16_weight == {head.weight.untyped_storage().data_ptr()}
    out.logprobs.sum().backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0


def test_prompt_cache_is_not_extended_by_recomputation(policy, monkeypatch):
    """The shared prompt's cache holds Lp positions per layer after forward AND backward,
    and recomputation really went through it (each ``update`` ran twice per layer)."""
    backbone, _ = split_head(policy)
    batch = pack_grouped(PROMPTS, GROUP_INDEX, COMPLETIONS, 0)
    lp = batch.prompt_ids.shape[1]
    cache = SharedPromptCache(backbone.config)
    calls = []
    update = SharedPromptCache.update

    def counting_update(self, k, v, layer_idx, *a, **kw):
        calls.append((self._index is None, layer_idx))  # (recording?, layer)
        return update(self, k, v, layer_idx, *a, **kw)

    monkeypatch.setattr(SharedPromptCache, "update", counting_update)
    idx = batch.group_index
    mask = torch.cat([batch.prompt_mask[idx], batch.completion_mask], dim=1)
    c_pos = batch.prompt_mask.sum(-1)[idx][:, None] + torch.arange(batch.completion_ids.shape[1])
    with checkpointed_layers(policy):
        backbone(input_ids=batch.prompt_ids, attention_mask=batch.prompt_mask, use_cache=True,
                 position_ids=(batch.prompt_mask.cumsum(-1) - 1).clamp(min=0), past_key_values=cache)
        hidden = backbone(input_ids=batch.completion_ids, attention_mask=mask, position_ids=c_pos,
                          past_key_values=cache.read_for(idx), use_cache=True).last_hidden_state
    layers = len(decoder_layers(policy))
    assert sorted(calls) == sorted([(True, i) for i in range(layers)] + [(False, i) for i in range(layers)])
    hidden.sum().backward()
    assert sorted(calls) == sorted(2 * [(True, i) for i in range(layers)] + 2 * [(False, i) for i in range(layers)])
    for layer in cache.layers:
        assert layer.keys.shape[-2] == lp and layer.values.shape[-2] == lp  # not 2 * Lp, not Lp + T


def test_a_plain_dynamic_cache_breaks_under_recomputation(policy):
    """Why the shared cache exists: the shared-prompt path on a DynamicCache (prompt pass,
    ``batch_select_indices``, completion pass) appends each recomputed layer's K/V again,
    and the recomputed attention no longer fits its mask."""
    backbone, _ = split_head(policy)
    batch = pack_grouped(PROMPTS, GROUP_INDEX, COMPLETIONS, 0)
    idx = batch.group_index
    mask = torch.cat([batch.prompt_mask[idx], batch.completion_mask], dim=1)
    c_pos = batch.prompt_mask.sum(-1)[idx][:, None] + torch.arange(batch.completion_ids.shape[1])
    cache = DynamicCache(config=backbone.config)
    with checkpointed_layers(policy):
        backbone(input_ids=batch.prompt_ids, attention_mask=batch.prompt_mask, use_cache=True,
                 position_ids=(batch.prompt_mask.cumsum(-1) - 1).clamp(min=0), past_key_values=cache)
        cache.batch_select_indices(idx)
        hidden = backbone(input_ids=batch.completion_ids, attention_mask=mask, position_ids=c_pos,
                          past_key_values=cache, use_cache=True).last_hidden_state
    with pytest.raises(RuntimeError, match="size"):
        hidden.sum().backward()


def test_layers_are_restored_and_no_grad_passes_are_untouched(policy):
    layers = decoder_layers(policy)
    assert layers and all("forward" not in layer.__dict__ for layer in layers)
    with checkpointed_layers(policy):
        assert all("forward" in layer.__dict__ for layer in layers)
    assert all("forward" not in layer.__dict__ for layer in layers)
    with torch.no_grad(), checkpointed_layers(policy):  # nothing to save: nothing wrapped
        assert all("forward" not in layer.__dict__ for layer in layers)


def test_resolving_the_setting(policy):
    assert use_activation_checkpointing("auto", policy) is True
    assert use_activation_checkpointing(True, policy) is True
    assert use_activation_checkpointing(False, policy) is False
    layerless = torch.nn.Linear(2, 2)
    assert use_activation_checkpointing("auto", layerless) is False
    assert use_activation_checkpointing(False, layerless) is False
    with pytest.raises(UserError, match="decoder layers"):
        use_activation_checkpointing(True, layerless)


def test_config_key_values():
    from grpo.config import load_config

    assert load_config(None).optim.activation_checkpointing == "auto"
    assert load_config(None, ["optim.activation_checkpointing=true"]).optim.activation_checkpointing is True
    assert load_config(None, ["optim.activation_checkpointing=false"]).optim.activation_checkpointing is False
    for bad in ("yes_please", "1", "maybe"):
        with pytest.raises(UserError, match="optim.activation_checkpointing"):
            load_config(None, [f"optim.activation_checkpointing={bad}"])


@pytest.mark.parametrize("packing", ["false", "true"])
def test_training_step_with_checkpointing_matches_without(tiny_model_dir, toy_plugin, tmp_path, packing, monkeypatch):
    """true, false, and auto both ways (a limit of 0 bytes: every micro-batch over it; a huge one:
    none) take the same step; auto checkpoints exactly the micro-batches over its limit."""
    from grpo import memory
    from grpo.config import load_config
    from grpo.trainer import Trainer
    from conftest import tiny_run_config

    metrics = {}
    for name, setting, fraction in (("false", "false", None), ("true", "true", None), ("auto_tight", "auto", 0.0),
                                    ("auto_roomy", "auto", 1e9)):
        if fraction is not None:
            monkeypatch.setattr(memory, "CHECKPOINT_FRACTION", fraction)
        cfg = load_config(None, tiny_run_config(tiny_model_dir, tmp_path / name, toy_plugin, **{
            "optim.activation_checkpointing": setting, "optim.packing": packing, "loss.beta": 0.1,
            "loss.update_passes": 2, "optim.micro_batch_size": 3}))
        trainer = Trainer(cfg, progress=False)
        trainer.setup()
        try:
            assert trainer.checkpoint_layers is (name != "false")
            assert (trainer.checkpoint_rule is not None) is (setting == "auto")
            metrics[name] = trainer.train_step(trainer.sampling_params())
        finally:
            trainer.cleanup()
    plain = metrics["false"]
    assert plain["sequences_in_loss"] > 0 and plain["update/micro_batches"] >= 2
    expected = {"false": 0, "true": plain["update/micro_batches"], "auto_tight": plain["update/micro_batches"],
                "auto_roomy": 0}
    for name, m in metrics.items():
        assert m["update/checkpointed_micro_batches"] == expected[name], name
        assert m["sequences_in_loss"] == plain["sequences_in_loss"]
        for key in ("loss", "kl", "ratio", "grad_norm", "entropy"):
            assert m[key] == pytest.approx(plain[key], rel=1e-5, abs=1e-7), (name, key)
