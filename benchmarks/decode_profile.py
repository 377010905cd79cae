"""Where one decode step of the HF engine goes: a per-token breakdown.

    .venv/bin/python benchmarks/decode_profile.py --batch 32 8 --dtype bfloat16 float32 --threads 1

For each dtype and batch size B it loads the model (default: the embedded SmolLM2-135M) with
LoRA r16 on the 7 linear layers of every block (as `benchmarks/step_throughput.py` does),
prefills B rows of a chat prompt and decodes `--context` tokens, so the KV cache is as long as
in the middle of a 64-token rollout. Then it times, each the median of `--reps` repetitions of
one step at that cache length (the cache is cropped back after each):

- `step`: the model forward of one token per row, adapters on, LM head included (what
  `HFEngine._generate` runs per token), and the same with the adapters off (`-> LoRA`)
  and without the LM head (`-> head`);
- `base matmuls alone`: every base linear layer's matmul at B rows on random inputs, nothing
  else: the arithmetic floor of the backbone at this batch size and dtype;
- `LM head alone`, `sample_tokens` (per-prompt streams), the engine's per-token Python
  (`tolist`, bookkeeping, EOS checks), the KV-cache append (`torch.cat` per layer);
- a `torch.profiler` table of one step's self CPU time by kind of op: base matmuls, LoRA
  matmuls (one side of rank r), LM head, attention, KV cache, norms/activations/adds,
  dtype casts, other. The profiler adds a per-op cost, so its shares are for orientation; the
  wall-clock lines above are the measurement.

Like the trainer, it first raises glibc's malloc thresholds (`grpo/allocator.py`);
`--glibc-default` leaves them as they are.

With `--ab OLD_HF_PY` it instead times whole `generate()` calls (`--prompts` x `--group` rows,
`--tokens` tokens, EOS ignored) of the engine in `grpo/engines/hf.py` against the engine in
the file OLD_HF_PY (e.g. `git show main~3:grpo/engines/hf.py > /tmp/hf_old.py`), alternating
old and new in the same process, `--reps` times each, prints the medians, and checks that
both sampled the same tokens with the same log-probs:

    .venv/bin/python benchmarks/decode_profile.py --ab /tmp/hf_old.py --dtype bfloat16 float32 --reps 3
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def timed(fn, reps: int) -> float:
    """Median wall time of ``fn()`` over ``reps`` calls, after one warm-up call (seconds)."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def build(args, dtype: str):
    import torch

    from grpo.models import add_lora, load_causal_lm, load_tokenizer, resolve_model_path

    path = resolve_model_path(args.model)
    tok = load_tokenizer(path)
    model = load_causal_lm(path, dtype)
    model.config.use_cache = False  # as grpo.build.build_policy leaves it; the engine passes use_cache=True
    model = add_lora(model, args.rank, 2 * args.rank, 0.0, LORA_TARGETS)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # a trained adapter is non-zero
            torch.nn.init.normal_(p, std=0.01)
    model.eval()
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 3 + 4? Explain step by step."}],
                                     add_generation_prompt=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    return model, tok, prompt


def decode_state(model, prompt: list[int], batch: int, context: int):
    """A cache holding ``batch`` rows of ``prompt`` plus ``context`` generated tokens."""
    import torch

    ids = torch.tensor([prompt] * batch)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        tok = out.logits[:, -1].argmax(-1)
        for _ in range(context):
            mask = torch.cat([mask, mask.new_ones((batch, 1))], 1)
            pos = mask.sum(-1, keepdim=True) - 1
            out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=pos, past_key_values=cache,
                        use_cache=True)
            tok = out.logits[:, -1].argmax(-1)
    mask = torch.cat([mask, mask.new_ones((batch, 1))], 1)
    return cache, tok, mask, mask.sum(-1, keepdim=True) - 1


@contextlib.contextmanager
def attention_variant(model, name: str):
    """Run ``model`` with a diagnostic attention function (``skip``: zeros, i.e. no attention
    cost; ``fp32``: grpo/attention.py's ``model.attention_dtype: float32`` function), restored after.
    ``skip`` is a diagnostic only: it does not give the model's numbers."""
    import torch
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def skip(module, query, key, value, attention_mask, **kwargs):
        return torch.zeros_like(query).transpose(1, 2).contiguous(), None

    from grpo.attention import sdpa_float32_forward  # model.attention_dtype: float32

    ALL_ATTENTION_FUNCTIONS.register(f"diag_{name}", {"skip": skip, "fp32": sdpa_float32_forward}[name])
    ALL_MASK_ATTENTION_FUNCTIONS.register(f"diag_{name}", sdpa_mask)
    old, model.config._attn_implementation = model.config._attn_implementation, f"diag_{name}"
    try:
        yield
    finally:
        model.config._attn_implementation = old


