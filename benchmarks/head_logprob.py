"""The LM head's log-prob arithmetic after the matmul: the autograd composition it replaced vs
``grpo.logprobs.SampledLogProb``, on one chunk of float32 logits (CPU).

    .venv/bin/python benchmarks/head_logprob.py --rows 512 --vocab 49152 --threads 1

"composed" is what ``grpo/logprobs.py`` ran before: ``z / T``, ``logsumexp``, ``gather`` (autograd
keeps the logits; its backward recomputes the exponentials) and the entropy from a second pass of
exponentials. "function" is ``SampledLogProb``. Times are the median of ``--reps`` runs, no-grad
forward (the reference pass) and forward + backward with the entropy (the policy pass).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from grpo.logprobs import SampledLogProb  # noqa: E402


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
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


if __name__ == "__main__":
    main()
