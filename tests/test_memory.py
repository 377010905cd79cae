"""Micro-batches sized to a memory budget (grpo/memory.py, ``optim.memory_budget_gb``).

The estimate is checked three ways: against numbers worked out by hand, against the bytes
autograd actually keeps for backward on a tiny random model (every update path, checkpointing
on and off, float32 and bf16), and through the trainer: a tight budget splits the batch into
several micro-batches and gives the gradients of one micro-batch.
"""

import dataclasses
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from grpo import logprobs, memory
from grpo.attention import apply_attention_dtype
from grpo.config import load_config
from grpo.errors import UserError
from grpo.fused_lora import use_fused_lora
from grpo.models import add_lora
from grpo.packing import pack_tree, tree_logprobs
from grpo.rms_norm import use_rms_norm_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from update_memory import peak_live_bytes, saved_bytes  # noqa: E402

from conftest import tiny_run_config  # noqa: E402

TINY = memory.ModelShape(layers=1, hidden=4, intermediate=8, heads=2, kv_heads=1, head_dim=2, vocab=10,
                         base_bytes=4, attention_bytes=4, lora_rank=1, lora_targets=("q_proj", "v_proj"))
# one prompt of 3 tokens, two completions of 2 tokens (3 of them scored), packed row 3 + 2 + 2
BATCH = memory.Batch(prompts=1, sequences=2, prompt_len=3, completion_len=2, packed_len=7, loss_tokens=3)


def test_estimate_by_hand_without_checkpointing():
    # per token and layer: norms 2 (4*4 + 4) = 40; q, out 2 * 4 * 4 = 32; lse 4 * 2 = 8; MLP 3 * 8 * 4 = 96;
    #   LoRA input: q and v share the norm's output (float32) 4 * 4 = 16; LoRA hidden 4 * 1 * 2 = 8 -> 200
    # per key position: K and V repeated to 2 heads 2 * 4 * 4 = 32; per (query, key): mask 4
    # prompt pass (1 row, 3 queries, 3 keys): 600 + 96 + 36 = 732
    # completion pass (2 rows, 2 queries, 5 keys): 800 + 320 + 80 = 1200
    # layers: 1932 - layer 0's first norm on 7 tokens (7 * 20) = 1792
    # outside: 7 tokens * (final norm 20 + RoPE cos, sin 2 * 2 * 4) = 252; head: 3 * (4 * 10 + 32) = 216 -> 468
    # transient: gradients 2 * 7 * (8 + 4) * 4 = 672; a head chunk's backward 2 * 3 * 10 * 4 = 240 -> 912
    est = memory.estimate(TINY, memory.UpdateSettings("grouped"), BATCH)
    assert est == (1792, 468, 912)
    assert est.saved == 2260 and est.total == 3172


def test_estimate_by_hand_with_checkpointing():
    # layers: each layer's input 7 * 4 * 4 = 112; the prompt K/V read by the completions 2 * 1 * 3 * 1 * 2 * 4 = 48
    # outside: 252 + the masks ((9 + 20) pairs * 4 = 116) + head 216 = 584
    # transient: one recomputed layer (the completion pass's 1200) + 672 + 240 = 2112
    est = memory.estimate(TINY, memory.UpdateSettings("grouped", checkpointing=True), BATCH)
    assert est == (160, 584, 2112)


def test_estimate_by_hand_packed_and_on_cuda():
    # packed: one row of 7 tokens attending to 7 keys: 7 * 200 + 7 * 32 + 49 * 4 = 1820; minus 7 * 20 -> 1680
    # outside as before: 252 + 216
    est = memory.estimate(TINY, memory.UpdateSettings("packed"), BATCH)
    assert (est.layers, est.outside) == (1680, 468)
    # CUDA: the head's chunks are checkpointed, so 3 * (4 * 4 + 32) = 144 instead of 216 (and a chunk's
    # recomputed logits with its backward in flight: 5 * 3 * 10 * 4 = 600 instead of 480)
    cuda = memory.estimate(TINY, memory.UpdateSettings("grouped", cuda=True), BATCH)
    assert cuda.outside == 252 + 144
    assert cuda.transient == 672 + 600


