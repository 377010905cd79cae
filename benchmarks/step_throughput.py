"""GRPO step throughput and memory: this trainer vs TRL's GRPOTrainer, same work, alternating.

    .venv/bin/pip install trl==1.16.0        # benchmark-only dependency
    .venv/bin/python benchmarks/step_throughput.py --prompts 4 --group 8 --tokens 128 --steps 3

Both systems run the same GRPO work: same model, prompts, group size G, fixed completion
length (EOS ignored, so both generate the same number of tokens), LoRA rank/alpha/targets,
beta, one update pass, same learning rate. Each runs in its own worker process (so peak
memory is its own); the driver alternates one step of each, and reports the median step
time after the warm-up steps, generation and training tokens/s, peak memory (RSS on CPU,
torch.cuda.max_memory_allocated on GPU) and the ratios. Our per-phase times come from the
trainer's own metrics.

Activation checkpointing A/B (peak memory and policy forward+backward time, interleaved):
``--systems ours_nockpt,ours_ckpt`` runs our trainer twice, with
``optim.activation_checkpointing`` false and true, and prints their ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Sequence

# our trainer under a name: the config default, or activation checkpointing forced off / on
OURS = {"ours": [], "ours_nockpt": ["optim.activation_checkpointing=false"],
        "ours_ckpt": ["optim.activation_checkpointing=true"],
        # bf16 base, attention in the weights' dtype vs in float32 (model.attention_dtype)
        "ours_bf16_att_model": ["model.dtype=bfloat16", "model.attention_dtype=model"],
        "ours_bf16_att_fp32": ["model.dtype=bfloat16", "model.attention_dtype=float32"],
        # LoRA through peft's own forward instead of the fused one (model.lora_kernel)
        "ours_peft_lora": ["model.lora_kernel=peft"]}
SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "vocab_size")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ----------------------------------------------------------------------------- workers
def _peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _prompts(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"What is {a} + {b}? Explain step by step."}]
            for a, b in [(3, 4), (7, 8), (2, 9), (6, 5), (1, 8), (9, 9), (4, 4), (5, 7)][:n]] * (1 + n // 8)


def worker_ours(args) -> None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from grpo.config import load_config
    from grpo.logprobs import split_head
    from grpo.prepared_linear import uses_bf16_products
    from grpo.registry import TASKS, VERIFIERS
    from grpo.trainer import Trainer
    from tasks.base import Task
    from verifiers.base import Score, Verifier

    prompts = _prompts(args.prompts)[:args.prompts]

    class Alternating(Verifier):
        """Reward 0, 1, 0, 1, ... by position: the same rewards as the TRL worker's, so both
        systems see nonzero advantages and do the same update work."""
        isolation = "inline"

        def score(self, completions, **fields):
            return [Score(float(i % 2), "alternating") for i in range(len(completions))]

    VERIFIERS.add("_bench_alternating", Alternating, source="benchmark")

    class BenchTask(Task):
        def rows(self, split):
            return [{"id": str(i), "prompt": p, "verifiers": {"_bench_alternating": 1.0}} for i, p in enumerate(prompts)]

    TASKS.add("_bench", BenchTask, source="benchmark")
    cfg = load_config(None, [
        f"model.name={args.model}", f"model.device={args.device}", f"model.lora_rank={args.rank}",
        f"model.lora_alpha={2 * args.rank}", f"model.lora_target_modules=[{','.join(LORA_TARGETS)}]",
        "task.name=_bench", f"output_dir={args.out}/{args.worker}", f"rollout.prompts_per_step={args.prompts}",
        f"rollout.num_generations={args.group}", f"rollout.max_new_tokens={args.tokens}", "rollout.ignore_eos=true",
        f"loss.beta={args.beta}", f"optim.lr={args.lr}", f"optim.micro_batch_size={args.prompts * args.group}",
        "eval.at_start=false", "eval.at_end=false", "checkpoint_every=0", f"steps={10 ** 6}", f"threads={args.threads}",
        *OURS[args.worker],
    ])
    trainer = Trainer(cfg, progress=False)
    trainer.setup()
    sampling = trainer.sampling_params()
    c = trainer.model.config
    print(json.dumps({"info": {"dtype": str(next(trainer.model.parameters()).dtype).removeprefix("torch."),
                               "prompt_lens": [len(trainer._encode(p)) for p in prompts],
                               "shape": {k: getattr(c, k, None) for k in SHAPE_KEYS}}}), flush=True)
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        if args.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
        m = trainer.train_step(sampling)
        parts = split_head(trainer.model)
        print(json.dumps({"step_s": m["time/step"], "generate_s": m["time/generate"], "score_s": m["time/score"],
                          "reference_s": m["time/reference_and_old"], "policy_s": m["time/policy_forward_backward"],
                          "optimizer_s": m["time/optimizer"], "gen_tokens": m["tokens/generated"],
                          "train_tokens": m["tokens/trained"], "peak_mb": _peak_memory_mb(args.device),
                          "head_bf16_products": parts is not None and uses_bf16_products(parts[1])}), flush=True)
    trainer.cleanup()


def worker_trl(args) -> None:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from grpo.models import resolve_model_path

    if args.threads:
        torch.set_num_threads(args.threads)

    path = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    bf16 = args.device.startswith("cuda") or args.trl_bf16
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if bf16 else torch.float32)
    prompts = _prompts(args.prompts)[:args.prompts]
    data = Dataset.from_list([{"prompt": p} for p in prompts] * 10_000)
    tokens = args.tokens

    class Gate(TrainerCallback):
        """Blocks before each step until the driver says 'step'; reports the step's time after."""

        def on_step_begin(self, *a, **k):
            line = sys.stdin.readline()
            if line.strip() != "step":
                os._exit(0)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            n = args.prompts * args.group
            print(json.dumps({"step_s": time.perf_counter() - self.t0, "gen_tokens": n * tokens,
                              "peak_mb": _peak_memory_mb(args.device)}), flush=True)

    config = GRPOConfig(
        output_dir=f"{args.out}/trl", per_device_train_batch_size=args.prompts * args.group,
        num_generations=args.group, max_completion_length=tokens, gradient_accumulation_steps=1,
        num_iterations=1, beta=args.beta, learning_rate=args.lr, max_steps=10 ** 6, logging_steps=10 ** 6,
        save_strategy="no", report_to=[], use_cpu=not args.device.startswith("cuda"),
        bf16=bf16, temperature=1.0, seed=0, gradient_checkpointing=not args.trl_no_checkpointing,
        generation_kwargs={"min_new_tokens": tokens}, disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [0.0 + (i % 2) for i in range(len(completions))],
                          args=config, train_dataset=data, processing_class=tokenizer,
                          peft_config=LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=LORA_TARGETS,
                                                 task_type="CAUSAL_LM"),
                          callbacks=[Gate()])
    print("ready", flush=True)
    trainer.train()


