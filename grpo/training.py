"""The training skeleton both trainers share: seeding, the learning-rate schedule, the
optimizer, gradient clipping, claiming the run directory, checkpoint save / resume and
the progress bar.

``grpo.trainer.Trainer`` (GRPO) and ``grpo.rm.train.RewardModelTrainer`` (Bradley-Terry)
are each ``setup()`` / ``train()`` / ``cleanup()`` over these helpers, so the two cannot
drift apart. The on-disk format is ``grpo.checkpoint``'s, the run-directory rules
``grpo.rundir``'s and the resume-time config check ``grpo.resume``'s.
"""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from grpo import checkpoint, dist, rundir
from grpo.resume import apply_optimizer_settings, reconcile

SCHEDULES = ("constant", "linear", "cosine")


def seed_everything(seed: int, threads: int = 0) -> None:
    """Seed Python, NumPy and torch; ``threads`` > 0 also fixes torch's CPU thread count."""
    if threads:
        torch.set_num_threads(threads)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_factor(step: int, warmup_steps: int, schedule: str, total_steps: int) -> float:
    """The multiplier of the base learning rate for optimizer step ``step`` (0-based).

    Linear warmup ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps, then
    ``constant`` (1), ``linear`` decay to 0 or ``cosine`` decay ``(1 + cos(pi * progress)) / 2``
    to 0 at ``total_steps``, with ``progress = (step - warmup_steps) / (total_steps - warmup_steps)``.
    """
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}; expected one of {SCHEDULES}")


def make_optimizer(params: Iterable[torch.nn.Parameter], *, lr: float, weight_decay: float, warmup_steps: int,
                   schedule: str, total_steps: int, betas: Sequence[float] = (0.9, 0.999)):
    """AdamW over ``params`` and its ``LambdaLR`` schedule (``lr_factor``); returns (optimizer, scheduler)."""
    optimizer = torch.optim.AdamW(list(params), lr=lr, betas=tuple(betas), weight_decay=weight_decay)

    def factor(step: int) -> float:  # a plain function: the scheduler's state_dict then stores no closure
        return lr_factor(step, warmup_steps, schedule, total_steps)

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def clip_gradients(params: Sequence[torch.nn.Parameter], max_grad_norm: float) -> float:
    """The total gradient norm of ``params`` before clipping; clips it to ``max_grad_norm`` (0 = off).

    Works on FSDP2-sharded parameters too (the norm is then a DTensor, made whole here)."""
    if max_grad_norm > 0:
        return _scalar(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    grads = [p.grad for p in params if p.grad is not None]
    return _scalar(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def _scalar(norm: torch.Tensor) -> float:
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def claim_run_dir(run_dir: Path, config: dict[str, Any], resume: bool):
    """Lock and check ``run_dir`` before any model is loaded (``grpo.rundir``); on ``--resume``
    read the newest intact checkpoint and check ``config`` against its saved one
    (``grpo.resume``); only then write ``config.yaml``.

    Returns ``(lock, resumed)``: release the lock when the run ends; ``resumed`` is
    ``(checkpoint path, saved state)`` for ``resume_training``, or None for a fresh run.
    """
    lock = rundir.claim(run_dir, resume)
    try:
        resumed = None
        if resume:
            resumed = checkpoint.find_resumable(run_dir)
            reconcile(resumed[1].get("config"), config, resumed[0].name)
        with rundir.os_errors(f"cannot write the run directory {run_dir}"):
            (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    except BaseException:
        lock.release()
        raise
    return lock, resumed


def save_training(run_dir: Path, step: int, model, optimizer, scheduler, config: dict[str, Any], keep: int,
                  extra: dict[str, Any] | None = None, *, optimizer_state: dict[str, Any] | None = None,
                  adapter_state: dict[str, Any] | None = None) -> Path:
    """Checkpoint a trainer: adapter, optimizer, scheduler, RNG states and config, plus ``extra``
    (the GRPO trainer's data position and engine state). ``optimizer_state`` / ``adapter_state``
    replace the optimizer's and model's own when those are sharded (FSDP2: gathered by the caller)."""
    state = {"step": step, "optimizer": optimizer_state if optimizer_state is not None else optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "rng": checkpoint.rng_state(), "config": config, **(extra or {})}
    return checkpoint.save(run_dir, step, model, state, keep, adapter_state)


def resume_training(resumed: tuple[Path, dict[str, Any]], model, optimizer, scheduler, *, lr: float,
                    weight_decay: float, betas: Sequence[float] = (0.9, 0.999), adapter_loaded: bool = False,
                    load_optimizer: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Load ``claim_run_dir``'s checkpoint into the model, optimizer, scheduler and RNGs; return its state.

    The optimizer's saved hyperparameters give way to the config's (a resumed run may change
    ``lr`` or the schedule: ``grpo.resume.apply_optimizer_settings``).
    """
    path, state = resumed
    if not adapter_loaded:  # the data-parallel trainer loads it before DDP/FSDP2 wrap the model
        checkpoint.load_adapter(path, model)
    (load_optimizer or optimizer.load_state_dict)(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    # the config wins over the saved hyperparameters (recomputing an unchanged lr gives the same float)
    apply_optimizer_settings(optimizer, scheduler, lr, weight_decay, tuple(betas))
    checkpoint.set_rng_state(state["rng"])
    dist.print0(f"resumed from {path} (step {state['step']})", file=sys.stderr)
    return state


def progress_bar(enabled: bool, total: int, initial: int, desc: str):
    """A tqdm bar over optimizer steps, or None when disabled."""
    if not enabled:
        return None
    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)