def test_lora_inputs_per_target_under_a_16_bit_base_or_dropout():
    every = dataclasses.replace(TINY, lora_targets=memory.PROJECTIONS)
    # float32: q/k/v share one input (4H), gate/up one (4H), o reuses attention's output, down keeps 4I
    assert memory._lora_input_bytes(every) == 16 + 16 + 32
    # a bf16 base: each adapter casts its own float32 copy: 4 (5 H + nh d + I) = 4 * 32 = 128
    assert memory._lora_input_bytes(dataclasses.replace(every, base_bytes=2)) == 128
    # dropout: each adapter's dropped-out copy plus dropout's float32 mask
    assert memory._lora_input_bytes(dataclasses.replace(every, lora_dropout=True)) == 256


def _cost(b: memory.Batch) -> int:
    return 10 * (b.prompts * b.prompt_len + b.sequences * b.completion_len)


SEQS = [memory.Seq(0, 2, 1, 1), memory.Seq(0, 2, 3, 3), memory.Seq(1, 4, 2, 2), memory.Seq(1, 4, 2, 2)]


def test_split_by_budget_is_greedy_and_keeps_groups_together():
    # [0]: 10 (2 + 1) = 30; [0, 1]: 10 (2 + 2 * 3) = 80; + 2: 10 (2 * 4 + 3 * 3) = 170 > 100 -> cut
    # [2]: 60; [2, 3]: 10 (4 + 2 * 2) = 80
    assert memory.split_by_budget(SEQS, _cost, 100) == [[0, 1], [2, 3]]
    assert memory.split_by_budget(SEQS, _cost, 1000) == [[0, 1, 2, 3]]
    # [1] alone: 10 (2 + 3) = 50 fits 50 exactly; [2] alone: 10 (4 + 2) = 60 does not
    with pytest.raises(ValueError) as info:
        memory.split_by_budget(SEQS, _cost, 50)
    assert info.value.args == (60,)


def test_add_tracks_packed_rows_per_group():
    groups = {}
    b = memory.Batch()
    for seq in SEQS:
        b = memory.add(b, seq, groups)
        groups[seq.group] = groups.get(seq.group, seq.prompt_len) + seq.completion_len
    assert b == memory.Batch(prompts=2, sequences=4, prompt_len=4, completion_len=3, packed_len=8, loss_tokens=8)


def test_plan_split_reports_the_largest_estimate_and_refuses_a_sequence_over_budget():
    plan = memory.Plan(TINY, memory.UpdateSettings("grouped"), 10 ** 9, 1.0)
    parts, largest = plan.split(SEQS)
    assert parts == [[0, 1, 2, 3]]
    assert largest == plan.cost(memory.Batch(2, 4, 4, 3, 8, 8))
    tight = dataclasses.replace(plan, budget=100, setting=1e-7)
    with pytest.raises(UserError, match=r"optim.memory_budget_gb=1e-07: one sequence of this step needs an "
                                        r"estimated [0-9.e-]+ GiB for the update \(budget 9.31e-08 GiB\); raise "
                                        r"optim.memory_budget_gb, lower rollout.max_new_tokens, or set "
                                        r"optim.activation_checkpointing=true$"):
        tight.split(SEQS)
    checkpointed = dataclasses.replace(tight, settings=memory.UpdateSettings("grouped", checkpointing=True))
    with pytest.raises(UserError, match=r"one sequence \(3 prompt \+ 64 completion tokens\) needs an estimated "
                                        r"[0-9.e-]+ GiB .*max_new_tokens$"):  # checkpointing is on already
        checkpointed.check(3, 64)


def test_budget_bytes(tmp_path):
    assert memory.budget_bytes(1.5, "cpu") == 3 * 2 ** 29
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       4194304 kB\nMemAvailable:   2097152 kB\n")
    # 2 GiB available, 0.8 of it, shared by 2 ranks on this machine
    assert memory.budget_bytes("auto", "cpu", local_ranks=2, meminfo=str(meminfo)) == int(2 * 2 ** 30 * 0.8 / 2)
    meminfo.write_text("MemTotal:       4194304 kB\n")
    with pytest.raises(UserError, match="optim.memory_budget_gb=auto: cannot read MemAvailable"):
        memory.budget_bytes("auto", "cpu", meminfo=str(meminfo))
    with pytest.raises(UserError, match="optim.memory_budget_gb=auto: free memory is not known on mps"):
        memory.budget_bytes("auto", "mps")


