"""Packed (padding-free) update batches give the same log-probs and gradients as the grouped ones."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from grpo.logprobs import grouped_logprobs, pack_grouped
from grpo.models import add_lora
from grpo.packing import pack_tree, tree_logprobs

PROMPTS = [[1, 10, 11, 12, 13], [1, 20], [1, 30, 31]]
GROUP_INDEX = [0, 0, 1, 2, 2, 2]
COMPLETIONS = [[40, 41], [50, 51, 52, 53, 54, 55, 56], [60], [70, 71, 72], [80, 81, 82, 83, 84], [90]]


@pytest.fixture()
def policy(tiny_model_dir):
    torch.manual_seed(0)
    model = add_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), 4, 8, 0.0, ["q_proj", "v_proj"])
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    return model.eval()


def test_tree_layout_positions_and_mask():
    batch = pack_tree([[1, 2, 3]], [0, 0], [[4, 5], [6]], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 6]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 3]]
    assert batch.segment.tolist() == [[0, 0, 0, 1, 1, 2]]
    # completion 0 is predicted by columns [2, 3]; completion 1 by column [2] (the prompt's last state)
    assert batch.source.tolist() == [[2, 3], [2, 0]]
    visible = batch.attention_bias(torch.float32)[0, 0] == 0
    assert visible[5].tolist() == [True, True, True, False, False, True]  # the second completion skips the first
    assert visible[4].tolist() == [True, True, True, True, True, False]


@pytest.mark.parametrize("fast_head", [True, False])
def test_tree_logprobs_and_gradients_equal_grouped(policy, fast_head):
    grouped = pack_grouped(PROMPTS, GROUP_INDEX, COMPLETIONS, 0)
    tree = pack_tree(PROMPTS, GROUP_INDEX, COMPLETIONS, 0)
    a = grouped_logprobs(policy, grouped, temperature=0.8, fast_head=fast_head)
    grads_a = torch.autograd.grad(a.sum(), [p for p in policy.parameters() if p.requires_grad])
    b = tree_logprobs(policy, tree, temperature=0.8, fast_head=fast_head)
    grads_b = torch.autograd.grad(b.sum(), [p for p in policy.parameters() if p.requires_grad])
    assert torch.allclose(a, b, atol=1e-5)
    for ga, gb in zip(grads_a, grads_b):
        assert torch.allclose(ga, gb, atol=1e-5, rtol=1e-4)
    ent_a = grouped_logprobs(policy, grouped, with_entropy=True).entropy
    ent_b = tree_logprobs(policy, tree, with_entropy=True).entropy
    assert torch.allclose(ent_a, ent_b, atol=1e-5)


def test_training_step_with_packing_matches_without(tiny_model_dir, toy_plugin, tmp_path):
    from grpo.config import load_config
    from grpo.trainer import Trainer
    from conftest import tiny_run_config

    metrics = []
    for packing in ("false", "true"):
        cfg = load_config(None, tiny_run_config(tiny_model_dir, tmp_path / packing, toy_plugin, **{
            "optim.packing": packing, "loss.beta": 0.1, "loss.update_passes": 2, "optim.micro_batch_size": 3}))
        trainer = Trainer(cfg, progress=False)
        trainer.setup()
        try:
            metrics.append(trainer.train_step(trainer.sampling_params()))
        finally:
            trainer.cleanup()
    plain, packed = metrics
    assert plain["sequences_in_loss"] == packed["sequences_in_loss"] > 0
    for key in ("loss", "kl", "ratio", "grad_norm", "entropy"):
        assert packed[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-6), key
    assert packed["tokens/trained"] <= plain["tokens/trained"]


def test_packing_auto_applies_to_short_cpu_groups_only():
    from types import SimpleNamespace

    from grpo.packing import AUTO_MAX_POSITIONS, use_packing

    plain = SimpleNamespace()  # a config without sliding windows (SmolLM2, Llama)
    assert use_packing("auto", "cpu", False, 8, 32, plain) == "auto"
    assert use_packing("auto", "cpu", False, 8, AUTO_MAX_POSITIONS // 8, plain) == "auto"
    assert use_packing("auto", "cpu", False, 8, AUTO_MAX_POSITIONS // 8 + 1, plain) is False  # quadratic mask
    assert use_packing("auto", "cuda:0", False, 8, 32, plain) is False  # the mask rules out flash attention
    assert use_packing("auto", "mps", False, 8, 32, plain) is False  # not measured there
    assert use_packing("auto", "cpu", True, 8, 32, plain) is False  # tool episodes need the unpacked loss mask
    assert use_packing("auto", "cpu", False, 8, 32, plain, sharded=True) is False  # FSDP2: collectives line up
    assert use_packing("auto", "cpu", False, 8, 32, SimpleNamespace(sliding_window=4096)) is False  # Mistral
    assert use_packing("auto", "cpu", False, 8, 32, SimpleNamespace(sliding_window=4096, use_sliding_window=False))
    assert use_packing("auto", "cpu", False, 8, 32,
                       SimpleNamespace(layer_types=["full_attention", "sliding_attention"])) is False
    assert use_packing(True, "cuda:0", False, 64, 4096, plain) is True
    assert use_packing(False, "cpu", False, 8, 32, plain) is False


def test_packing_auto_packs_a_micro_batch_by_its_padding():
    from grpo.packing import AUTO_MIN_PADDING, packs

    assert not packs("auto", [64] * 32)  # equal lengths: nothing to save, packing measured slower
    assert packs("auto", [4, 31, 12, 20, 9, 27])  # padded to 31: 186 positions for 103 real ones
    assert packs("auto", [4, 5]) == (2 * 5 >= AUTO_MIN_PADDING * 9)  # 10 vs 9 x 1.25: no
    assert not packs("auto", [0, 0])  # nothing to run
    assert packs(True, [64] * 32) and not packs(False, [4, 31])


def test_memory_estimates_under_auto_take_the_larger_of_both_paths():
    from grpo import memory

    plan = memory.Plan(memory.model_shape(_TinyConfig(), 4, 8, memory.PROJECTIONS, False), memory.UpdateSettings("grouped"),
                       10 ** 12, 1.0, (memory.UpdateSettings("packed"),))
    batch = memory.batch_of([memory.Seq(0, 30, n, n) for n in (4, 60, 60, 60)])
    each = [memory.estimate(plan.shape, s, batch).total for s in (memory.UpdateSettings("grouped"),
                                                                   memory.UpdateSettings("packed"))]
    assert each[0] != each[1] and plan.cost(batch) == max(each)


class _TinyConfig:
    hidden_size, intermediate_size, num_hidden_layers, num_attention_heads = 64, 128, 2, 4
    num_key_value_heads, vocab_size, head_dim = 2, 1000, 16


def test_packing_auto_with_tools_trains_on_the_unpacked_path(tiny_model_dir, toy_plugin, tmp_path):
    from conftest import tiny_run_config

    from grpo.config import load_config
    from grpo.trainer import Trainer

    cfg = load_config(None, tiny_run_config(tiny_model_dir, tmp_path / "run", toy_plugin,
                                            **{"tools.enabled": "[calculator]"}))
    assert cfg.optim.packing == "auto"
    trainer = Trainer(cfg, progress=False)
    trainer.setup()
    try:
        assert trainer.packing is False
    finally:
        trainer.cleanup()
