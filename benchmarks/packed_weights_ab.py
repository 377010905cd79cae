"""rollout.packed_weights A/B: whole HF-engine generations with and without the packed base weights.

    .venv/bin/python benchmarks/packed_weights_ab.py --prompts 8 --group 8 --tokens 32 --threads 2 --reps 4

Builds the policy as the trainer does on CPU (float32, LoRA r16 on the 7 linears of every block
with non-zero B, the fused LoRA forward), prepares the packed copies (timed, with the RSS they
add), then alternates whole ``generate()`` calls (``--prompts`` x ``--group`` rows, ``--tokens``
tokens, EOS ignored, per-prompt streams as in training; the order flips every round, the first
round is a warm-up) with ``packed_weights`` off and on, on the same engine and model. Prints the
medians, their ratio, and how many rows sampled the same tokens (different kernels round
differently, so a row can diverge after a near-tie) and the largest log-prob difference before
the first divergence.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=4)
    args = parser.parse_args()
    import torch

    from generation_ab import PROMPT_SETS, build_policy
    from grpo.allocator import keep_freed_memory
    from grpo.engines.base import SamplingParams
    from grpo.engines.hf import HFEngine
    from grpo.fused_lora import pack_base_weights, use_fused_lora
    from grpo.prompts import encode_prompt

    torch.set_num_threads(args.threads)
    keep_freed_memory()
    tok, model, _ = build_policy(args.model, "float32", 16)
    use_fused_lora(model, "fused")
    engine = HFEngine(model, tok)
    before, t0 = rss_mb(), time.perf_counter()
    copy = pack_base_weights(model)
    print(f"packed copies: {copy / 2**20:.0f} MB in {time.perf_counter() - t0:.2f} s, RSS +{rss_mb() - before:.0f} MB")
    pairs = (PROMPT_SETS["varied"] * args.prompts)[:args.prompts]
    prompts = [encode_prompt(tok, [{"role": "user", "content": f"What is {a} + {b}?"}]) for a, b in pairs]
    params = SamplingParams(n=args.group, max_new_tokens=args.tokens, temperature=1.0, ignore_eos=True)
    times: dict[bool, list[float]] = {False: [], True: []}
    outs = {}
    for rep in range(args.reps + 1):
        for packed in ((False, True) if rep % 2 else (True, False)):
            engine.packed_weights = packed
            t = time.perf_counter()
            outs[packed] = engine.generate(prompts, params, prompt_seeds=list(range(len(prompts))))
            if rep:
                times[packed].append(time.perf_counter() - t)
    plain, packed = statistics.median(times[False]), statistics.median(times[True])
    rows = [(a, b) for ga, gb in zip(outs[False], outs[True]) for a, b in zip(ga, gb)]
    same, diff = 0, 0.0
    for a, b in rows:
        same += a.token_ids == b.token_ids
        for ta, tb, la, lb in zip(a.token_ids, b.token_ids, a.logprobs, b.logprobs):
            if ta != tb:
                break
            diff = max(diff, abs(la - lb))
    print(f"{args.prompts} x {args.group} rows x {args.tokens} tokens, {args.threads} thread(s), "
          f"{args.reps} rounds: plain {plain:.2f} s, packed {packed:.2f} s -> {plain / packed:.3f}x; "
          f"same tokens {same}/{len(rows)} rows, max log-prob difference {diff:.1e}; "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
