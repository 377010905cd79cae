"""Where the update's memory goes: what autograd keeps for backward, with activation checkpointing off and on.

    .venv/bin/python benchmarks/update_memory.py --prompts 4 --group 8 --tokens 128 --threads 1

One micro-batch of the shared-prompt update (``grouped_logprobs``: P prompts of
``--prompt-tokens`` random tokens, G completions of ``--tokens`` each, LoRA r16 on all
linear layers) runs forward and backward, checkpointing off and on, twice each. For each
it prints the memory of the tensors autograd keeps for backward (distinct storages, so a
tensor saved by two operations counts once, the model's own weights not at all), split into the backbone (decoder layers) and
the chunked LM head, and the forward and backward times. Under checkpointing the
saved-tensor hooks see only what is saved outside the recomputed layers; the inputs each
checkpointed layer keeps (b x T x hidden per layer) are added as computed. Peak RSS per
setting needs a process each: ``benchmarks/step_throughput.py --systems ours_nockpt,ours_ckpt``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from grpo import logprobs  # noqa: E402
from grpo.models import add_lora, load_causal_lm, resolve_model_path  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tensors(obj, out: list) -> None:
    """Every tensor in ``obj``: nested tuples/lists/dicts, and the keys/values a KV cache holds."""
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            _tensors(x, out)
    elif isinstance(obj, dict):
        for x in obj.values():
            _tensors(x, out)
    elif hasattr(obj, "layers") and isinstance(getattr(obj, "layers"), list):  # a transformers Cache
        for layer in obj.layers:
            _tensors([getattr(layer, "keys", None), getattr(layer, "values", None)], out)


def saved_bytes(model, forward) -> tuple[int, object]:
    """Bytes autograd keeps for backward while ``forward()`` builds its graph: distinct storages
    (a tensor saved by two operations counts once) that saved-tensor hooks see, plus, under
    activation checkpointing, those each checkpointed call keeps to recompute from (its
    arguments: hidden states, mask, RoPE, the KV cache it reads). The model's own weights are
    not counted. Returns (bytes, forward's result)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def keep(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            storages.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    original = logprobs.checkpoint

    def recorded_checkpoint(fn, *args, **kwargs):
        found: list[torch.Tensor] = []
        _tensors([args, kwargs], found)
        for t in found:
            keep(t)
        return original(fn, *args, **kwargs)

    logprobs.checkpoint = recorded_checkpoint
    try:
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            result = forward()
    finally:
        logprobs.checkpoint = original
    return sum(storages.values()), result


def measure(model, batch, on: bool) -> dict[str, float]:
    storages: dict[int, tuple[int, bool]] = {}  # storage address -> (bytes, saved inside the LM head)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}  # saved, but not extra memory
    in_head = [False]

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            storages.setdefault(storage.data_ptr(), (storage.nbytes(), in_head[0]))
        return t

    original_head = logprobs.head_logprobs

    def head(*a, **k):
        in_head[0] = True
        try:
            return original_head(*a, **k)
        finally:
            in_head[0] = False

    logprobs.head_logprobs = head
    try:
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            lp = logprobs.grouped_logprobs(model, batch, checkpoint_layers=on)
        t1 = time.perf_counter()
        lp.sum().backward()
        t2 = time.perf_counter()
    finally:
        logprobs.head_logprobs = original_head
    model.zero_grad(set_to_none=True)
    head_bytes = sum(n for n, h in storages.values() if h)
    backbone = sum(n for n, h in storages.values() if not h)
    if on:  # each checkpointed layer keeps its input hidden states: prompt pass and completion pass
        c = model.config
        itemsize = model.get_input_embeddings().weight.element_size()  # the base dtype's
        tokens = batch.prompt_ids.numel() + batch.completion_ids.numel()
        backbone += tokens * c.hidden_size * itemsize * c.num_hidden_layers
    return {"backbone_mb": backbone / 2**20, "head_mb": head_bytes / 2**20, "forward_s": t1 - t0,
            "backward_s": t2 - t1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=43)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = add_lora(load_causal_lm(resolve_model_path(args.model), args.dtype, "cpu"), 16, 32, 0.0, TARGETS)
    logprobs.set_update_mode(model)
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompts = [torch.randint(3, vocab, (args.prompt_tokens,), generator=gen).tolist() for _ in range(args.prompts)]
    group_index = [p for p in range(args.prompts) for _ in range(args.group)]
    completions = [torch.randint(3, vocab, (args.tokens,), generator=gen).tolist() for _ in group_index]
    batch = logprobs.pack_grouped(prompts, group_index, completions, 0)
    print(f"{args.model} ({args.dtype} base), {args.prompts} prompts x {args.prompt_tokens} tokens, "
          f"{len(completions)} completions x {args.tokens} tokens, {args.threads} thread(s)")
    measure(model, batch, False)  # warm-up: first-call allocations
    print("| checkpointing | kept for backward: backbone MB | LM head MB | forward s | backward s |")
    print("|---|---|---|---|---|")
    for on in (False, True, False, True):
        r = measure(model, batch, on)
        print(f"| {'on' if on else 'off'} | {r['backbone_mb']:.0f} | {r['head_mb']:.0f} | "
              f"{r['forward_s']:.2f} | {r['backward_s']:.2f} |", flush=True)

if __name__ == "__main__":
    main()