def test_config_key():
    assert load_config(None).optim.memory_budget_gb is None  # default: fixed optim.micro_batch_size
    assert load_config(None, ["optim.memory_budget_gb=2.5"]).optim.memory_budget_gb == 2.5
    assert load_config(None, ["optim.memory_budget_gb=auto"]).optim.memory_budget_gb == "auto"
    assert load_config(None, ["optim.memory_budget_gb=null"]).optim.memory_budget_gb is None
    for bad in ("0", "-1", "lots"):
        with pytest.raises(UserError, match="optim.memory_budget_gb"):
            load_config(None, [f"optim.memory_budget_gb={bad}"])


def test_model_shape_from_an_hf_config(tiny_model_dir):
    config = AutoModelForCausalLM.from_pretrained(tiny_model_dir).config
    shape = memory.model_shape(config, 2, 8, ["q_proj", "v_proj"], False)
    assert (shape.layers, shape.hidden, shape.intermediate, shape.heads, shape.kv_heads, shape.head_dim) == \
        (2, 64, 128, 4, 2, 16)
    assert shape.vocab == config.vocab_size and shape.base_bytes == 2 and shape.lora_targets == ("q_proj", "v_proj")
    # a target name it does not know counts as every projection (an upper bound)
    assert memory.model_shape(config, 4, 8, ["all-linear"], False).lora_targets == memory.PROJECTIONS


# ---------------------------------------------------------------- against measurement
PROMPTS = [[1, 10, 11, 12, 13], [1, 20]]
GROUP_INDEX = [0, 0, 0, 1, 1]
COMPLETIONS = [[40, 41, 42], [50, 51, 52, 53, 54, 55, 56], [60], [70, 71, 72, 73], [80, 81]]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOLERANCE = 0.05  # |estimate / measured - 1|; seen: within 3.0 % on every case below


def _forward(model, path: str, fast_head: bool, on: bool):
    """A function running the policy's log-prob pass over the test batch on ``path``."""
    if path == "grouped":
        batch = logprobs.pack_grouped(PROMPTS, GROUP_INDEX, COMPLETIONS, 0)

        def forward():
            return logprobs.grouped_logprobs(model, batch, fast_head=fast_head, checkpoint_layers=on,
                                             with_entropy=True).logprobs
    elif path == "packed":
        batch = pack_tree(PROMPTS, GROUP_INDEX, COMPLETIONS, 0)

        def forward():
            return tree_logprobs(model, batch, fast_head=fast_head, checkpoint_layers=on, with_entropy=True).logprobs
    else:
        batch = logprobs.pack([PROMPTS[g] for g in GROUP_INDEX], COMPLETIONS, 0)

        def forward():
            return logprobs.sampled_logprobs(model, batch, fast_head=fast_head, checkpoint_layers=on)
    return forward


def _measured(model, path: str, fast_head: bool, on: bool) -> int:
    n, lp = saved_bytes(model, _forward(model, path, fast_head, on))
    lp.sum().backward()
    model.zero_grad(set_to_none=True)
    return n


