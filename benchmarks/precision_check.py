"""bf16 vs fp32 base weights on the same tokens: log-prob difference and forward time.

    .venv/bin/python benchmarks/precision_check.py --threads 1

Samples completions once with the fp32 model, then scores exactly those tokens with the
model in fp32 and in bf16 (log-softmax in fp32 either way, as the trainer does), and times
one no-grad forward of the whole batch in each dtype (and bf16 with model.attention_dtype: float32).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    import torch
    from grpo.attention import apply_attention_dtype
    from grpo.engines.base import SamplingParams
    from grpo.engines.hf import HFEngine
    from grpo.logprobs import pack, sampled_logprobs
    from grpo.models import load_causal_lm, load_tokenizer, resolve_model_path
    from grpo.precision import probe_bf16_speedup

    torch.set_num_threads(args.threads)
    path = resolve_model_path(args.model)
    tok = load_tokenizer(path)
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"What is {a} + {b}? Explain step by step."}],
                                       add_generation_prompt=True) for a, b in [(3, 4), (7, 8), (2, 9), (6, 5)]]
    prompts = [list(p["input_ids"] if hasattr(p, "keys") else p) for p in prompts][:args.prompts]
    fp32 = load_causal_lm(path, "float32").eval()
    out = HFEngine(fp32, tok, seed=0).generate(prompts, SamplingParams(n=args.group, max_new_tokens=args.tokens,
                                                                       ignore_eos=True))
    comps = [c.token_ids for g in out for c in g]
    batch = pack([prompts[i // args.group] for i in range(len(comps))], comps, tok.pad_token_id)
    mask = batch.completion_mask.bool()
    results = {}
    bf16 = load_causal_lm(path, "bfloat16").eval()
    for name in ("float32", "bfloat16", "bfloat16+fp32 attention"):
        if name == "bfloat16+fp32 attention":  # model.attention_dtype: float32 on the same bf16 weights
            apply_attention_dtype(bf16, "float32", "cpu")
        model = fp32 if name == "float32" else bf16
        with torch.no_grad():
            sampled_logprobs(model, batch)  # warm-up
            t0 = time.perf_counter()
            lp = sampled_logprobs(model, batch)
            results[name] = (lp, time.perf_counter() - t0)
    diff = (results["bfloat16"][0] - results["float32"][0])[mask].abs()
    b, n = batch.input_ids.shape
    print(f"{args.model}: {b} sequences x {n} tokens, {int(mask.sum())} completion tokens, {args.threads} thread(s)")
    print(f"|log p bf16 - log p fp32| per token: mean {diff.mean():.4f}, median {diff.median():.4f}, "
          f"p99 {diff.quantile(0.99):.4f}, max {diff.max():.4f}")
    print(f"sequence log-prob difference: mean |sum| {((results['bfloat16'][0] - results['float32'][0]) * mask).sum(-1).abs().mean():.3f}")
    att = (results["bfloat16+fp32 attention"][0] - results["float32"][0])[mask].abs()
    print(f"|log p bf16 with fp32 attention - log p fp32| per token: mean {att.mean():.4f}, median "
          f"{att.median():.4f}, p99 {att.quantile(0.99):.4f}, max {att.max():.4f}; forward "
          f"{results['bfloat16+fp32 attention'][1]:.2f} s")
    print(f"forward (no grad) time: fp32 {results['float32'][1]:.2f} s, bf16 {results['bfloat16'][1]:.2f} s "
          f"(bf16 speedup {results['float32'][1] / results['bfloat16'][1]:.2f}x)")
    print(f"matmul probe now: {probe_bf16_speedup(args.threads)}")


if __name__ == "__main__":
    main()
