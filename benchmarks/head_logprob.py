"""The LM head's log-prob arithmetic after the matmul: the autograd composition it replaced vs
``grpo.logprobs.SampledLogProb``, on one chunk of float32 logits (CPU).

    .venv/bin/python benchmarks/head_logprob.py --rows 512 --vocab 49152 --threads 1

"composed" is what ``grpo/logprobs.py`` ran before: ``z / T``, ``logsumexp``, ``gather`` (autograd
keeps the logits; its backward recomputes the exponentials) and the entropy from a second pass of
exponentials. "function" is ``SampledLogProb``. Times are the median of ``--reps`` runs, no-grad
forward (the reference pass) and forward + backward with the entropy (the policy pass).

``--hidden H`` adds the head's matmul itself, a bf16 head of (vocab, H) on (rows, H) bf16 hidden
states: the float32 forward with the weight cast per chunk vs once, and forward + backward through
``F.linear`` in float32 (what ran before) vs ``grpo.logprobs.Float32Head`` (backward in bf16).
"""

from __future__ import annotations

import argparse
from functools import partial
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from grpo.logprobs import Float32Head, SampledLogProb  # noqa: E402
from grpo.prepared_linear import float32_linear  # noqa: E402


def composed(z, y, temperature, with_entropy):
    logits = z / temperature
    lse = logits.logsumexp(-1)
    logp = logits.gather(-1, y[:, None]).squeeze(-1) - lse
    if not with_entropy:
        return logp, None
    with torch.no_grad():  # the entropy metric as it was computed: a second pass of exponentials
        entropy = lse - ((logits - lse[:, None]).exp() * logits).sum(-1)
    return logp, entropy


def function(z, y, temperature, with_entropy):
    return SampledLogProb.apply(z, y, temperature, with_entropy)


def timed(fn, z, y, temperature, grad: bool, reps: int) -> float:
    times = []
    for _ in range(reps):
        x = z.detach().requires_grad_(grad)
        t0 = time.perf_counter()
        with torch.set_grad_enabled(grad):
            logp, _ = fn(x, y, temperature, grad)
            if grad:
                logp.sum().backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def median_ms(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def matmul_table(rows: int, vocab: int, hidden: int, reps: int) -> None:
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(vocab, hidden, generator=g) * 0.05).bfloat16()
    h = torch.randn(rows, hidden, generator=g).bfloat16()
    w32 = w.float()
    linear = torch.nn.functional.linear

    def fwd_bwd(head):
        x = h.detach().requires_grad_(True)
        head(x).sum().backward()

    print(f"\nthe head's matmul: ({rows}, {hidden}) bf16 hidden x ({vocab}, {hidden}) bf16 weight, median of {reps}")
    print("| head matmul | ms |")
    print("|---|---|")
    with torch.no_grad():
        print(f"| no-grad forward, float32 weight cast per chunk | {median_ms(lambda: linear(h.float(), w.float()), reps):.0f} |")
        print(f"| no-grad forward, float32 weight cast once | {median_ms(lambda: linear(h.float(), w32), reps):.0f} |")
    head = torch.nn.Linear(hidden, vocab, bias=False).requires_grad_(False)
    head.weight.data = w
    prepared = float32_linear(head)  # oneDNN's packed float32 layout where torch has it
    with torch.no_grad():
        print(f"| no-grad forward, float32_linear (prepared once) | {median_ms(lambda: prepared(h.float()), reps):.0f} |")
    print(f"| forward + backward, F.linear in float32 | {median_ms(lambda: fwd_bwd(lambda x: linear(x.float(), w32)), reps):.0f} |")
    print(f"| forward + backward, Float32Head (F.linear forward, backward in bf16) | "
          f"{median_ms(lambda: fwd_bwd(lambda x: Float32Head.apply(x, partial(linear, weight=w32), w)), reps):.0f} |")
    print(f"| forward + backward, Float32Head (float32_linear forward, backward in bf16) | "
          f"{median_ms(lambda: fwd_bwd(lambda x: Float32Head.apply(x, prepared, w)), reps):.0f} |", flush=True)
    rows32 = h[:32].float()
    with torch.no_grad():
        print(f"| 32 rows (a decode step), F.linear in float32 | {median_ms(lambda: linear(rows32, w32), reps):.1f} |")
        print(f"| 32 rows (a decode step), float32_linear | {median_ms(lambda: prepared(rows32), reps):.1f} |")
        print(f"| 32 rows (a decode step), bf16 F.linear (rounded logits) | "
              f"{median_ms(lambda: linear(rows32.bfloat16(), w), reps):.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=0, help="also time the head's matmul at this hidden size")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(args.rows, args.vocab, generator=g) * 3
    y = torch.randint(0, args.vocab, (args.rows,), generator=g)
    print(f"{args.rows} x {args.vocab} float32 logits, T={args.temperature}, {args.threads} thread(s), "
          f"median of {args.reps}")
    print("| arithmetic | no-grad forward ms | forward + backward with entropy ms |")
    print("|---|---|---|")
    for name, fn in (("composed", composed), ("function", function)):
        fn(z, y, args.temperature, False)  # warm-up
        print(f"| {name} | {timed(fn, z, y, args.temperature, False, args.reps) * 1e3:.0f} | "
              f"{timed(fn, z, y, args.temperature, True, args.reps) * 1e3:.0f} |", flush=True)
    if args.hidden:
        matmul_table(args.rows, args.vocab, args.hidden, args.reps)


if __name__ == "__main__":
    main()
