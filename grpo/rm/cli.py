"""``grpo rm train`` and ``grpo rm build-pairs``.

    grpo rm train configs/rm/train_arith.yaml [key=value ...] [--resume]
    grpo rm train --data prefs.jsonl --model smollm2-135m [--eval-data held.jsonl] [--epochs 2] [key=value ...]
    grpo rm build-pairs --task arith --model smollm2-135m --n 8 --num-prompts 64 --out pairs.jsonl

``grpo.cli.build_parser`` calls ``add_rm_parser(sub)`` and registers ``run_rm`` as the
``rm`` command. Nothing heavy is imported here (torch loads inside the subcommands).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from grpo.errors import UserError

# --flag -> config key for `grpo rm train` (flags override the YAML; dotted overrides win over both)
_TRAIN_FLAGS = {"data": "data", "eval_data": "eval_data", "model": "model.name", "output": "output_dir",
                "epochs": "epochs", "lr": "lr", "bad_rows": "bad_rows", "name": "name"}


def add_rm_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("rm", help="learned reward models: train a Bradley-Terry RM, build preference pairs",
                       description="Train a reward model on preference pairs (grpo rm train) or turn a "
                                   "verifiable task into preference pairs (grpo rm build-pairs).")
    p.set_defaults(_rm_parser=p)
    rm = p.add_subparsers(dest="rm_command", metavar="RM_COMMAND")

    t = rm.add_parser("train", help="train a reward model (LoRA + scalar head) on prompt/chosen/rejected rows")
    t.add_argument("config", nargs="?", help="YAML config (configs/rm/*.yaml); optional with --data")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. epochs=2 margin=0.5 model.lora_rank=8")
    t.add_argument("--data", help="preference rows (.jsonl/.json/.parquet/datasets dir)")
    t.add_argument("--eval-data", help="held-out preference rows (default: hold out eval_fraction of the prompts)")
    t.add_argument("--model", help="base model spec (embedded name, .gguf, HF directory, hub id)")
    t.add_argument("--output", help="run directory (default runs/{name})")
    t.add_argument("--name", help="run name")
    t.add_argument("--epochs", type=int, help="passes over the training pairs")
    t.add_argument("--lr", type=float, help="learning rate")
    t.add_argument("--bad-rows", choices=["error", "skip"], help="stop at bad rows, or skip them with a warning")
    t.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--help-config", action="store_true", help="list every config key with its type, default and help")

    b = rm.add_parser("build-pairs", help="sample G completions per prompt of a task; pair verified-correct with "
                                          "incorrect ones (JSONL preference rows)")
    b.add_argument("--task", required=True, help="registered task name (grpo list tasks) or module:attr")
    b.add_argument("--model", required=True, help="policy model spec that samples the completions")
    b.add_argument("--adapter", help="LoRA adapter directory to sample from (e.g. runs/arith/adapter)")
    b.add_argument("--out", required=True, help="output JSONL file")
    b.add_argument("--split", choices=["train", "heldout"], default="train", help="task split to draw prompts from")
    b.add_argument("--num-prompts", type=int, default=64, help="prompts taken from the split (0 = all)")
    b.add_argument("--n", type=int, default=8, help="completions G sampled per prompt")
    b.add_argument("--max-new-tokens", type=int, default=64, help="completion length limit")
    b.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    b.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    b.add_argument("--pair-by", choices=["correct", "reward"], default="correct",
                   help="correct: verified-correct vs incorrect; reward: total reward higher by --min-gap")
    b.add_argument("--min-gap", type=float, default=0.5, help="least reward difference of a pair with --pair-by reward")
    b.add_argument("--max-pairs-per-prompt", type=int, default=4, help="most pairs kept per prompt")
    b.add_argument("--seed", type=int, default=0, help="sampling and pairing seed")
    b.add_argument("--task-args", default="{}", help="task keyword arguments as JSON, e.g. '{\"digits\": 1}'")
    b.add_argument("--verifier-args", default="{}", help="per-verifier arguments as JSON, e.g. '{\"math\": {}}'")
    b.add_argument("--system-prompt", help="system message prepended to chat prompts (match training)")
    b.add_argument("--plugins", action="append", default=[], help="python file registering tasks/verifiers")
    b.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    b.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    b.add_argument("--prompts-per-batch", type=int, default=16, help="prompts sampled together")
    b.add_argument("--workers", type=int, default=2, help="worker processes for isolated verifiers")
    b.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run_rm(args: argparse.Namespace) -> int:
    if args.rm_command == "train":
        return _train(args)
    if args.rm_command == "build-pairs":
        return _build_pairs(args)
    args._rm_parser.print_help()
    return 2


def _train(args: argparse.Namespace) -> int:
    from grpo.config import describe, load_config
    from grpo.rm.train import RMConfig, run, validate_rm

    if args.help_config:
        print("\n".join(describe(RMConfig)))
        return 0
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not os.path.isfile(config):
        config, overrides = None, [config] + overrides  # `grpo rm train --data f key=value`: no YAML given
    flags = []
    for flag, key in _TRAIN_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            flags.append(f"{key}={json.dumps(value)}")  # JSON is YAML: paths with ':' or '#' stay strings
    if config is None and args.data is None:
        raise UserError("grpo rm train needs a CONFIG file (configs/rm/) or --data FILE.jsonl")
    cfg = load_config(config, flags + overrides, RMConfig, prepare=None, check=validate_rm)
    summary = run(cfg, resume=args.resume, progress=not args.no_progress)
    print(f"run directory: {cfg.run_dir}")
    print(f"reward model: {summary['model_dir']}")
    if "after" in summary:
        before = summary.get("before", {}).get("heldout/accuracy")
        after = summary["after"]
        start = f"{before:.3f} -> " if before is not None else ""
        print(f"held-out pair accuracy: {start}{after['heldout/accuracy']:.3f} "
              f"± {after['heldout/accuracy_stderr']:.3f} "
              f"({summary['heldout_pairs']} pairs), mean margin {after['heldout/margin']:+.3f}")
    return 0


def _build_pairs(args: argparse.Namespace) -> int:
    import errno
    import os
    from pathlib import Path

    from grpo.config import json_object_arg
    from grpo.rm.pairs import build_pairs, write_jsonl
    from grpo.rundir import os_errors

    task_args = json_object_arg(args.task_args, "--task-args")
    verifier_args = json_object_arg(args.verifier_args, "--verifier-args")
    out_dir = Path(args.out).expanduser().parent
    with os_errors(f"cannot write --out {args.out}"):  # before the sampling, not after it
        out_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(out_dir, os.W_OK):
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(out_dir))
    pairs, stats = build_pairs(
        args.task, args.model, adapter=args.adapter, split=args.split, num_prompts=args.num_prompts, n=args.n,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, pair_by=args.pair_by,
        min_gap=args.min_gap, max_pairs_per_prompt=args.max_pairs_per_prompt, seed=args.seed, task_args=task_args,
        verifier_args=verifier_args, system_prompt=args.system_prompt, plugins=args.plugins, device=args.device,
        dtype=args.dtype, prompts_per_batch=args.prompts_per_batch, workers=args.workers, threads=args.threads,
        progress=not args.no_progress)
    with os_errors(f"cannot write --out {args.out}"):
        write_jsonl(args.out, pairs)
    print(f"{stats['prompts']} prompts x {args.n} completions: accuracy {stats['accuracy']:.3f}, "
          f"{stats['prompts_with_pairs']} prompts with both outcomes, {len(pairs)} pairs -> {args.out}")
    if not pairs:
        print("warning: no pairs: every prompt's completions were all correct or all incorrect "
              "(more --n, another --temperature, or --pair-by reward)", file=sys.stderr)
    return 0