# ------------------------------------------------------------------------------ driver
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--steps", type=int, default=3, help="measured steps per system")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--systems", default="ours,trl", help=f"comma-separated: trl, {', '.join(OURS)}")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads in both workers (0 = torch default)")
    parser.add_argument("--rate-seconds", type=float, default=0.5, help="length of each matmul-rate window")
    parser.add_argument("--rate-shapes", type=int, default=len(CPU_RATE_SHAPES),
                        help="how many of CPU_RATE_SHAPES the CPU matmul rate is the best of (1: the 512-row one)")
    parser.add_argument("--trl-bf16", action="store_true", help="TRL in bf16 on CPU too (its CPU default is fp32)")
    parser.add_argument("--trl-no-checkpointing", action="store_true",
                        help="TRL without gradient checkpointing (GRPOConfig's default turns it on)")
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--json", default=None, help="write all step records here")
    parser.add_argument("--worker", choices=[*OURS, "trl"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        (worker_trl if args.worker == "trl" else worker_ours)(args)
        return

    systems = args.systems.split(",")
    rates = measure_rates(args.threads, args.device, args.rate_seconds, CPU_RATE_SHAPES[:max(1, args.rate_shapes)])
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    # A worker that fails (its traceback is on stderr) is dropped and the others go on: a one-shot
    # run on a lent machine keeps what the rest measured; the exit status still says it failed.
    procs, infos, failed = {}, {}, {}
    for name in systems:
        cmd = [sys.executable, __file__, "--worker", name] + [a for a in sys.argv[1:] if a != "--worker"]
        procs[name] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        try:
            infos[name] = _expect_ready(name, procs[name])
        except WorkerFailed as e:
            failed[name] = _dropped(e)
    live = [n for n in systems if n not in failed]
    if not live:
        raise SystemExit("step_throughput: no worker started: " + "; ".join(failed.values()))
    if "ours" in infos and not args.device.startswith("cuda"):  # the decode-shape rate, at our dtype
        rates["decode"] = decode_rate(args, infos["ours"])
    records: dict[str, list[dict]] = {n: [] for n in live}
    for i in range(args.warmup + args.steps):
        for name in list(live):  # alternate: one step of each system in turn
            try:
                rec = _step(name, procs[name])
            except WorkerFailed as e:
                failed[name] = _dropped(e)
                live.remove(name)
                continue
            rec["warmup"] = i < args.warmup
            records[name].append(rec)
            print(f"{name:5s} step {i + 1}: {rec['step_s']:.2f} s", file=sys.stderr, flush=True)
        if args.json:  # after every round: what was measured survives a crash or a timeout
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "records": records, "rates": rates, "infos": infos,
                           "failed": failed}, f, indent=2)
    for name in live:
        procs[name].stdin.close()
        procs[name].wait(timeout=120)
    measured = {n: r for n, r in records.items() if any(not x["warmup"] for x in r)}
    if measured:
        report(args, measured, rates, infos.get("ours") if "ours" in measured else None)
    if failed:
        raise SystemExit("step_throughput: " + "; ".join(failed.values()))


