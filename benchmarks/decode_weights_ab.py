"""HF-engine decode weights A/B: whole generations with the LoRA layers' weights as they decode.

    .venv/bin/python benchmarks/decode_weights_ab.py --prompts 8 --group 8 --tokens 32 --threads 2 --reps 4
    .venv/bin/python benchmarks/decode_weights_ab.py --variants plain packed --threads 2

Variants (``rollout.packed_weights`` / ``rollout.merged_weights``, ``grpo.fused_lora``):
``plain`` (base ``F.linear`` + the fused LoRA product), ``packed`` (the base through its oneDNN-packed
float32 copy + the LoRA product), ``merged`` (one ``F.linear`` on a float32 copy of W + s B A),
``merged+packed`` (that copy packed).

Builds the policy as the trainer does on CPU (float32, LoRA r16 on the 7 linears of every block
with non-zero B, the fused LoRA forward), prepares each variant's copies once (timed, with the RSS
they add), then alternates whole ``generate()`` calls (``--prompts`` x ``--group`` rows,
``--tokens`` tokens, EOS ignored, per-prompt streams as in training; the order rotates every
round, the first round is a warm-up) on the same engine and model. Before every call the adapter
is written in place (``lora_B += 0``, as an optimizer step would), so a merged variant remakes its
copy inside the timed call, as in training, once per step. Prints each variant's median, its
speed relative to the first variant, how many rows sampled the first variant's tokens (kernels
round differently, so a row can diverge after a near-tie) and the largest log-prob difference
before the first divergence.
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

VARIANTS = {"plain": (False, False), "packed": (True, False), "merged": (False, True), "merged+packed": (True, True)}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def agreement(first, other) -> tuple[int, int, float]:
    """(rows with the same tokens, rows, largest log-prob difference before a row's first divergence)."""
    rows = [(a, b) for ga, gb in zip(first, other) for a, b in zip(ga, gb)]
    same, diff = 0, 0.0
    for a, b in rows:
        same += a.token_ids == b.token_ids
        for ta, tb, la, lb in zip(a.token_ids, b.token_ids, a.logprobs, b.logprobs):
            if ta != tb:
                break
            diff = max(diff, abs(la - lb))
    return same, len(rows), diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["plain", "merged+packed"])
    args = parser.parse_args()
    import torch

    from generation_ab import PROMPT_SETS, build_policy
    from grpo.allocator import keep_freed_memory
    from grpo.engines.base import SamplingParams
    from grpo.engines.hf import HFEngine
    from grpo.fused_lora import fused_layers, prepare_decode_weights, use_fused_lora
    from grpo.prompts import encode_prompt

    torch.set_num_threads(args.threads)
    keep_freed_memory()
    tok, model, _ = build_policy(args.model, "float32", 16)
    use_fused_lora(model, "fused")
    engine = HFEngine(model, tok)
    lora_b = [p for layer in fused_layers(model) for p in layer.lora_B.parameters()]
    for name in args.variants:
        before, t0 = rss_mb(), time.perf_counter()
        copy = prepare_decode_weights(model, *VARIANTS[name])
        if copy:
            print(f"{name}: copies {copy / 2**20:.0f} MB in {time.perf_counter() - t0:.2f} s, "
                  f"RSS +{rss_mb() - before:.0f} MB")
    pairs = (PROMPT_SETS["varied"] * args.prompts)[:args.prompts]
    prompts = [encode_prompt(tok, [{"role": "user", "content": f"What is {a} + {b}?"}]) for a, b in pairs]
    params = SamplingParams(n=args.group, max_new_tokens=args.tokens, temperature=1.0, ignore_eos=True)
    times: dict[str, list[float]] = {name: [] for name in args.variants}
    outs = {}
    for rep in range(args.reps + 1):
        shift = rep % len(args.variants)
        for name in args.variants[shift:] + args.variants[:shift]:
            engine.packed_weights, engine.merged_weights = VARIANTS[name]
            with torch.no_grad():
                for p in lora_b:
                    p.add_(0)  # a new version, as after an optimizer step: merged copies are made again
            t = time.perf_counter()
            outs[name] = engine.generate(prompts, params, prompt_seeds=list(range(len(prompts))))
            if rep:
                times[name].append(time.perf_counter() - t)
    first = args.variants[0]
    base = statistics.median(times[first])
    print(f"{args.prompts} x {args.group} rows x {args.tokens} tokens, {args.threads} thread(s), {args.reps} rounds; "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    for name in args.variants:
        median = statistics.median(times[name])
        same, rows, diff = agreement(outs[first], outs[name])
        print(f"  {name:14s} {median:6.2f} s  {base / median:.3f}x  same tokens as {first}: {same}/{rows} rows, "
              f"max log-prob difference {diff:.1e}  (runs {', '.join(f'{t:.2f}' for t in times[name])})")


if __name__ == "__main__":
    main()
