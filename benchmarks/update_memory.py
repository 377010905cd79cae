"""Where the update's memory goes: what autograd keeps for backward, with activation checkpointing off and on.

    .venv/bin/python benchmarks/update_memory.py --prompts 4 --group 8 --tokens 128 --threads 1

One micro-batch of the shared-prompt update (``grouped_logprobs``: P prompts of
``--prompt-tokens`` random tokens, G completions of ``--tokens`` each, LoRA r16 on all
linear layers) runs forward and backward, checkpointing off and on, twice each. For each
it prints the memory autograd keeps for backward, measured (``saved_bytes``: distinct
storages the saved-tensor hooks see, so a tensor saved by two operations counts once and
the model's own weights not at all, plus what each checkpointed layer keeps to recompute
from: its arguments and the KV cache it reads), beside ``grpo.memory.estimate`` of the same
micro-batch (what ``optim.memory_budget_gb`` sizes micro-batches by), that estimate's peak
(with its transient allowance), and the forward and backward times. ``--single off|on``
runs one setting in this (fresh) process and also prints the pass's peak: the most bytes of
live tensors (``peak_live_bytes``, the profiler's allocation events) and the growth of the
process's peak RSS (which adds the allocator's caching and fragmentation). Peak RSS of a
whole step: ``benchmarks/step_throughput.py --systems ours_nockpt,ours_ckpt``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from grpo import logprobs, memory  # noqa: E402
from grpo.attention import apply_attention_dtype  # noqa: E402
from grpo.fused_lora import use_fused_lora  # noqa: E402
from grpo.models import add_lora, load_causal_lm, resolve_model_path  # noqa: E402
from grpo.rms_norm import use_rms_norm_function  # noqa: E402

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


def peak_live_bytes(run) -> int:
    """The most bytes torch's CPU allocator held at once during ``run()``, above what it held when
    ``run`` started: the running sum of the profiler's allocation and free events (torch.profiler,
    ``profile_memory=True``), so allocator caching and fragmentation do not count."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith(key + ":")))


def measure(model, batch, on: bool, plan: memory.Plan) -> dict[str, float]:
    """Measured bytes kept for backward (``saved_bytes``) beside the estimate, the pass's times, and
    the growth of the process's peak RSS during the pass (VmHWM, reset first through
    /proc/self/clear_refs; meaningful in a fresh process only: pages freed by an earlier pass
    and kept by the allocator are reused without growing RSS)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    rss0 = _status_kib("VmRSS")
    t0 = time.perf_counter()
    kept, lp = saved_bytes(model, lambda: logprobs.grouped_logprobs(model, batch, checkpoint_layers=on,
                                                                     with_entropy=True).logprobs)
    t1 = time.perf_counter()
    lp.sum().backward()
    t2 = time.perf_counter()
    peak_rss = _status_kib("VmHWM") - rss0
    model.zero_grad(set_to_none=True)
    b = batch.completion_ids.shape
    shape = memory.Batch(prompts=batch.prompt_ids.shape[0], sequences=b[0], prompt_len=batch.prompt_ids.shape[1],
                         completion_len=b[1], packed_len=0, loss_tokens=int(batch.loss_mask.sum()))
    est = memory.estimate(plan.shape, dataclasses.replace(plan.settings, checkpointing=on), shape)
    return {"measured_mib": kept / 2**20, "estimated_mib": est.saved / 2**20, "peak_mib": est.total / 2**20,
            "forward_s": t1 - t0, "backward_s": t2 - t1, "peak_rss_mib": peak_rss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=43)
    parser.add_argument("--attention-dtype", default="auto", help="model.attention_dtype (auto: float32 "
                        "attention under a bf16 base on CPU, as training runs it)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lora-kernel", choices=["fused", "peft"], default="fused",
                        help="model.lora_kernel (fused, the default, also binds grpo/rms_norm.py, as training does)")
    parser.add_argument("--transformers-norms", action="store_true",
                        help="leave the RMSNorms as transformers' (their float32 input kept) under the fused kernel")
    parser.add_argument("--single", choices=["off", "on"], help="one pass with checkpointing off/on, no warm-up, "
                        "in this fresh process: also prints the peak RSS growth during it beside the estimated peak")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = load_causal_lm(resolve_model_path(args.model), args.dtype, "cpu")
    attention = apply_attention_dtype(base, args.attention_dtype, "cpu")
    model = add_lora(base, 16, 32, 0.0, TARGETS)
    fused = args.lora_kernel == "fused"
    use_fused_lora(model, args.lora_kernel)
    norms = use_rms_norm_function(model, fused and not args.transformers_norms)
    plan = memory.make_plan(1.0, base.config, base.get_input_embeddings().weight.element_size(), 16, TARGETS,
                            False, packing=False, fast_head=True, checkpointing=False, device="cpu",
                            chunk_tokens=512, lora_fused=fused)
    logprobs.set_update_mode(model)
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompts = [torch.randint(3, vocab, (args.prompt_tokens,), generator=gen).tolist() for _ in range(args.prompts)]
    group_index = [p for p in range(args.prompts) for _ in range(args.group)]
    completions = [torch.randint(3, vocab, (args.tokens,), generator=gen).tolist() for _ in group_index]
    batch = logprobs.pack_grouped(prompts, group_index, completions, 0)
    print(f"{args.model} ({args.dtype} base, {attention} attention, {args.lora_kernel} LoRA, {norms} norms through "
          f"grpo/rms_norm.py), {args.prompts} prompts x {args.prompt_tokens} tokens, {len(completions)} completions x "
          f"{args.tokens} tokens, {args.threads} thread(s)")
    if args.single:
        on = args.single == "on"
        r = measure(model, batch, on, plan)

        def run():
            logprobs.grouped_logprobs(model, batch, checkpoint_layers=on, with_entropy=True).logprobs.sum().backward()

        live = peak_live_bytes(run) / 2**20
        model.zero_grad(set_to_none=True)
        print(f"checkpointing {args.single}: kept for backward measured {r['measured_mib']:.0f} MiB, estimated "
              f"{r['estimated_mib']:.0f} MiB; peak of the pass: live tensors (profiler) {live:.0f} MiB, "
              f"RSS growth {r['peak_rss_mib']:.0f} MiB, estimated {r['peak_mib']:.0f} MiB; forward "
              f"{r['forward_s']:.2f} s, backward {r['backward_s']:.2f} s")
        return
    measure(model, batch, False, plan)  # warm-up: first-call allocations
    print("| checkpointing | kept for backward: measured MiB | estimated MiB (grpo/memory.py) | estimated / "
          "measured | estimated peak MiB (+ transient) | forward s | backward s |")
    print("|---|---|---|---|---|---|---|")
    for on in (False, True, False, True):
        r = measure(model, batch, on, plan)
        print(f"| {'on' if on else 'off'} | {r['measured_mib']:.0f} | {r['estimated_mib']:.0f} | "
              f"{r['estimated_mib'] / r['measured_mib']:.3f} | {r['peak_mib']:.0f} | {r['forward_s']:.2f} | "
              f"{r['backward_s']:.2f} |", flush=True)

if __name__ == "__main__":
    main()
