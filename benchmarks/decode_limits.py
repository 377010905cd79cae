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
  (as ``grpo.logprobs.SampledLogProb`` runs them) and in place;

with glibc's malloc thresholds raised first, as the trainer does (``grpo/allocator.py``).
- one RMSNorm's forward and forward+backward at 2,048 bf16 rows (a 32 x 64 update micro-batch),
  transformers' ``LlamaRMSNorm`` and ``F.rms_norm``.

Reported in docs/benchmarks.md ("Session 11").
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


if __name__ == "__main__":
    main()
