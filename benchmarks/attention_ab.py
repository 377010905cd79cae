"""Attention A/B under float32 weights: transformers' stock SDPA against grpo's ``sdpa_float32``.

    .venv/bin/python benchmarks/attention_ab.py --reps 3

Under a float32 base on CPU, ``model.attention_dtype: auto`` installs ``grpo.attention``'s
function for its grouped-query path (``enable_gqa``): transformers' own SDPA function copies
every key and value ``heads / kv_heads`` times per layer whenever a mask is passed (prompts of
different lengths in a batch). This builds the policy with ``generation_ab.build_policy`` (float32,
LoRA r16 on the 7 linears, non-zero B, then fused LoRA), copies it, switches the copy to the stock
``sdpa``, then alternates (order flipping each round, first round a warm-up):

- whole ``HFEngine.generate`` calls, ``--prompts`` x ``--group`` rows, ``--tokens`` tokens, EOS
  ignored, prompts of different lengths (``generation_ab.PROMPT_SETS["varied"]``), per-prompt
  streams; it checks both sampled the same tokens;
- the update's shared-prompt forward+backward (``grouped_logprobs``) on those completions.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch
    from generation_ab import PROMPT_SETS, alternate_generations, build_policy, sum_prompts

    from grpo.allocator import keep_freed_memory
    from grpo.engines.base import SamplingParams
    from grpo.engines.hf import HFEngine
    from grpo.fused_lora import use_fused_lora
    from grpo.logprobs import grouped_logprobs, pack_grouped, set_update_mode

    torch.set_num_threads(args.threads)
    keep_freed_memory()
    tok, new, attention = build_policy(args.model, "float32", 16)
    stock = copy.deepcopy(new)
    use_fused_lora(new, "fused")
    use_fused_lora(stock, "fused")
    stock.config._attn_implementation = "sdpa"  # its own config object (deepcopy)
    stock.eval(), new.eval()

    prompts = sum_prompts(tok, PROMPT_SETS["varied"][:args.prompts])
    params = SamplingParams(n=args.group, max_new_tokens=args.tokens, temperature=1.0, ignore_eos=True)
    sides = {"old": (HFEngine, stock), "new": (HFEngine, new)}
    times, outputs = alternate_generations(sides, tok, prompts, params, args.reps)
    same = [t for t, _ in outputs["old"]] == [t for t, _ in outputs["new"]]

    completions = [t for t, _ in outputs["new"]]
    group_index = [i for i in range(len(prompts)) for _ in range(args.group)]
    batch = pack_grouped(prompts, group_index, completions, tok.pad_token_id or 0)
    update = {"old": [], "new": []}
    for model in (stock, new):
        set_update_mode(model)
    for r in range(args.reps + 1):
        order = (("old", stock), ("new", new)) if r % 2 else (("new", new), ("old", stock))
        for name, model in order:
            t0 = time.perf_counter()
            grouped_logprobs(model, batch, 1.0).sum().backward()
            model.zero_grad(set_to_none=True)
            if r:  # round 0 is a warm-up
                update[name].append(time.perf_counter() - t0)

    def line(what: str, t: dict) -> str:
        old, new_ = statistics.median(t["old"]), statistics.median(t["new"])
        return (f"  {what}: stock sdpa {old:.2f} s, {attention} {new_:.2f} s, stock/{attention} {old / new_:.3f} "
                f"(runs {', '.join(f'{x:.2f}' for x in t['old'])} / {', '.join(f'{x:.2f}' for x in t['new'])})")
    print(f"float32 weights, {len(prompts) * args.group} rows x {args.tokens} tokens, prompts of "
          f"{sorted({len(p) for p in prompts})} tokens, {args.threads} thread(s), {args.reps} reps alternating:")
    print(line("generate", times) + f"; same tokens: {same}")
    print(line("update forward+backward", update))


if __name__ == "__main__":
    main()
