"""Where the update's passes go: the reference and policy passes of one GRPO step, by part.

    .venv/bin/python benchmarks/update_profile.py --prompts 4 --group 8 --tokens 64 --threads 1

The policy is built as the trainer builds it (``grpo.build.build_policy`` from the run settings
``--set``: the embedded SmolLM2-135M, ``model.dtype: auto``, LoRA r16 on the 7 linears of each
block, non-zero B as after training), the batch is ``--prompts`` chat prompts x ``--group``
completions of ``--tokens`` random tokens each, packed as the trainer packs them
(``pack_grouped``: each prompt encoded once). Each line is the median of ``--reps`` timed runs
after a warm-up, in the same process (the pass and its attention-stubbed twin in turns):

- ``reference``: ``grouped_logprobs`` with the adapters off, no gradient (the reference pass);
- ``policy``: ``grouped_logprobs`` with entropy, then backward of the summed log-probs (the
  trainer's loss adds a few elementwise terms on (b, T), nothing per layer);
- the same two with attention replaced by a stub that passes the queries through (no attention
  arithmetic; in backward the queries get the output's gradient and the keys and values zeros,
  so the q, k and v projections' backward still runs): their difference is attention's share;
- ``LM head + log-softmax``: ``head_logprobs`` alone on hidden states of the batch's shape,
  forward (+ backward for the policy);
- ``base products``: every base linear's product at the pass's row counts in the model's dtype,
  forward (+ the input-gradient product for the policy; a frozen base has no weight gradients),
  on random inputs, nothing else;
- ``LoRA rank-r sides`` (policy): the LoRA linears of the backbone called as the trainer calls
  them (``grpo.fused_lora``, backward ``grpo.lora_grad``) at the same row counts, forward and
  backward, minus the base products: what the adapters add;
- ``RMSNorms``: the backbone's norm module at the same row counts, times the number of norms.

What is left (RoPE, activations, residual adds, dtype casts, the shared-prompt cache,
autograd's bookkeeping) is the pass minus those parts. Each part is printed with its FLOPs and
the rate it reached, next to the machine's best matmul rate now (``grpo.precision``), so the table
shows which parts run near a matmul's speed and which do not: the measurement behind the
update's distance from its compute floor in ``benchmarks/step_throughput.py`` (docs/benchmarks.md,
"Session 12").
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from decode_profile import timed  # noqa: E402  (median of reps after a warm-up)

LORA_TARGETS = "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"


def interleaved(run, model, reps: int) -> tuple[float, float]:
    """Median seconds of ``run`` as it is and with ``attention_stub``, timed in turns (the
    machine's speed drifts; alternating keeps both medians from the same minutes)."""
    run()
    with attention_stub(model):
        run()
    full, stubbed = [], []
    for _ in range(reps):
        for times, stub in ((full, False), (stubbed, True)):
            with attention_stub(model) if stub else contextlib.nullcontext():
                t0 = time.perf_counter()
                run()
                times.append(time.perf_counter() - t0)
    return statistics.median(full), statistics.median(stubbed)


@contextlib.contextmanager
def attention_stub(model):
    """Attention replaced by ``out = q`` (the query heads as the output): no attention arithmetic,
    the rest of the model's graph unchanged, the keys and values still in it (their gradients are
    zeros, so the k and v projections' backward runs as in the real pass; a stub that dropped them
    would charge that backward to attention). A diagnostic: the model's numbers are not these."""
    import torch
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    class PassQuery(torch.autograd.Function):
        @staticmethod
        def forward(ctx, query, key, value):
            ctx.kv = (key.shape, key.dtype), (value.shape, value.dtype)
            return query.transpose(1, 2).contiguous()

        @staticmethod
        def backward(ctx, grad):
            (ks, kd), (vs, vd) = ctx.kv
            return grad.transpose(1, 2), grad.new_zeros(ks, dtype=kd), grad.new_zeros(vs, dtype=vd)

    def stub(module, query, key, value, attention_mask, **kwargs):
        return PassQuery.apply(query, key, value), None

    ALL_ATTENTION_FUNCTIONS.register("diag_stub", stub)
    ALL_MASK_ATTENTION_FUNCTIONS.register("diag_stub", sdpa_mask)
    configs = {id(m.config): m.config for m in model.modules() if hasattr(getattr(m, "config", None), "_attn_implementation")}
    old = {k: c._attn_implementation for k, c in configs.items()}
    for c in configs.values():
        c._attn_implementation = "diag_stub"
    try:
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation = old[k]


def build(args):
    import torch

    from grpo.build import build_policy
    from grpo.config import load_config
    from grpo.logprobs import pack_grouped, set_update_mode

    cfg = load_config(None, [f"model.name={args.model}", f"model.lora_rank={args.rank}",
                             f"model.lora_alpha={2 * args.rank}", f"model.lora_target_modules={LORA_TARGETS}",
                             "task.name=arith", *args.set])
    model, tok = build_policy(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # a trained adapter is non-zero
                p.normal_(std=0.01)
    set_update_mode(model)
    texts = [f"What is {a} + {b}? Explain step by step." for a, b in [(3, 4), (7, 8), (2, 9), (6, 5), (1, 1)]]
    prompts = []
    for i in range(args.prompts):
        ids = tok.apply_chat_template([{"role": "user", "content": texts[i % len(texts)]}], add_generation_prompt=True)
        prompts.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    g = torch.Generator().manual_seed(1)
    vocab = model.get_output_embeddings().weight.shape[0]
    completions = [torch.randint(0, vocab, (args.tokens,), generator=g).tolist()
                   for _ in range(args.prompts * args.group)]
    index = [i // args.group for i in range(len(completions))]
    return model, cfg, pack_grouped(prompts, index, completions, tok.pad_token_id or 0)


def base_products_seconds(model, rows: list[int], backward: bool, reps: int) -> tuple[float, float]:
    """(seconds, FLOPs) of every base linear's product at ``rows`` rows (each entry one forward of
    that many tokens), and with ``backward`` the input-gradient product too."""
    import torch

    from grpo.logprobs import decoder_layers

    layers = decoder_layers(model)
    shapes = []
    for module in layers[0].modules():
        base = getattr(module, "base_layer", None)
        if isinstance(base, torch.nn.Linear):
            shapes.append(base.weight)
    dtype = shapes[0].dtype
    inputs = [(w, torch.randn(n, w.shape[1], dtype=dtype), torch.randn(n, w.shape[0], dtype=dtype))
              for w in shapes for n in rows]

    def run():
        for w, x, g in inputs:
            torch.nn.functional.linear(x, w)
            if backward:
                g @ w
    seconds = timed(run, reps) * len(layers)
    flops = sum(2 * x.shape[0] * w.numel() for w, x, _ in inputs) * len(layers) * (2 if backward else 1)
    return seconds, flops


def lora_seconds(model, rows: list[int], backward: bool, reps: int) -> tuple[float, float]:
    """(seconds, FLOPs) of the LoRA linears of the backbone as the trainer runs them
    (``grpo.fused_lora``: base product and rank-r sides, with ``backward`` its written-out
    backward ``grpo.lora_grad``) at ``rows`` rows; the caller subtracts the base products."""
    import torch

    from grpo.fused_lora import fused_layers, plain_adapter
    from grpo.logprobs import decoder_layers

    layers = decoder_layers(model)
    inputs = []
    for layer in fused_layers(layers[0]):
        w = layer.base_layer.weight
        for n in rows:
            inputs.append((layer, torch.randn(n, w.shape[1], dtype=w.dtype, requires_grad=backward),
                           torch.randn(n, w.shape[0], dtype=w.dtype)))

    def run():
        with torch.enable_grad() if backward else torch.no_grad():
            for layer, x, g in inputs:
                y = layer(x)
                if backward:
                    y.backward(g)
                    x.grad = None
        model.zero_grad(set_to_none=True)
    flops = 0
    for layer, x, _ in inputs:
        a = layer.lora_A[plain_adapter(layer)].weight
        flops += 2 * x.shape[0] * a.shape[0] * (a.shape[1] + layer.base_layer.weight.shape[0])
    return timed(run, reps) * len(layers), flops * len(layers) * (3 if backward else 1)


def norm_seconds(model, rows: list[int], backward: bool, reps: int) -> float:
    """Seconds of every RMSNorm of the backbone (two per block and the final one) at ``rows`` rows."""
    import torch

    from grpo.logprobs import decoder_layers

    layers = decoder_layers(model)
    norm = layers[0].input_layernorm
    dtype = norm.weight.dtype
    xs = [torch.randn(n, norm.weight.shape[0], dtype=dtype, requires_grad=backward) for n in rows]

    def run():
        with torch.enable_grad() if backward else torch.no_grad():
            for x in xs:
                y = norm(x)
                if backward:
                    y.backward(torch.ones_like(y))
    return timed(run, reps) * (2 * len(layers) + 1)


def head_seconds(model, batch, backward: bool, reps: int) -> tuple[float, float]:
    import torch

    from grpo.logprobs import head_logprobs, split_head

    _, head = split_head(model)
    b, t = batch.completion_ids.shape
    dtype = head.weight.dtype
    hidden = torch.randn(b, t, head.weight.shape[1], dtype=dtype, requires_grad=backward)

    def run():
        with torch.enable_grad() if backward else torch.no_grad():
            out = head_logprobs(hidden, batch.completion_ids, batch.loss_mask, head, 1.0, 512, backward)
            if backward:
                out.logprobs.sum().backward()
                hidden.grad = None
    n = int(batch.loss_mask.sum())
    return timed(run, reps), 2 * n * head.weight.numel() * (2 if backward else 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more run settings")
    args = parser.parse_args()
    import torch

    from grpo.allocator import keep_freed_memory
    from grpo.logprobs import grouped_logprobs
    from grpo.precision import matmul_gflops
    from roofline import Shape, phase_flops

    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the trainer does
    model, cfg, batch = build(args)
    dtype = next(p for n, p in model.named_parameters() if "lora" not in n).dtype
    shape = Shape.from_config(model.config)
    prompt_lens = batch.prompt_mask.sum(-1).tolist()
    flops = phase_flops(shape, prompt_lens, args.group, args.tokens, args.rank)
    best = max(matmul_gflops(d, args.threads, (2048, 576, 1536), 0.5) for d in (torch.float32, torch.bfloat16))

    def reference():
        with model.disable_adapter(), torch.no_grad():
            grouped_logprobs(model, batch)

    def policy():
        out = grouped_logprobs(model, batch, with_entropy=True)
        out.logprobs.sum().backward()
        model.zero_grad(set_to_none=True)

    rows = [batch.prompt_ids.numel(), batch.completion_ids.numel()]
    # attention's forward FLOPs, causal, as benchmarks/roofline.py counts them
    attn_flops = shape.layers * sum(shape.attention_flops(k + 1) for p in prompt_lens
                                    for k in list(range(p)) + [p + j for j in range(args.tokens)] * args.group)
    print(f"model {args.model} ({dtype}), {args.prompts} prompts x G={args.group} x {args.tokens} tokens, "
          f"LoRA r={args.rank}, {args.threads} thread(s); best matmul rate now {best:.0f} GFLOP/s")
    print("| pass | part | s | GFLOP | GFLOP/s | share of pass |")
    print("|---|---|---|---|---|---|")
    for name, run, backward in (("reference", reference, False), ("policy fwd+bwd", policy, True)):
        total, no_attn = interleaved(run, model, args.reps)
        head_s, head_f = head_seconds(model, batch, backward, args.reps)
        base_s, base_f = base_products_seconds(model, rows, backward, args.reps)
        lora_s, lora_f = lora_seconds(model, rows, backward, args.reps) if backward else (base_s, 0.0)
        lora_s -= base_s  # the LoRA linears' time beyond their base products
        norm_s = norm_seconds(model, rows, backward, args.reps)
        attn_f = attn_flops * (3 if backward else 1)
        phase = flops["reference" if not backward else "policy"]
        parts = [("whole pass", total, phase), ("attention (pass - pass with attention stubbed)", total - no_attn, attn_f),
                 ("LM head + log-softmax", head_s, head_f), ("base products", base_s, base_f)]
        if backward:  # the reference pass runs with the adapters off
            parts.append(("LoRA rank-r sides (fused kernel)", lora_s, lora_f))
        parts.append(("RMSNorms", norm_s, 0.0))
        rest = total - sum(s for _, s, _ in parts[1:])
        for part, s, f in parts:
            rate = f"{f / 1e9 / s:.0f}" if f else ""
            print(f"| {name} | {part} | {s:.2f} | {f / 1e9:.0f} | {rate} | {s / total:.0%} |")
        print(f"| {name} | rest: RoPE, activations, residual adds, casts, the cache, autograd | {rest:.2f} | | | "
              f"{rest / total:.0%} |")
        print(f"| {name} | compute floor (its FLOPs at {best:.0f} GFLOP/s) | {phase / 1e9 / best:.2f} | | | |")


if __name__ == "__main__":
    main()
