"""Update-pass time with and without sequence packing (``optim.packing``), on the embedded SmolLM2.

    flock /tmp/grpo-cpu.lock .venv/bin/python benchmarks/packing_speed.py --threads 2 --reps 2 --batches mixed

One "update pass" = log-probs (LoRA on, with grad) + backward over a whole batch of
P prompts x G completions in micro-batches, exactly as ``Trainer._update`` runs it:
grouped (shared-prompt KV cache, completions right-padded to the micro-batch's longest)
vs packed (each group's prompt and completions in one row, block attention mask).
Two batches: completion lengths mixed (uniform in [min, max]) and all equal (max).
Prints the median of ``--reps`` timed passes after one warm-up, and checks that both
layouts give the same loss.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def micro_batches(prompts, completions, group: int, size: int, pack):
    """The trainer's micro-batches: sequence i continues prompt i // ``group``; sequences sorted by
    group and completion length, cut every ``size``; each built by ``pack`` (``pack_grouped`` or
    ``pack_tree``). Returns (the sequence indices of each micro-batch, the batches)."""
    order = sorted(range(len(completions)), key=lambda i: (i // group, len(completions[i]), i))
    micro = [order[s:s + size] for s in range(0, len(order), size)]
    batches = []
    for idx in micro:
        groups = sorted({i // group for i in idx})
        row_of = {g: r for r, g in enumerate(groups)}
        batches.append(pack([prompts[g] for g in groups], [row_of[i // group] for i in idx],
                            [completions[i] for i in idx], 0))
    return micro, batches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=45)
    ap.add_argument("--min-tokens", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batches", default="mixed,equal", help="which batches to time (comma-separated)")
    args = ap.parse_args()

    import torch

    from grpo.logprobs import grouped_logprobs, pack_grouped
    from grpo.models import add_lora, load_causal_lm, resolve_model_path
    from grpo.packing import pack_tree, tree_logprobs

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = load_causal_lm(resolve_model_path("smollm2-135m"), "float32", "cpu")
    model = add_lora(model, 16, 32, 0.0, LORA_TARGETS)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.01)
    model.eval()
    rng = random.Random(0)
    vocab = model.config.vocab_size
    prompts = [[rng.randrange(100, vocab) for _ in range(args.prompt_tokens)] for _ in range(args.prompts)]
    results = {}
    batches = {"mixed": [rng.randint(args.min_tokens, args.max_tokens) for _ in range(args.prompts * args.group)],
               "equal": [args.max_tokens] * (args.prompts * args.group)}
    for label in args.batches.split(","):
        lengths = batches[label]
        completions = [[rng.randrange(100, vocab) for _ in range(n)] for n in lengths]
        row = {}
        for layout in ("grouped", "packed"):
            _, packed = micro_batches(prompts, completions, args.group, args.micro_batch,
                                      pack_tree if layout == "packed" else pack_grouped)

            def one_pass() -> float:
                total = 0.0
                for b in packed:
                    lp = tree_logprobs(model, b) if layout == "packed" else grouped_logprobs(model, b)
                    loss = -lp.sum() / len(completions)
                    loss.backward()
                    total += float(loss.detach())
                model.zero_grad(set_to_none=True)
                return total

            one_pass()  # warm-up
            times, loss = [], 0.0
            for _ in range(args.reps):
                t0 = time.perf_counter()
                loss = one_pass()
                times.append(time.perf_counter() - t0)
            # positions the network computes, padding included
            run = [b.input_ids.numel() if layout == "packed" else b.prompt_ids.numel() + b.completion_ids.numel()
                   for b in packed]
            row[layout] = {"median_s": statistics.median(times), "times_s": times, "loss": loss,
                           "tokens_run": sum(run)}
        row["speedup"] = row["grouped"]["median_s"] / row["packed"]["median_s"]
        row["same_loss"] = abs(row["grouped"]["loss"] - row["packed"]["loss"]) < 1e-3 * abs(row["grouped"]["loss"])
        results[label] = row
        print(f"{label:5s} lengths {min(lengths)}-{max(lengths)} (mean {statistics.mean(lengths):.1f}): "
              f"grouped {row['grouped']['median_s']:.2f} s, packed {row['packed']['median_s']:.2f} s, "
              f"speed-up x{row['speedup']:.2f}, tokens run {row['grouped']['tokens_run']} vs "
              f"{row['packed']['tokens_run']}, same loss: {row['same_loss']}", flush=True)
    print(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
