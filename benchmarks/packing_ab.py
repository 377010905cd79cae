"""The trainer's update passes grouped vs packed, alternating in one process.

    .venv/bin/python benchmarks/packing_ab.py --threads 1 --prompts 4 --group 8 --min-tokens 64 --max-tokens 64
    .venv/bin/python benchmarks/packing_ab.py --threads 2 --prompts 8 --group 8 --min-tokens 4 --max-tokens 31

Unlike ``packing_speed.py`` (peft's own LoRA forward, no entropy), this runs the passes as
``Trainer._update`` does by default: the policy built as ``generation_ab.build_policy`` (float32,
LoRA r16 on the 7 linears, non-zero B, ``set_update_mode``) with the fused LoRA forward; the
reference pass (adapters off, no grad) and the policy pass (log-probs with entropy, backward)
over micro-batches of ``--micro-batch`` sequences sorted by group and length, on random prompts
of ``--prompt-tokens`` tokens and completions of lengths drawn uniformly from
[``--min-tokens``, ``--max-tokens``]. Grouped (shared-prompt KV cache, completions padded) and
packed (``grpo.packing``) alternate, order flipping each round, the first round a warm-up;
it prints the medians and the padding ratio ``optim.packing: auto`` decides by
(``grpo.packing.packs``).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=44)
    parser.add_argument("--min-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import torch
    from generation_ab import build_policy
    from packing_speed import micro_batches

    from grpo.allocator import keep_freed_memory
    from grpo.fused_lora import use_fused_lora
    from grpo.logprobs import grouped_logprobs, pack_grouped, set_update_mode
    from grpo.packing import pack_tree, packs, tree_logprobs

    torch.set_num_threads(args.threads)
    keep_freed_memory()
    _, model, _ = build_policy(args.model, "float32", 16)
    use_fused_lora(model, "fused")
    set_update_mode(model)
    rng, vocab = random.Random(0), model.config.vocab_size
    P, G = args.prompts, args.group
    prompts = [[rng.randrange(100, vocab) for _ in range(args.prompt_tokens)] for _ in range(P)]
    lengths = [rng.randint(args.min_tokens, args.max_tokens) for _ in range(P * G)]
    completions = [[rng.randrange(100, vocab) for _ in range(n)] for n in lengths]
    micro, grouped = micro_batches(prompts, completions, G, args.micro_batch, pack_grouped)
    sides = {"grouped": grouped, "packed": micro_batches(prompts, completions, G, args.micro_batch, pack_tree)[1]}

    def one_pass(name: str, reference: bool) -> None:
        for b in sides[name]:
            if name == "packed":
                def run(entropy):
                    return tree_logprobs(model, b, 1.0, 512, True, entropy)
            else:
                def run(entropy):
                    return grouped_logprobs(model, b, 1.0, 512, 0, True, entropy)
            if reference:
                with torch.no_grad(), model.disable_adapter():
                    run(False)
            else:
                out = run(True)
                (-out.logprobs.sum() / (P * G)).backward()
        model.zero_grad(set_to_none=True)

    times = {(n, r): [] for n in sides for r in (True, False)}
    for rep in range(args.reps + 1):
        for name in ("grouped", "packed") if rep % 2 == 0 else ("packed", "grouped"):
            for reference in (True, False):
                t0 = time.perf_counter()
                one_pass(name, reference)
                if rep:
                    times[(name, reference)].append(time.perf_counter() - t0)
    ratios = [len(micro[i]) * max(lengths[j] for j in micro[i]) / max(1, sum(lengths[j] for j in micro[i]))
              for i in range(len(micro))]
    auto = [packs("auto", [lengths[j] for j in idx]) for idx in micro]
    print(f"{P} prompts x G={G}, completions {min(lengths)}-{max(lengths)} tokens (mean "
          f"{statistics.mean(lengths):.1f}), micro-batches of {args.micro_batch}, {args.threads} thread(s), "
          f"{args.reps} reps alternating; padding ratio per micro-batch {[round(r, 2) for r in ratios]}, "
          f"optim.packing=auto packs {sum(auto)} of {len(micro)}")
    for reference in (True, False):
        g, p = (statistics.median(times[(n, reference)]) for n in ("grouped", "packed"))
        print(f"  {'reference' if reference else 'policy fwd+bwd'}: grouped {g:.2f} s, packed {p:.2f} s, "
              f"grouped/packed {g / p:.3f} (runs {[round(x, 2) for x in times[('grouped', reference)]]} / "
              f"{[round(x, 2) for x in times[('packed', reference)]]})")


if __name__ == "__main__":
    main()
