"""What bounds the parts of a GRPO step that are not large matmuls, measured on this CPU.

    .venv/bin/python benchmarks/decode_limits.py --rows 32 --cache 100 --threads 1

At SmolLM2-135M's shapes (9 query / 3 key-value heads of 64, hidden 576, MLP 1536, vocabulary
49152), ``--rows`` decode rows and ``--cache`` cached positions, each the best of several timed
calls after warm-ups:

- one block's q/k/v and gate/up with their rank-16 adapters in bf16, layer by layer (a packed base
  product, the A side, the B side's ``addmm``) and as one product per group
  (``grpo.decode_groups``), with whether the outputs are bit for bit the same;
- one layer's decode attention: SDPA over a float32 cache (what the engine runs under a bf16
  base, ``grpo.kv_cache``), the per-token upcast of a bf16 cache that this replaced, a
  hand-written grouped ``baddbmm``/softmax/``bmm``, and bf16 SDPA over a bf16 cache; with the
  rate at which the float32 one reads the keys and values, against a plain read of 256 MB;
- sampling's passes over the (rows, vocabulary) float32 logits: softmax, cumsum;
- the update's per-chunk log-softmax passes over 512 x vocabulary float32 logits, out of place
  (as ``grpo.logprobs.SampledLogProb`` runs them) and in place, and the entropy's row-wise dot
  product as a batched ``bmm`` and as ``torch.linalg.vecdot`` (what it runs), each with its error
  against float64;
- one RMSNorm's forward and forward+backward at 2,048 bf16 rows (a 32 x 64 update micro-batch),
  transformers' ``LlamaRMSNorm`` and ``F.rms_norm``;
- the update's attention of one layer, forward and forward+backward, 32 rows x 64 completion
  tokens over 43 prompt + 64 keys: float32 SDPA (what the update runs under a bf16 base), bf16
  SDPA, and a hand-written grouped float32 matmul/softmax/matmul, with the FLOP rate each reaches;
- the update's LM-head product of one 512-token chunk: bf16 hidden states times the bf16 head as
  bf16 products with float32 accumulation (what ``grpo.prepared_linear.float32_linear`` runs),
  as plain float32 products, and as a bf16 matmul (bf16-rounded logits, which the update does not
  use), with their FLOP rates;

with glibc's malloc thresholds raised first, as the trainer does (``grpo/allocator.py``).
Reported in docs/benchmarks.md ("Session 11", "Session 12").
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from grpo.prepared_linear import prepared_linear  # noqa: E402

HIDDEN, MLP, HEADS, KV_HEADS, HEAD_DIM, VOCAB, RANK = 576, 1536, 9, 3, 64, 49152, 16
F = torch.nn.functional


def best_us(run, reps: int = 50) -> float:
    """Best microseconds per call of ``run`` over 5 rounds of ``reps`` calls, after warm-ups."""
    for _ in range(3):
        run()
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            run()
        rounds.append((time.perf_counter() - t0) / reps)
    return min(rounds) * 1e6


def groups(rows: int) -> None:
    g = torch.Generator().manual_seed(0)

    def w(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).bfloat16()
    x = torch.randn(rows, HIDDEN, generator=g).bfloat16()
    print("| one block, bf16, with rank-16 adapters | layer by layer us | one product per group us | same bits |")
    print("|---|---|---|---|")
    for name, outs in (("q/k/v", (HIDDEN, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM)), ("gate/up", (MLP, MLP))):
        weights, a, b = [w(o, HIDDEN) for o in outs], [w(RANK, HIDDEN) for _ in outs], [w(o, RANK) for o in outs]
        packed = [prepared_linear(m, None) for m in weights]
        fused = prepared_linear(torch.cat(weights), None)
        a_cat, b_block = torch.cat(a), torch.block_diag(*b)

        def each():
            return [torch.addmm(p(x), F.linear(x, ai), bi.t()) for p, ai, bi in zip(packed, a, b)]

        def group():
            return torch.addmm(fused(x), F.linear(x, a_cat), b_block.t()).split(list(outs), dim=-1)
        same = all(torch.equal(u, v) for u, v in zip(each(), group()))
        print(f"| {name} | {best_us(each):.0f} | {best_us(group):.0f} | {same} |")


def attention(rows: int, cache: int) -> None:
    g = torch.Generator().manual_seed(1)
    q = torch.randn(rows, HEADS, 1, HEAD_DIM, generator=g)
    k, v = (torch.randn(rows, KV_HEADS, cache, HEAD_DIM, generator=g) for _ in range(2))
    kb, vb, qb = k.bfloat16(), v.bfloat16(), q.bfloat16()
    k32, v32, q32 = kb.float(), vb.float(), qb.float()  # a float32 cache of bf16 values, as the engine keeps
    per_group = HEADS // KV_HEADS

    def sdpa32():
        return F.scaled_dot_product_attention(q32, k32, v32, enable_gqa=True)

    def upcast():
        return kb.float(), vb.float()

    def by_hand():
        s = torch.matmul(q32.view(rows, KV_HEADS, per_group, HEAD_DIM), k32.transpose(-1, -2)) * HEAD_DIM ** -0.5
        return torch.matmul(s.softmax(-1), v32).view(rows, HEADS, 1, HEAD_DIM)

    def sdpa16():
        return F.scaled_dot_product_attention(qb, kb, vb, enable_gqa=True)
    big = torch.ones(64 * 1024 * 1024)
    read = big.numel() * 4 / best_us(lambda: big.sum(), 5) / 1e3  # GB/s
    kv_bytes = 2 * k32.numel() * 4
    t32 = best_us(sdpa32)
    print(f"| one layer's decode attention, {rows} rows x {cache} cached positions | us |")
    print("|---|---|")
    print(f"| SDPA over a float32 cache (the engine under a bf16 base) | {t32:.0f} "
          f"({kv_bytes / t32 / 1e3:.1f} GB/s of keys and values; a plain read runs {read:.1f} GB/s) |")
    print(f"| upcasting a bf16 cache to float32 (per layer and token before grpo.kv_cache) | {best_us(upcast):.0f} |")
    print(f"| hand-written grouped matmul, softmax, matmul (float32) | {best_us(by_hand):.0f} "
          f"(max diff {float((by_hand() - sdpa32()).abs().max()):.1g}) |")
    print(f"| bf16 SDPA over a bf16 cache (half the bytes; attention would differ from the update's) | {best_us(sdpa16):.0f} |")


def passes(rows: int) -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(rows, VOCAB, generator=g) * 3
    probs = logits.softmax(-1)
    print(f"| sampling at {rows} rows, float32 (rows, {VOCAB}) | us |")
    print("|---|---|")
    print(f"| softmax | {best_us(lambda: logits.softmax(-1), 20):.0f} |")
    print(f"| cumsum (the inverse-CDF draw) | {best_us(lambda: probs.cumsum(-1), 20):.0f} |")
    z = torch.randn(512, VOCAB, generator=g) * 3
    top, scale, scratch = z.amax(-1, keepdim=True), torch.rand(512, 1, generator=g), z.clone()
    print(f"| the update's log-softmax, 512 x {VOCAB} float32 | out of place ms | in place ms |")
    print("|---|---|---|")
    print(f"| z - max | {best_us(lambda: z - top, 5) / 1e3:.1f} | {best_us(lambda: scratch.sub_(top), 5) / 1e3:.1f} |")
    print(f"| e * s (backward) | {best_us(lambda: z * scale, 5) / 1e3:.1f} | "
          f"{best_us(lambda: scratch.mul_(scale), 5) / 1e3:.1f} |")
    e = (z - top).exp()
    exact = (e.double() * z.double()).sum(-1)
    print(f"| the entropy's sum_v e_v z_v, 512 x {VOCAB} float32 | ms | max relative error vs float64 |")
    print("|---|---|---|")
    for name, dot in (("batched (1, V) x (V, 1) bmm", lambda: torch.bmm(e.unsqueeze(1), z.unsqueeze(2)).view(-1)),
                      ("torch.linalg.vecdot (grpo.logprobs)", lambda: torch.linalg.vecdot(e, z))):
        err = float(((dot().double() - exact).abs() / exact.abs()).max())
        print(f"| {name} | {best_us(dot, 5) / 1e3:.1f} | {err:.1e} |")


def norms() -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(HIDDEN, eps=1e-5).bfloat16()
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(HIDDEN))

    def rms_norm(x):
        return norm.weight * F.rms_norm(x.float(), (HIDDEN,), None, 1e-5).to(x.dtype)
    x = torch.randn(2048, HIDDEN).bfloat16()
    xg = x.clone().requires_grad_()

    def both(fn):
        def run():
            fn(xg).float().sum().backward()
        return run
    with torch.no_grad():
        fwd = (best_us(lambda: norm(x), 20), best_us(lambda: rms_norm(x), 20))
    bwd = (best_us(both(norm), 10), best_us(both(rms_norm), 10))
    print(f"| one RMSNorm, 2048 x {HIDDEN} bf16 | LlamaRMSNorm ms | F.rms_norm ms | same bits |")
    print("|---|---|---|---|")
    with torch.no_grad():
        same = torch.equal(norm(x), rms_norm(x))
    print(f"| forward | {fwd[0] / 1e3:.2f} | {fwd[1] / 1e3:.2f} | {same} |")
    print(f"| forward + backward | {bwd[0] / 1e3:.2f} | {bwd[1] / 1e3:.2f} | |")


def update_attention(rows: int = 32, prompt: int = 43, tokens: int = 64) -> None:
    """One layer's attention in the update: ``rows`` completions of ``tokens`` attending causally
    over their prompt's ``prompt`` keys and their own (a float mask, as the packed batch passes)."""
    g = torch.Generator().manual_seed(3)
    keys = prompt + tokens
    mask = torch.zeros(tokens, keys)
    mask[torch.arange(keys)[None, :] > prompt + torch.arange(tokens)[:, None]] = float("-inf")
    mask = mask.expand(rows, 1, tokens, keys)
    per_group = HEADS // KV_HEADS
    flops = 4 * rows * HEADS * tokens * keys * HEAD_DIM  # q.k and p.v, forward

    def make(dtype):
        q = torch.randn(rows, HEADS, tokens, HEAD_DIM, generator=g).to(dtype).requires_grad_()
        k, v = (torch.randn(rows, KV_HEADS, keys, HEAD_DIM, generator=g).to(dtype).requires_grad_() for _ in range(2))
        return q, k, v

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), enable_gqa=True)

    def by_hand(q, k, v):
        s = torch.matmul(q.reshape(rows, KV_HEADS, per_group * tokens, HEAD_DIM), k.transpose(-1, -2))
        s = s.view(rows, KV_HEADS, per_group, tokens, keys) * HEAD_DIM ** -0.5 + mask[:, :, None]
        return torch.matmul(s.softmax(-1).view(rows, KV_HEADS, per_group * tokens, keys), v).view(q.shape)
    print(f"| the update's attention, one layer, {rows} x {tokens} queries over {prompt} + {tokens} keys | "
          "forward ms | forward + backward ms | GFLOP/s (forward + 2x backward) |")
    print("|---|---|---|---|")
    for name, fn, dtype in (("float32 SDPA (the update under a bf16 base)", sdpa, torch.float32),
                            ("bf16 SDPA", sdpa, torch.bfloat16),
                            ("float32 grouped matmul, softmax, matmul", by_hand, torch.float32)):
        qkv = make(dtype)
        with torch.no_grad():
            fwd = best_us(lambda: fn(*qkv), 5)
        both = best_us(lambda: fn(*qkv).float().sum().backward(), 3)
        print(f"| {name} | {fwd / 1e3:.2f} | {both / 1e3:.2f} | {3 * flops / both / 1e3:.0f} |")