def _policy(model_dir, dtype, dropout, kernel="peft"):
    """(LoRA policy on every projection, its ModelShape, the test batch's Batch)."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    apply_attention_dtype(base, "auto", "cpu")  # bf16 on CPU: float32 attention, as training runs it
    model = add_lora(base, 4, 8, dropout, TARGETS)
    use_fused_lora(model, kernel)
    use_rms_norm_function(model, kernel == "fused")  # as grpo.build.build_policy does
    logprobs.set_update_mode(model)
    shape = memory.model_shape(base.config, base.get_input_embeddings().weight.element_size(), 4, TARGETS,
                               dropout > 0, kernel == "fused")
    assert shape.attention_bytes == 4 and shape.base_bytes == (2 if dtype == torch.bfloat16 else 4)
    rows = [len(PROMPTS[0]) + 3 + 7 + 1, len(PROMPTS[1]) + 4 + 2]
    batch = memory.Batch(prompts=2, sequences=5, prompt_len=5, completion_len=7, packed_len=max(rows),
                         loss_tokens=sum(map(len, COMPLETIONS)))
    return model, shape, batch


@pytest.mark.parametrize("dtype,dropout,kernel", [(torch.float32, 0.0, "peft"), (torch.bfloat16, 0.0, "peft"),
                                                  (torch.float32, 0.1, "peft"), (torch.float32, 0.0, "fused"),
                                                  (torch.bfloat16, 0.0, "fused"), (torch.float32, 0.1, "fused"),
                                                  (torch.bfloat16, 0.1, "fused")],
                         ids=["fp32", "bf16", "fp32-dropout", "fused-fp32", "fused-bf16", "fused-fp32-dropout",
                              "fused-bf16-dropout"])
def test_estimate_matches_the_bytes_autograd_keeps(tiny_model_dir, dtype, dropout, kernel):
    """Within 5 % (seen 3.6 %); the fused kernel with dropout under bf16 is counted as peft's,
    an upper bound (seen 1.32-1.38x without checkpointing)."""
    model, shape, batch = _policy(tiny_model_dir, dtype, dropout, kernel)
    bound = kernel == "fused" and dropout > 0 and dtype == torch.bfloat16
    for path in ("grouped", "packed", "flat"):
        for fast_head in (True, False):
            for on in (False, True):
                measured = _measured(model, path, fast_head, on)
                est = memory.estimate(shape, memory.UpdateSettings(path, not fast_head, on), batch)
                if bound:
                    assert measured * (1 - TOLERANCE) <= est.saved <= 1.5 * measured, (path, fast_head, on)
                else:
                    assert abs(est.saved / measured - 1) <= TOLERANCE, (path, fast_head, on, est.saved, measured)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_estimated_peak_bounds_the_live_peak(tiny_model_dir, dtype):
    """The estimate with its transient allowance against the most bytes of live tensors during
    forward + backward (the profiler's allocation events): never below, at most 1.5x above with
    the chunked LM head (seen 1.09-1.23x here), 2x with the model's own head (seen up to 1.55x:
    its backward is counted generously)."""
    model, shape, batch = _policy(tiny_model_dir, dtype, 0.0)
    for path in ("grouped", "packed", "flat"):
        for fast_head in (True, False):
            for on in (False, True):
                forward = _forward(model, path, fast_head, on)

                def run():
                    forward().sum().backward()

                run()  # first-call allocations
                model.zero_grad(set_to_none=True)
                peak = peak_live_bytes(run)
                model.zero_grad(set_to_none=True)
                est = memory.estimate(shape, memory.UpdateSettings(path, not fast_head, on), batch).total
                assert peak <= est <= (1.5 if fast_head else 2.0) * peak, (path, fast_head, on, est, peak)


# ---------------------------------------------------------------- in the trainer
def _trainer_update(model_dir, plugin, out, packing: str, budget_from=None):
    """Two updates on the fixed rollout of tests/dist_step_worker.py: (stats of the second, adapter grads,
    the budget in bytes or None)."""
    from dist_step_worker import G, P, fixed_rollout
    from grpo.rewards import RewardBatch
    from grpo.trainer import ScoredGroup, Trainer

    overrides = {"rollout.prompts_per_step": P, "rollout.num_generations": G, "optim.max_grad_norm": 0,
                 "optim.micro_batch_size": 16, "loss.aggregation": "token_mean", "optim.packing": packing,
                 "steps": 1, "loss.beta": 0.1}
    if budget_from is not None:
        overrides["optim.memory_budget_gb"] = 1.0
    trainer = Trainer(load_config(None, tiny_run_config(model_dir, out, plugin, **overrides)), progress=False)
    trainer.setup()
    budget = None
    try:
        if budget_from is not None:
            budget = budget_from(trainer.memory_plan)
            trainer.memory_plan = dataclasses.replace(trainer.memory_plan, budget=budget)
        prompts, completions, rewards = fixed_rollout(trainer)
        groups = [ScoredGroup(prompts[p], completions[p * G:(p + 1) * G], rewards[p * G:(p + 1) * G],
                              RewardBatch(rewards[p * G:(p + 1) * G], {}, {}, [False] * G)) for p in range(P)]
        rollout = trainer._advantages(groups)
        trainer._update(rollout)
        stats = trainer._update(rollout)  # LoRA B is no longer zero: A gets gradient too
        grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        return stats, grads, budget
    finally:
        trainer.cleanup()


@pytest.mark.parametrize("packing", ["false", "true"])
def test_tight_budget_gives_the_gradients_of_one_micro_batch(tiny_model_dir, toy_plugin, tmp_path, packing):
    def tight(plan):  # room for about two short sequences of one group
        return plan.cost(memory.Batch(prompts=1, sequences=2, prompt_len=40, completion_len=8, packed_len=56,
                                      loss_tokens=16))

    one, g_one, _ = _trainer_update(tiny_model_dir, toy_plugin, tmp_path / "one", packing)
    split, g_split, budget = _trainer_update(tiny_model_dir, toy_plugin, tmp_path / "split", packing, tight)
    assert one["update/micro_batches"] == 1 and "update/estimated_gb" not in one
    assert split["update/micro_batches"] >= 4  # 16 sequences in 4 groups: at least one micro-batch per group
    assert 0 < split["update/estimated_gb"] * memory.GIB <= budget
    assert split["tokens_in_loss"] == one["tokens_in_loss"]
    assert split["loss"] == pytest.approx(one["loss"], rel=1e-5, abs=1e-7)
    for name, g in g_one.items():
        assert float(g.abs().max()) > 0, name
        torch.testing.assert_close(g_split[name], g, rtol=1e-4, atol=1e-7, msg=name)


def test_budget_too_small_for_one_sequence_fails_at_setup(tiny_model_dir, toy_plugin, tmp_path):
    from grpo.trainer import Trainer

    cfg = load_config(None, tiny_run_config(tiny_model_dir, tmp_path / "run", toy_plugin,
                                            **{"optim.memory_budget_gb": 1e-6}))
    trainer = Trainer(cfg, progress=False)
    try:
        with pytest.raises(UserError, match=r"^optim.memory_budget_gb=1e-06: one sequence \(\d+ prompt \+ 8 "
                                            r"completion tokens\) needs an estimated 0.000[0-9]+ GiB for the "
                                            r"update \(budget 9.99e-07 GiB\)"):
            trainer.setup()
    finally:
        trainer.cleanup()


def test_auto_budget_trains_and_logs_the_split(tiny_model_dir, toy_plugin, tmp_path):
    from grpo.trainer import Trainer

    cfg = load_config(None, tiny_run_config(tiny_model_dir, tmp_path / "run", toy_plugin,
                                            **{"optim.memory_budget_gb": "auto"}))
    trainer = Trainer(cfg, progress=False)
    trainer.setup()
    try:
        total = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0]) * 1024
        assert 0 < trainer.memory_plan.budget <= total * memory.AUTO_FRACTION  # a share of the free memory
        # optim.packing=auto on CPU: each micro-batch grouped or packed, so the estimate covers both paths
        assert trainer.memory_plan.settings == memory.UpdateSettings("grouped", False, True, False, 512)
        assert trainer.memory_plan.alternatives == (memory.UpdateSettings("packed", False, True, False, 512),)
        m = trainer.train_step(trainer.sampling_params())
    finally:
        trainer.cleanup()
    assert m["update/micro_batches"] == 1  # a tiny model's 8 sequences fit any real machine's budget
    assert m["update/packed_micro_batches"] in (0, 1)  # by its completions' padding (optim.packing=auto)
    assert 0 < m["update/estimated_gb"] < 0.01


def test_micro_batches_hand_the_split_each_sequence_with_its_model_tokens():
    """Tool episodes: observation tokens run through the network but are not scored (loss mask 0)."""
    from grpo.engines.base import Completion
    from grpo.trainer import Rollout, Trainer

    class Capture:  # a Plan stand-in that records what it is asked to split
        seqs: list = []

        def split(self, seqs):
            self.seqs = list(seqs)
            return [list(range(len(seqs)))], 123

    trainer = Trainer.__new__(Trainer)
    trainer.cfg = load_config(None, ["rollout.num_generations=2"])
    trainer.memory_plan = plan = Capture()
    trainer.checkpoint_layers, trainer.checkpoint_rule = True, None
    completions = [Completion([5, 6, 7, 8], "", [0.0] * 4, "stop", loss_mask=[1, 0, 0, 1]),
                   Completion([5, 6], "", [0.0] * 2, "stop"), Completion([9], "", [0.0], "stop"),
                   Completion([9, 9, 9], "", [0.0] * 3, "stop")]
    rollout = Rollout([[1, 2, 3], [1, 2, 3], [4], [4]], completions, torch.zeros(4), torch.zeros(4), [0, 1, 2, 3])
    micro, checkpointed, metrics = trainer._micro_batches(rollout)
    assert micro == [[1, 0, 2, 3]] and checkpointed == [True]  # group by group, shortest completion first
    assert plan.seqs == [memory.Seq(0, 3, 2, 2), memory.Seq(0, 3, 4, 2), memory.Seq(1, 1, 1, 1), memory.Seq(1, 1, 3, 3)]
    assert metrics == {"update/estimated_gb": 123 / memory.GIB, "update/checkpointed_micro_batches": 1}
    trainer.memory_plan = None  # without a budget: every optim.micro_batch_size sequences, no split metrics
    trainer.cfg.optim.micro_batch_size = 3
    assert trainer._micro_batches(rollout) == ([[1, 0, 2], [3]], [True, True],
                                               {"update/checkpointed_micro_batches": 2})

    class Rule:  # a CheckpointRule stand-in: checkpoint micro-batches of over 2 sequences
        seen: list = []

        def needed(self, seqs):
            self.seen.append(list(seqs))
            return len(seqs) > 2

        def beyond_free(self, seqs):
            return 0

    trainer.checkpoint_rule = rule = Rule()
    assert trainer._micro_batches(rollout)[1:] == ([True, False], {"update/checkpointed_micro_batches": 1})
    assert rule.seen == [plan.seqs[:3], plan.seqs[3:]]
    trainer.checkpoint_layers = False  # off (or no layers to wrap): the rule is not consulted
    assert trainer._micro_batches(rollout)[1] == [False, False]


def test_checkpoint_rule_checkpoints_only_what_would_not_fit(tmp_path):
    """optim.activation_checkpointing=auto: a micro-batch is checkpointed when its estimate without
    checkpointing exceeds CHECKPOINT_FRACTION of this rank's share of free memory."""
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3)  # SmolLM2-135M's shape
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       8388608 kB\nMemAvailable:   4194304 kB\n")  # 4 GiB free
    rule = memory.make_checkpoint_rule(config, 2, 16, memory.PROJECTIONS, False, False, True, "cpu", 512,
                                       local_ranks=2, meminfo=str(meminfo))
    assert rule.limit == int(4 * 2 ** 30 / 2 * memory.CHECKPOINT_FRACTION) and not rule.settings.checkpointing
    small, large = [memory.Seq(0, 40, 64, 64)] * 2, [memory.Seq(g, 40, 4096, 4096) for g in range(8)]
    est = [memory.estimate(rule.shape, rule.settings, memory.batch_of(s)).total for s in (small, large)]
    assert est[0] <= rule.limit < est[1]  # the test's premise: one fits, one does not
    assert not rule.needed(small) and rule.needed(large)
    # free memory unknown (not Linux, another device): no rule, every micro-batch checkpointed as before
    assert memory.make_checkpoint_rule(config, 2, 16, memory.PROJECTIONS, False, False, True, "cpu", 512,
                                       meminfo=str(tmp_path / "absent")) is None
    assert memory.make_checkpoint_rule(config, 2, 16, memory.PROJECTIONS, False, False, True, "mps", 512) is None


