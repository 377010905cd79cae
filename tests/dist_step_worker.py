"""One policy update on fixed rollouts, for tests/test_distributed.py.

    torchrun --nproc-per-node N tests/dist_step_worker.py MODEL_DIR PLUGIN OUT_FILE STRATEGY

Every rank builds the same synthetic step (P=4 prompts x G=4 completions of varied
lengths, fixed rewards: what ``_draw_groups`` returns, gathered), keeps its share of the
groups (``Trainer._advantages``), runs ``Trainer._update`` and rank 0 saves
the first update's loss and the full adapter gradients of a second update to OUT_FILE. Run without torchrun it is
the one-process reference: same rollouts, same maths, one rank.
"""

from __future__ import annotations

import gc
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import tiny_run_config  # noqa: E402
from grpo import dist  # noqa: E402
from grpo.config import load_config  # noqa: E402
from grpo.engines.base import Completion  # noqa: E402
from grpo.rewards import RewardBatch  # noqa: E402
from grpo.trainer import ScoredGroup, Trainer  # noqa: E402

P, G = 4, 4


def fixed_rollout(trainer: Trainer):
    """The same P prompts, P * G completions and rewards on every rank and at any world size."""
    rng = random.Random(7)
    prompts = [trainer._encode([{"role": "user", "content": f"say digits {i}"}]) for i in range(P)]
    completions = []
    for _ in range(P * G):
        ids = [rng.randrange(6, 100) for _ in range(rng.randrange(1, 9))]
        completions.append(Completion(ids, "", [-1.0] * len(ids), "stop"))
    rewards = [float(rng.random() < 0.5) + 0.1 * rng.random() for _ in range(P * G)]
    if trainer.cfg.loss.drop_zero_variance:  # the last two groups (rank 1's of 2) score flat: dropped
        rewards[2 * G:] = [0.5] * (2 * G)
    return prompts, completions, rewards


def one_step(model_dir: str, plugin: str, out: str, strategy: str, extra: list[str] = ()) -> None:
    overrides = tiny_run_config(Path(model_dir), Path(out).with_suffix(".run"), Path(plugin), **{
        "rollout.prompts_per_step": P, "rollout.num_generations": G, "optim.max_grad_norm": 0,
        "optim.micro_batch_size": 3, "loss.aggregation": "token_mean", "loss.advantage_scale": "batch",
        "distributed.strategy": strategy, "distributed.timeout_s": 120, "steps": 1})
    cfg = load_config(None, [*overrides, *extra])
    dist.init(cfg.distributed.timeout_s, "cpu")
    trainer = Trainer(cfg, progress=False)
    try:
        trainer.setup()
        prompts, completions, rewards = fixed_rollout(trainer)
        groups = [ScoredGroup(prompts[p], completions[p * G:(p + 1) * G], rewards[p * G:(p + 1) * G],
                              RewardBatch(rewards[p * G:(p + 1) * G], {}, {}, [False] * G)) for p in range(P)]
        rollout = trainer._advantages(groups)  # this rank's share of the whole batch
        stats = trainer._update(rollout)
        trainer._update(rollout)  # a second update: LoRA B is no longer zero, so A gets gradients too
        grads = {}
        for name, p in trainer.model.named_parameters():
            if p.requires_grad:
                g = p.grad
                grads[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
        if trainer.dist.is_main:
            torch.save({"loss": stats["loss"], "tokens": stats["tokens_in_loss"], "grads": grads,
                        "micro_batches": stats["update/micro_batches"]}, out)
    except BaseException as exc:
        dist.fail(exc)  # as grpo.trainer.run does: leave the group now, no barrier
        raise
    finally:
        trainer.cleanup()
        dist.teardown()


def gloo_threads() -> list[str]:
    """Names of this process's gloo threads (Linux; empty elsewhere)."""
    tasks = Path("/proc/self/task")
    names = [(t / "comm").read_text().strip() for t in tasks.iterdir()] if tasks.is_dir() else []
    return [n for n in names if "gloo" in n]


if __name__ == "__main__":
    one_step(*sys.argv[1:5], extra=sys.argv[5:])
    gc.collect()  # the trainer (and its DDP wrapper) is gone: so must the group and its threads be
    # (not under FSDP2: torch 2.13's fully_shard keeps the group after its module is freed;
    # dist.finish is what keeps those threads out of interpreter finalization)
    if sys.argv[4] == "ddp" and gloo_threads():
        print(f"gloo threads still running after teardown: {gloo_threads()}", file=sys.stderr)
        dist.finish(3)
    dist.finish(0)  # as grpo.cli.main ends a rank
