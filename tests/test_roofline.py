"""benchmarks/roofline.py: a step's FLOPs per phase, against a count done by hand."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from roofline import Shape, phase_flops  # noqa: E402


def test_phase_flops_by_hand():
    # hidden 4, MLP 8, one layer, 2 query heads and 1 kv head of dim 2, vocab 10, LoRA r=1.
    s = Shape(hidden=4, intermediate=8, layers=1, heads=2, kv_heads=1, head_dim=2, vocab=10)
    # linears (in, out): q 4x4, k 4x2, v 4x2, o 4x4, gate 4x8, up 4x8, down 8x4 -> 144 MACs = 288 FLOPs/token
    assert s.layer_linear_flops() == 288
    assert s.attention_flops(3) == 4 * 3 * 2 * 2  # 48
    assert s.head_flops() == 80
    assert s.lora_flops(1) == 2 * (8 + 6 + 6 + 8 + 12 + 12 + 12)  # 128
    # One prompt of 2 tokens, G=2 completions of 2 tokens.
    # prompt: 2*288 + attention over 1 and 2 keys 16*(1+2) = 624
    # completions: 2 rows * (2*288 + 16*(3+4)) = 1376; head at 4 completion positions = 320
    # generate: prompt 624 + head once 80 + one decode step per row 2*(288+16*3) = 672 + head 2 rows 160
    # policy: forward 2320 + LoRA 6 tokens * 128 = 768 -> 3088; backward: linears 6*288 = 1728,
    #   head 320, attention 2*272, LoRA 2*768 -> 4128
    assert phase_flops(s, [2], group=2, tokens=2, rank=1) == {"generate": 1536.0, "reference": 2320.0,
                                                              "policy": 7216.0}


def test_decode_flops_is_generation_after_the_prefill():
    from roofline import decode_flops

    s = Shape(hidden=4, intermediate=8, layers=1, heads=2, kv_heads=1, head_dim=2, vocab=10)
    # generate 1536 = prefill 624 + head once 80 + decode 672 + head at 2 rows 160 (see above)
    assert decode_flops(s, [2], group=2, tokens=2) == 672 + 160


def test_decode_gflops_measures_a_positive_rate():
    import torch
    from roofline import decode_gflops

    s = Shape(hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2, head_dim=8, vocab=10)
    assert decode_gflops(s, rows=4, dtype=torch.float32, threads=1, seconds=0.01) > 0


def test_float32_head_flops_counts_the_two_update_passes():
    from roofline import float32_head_flops

    s = Shape(hidden=4, intermediate=8, layers=1, heads=2, kv_heads=1, head_dim=2, vocab=10)
    # head at 4 completion positions = 320 FLOPs per pass (see above); reference + policy forwards
    assert float32_head_flops(s, [2], group=2, tokens=2) == 640.0


def test_update_profile_runs_and_prints_every_part(tiny_model_dir):
    """benchmarks/update_profile.py end to end on the tiny model (the numbers mean nothing at that
    size; the point is that the script cannot rot)."""
    import subprocess

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "update_profile.py"
    run = subprocess.run([sys.executable, str(script), "--model", str(tiny_model_dir), "--prompts", "2", "--group", "2",
                          "--tokens", "3", "--reps", "1"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    for part in ("whole pass", "attention", "LM head + log-softmax", "base products", "LoRA rank-r sides",
                 "RMSNorms", "rest:", "compute floor"):
        assert part in run.stdout, part
    assert run.stdout.count("| reference |") == 7 and run.stdout.count("| policy fwd+bwd |") == 8


def test_update_profile_attention_stub_keeps_the_key_and_value_backward(tiny_model_dir):
    """The stub removes attention's arithmetic only: k_proj and v_proj still get gradients (zeros
    through the stub), so their backward is not charged to attention; the numbers change (the
    stub ran) and the model's own attention is back afterwards."""
    import argparse

    import torch
    from update_profile import attention_stub, build

    from grpo.logprobs import grouped_logprobs

    args = argparse.Namespace(model=str(tiny_model_dir), rank=4, set=[], prompts=2, group=2, tokens=3)
    model, _, batch = build(args)
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def grads():
        model.zero_grad(set_to_none=True)
        out = grouped_logprobs(model, batch)
        out.sum().backward()
        return out.detach(), {n: p.grad for n, p in lora.items()}

    real, real_grads = grads()
    with attention_stub(model):
        stubbed, stub_grads = grads()
    again, _ = grads()
    assert not torch.allclose(real, stubbed) and torch.equal(real, again)
    for proj in ("k_proj", "v_proj", "q_proj"):
        names = [n for n in lora if f"{proj}.lora_A" in n]
        assert names and all(stub_grads[n] is not None for n in names), proj
    assert all(real_grads[n] is not None for n in lora)


def test_float32_head_flops_on_cuda_adds_the_recomputation_and_generation():
    from roofline import float32_head_flops

    s = Shape(hidden=4, intermediate=8, layers=1, heads=2, kv_heads=1, head_dim=2, vocab=10)
    # 4 completion positions x 80 FLOPs: update 3 forwards (checkpointed policy head) + generation 1
    assert float32_head_flops(s, [2], group=2, tokens=2, cuda=True) == 4 * 320.0