# CPU shapes (M, K, N) the rate is the best of: a SmolLM2-sized MLP matmul at 512 tokens, and at
# 2048 tokens both ways round (the update's and reference's batches). A single 512-row probe read
# 54 GFLOP/s float32 on an AVX2-only EPYC where the 2048-row ones ran 82-84: phases then "beat" a
# floor taken at the probe's rate, so the floor takes the best shape measured.
CPU_RATE_SHAPES = ((512, 576, 1536), (2048, 576, 1536), (2048, 1536, 576))


def measure_rates(threads: int, device: str, seconds: float = 0.5,
                  cpu_shapes: Sequence[tuple[int, int, int]] = CPU_RATE_SHAPES) -> dict[str, float]:
    """Sustained matmul GFLOP/s on this machine now (fp32 and bf16; one thread and the run's),
    the best of ``cpu_shapes`` on CPU."""
    import torch

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from grpo.precision import matmul_gflops

    run_threads = threads or torch.get_num_threads()
    rates = {"threads": run_threads}
    shapes = [(4096, 4096, 4096)] if device.startswith("cuda") else cpu_shapes
    for dtype in ("float32", "bfloat16"):
        for t in sorted({1, run_threads}) if not device.startswith("cuda") else [run_threads]:
            rates[f"{dtype}@{t}"] = max(matmul_gflops(getattr(torch, dtype), t, shape, seconds, device)
                                        for shape in shapes)
    return rates