def classify(name: str, shapes, rank: int, vocab: int) -> str:
    if name in ("aten::mm", "aten::addmm", "aten::bmm"):
        dims = {d for s in shapes if s for d in s}
        if vocab in dims:
            return "LM head matmul"
        if rank in dims:
            return "LoRA matmuls"
        return "base matmuls"
    if "attention" in name or name.startswith("aten::_scaled_dot") or "flash" in name:
        return "attention (sdpa)"
    if name in ("aten::cat",):
        return "KV cache / mask (cat)"
    if name in ("aten::to", "aten::_to_copy", "aten::copy_"):
        return "dtype casts / copies"
    if name in ("aten::mul", "aten::add", "aten::pow", "aten::mean", "aten::rsqrt", "aten::silu", "aten::neg",
                "aten::add_", "aten::mul_", "aten::cos", "aten::sin"):
        return "norms / act / adds / rope"
    return "other ops (views, mask, index, ...)"


def profile_step(step, rank: int, vocab: int) -> dict[str, float]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    kinds: dict[str, float] = defaultdict(float)
    for ev in prof.key_averages(group_by_input_shape=True):
        kinds[classify(ev.key, ev.input_shapes, rank, vocab)] += ev.self_cpu_time_total / 1e3
    del torch
    return dict(kinds)