def test_checkpoint_rule_says_when_even_checkpointing_would_not_fit(tmp_path):
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3)
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       8388608 kB\nMemAvailable:   1048576 kB\n")  # 1 GiB free
    rule = memory.make_checkpoint_rule(config, 2, 16, memory.PROJECTIONS, False, False, True, "cpu", 512,
                                       local_ranks=1, meminfo=str(meminfo))
    small, huge = [memory.Seq(0, 40, 64, 64)] * 2, [memory.Seq(g, 40, 4096, 4096) for g in range(16)]
    assert rule.beyond_free(small) == 0
    need = rule.beyond_free(huge)
    checkpointed = dataclasses.replace(rule.settings, checkpointing=True)
    assert need == memory.estimate(rule.shape, checkpointed, memory.batch_of(huge)).total > 2 ** 30


def test_a_config_without_llama_attribute_names(tmp_path):
    """OPT / GPT-2 / Falcon configs: no estimate; auto checkpoints every micro-batch, a budget is an error."""
    from transformers import OPTConfig

    config = OPTConfig(vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=32)
    assert memory.make_checkpoint_rule(config, 4, 4, memory.PROJECTIONS, False, False, True, "cpu", 512) is None
    with pytest.raises(UserError, match=r"optim.memory_budget_gb: the model's config \(OPTConfig\) has no "
                                        r"intermediate_size, so the update's memory cannot be estimated"):
        memory.make_plan(1.0, config, 4, 4, memory.PROJECTIONS, False, False, True, False, "cpu", 512)