def head_product(chunk: int = 512) -> None:
    """The update's LM head over one chunk of bf16 hidden states, float32 logits."""
    from grpo.prepared_linear import bf16_products

    g = torch.Generator().manual_seed(4)
    x = torch.randn(chunk, HIDDEN, generator=g).bfloat16()
    w = (torch.randn(VOCAB, HIDDEN, generator=g) * 0.02).bfloat16()
    fn32 = prepared_linear(w.float(), None)
    flops = 2 * chunk * HIDDEN * VOCAB

    def products():
        with bf16_products():
            return fn32(x.float())
    print(f"| the update's LM head, {chunk} x {HIDDEN} x {VOCAB} | ms | GFLOP/s |")
    print("|---|---|---|")
    for name, fn in (("bf16 products, float32 sums and logits (grpo.prepared_linear)", products),
                     ("float32 products (packed)", lambda: fn32(x.float())),
                     ("bf16 matmul, bf16 logits (not used: rounded logits)", lambda: x @ w.t())):
        t = best_us(fn, 3)
        print(f"| {name} | {t / 1e3:.1f} | {flops / t / 1e3:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--cache", type=int, default=100, help="cached positions for the attention timing")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from grpo.allocator import keep_freed_memory

    keep_freed_memory()  # as the trainer and `grpo eval` do: no fresh pages per large temporary
    print(f"threads {args.threads}, rows {args.rows}, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        groups(args.rows)
    else:
        print("(no oneDNN bf16 path on this CPU: the group timing is skipped)")
    attention(args.rows, args.cache)
    passes(args.rows)
    norms()
    update_attention()
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        head_product()


if __name__ == "__main__":
    main()