def run_one(args, model, tok, prompt, batch: int, dtype: str) -> None:
    import torch
    import torch.nn.functional as F

    from grpo.engines.base import SamplingParams
    from grpo.engines.hf import PromptStreams, sample_tokens

    cache, tok_ids, mask, pos = decode_state(model, prompt, batch, args.context)
    length = cache.get_seq_length()
    inner = model.base_model.model  # LlamaForCausalLM (peft-wrapped linears)
    vocab = inner.config.vocab_size

    def forward(m):
        def go():
            m(input_ids=tok_ids[:, None], attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
            cache.crop(-1)  # drop the appended token again
        return go

    step = forward(model)
    with torch.no_grad():
        t_step = timed(step, args.reps)
        with model.disable_adapter():
            t_nolora = timed(step, args.reps)
        t_backbone = timed(forward(inner.model), args.reps)
        with attention_variant(model, "skip"):
            t_no_attention = timed(step, args.reps)
        with attention_variant(model, "fp32"):
            t_fp32_attention = timed(step, args.reps)
        hidden = torch.randn(batch, 1, inner.config.hidden_size, dtype=inner.lm_head.weight.dtype)
        t_head = timed(lambda: inner.lm_head(hidden).float(), args.reps)
        base_linears = [m.base_layer for n, m in model.named_modules() if hasattr(m, "base_layer")]
        xs = {m.in_features: torch.randn(batch, 1, m.in_features, dtype=m.weight.dtype) for m in base_linears}
        t_mm = timed(lambda: [F.linear(xs[m.in_features], m.weight) for m in base_linears], args.reps)
        logits = torch.randn(batch, vocab) * 3
        streams = PromptStreams(list(range(max(1, batch // args.group))), torch.device("cpu"))
        owner = torch.arange(batch) // args.group
        params = SamplingParams(n=args.group, temperature=1.0)
        t_sample = timed(lambda: sample_tokens(logits, params, None, streams, owner), args.reps)
        eos = torch.tensor([tok.eos_token_id])
        rows = torch.arange(batch)
        toks_l: list[list[int]] = [[] for _ in range(batch)]

        def python_part():
            t, lp = logits[:, 0].long().abs() % vocab, logits[:, 1]
            for r, a, b in zip(rows.tolist(), t.tolist(), lp.tolist()):
                toks_l[r].append(a)
            done = torch.isin(t, eos)
            bool(done.all()), bool(done.any())
            torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        t_py = timed(python_part, args.reps)
        new = torch.randn(cache.layers[0].keys[:, :, :1].shape, dtype=cache.layers[0].keys.dtype)

        def append():
            for layer in cache.layers:
                layer.update(new, new)
            cache.crop(-1)
        t_kv = timed(append, args.reps)
        kinds = profile_step(step, args.rank, vocab)

    ms = 1e3
    print(f"\n## {dtype}, B={batch} rows, cache {length} tokens, {torch.get_num_threads()} thread(s)")
    print("| part | ms per token | share of step |")
    print("|---|---|---|")
    rows_out = [
        ("step: model forward, adapters on (LM head incl.)", t_step),
        ("  of which LoRA adapters (step - adapters off)", t_step - t_nolora),
        ("  of which LM head + fp32 logits (step - backbone)", t_step - t_backbone),
        ("  backbone base matmuls alone (210 F.linear)", t_mm),
        ("  backbone rest (attention, norms, cache, dispatch)", t_backbone - (t_step - t_nolora) - t_mm),
        ("  of which attention (step - step with attention skipped)", t_step - t_no_attention),
        ("  step with model.attention_dtype: float32 instead", t_fp32_attention),
        ("LM head alone (+ .float())", t_head),
        ("KV-cache append alone (30 layers' update + crop)", t_kv),
        ("sample_tokens (per-prompt streams)", t_sample),
        ("engine Python per token (tolist, EOS check, mask cat)", t_py),
    ]
    for name, t in rows_out:
        print(f"| {name} | {t * ms:.2f} | {t / t_step:.0%} |")
    total = t_step + t_sample + t_py
    print(f"| **per token total (step + sampling + Python)** | **{total * ms:.2f}** | |")
    flops = 2 * batch * sum(m.in_features * m.out_features for m in base_linears)
    print(f"base matmuls alone run {flops / t_mm / 1e9:.1f} GFLOP/s at {batch} rows")
    prof_total = sum(kinds.values())
    print(f"torch.profiler, one step, self CPU time by kind (total {prof_total:.1f} ms, profiler overhead included):")
    for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"  {k:38s} {v:8.2f} ms  {v / prof_total:5.1%}")


def load_engine_file(path: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("hf_engine_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.HFEngine


def run_ab(args, model, tok, dtype: str) -> None:
    from generation_ab import alternate_generations, sum_prompts  # a sibling script

    from grpo.engines.base import SamplingParams
    from grpo.engines.hf import HFEngine

    old_engine = load_engine_file(args.ab)
    prompts = sum_prompts(tok, [(3, 4), (7, 8), (2, 9), (6, 5), (1, 8), (9, 9), (4, 4), (5, 7)][:args.prompts])
    params = SamplingParams(n=args.group, max_new_tokens=args.tokens, ignore_eos=True)
    sides = {"old": (old_engine, model), "new": (HFEngine, model)}
    times, outputs = alternate_generations(sides, tok, prompts, params, args.reps)
    old, new = statistics.median(times["old"]), statistics.median(times["new"])
    rows = len(prompts) * args.group
    print(f"{dtype}, {rows} rows x {args.tokens} tokens, {args.reps} reps, old/new alternating: "
          f"old {old:.2f} s (runs {', '.join(f'{t:.2f}' for t in times['old'])}), "
          f"new {new:.2f} s (runs {', '.join(f'{t:.2f}' for t in times['new'])}), "
          f"speed-up {old / new:.2f}x; same tokens and log-probs: {outputs['old'] == outputs['new']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 8])
    parser.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--group", type=int, default=8, help="rows per prompt (per-prompt streams)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--context", type=int, default=32, help="tokens decoded before the timed step")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--glibc-default", action="store_true",
                        help="leave glibc's malloc thresholds as they are (the trainer raises them: grpo/allocator.py)")
    parser.add_argument("--ab", metavar="OLD_HF_PY", help="time generate() against the engine in this file")
    parser.add_argument("--prompts", type=int, default=4, help="--ab: prompts per generate() call")
    parser.add_argument("--tokens", type=int, default=64, help="--ab: tokens per completion")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if not args.glibc_default:
        from grpo.allocator import keep_freed_memory

        print(f"glibc thresholds raised (grpo/allocator.py): {keep_freed_memory()}")
    for dtype in args.dtype:
        model, tok, prompt = build(args, dtype)
        if args.ab:
            run_ab(args, model, tok, dtype)
            continue
        for batch in args.batch:
            run_one(args, model, tok, prompt, batch, dtype)
        del model


if __name__ == "__main__":
    main()
