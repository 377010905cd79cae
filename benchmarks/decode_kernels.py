"""What one kernel of a decode step costs on this CPU, and how fast memory streams.

    .venv/bin/python benchmarks/decode_kernels.py --rows 32 --threads 1

A decode step of SmolLM2-135M at 32 rows has little arithmetic and many kernels, so its time is
set by per-kernel cost and by how fast the weights stream from memory, not by the matmul rate.
This prints, at ``--rows`` rows and ``--threads`` threads:

- `read GB/s`: summing a 256 MB float32 tensor, the rate at which weights can stream;
- the 210 base products of one decode step (SmolLM2's 30 x q, k, v, o, gate, up, down, distinct
  random weights, so they stream as in the model) through ``F.linear`` and through oneDNN's
  packed copy (``grpo.prepared_linear.packed_linear``), in bf16 and float32, with the largest
  difference between the two (bf16: 0.0 means bit for bit);
- the cost of each of a LoRA layer's kernels at that shape (the A side, a rank-16 product; the
  B side's ``addmm``) in bf16 and float32: the fixed cost that dominates a decode step;
- the LM head (49152 x 576) as float32 products and as bf16 products with float32 accumulation
  (``grpo.prepared_linear.bf16_products``) on bf16-valued inputs, at ``--rows`` and at a
  512-row chunk, with each one's distance from the float64 product.

Reported in docs/benchmarks.md ("Session 10").
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from grpo.prepared_linear import bf16_products, prepared_linear  # noqa: E402

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)] * 30
RANK = 16


def timed(run, reps: int) -> float:
    """Best seconds per call of ``run`` over ``reps`` calls after two warm-ups."""
    run()
    run()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return best


def read_bandwidth() -> float:
    x = torch.ones(64 * 1024 * 1024)  # 256 MB
    return x.numel() * 4 / timed(x.sum, 5) / 1e9


def base_products(rows: int, dtype: torch.dtype) -> tuple[float, float, float]:
    """(ms through F.linear, ms through the packed copies, largest difference) for one decode step."""
    gen = torch.Generator().manual_seed(0)
    weights = [(torch.randn(o, i, generator=gen) * 0.02).to(dtype) for o, i in SHAPES]
    xs = {i: torch.randn(rows, i, generator=gen).to(dtype) for i in (576, 1536)}
    packed = [prepared_linear(w, None) for w in weights]

    def plain():
        return [torch.nn.functional.linear(xs[w.shape[1]], w) for w in weights]

    def onednn():
        return [p(xs[w.shape[1]]) for w, p in zip(weights, packed)]
    diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(plain(), onednn()))
    return timed(plain, 5) * 1e3, timed(onednn, 5) * 1e3, diff


def lora_kernels(rows: int, dtype: torch.dtype, out: int) -> tuple[float, float]:
    """(us of the A side, us of the B side's addmm) of one LoRA layer (576 in, ``out`` out)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(rows, 576, generator=gen).to(dtype)
    a = (torch.randn(RANK, 576, generator=gen) * 0.02).to(dtype)
    b = (torch.randn(out, RANK, generator=gen) * 0.02).to(dtype)
    base = torch.randn(rows, out, generator=gen).to(dtype)
    h = torch.nn.functional.linear(x, a)
    a_side = timed(lambda: torch.nn.functional.linear(x, a), 200)
    b_side = timed(lambda: torch.addmm(base, h, b.t()), 200)
    return a_side * 1e6, b_side * 1e6


def head(rows: int) -> list[tuple[str, float, float]]:
    """(mode, ms, max |error| against float64) of the LM head on bf16-valued rows."""
    gen = torch.Generator().manual_seed(2)
    w32 = (torch.randn(49152, 576, generator=gen) * 0.05).bfloat16().float()
    x = torch.randn(rows, 576, generator=gen).bfloat16().float()
    ref = x.double() @ w32.double().t()
    linear = prepared_linear(w32, None)
    out = [("float32 products", timed(lambda: linear(x), 5) * 1e3, float((linear(x).double() - ref).abs().max()))]
    try:
        with bf16_products():
            out.append(("bf16 products, float32 accumulation", timed(lambda: linear(x), 5) * 1e3,
                        float((linear(x).double() - ref).abs().max())))
    except (AttributeError, RuntimeError) as err:  # a torch without the mode
        out.append((f"bf16 products: unavailable ({err})", float("nan"), float("nan")))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}, rows {args.rows}, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"read bandwidth: {read_bandwidth():.1f} GB/s (sum of a 256 MB tensor)")
    flops = sum(2 * args.rows * o * i for o, i in SHAPES)
    print("| base products of one decode step | F.linear ms | packed ms | largest difference |")
    print("|---|---|---|---|")
    for dtype in (torch.bfloat16, torch.float32):
        plain, packed, diff = base_products(args.rows, dtype)
        print(f"| {str(dtype).removeprefix('torch.')} | {plain:.2f} ({flops / plain / 1e6:.0f} GFLOP/s) "
              f"| {packed:.2f} ({flops / packed / 1e6:.0f} GFLOP/s) | {diff:.2g} |")
    print("| LoRA kernel (576 in) | bf16 us | float32 us |")
    print("|---|---|---|")
    for out in (576, 192, 1536):
        bf = lora_kernels(args.rows, torch.bfloat16, out)
        fp = lora_kernels(args.rows, torch.float32, out)
        print(f"| A side (rank {RANK}), out {out} | {bf[0]:.1f} | {fp[0]:.1f} |")
        print(f"| B side addmm, out {out} | {bf[1]:.1f} | {fp[1]:.1f} |")
    print("| LM head 49152 x 576 | rows | ms | max error vs float64 |")
    print("|---|---|---|---|")
    for rows in (args.rows, 512):
        for mode, ms, err in head(rows):
            print(f"| {mode} | {rows} | {ms:.2f} | {err:.2g} |")


if __name__ == "__main__":
    main()
