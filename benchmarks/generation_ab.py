"""Generation A/B: the HF engine of an older commit against the working tree's, in one process.

    .venv/bin/python benchmarks/generation_ab.py --old fff2f4b --prompts 4 --group 8 --tokens 64 --reps 5

The old side loads ``grpo/engines/hf.py``, ``grpo/fused_lora.py`` and ``grpo/attention.py`` as
they were at ``--old`` (``git show``) under other module names; everything they import from
``grpo`` comes from the working tree. Two copies of the model are built the way the trainer
builds its policy (``model.dtype``, float32 attention by ``model.attention_dtype: auto``, LoRA
r16 on the 7 linears of each block with non-zero B, the fused LoRA forward), one bound to the
old code and one to the new, with the same weights. Then whole ``generate()`` calls
(``--prompts`` x ``--group`` rows, ``--tokens`` tokens, EOS ignored, per-prompt streams as in
training; ``--prompt-set``: equal or varied prompt lengths, see PROMPT_SETS) alternate old / new (the order flips every round; the first round is a warm-up),
and it prints the medians and whether both sampled the same tokens with log-probs equal to
float rounding (max |difference| printed).

With ``--sampling`` it times only ``sample_tokens`` (old vs new, alternating, ``--reps`` x 20 calls
each) on (``--prompts`` x ``--group``, vocabulary) bf16 logits drawn at random, per-prompt streams.

Like the trainer, it first raises glibc's malloc thresholds (``grpo/allocator.py``).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# "equal": benchmarks/step_throughput.py's prompts, all the same length, so no row is padded and
# transformers drops the attention mask; "varied": numbers of different lengths, as in training,
# so the prompts are left-padded and every decode step's attention gets a mask.
PROMPT_SETS = {"equal": [(3, 4), (7, 8), (2, 9), (6, 5), (1, 8), (9, 9), (4, 4), (5, 7)],
               "varied": [(3, 4), (17, 8), (2, 913), (6125, 5), (1, 88), (99, 9), (4, 40000), (5, 7)]}
OLD_ATTENTION = "sdpa_float32_ab_old"  # the old attention function's name in transformers' registry


def load_old(rev: str, path: str, name: str, folder: str):
    """Module ``path`` of the repository as of ``rev``, imported as ``name``."""
    source = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:{path}"], check=True, capture_output=True,
                            text=True).stdout
    file = os.path.join(folder, name + ".py")
    with open(file, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_policy(model: str, dtype: str, rank: int):
    """(tokenizer, policy, attention implementation): the model loaded in ``dtype`` as the
    trainer builds it (attention by ``model.attention_dtype: auto``), LoRA r``rank`` on the 7
    linears of each block with non-zero B (a trained adapter), fused LoRA not yet applied."""
    import torch

    from grpo.attention import apply_attention_dtype
    from grpo.models import add_lora, load_causal_lm, load_tokenizer, resolve_model_path

    path = resolve_model_path(model)
    tok = load_tokenizer(path)
    base = load_causal_lm(path, dtype)
    base.config.use_cache = False  # as grpo.build.build_policy leaves it; the engine passes use_cache=True
    attention = apply_attention_dtype(base, "auto", "cpu")
    policy = add_lora(base, rank, 2 * rank, 0.0, LORA_TARGETS)
    torch.manual_seed(0)
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.01)
    return tok, policy, attention


def build_pair(args, old_fused, old_attention):
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from grpo.fused_lora import use_fused_lora

    tok, new, attention = build_policy(args.model, args.dtype, args.rank)
    old = copy.deepcopy(new)
    use_fused_lora(new, "fused")
    old_fused.use_fused_lora(old, "fused")
    if attention == "sdpa_float32":
        ALL_ATTENTION_FUNCTIONS.register(OLD_ATTENTION, old_attention.sdpa_float32_forward)
        ALL_MASK_ATTENTION_FUNCTIONS.register(OLD_ATTENTION, sdpa_mask)
        old.config._attn_implementation = OLD_ATTENTION  # its own config object (deepcopy)
    old.eval(), new.eval()
    return old, new, tok, attention


def sampling_ab(args, old_hf) -> None:
    import torch

    from grpo.engines.base import SamplingParams
    from grpo.engines.hf import PromptStreams, sample_tokens

    rows = args.prompts * args.group
    torch.manual_seed(0)
    logits = (torch.randn(rows, args.vocab) * 3).bfloat16()
    owner = torch.arange(rows) // args.group
    params = SamplingParams(n=args.group, temperature=args.temperature)
    sides = {"old": (old_hf.sample_tokens, old_hf.PromptStreams), "new": (sample_tokens, PromptStreams)}
    times: dict[str, list[float]] = {"old": [], "new": []}
    picked = {}
    for rep in range(args.reps + 1):
        for name in ("old", "new") if rep % 2 == 0 else ("new", "old"):
            fn, streams_cls = sides[name]
            streams = streams_cls(range(args.prompts), torch.device("cpu"))
            t0 = time.perf_counter()
            out = [fn(logits, params, None, streams, owner) for _ in range(20)]
            if rep:
                times[name].append((time.perf_counter() - t0) / 20)
            picked[name] = out
    same = all(torch.equal(a[0], b[0]) for a, b in zip(picked["old"], picked["new"]))
    diff = max((a[1] - b[1]).abs().max().item() for a, b in zip(picked["old"], picked["new"]))
    old, new = statistics.median(times["old"]), statistics.median(times["new"])
    print(f"sample_tokens, ({rows}, {args.vocab}) bf16 logits, T={args.temperature}, {args.reps} reps x 20 calls alternating, "
          f"old = {args.old}: old {old * 1e3:.2f} ms, new {new * 1e3:.2f} ms per call, old/new {old / new:.2f}; "
          f"same tokens: {same}; max |log-prob old - new| {diff:.2e}")


def sum_prompts(tok, pairs) -> list[list[int]]:
    """Chat-formatted "What is a + b? Explain step by step." prompts, as token ids."""
    prompts = []
    for a, b in pairs:
        p = tok.apply_chat_template([{"role": "user", "content": f"What is {a} + {b}? Explain step by step."}],
                                    add_generation_prompt=True)
        prompts.append(list(p["input_ids"] if hasattr(p, "keys") else p))
    return prompts


def alternate_generations(sides: dict, tok, prompts, params, reps: int):
    """``generate()`` with each side's (engine class, model), old and new alternating (the order
    flips every round; the first round is a warm-up), per-prompt streams as in training.
    Returns (seconds per side, the last round's (token ids, log-probs) per completion per side)."""
    from grpo.engines.base import stream_seed

    seeds = [stream_seed(0, 0, i) for i in range(len(prompts))]
    times: dict[str, list[float]] = {"old": [], "new": []}
    outputs = {}
    for rep in range(reps + 1):
        for name in ("old", "new") if rep % 2 == 0 else ("new", "old"):
            cls, model = sides[name]
            t0 = time.perf_counter()
            out = cls(model, tok, seed=0).generate(prompts, params, prompt_seeds=seeds)
            if rep:
                times[name].append(time.perf_counter() - t0)
            outputs[name] = [(c.token_ids, c.logprobs) for g in out for c in g]
    return times, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", required=True, help="git revision of the old engine / fused LoRA / attention")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompt-set", choices=sorted(PROMPT_SETS), default="equal")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sampling", action="store_true", help="time sample_tokens alone")
    parser.add_argument("--vocab", type=int, default=49152, help="--sampling: vocabulary size (SmolLM2's)")
    args = parser.parse_args()
    import torch

    from grpo.allocator import keep_freed_memory
    from grpo.engines.base import SamplingParams
    from grpo.engines.hf import HFEngine

    torch.set_num_threads(args.threads)
    keep_freed_memory()
    with tempfile.TemporaryDirectory() as folder:
        old_hf = load_old(args.old, "grpo/engines/hf.py", "ab_old_hf", folder)
        old_fused = load_old(args.old, "grpo/fused_lora.py", "ab_old_fused_lora", folder)
        old_attention = load_old(args.old, "grpo/attention.py", "ab_old_attention", folder)
    if args.sampling:
        sampling_ab(args, old_hf)
        return
    old_model, new_model, tok, attention = build_pair(args, old_fused, old_attention)
    prompts = sum_prompts(tok, PROMPT_SETS[args.prompt_set][:args.prompts])
    params = SamplingParams(n=args.group, max_new_tokens=args.tokens, temperature=args.temperature, ignore_eos=True)
    sides = {"old": (old_hf.HFEngine, old_model), "new": (HFEngine, new_model)}
    times, outputs = alternate_generations(sides, tok, prompts, params, args.reps)
    old, new = statistics.median(times["old"]), statistics.median(times["new"])
    same_tokens = [t for t, _ in outputs["old"]] == [t for t, _ in outputs["new"]]
    diff = max(abs(a - b) for (_, la), (_, lb) in zip(outputs["old"], outputs["new"]) for a, b in zip(la, lb))
    rows = len(prompts) * args.group
    lengths = sorted({len(p) for p in prompts})
    print(f"{args.dtype} weights, attention {attention}, {rows} rows x {args.tokens} tokens, prompts of {lengths} tokens, "
          f"{args.threads} thread(s), "
          f"{args.reps} reps alternating, old = {args.old}:")
    print(f"  old {old:.2f} s (runs {', '.join(f'{t:.2f}' for t in times['old'])})")
    print(f"  new {new:.2f} s (runs {', '.join(f'{t:.2f}' for t in times['new'])})")
    print(f"  old/new {old / new:.3f}; same tokens: {same_tokens}; max |log-prob old - new| {diff:.2e}")


if __name__ == "__main__":
    main()