def _shape(info: dict):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from roofline import Shape

    c = info["shape"]
    return Shape(c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["num_attention_heads"],
                 c["num_key_value_heads"] or c["num_attention_heads"],
                 c["head_dim"] or c["hidden_size"] // c["num_attention_heads"], c["vocab_size"])


def decode_rate(args, info: dict) -> float:
    """GFLOP/s of the decode step's linears at prompts x G rows in our dtype (``roofline.decode_gflops``)."""
    import torch
    from roofline import decode_gflops

    return decode_gflops(_shape(info), args.prompts * args.group, getattr(torch, info["dtype"]),
                         args.threads or torch.get_num_threads(), args.rate_seconds)


class WorkerFailed(Exception):
    """A benchmark worker exited before it was ready or during a step."""


def _dropped(e: WorkerFailed) -> str:
    print(f"step_throughput: {e}; going on without it", file=sys.stderr, flush=True)
    return str(e)


def _expect_ready(name: str, proc: subprocess.Popen) -> dict:
    info: dict = {}
    for line in proc.stdout:
        if line.startswith('{"info"'):
            info = json.loads(line)["info"]
        if line.strip() == "ready":
            return info
    raise WorkerFailed(f"{name} worker exited before it was ready (exit {proc.wait()})")


def _step(name: str, proc: subprocess.Popen) -> dict:
    """Ask ``proc`` for one step; its record."""
    try:
        proc.stdin.write("step\n")
        proc.stdin.flush()
    except BrokenPipeError:
        raise WorkerFailed(f"{name} worker died (exit {proc.wait()})") from None
    for line in proc.stdout:
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise WorkerFailed(f"{name} worker died (exit {proc.wait()})")


def report(args, records: dict[str, list[dict]], rates: dict[str, float] | None = None,
           info: dict | None = None) -> None:
    rows = {}
    for name, recs in records.items():
        measured = [r for r in recs if not r["warmup"]]
        step = statistics.median(r["step_s"] for r in measured)
        row = {"step_s": step, "peak_mb": max(r["peak_mb"] for r in recs)}
        if "generate_s" in measured[0]:
            gen = statistics.median(r["generate_s"] for r in measured)
            upd = statistics.median(r["reference_s"] + r["policy_s"] + r["optimizer_s"] for r in measured)
            row.update(gen_tok_s=measured[0]["gen_tokens"] / gen, train_tok_s=measured[0]["train_tokens"] / upd,
                       head_bf16_products=any(r.get("head_bf16_products") for r in measured),
                       **{k: statistics.median(r[k] for r in measured)
                          for k in ("generate_s", "score_s", "reference_s", "policy_s", "optimizer_s")})
        rows[name] = row
    print(f"\nGRPO step: model {args.model}, {args.device}, {args.prompts} prompts x G={args.group}, "
          f"{args.tokens} new tokens (fixed), LoRA r={args.rank}, beta={args.beta}, "
          f"median of {args.steps} steps after {args.warmup} warm-up\n")
    print("| system | s/step | gen tok/s | train tok/s | peak MB |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['step_s']:.2f} | {r.get('gen_tok_s', float('nan')):.0f} | "
              f"{r.get('train_tok_s', float('nan')):.0f} | {r['peak_mb']:.0f} |")
    for name, o in rows.items():
        if "generate_s" in o:
            print(f"\n{name} per phase (s): generate {o['generate_s']:.2f}, score {o['score_s']:.2f}, "
                  f"reference {o['reference_s']:.2f}, policy fwd+bwd {o['policy_s']:.2f}, "
                  f"optimizer {o['optimizer_s']:.3f}")
    if "ours_ckpt" in rows and "ours_nockpt" in rows:
        on, off = rows["ours_ckpt"], rows["ours_nockpt"]
        print(f"activation checkpointing on/off: peak memory {on['peak_mb'] / off['peak_mb']:.2f} "
              f"({on['peak_mb']:.0f} / {off['peak_mb']:.0f} MB), policy fwd+bwd {on['policy_s'] / off['policy_s']:.2f}, "
              f"step {on['step_s'] / off['step_s']:.2f}")
    floor_line = ""
    if "ours" in rows and rates and info:
        floor_line = roofline_report(args, rows["ours"], rates, info)
    if "ours" in rows and "trl" in rows:
        print(f"step time ours/trl = {rows['ours']['step_s'] / rows['trl']['step_s']:.3f}, "
              f"peak memory ours/trl = {rows['ours']['peak_mb'] / rows['trl']['peak_mb']:.2f}")
    if floor_line:
        print(floor_line)


def roofline_report(args, ours: dict, rates: dict[str, float], info: dict) -> str:
    """Print the machine's matmul rates and each phase's FLOPs and achieved fraction; return
    the ``compute floor`` line (FLOPs at the best measured rate at the run's threads)."""
    shape = _shape(info)
    from roofline import decode_flops, float32_head_flops, phase_flops

    flops = phase_flops(shape, info["prompt_lens"], args.group, args.tokens, args.rank)
    t = rates["threads"]
    print("\nmachine matmul rate now (GFLOP/s): " + ", ".join(f"{k} threads {v:.0f}" for k, v in rates.items()
                                                           if k not in ("threads", "decode")))
    own = rates[f"{info['dtype']}@{t}"]
    best = max(rates[f"float32@{t}"], rates[f"bfloat16@{t}"])
    print(f"ours runs the base in {info['dtype']} ({own:.0f} GFLOP/s at {t} threads); best dtype here {best:.0f}")
    print("| phase | TFLOP | floor s (best dtype) | ours s | achieved of own-dtype rate |")
    print("|---|---|---|---|---|")
    times = {"generate": ours["generate_s"], "reference": ours["reference_s"],
             "policy": ours["policy_s"] + ours["optimizer_s"]}
    for phase, f in flops.items():
        print(f"| {phase} | {f / 1e12:.3f} | {f / best / 1e9:.2f} | {times[phase]:.2f} | "
              f"{f / own / 1e9 / times[phase]:.1%} |")
    floor = sum(flops.values()) / best / 1e9
    line = f"compute floor: {floor:.2f} s; ours/floor = {ours['step_s'] / floor:.2f}"
    below = floor  # the floor the float32 head's line adds to
    if "decode" in rates:  # decoding cannot run at the big-matmul rate: its matmuls have prompts x G rows
        decode = decode_flops(shape, info["prompt_lens"], args.group, args.tokens)
        below = shaped = floor + decode / 1e9 * (1 / rates["decode"] - 1 / best)
        print(f"decode-shape rate (the backbone's linears at {args.prompts * args.group} rows, weights streamed, "
              f"{info['dtype']}): {rates['decode']:.0f} GFLOP/s; generation's decode steps are "
              f"{decode / flops['generate']:.0%} of its FLOPs")
        line += f"\nfloor at the step's matmul shapes: {shaped:.2f} s; ours/shape floor = {ours['step_s'] / shaped:.2f}"
    cuda = args.device.startswith("cuda")
    head32 = float32_head_flops(shape, info["prompt_lens"], args.group, args.tokens, cuda)
    fp32 = rates[f"float32@{t}"]
    if ours.get("head_bf16_products"):
        line += ("\n(the update's LM-head forwards ran as bf16 products with float32 accumulation, at the "
                 "bf16 rate: the shape floor is also the floor at the step's precisions)")
    elif fp32 < best:  # the LM-head forwards run in float32 by design (unrounded logits)
        precise = below + head32 / 1e9 * (1 / fp32 - 1 / best)
        what = ("generation's, the update's and its recomputation's LM-head forwards" if cuda
                else "the update's LM-head forwards")
        where = "shapes and precisions" if "decode" in rates else "precisions"
        line += (f"\nfloor at the step's {where} ({what}, {head32 / 1e12:.3f} TFLOP, in float32): "
                 f"{precise:.2f} s; ours/that floor = {ours['step_s'] / precise:.2f}")
    return line


if __name__ == "__main__":
    main()
