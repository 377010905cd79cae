"""``grpo rm train``: a Bradley-Terry reward model on preference pairs, through LoRA.

For a pair with rewards ``r_c`` (chosen) and ``r_r`` (rejected) the loss is the
Bradley-Terry negative log-likelihood with an optional margin ``m`` (Llama 2's margin
variant; TRL ``RewardTrainer``), plus an optional term that keeps rewards centred on
zero (Eisenstein et al. 2023; TRL ``center_rewards_coefficient``)::

    loss = mean_pairs( -log sigmoid(r_c - r_r - m) ) + center_rewards * mean_pairs( (r_c + r_r)^2 )

Each epoch (or every ``eval_every`` steps) the held-out pairs are scored: pair
accuracy (share with ``r_c > r_r``; ties count as wrong) and the mean margin
``r_c - r_r``. Held-out pairs come from ``eval_data`` or from whole prompts split off
``data`` (``eval_fraction``), never from prompts seen in training. The run directory
gets ``metrics.jsonl``, TensorBoard events, resumable ``checkpoints/``, ``summary.json``
and ``model/``: a standard ``AutoModelForSequenceClassification`` directory.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F

from grpo import checkpoint
from grpo.config import ModelConfig, opt, to_dict
from grpo.errors import UserError
from grpo.metrics import MetricsLogger
from grpo.rm.data import encode_conversation, load_preferences, shuffled, split_by_prompt
from grpo.rm.model import build_for_training, forward_rewards, save_reward_model, score_sequences
from grpo.training import (claim_run_dir, clip_gradients, make_optimizer, progress_bar, resume_training,
                           save_training, seed_everything)


@dataclass
class RMConfig:
    name: str = opt("rm", "run name (used in the default output directory)")
    output_dir: str = opt("runs/{name}", "run directory ({name} is replaced)")
    seed: int = opt(0, "seed for the data order, the held-out split, LoRA and head init")
    data: str = opt("", "preference rows (prompt, chosen, rejected): .jsonl, .json, .parquet or a datasets directory")
    eval_data: str = opt("", "held-out preference rows ('' = hold out eval_fraction of data's prompts)")
    eval_fraction: float = opt(0.1, "share of data's prompts held out when eval_data is not given (0 = none)")
    bad_rows: Literal["error", "skip"] = opt(
        "error", "rows with a missing field, an empty text or chosen == rejected: error (stop and list their "
                 "lines) or skip (drop them with a warning listing their lines)")
    max_length: int = opt(1024, "tokens per prompt + response; longer sequences keep their end")
    epochs: int = opt(1, "passes over the training pairs")
    batch_size: int = opt(16, "pairs per optimizer step")
    micro_batch_size: int = opt(8, "pairs per forward/backward (gradient accumulation up to batch_size)")
    eval_batch_size: int = opt(32, "sequences per forward when scoring held-out pairs")
    lr: float = opt(1e-4, "AdamW learning rate (LoRA adapters and the head)")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    warmup_steps: int = opt(0, "linear warmup optimizer steps")
    schedule: Literal["constant", "linear", "cosine"] = opt("linear", "learning-rate schedule after warmup")
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0 = off)")
    margin: float = opt(0.0, "margin m in -log sigmoid(r_chosen - r_rejected - m); a row's 'margin' field wins")
    center_rewards: float = opt(0.0, "weight of mean((r_chosen + r_rejected)^2), keeping rewards near 0 (e.g. 0.01)")
    eval_every: int = opt(0, "held-out evaluation every N optimizer steps (0: at the end of each epoch)")
    eval_at_start: bool = opt(True, "score the held-out pairs before training (the untrained head: chance level)")
    checkpoint_every: int = opt(0, "resumable checkpoint every N optimizer steps (0: at the end of each epoch)")
    keep_checkpoints: int = opt(2, "checkpoints kept on disk (oldest deleted)")
    threads: int = opt(0, "torch CPU threads (0 = torch default)")
    model: ModelConfig = field(default_factory=ModelConfig,
                               metadata={"help": "base model, LoRA, and the system prompt of chat rows"})

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir.format(name=self.name))


def validate_rm(cfg: RMConfig) -> None:
    checks = [
        (bool(cfg.data), "no preference data: give --data FILE.jsonl or data: in the config"),
        (cfg.epochs >= 1, "epochs must be >= 1"),
        (cfg.batch_size >= 1 and cfg.micro_batch_size >= 1 and cfg.eval_batch_size >= 1, "batch sizes must be >= 1"),
        (0 <= cfg.eval_fraction < 1, "eval_fraction must be in [0, 1)"),
        (cfg.lr > 0, "lr must be > 0"),
        (cfg.max_length >= 8, "max_length must be >= 8"),
        (math.isfinite(cfg.margin), "margin must be finite"),
        (cfg.center_rewards >= 0, "center_rewards must be >= 0"),
        (cfg.eval_every >= 0 and cfg.checkpoint_every >= 0 and cfg.keep_checkpoints >= 1,
         "eval_every and checkpoint_every must be >= 0, keep_checkpoints >= 1"),
        (cfg.model.lora_rank >= 1, "model.lora_rank must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(f"rm config: {message}")


# ------------------------------------------------------------------------------ maths
class BTLoss(NamedTuple):
    loss: torch.Tensor  # scalar, differentiable
    accuracy: float  # share of pairs with r_chosen > r_rejected
    margin: float  # mean r_chosen - r_rejected


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                       center_rewards: float = 0.0) -> BTLoss:
    """Bradley-Terry pairwise loss. chosen, rejected, margin: (B,) rewards and margins.

    ``mean(-log sigmoid(chosen - rejected - margin)) + center_rewards * mean((chosen + rejected)^2)``;
    ``F.logsigmoid`` is stable for large differences of either sign.
    """
    diff = chosen - rejected  # (B,)
    target = diff if margin is None else diff - margin
    loss = -F.logsigmoid(target).mean()
    if center_rewards:
        loss = loss + center_rewards * ((chosen + rejected) ** 2).mean()
    return BTLoss(loss, float((diff > 0).float().mean()), float(diff.detach().mean()))


# ------------------------------------------------------------------------------- data
class EncodedPair(NamedTuple):
    chosen: list[int]
    rejected: list[int]
    margin: float


def load_pairs(cfg: RMConfig):
    """(train pairs, held-out pairs) as ``PreferencePair``s; held-out split off by prompt."""
    pairs = load_preferences(cfg.data, cfg.bad_rows)
    if cfg.eval_data:
        return pairs, load_preferences(cfg.eval_data, cfg.bad_rows)
    return split_by_prompt(pairs, cfg.eval_fraction, cfg.seed)


def encode_pairs(tokenizer, pairs, cfg: RMConfig, source: str) -> list[EncodedPair]:
    out, truncated = [], 0
    for p in pairs:
        c, tc = encode_conversation(tokenizer, p.prompt, p.chosen, cfg.model.system_prompt, cfg.max_length)
        r, tr = encode_conversation(tokenizer, p.prompt, p.rejected, cfg.model.system_prompt, cfg.max_length)
        truncated += tc + tr
        out.append(EncodedPair(c, r, cfg.margin if p.margin is None else p.margin))
    if truncated:
        print(f"warning: {source}: {truncated} sequences longer than max_length={cfg.max_length} tokens "
              "keep only their last tokens", file=sys.stderr)
    return out


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    return shuffled(n, seed * 1_000_003 + epoch)


# ---------------------------------------------------------------------------- trainer
class RewardModelTrainer:
    """``setup()`` / ``train()`` / ``cleanup()``, like ``grpo.trainer.Trainer``."""

    def __init__(self, cfg: RMConfig, resume: bool = False, progress: bool = True):
        self.cfg, self.resume, self.progress = cfg, resume, progress
        self.run_dir = cfg.run_dir
        self.step = 0
        self.metrics = self.run_lock = None

    def setup(self) -> None:
        cfg = self.cfg
        seed_everything(cfg.seed, cfg.threads)
        # before any model is loaded or file written; on --resume also reads and checks the checkpoint
        self.run_lock, resumed = claim_run_dir(self.run_dir, to_dict(cfg), self.resume)
        train_pairs, eval_pairs = load_pairs(cfg)
        self.model, self.tokenizer, self.base_path = build_for_training(cfg.model)
        self.train_set = encode_pairs(self.tokenizer, train_pairs, cfg, cfg.data)
        self.eval_set = encode_pairs(self.tokenizer, eval_pairs, cfg, cfg.eval_data or cfg.data)
        if not self.eval_set:
            print("warning: no held-out pairs (eval_fraction is 0 or data has one prompt); "
                  "held-out accuracy is not measured", file=sys.stderr)
        self.steps_per_epoch = math.ceil(len(self.train_set) / cfg.batch_size)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.optimizer, self.scheduler = make_optimizer(
            (p for p in self.model.parameters() if p.requires_grad), lr=cfg.lr, weight_decay=cfg.weight_decay,
            warmup_steps=cfg.warmup_steps, schedule=cfg.schedule, total_steps=self.total_steps)
        if resumed is not None:
            self.step = resume_training(resumed, self.model, self.optimizer, self.scheduler, lr=cfg.lr,
                                        weight_decay=cfg.weight_decay)["step"]
        self.metrics = MetricsLogger(self.run_dir, self.step)
        print(f"reward model: {cfg.model.name}, {len(self.train_set)} training pairs, {len(self.eval_set)} held-out "
              f"pairs, {self.total_steps} steps of {cfg.batch_size} pairs", file=sys.stderr)

    # --------------------------------------------------------------------- train
    def train(self) -> dict[str, Any]:
        cfg = self.cfg
        summary: dict[str, Any] = {"train_pairs": len(self.train_set), "heldout_pairs": len(self.eval_set)}
        # resumed: the evaluations already logged (a finished run resumed evaluates nothing again)
        logged = {r["step"]: {k: v for k, v in r.items() if k != "step"}
                  for r in self.metrics.records() if "heldout/accuracy" in r}
        if cfg.eval_at_start and self.eval_set:
            if self.step == 0:
                summary["before"] = self.evaluate()
            elif 0 in logged:
                summary["before"] = logged[0]
        bar = progress_bar(self.progress, self.total_steps, self.step, "rm")
        last_eval = self.step if self.step and self.step in logged else -1
        if last_eval > 0:
            summary["after"] = logged[self.step]
        while self.step < self.total_steps:
            epoch, k = divmod(self.step, self.steps_per_epoch)
            order = epoch_order(len(self.train_set), cfg.seed, epoch)
            batch = [self.train_set[i] for i in order[k * cfg.batch_size:(k + 1) * cfg.batch_size]]
            stats = self.update(batch)
            self.step += 1
            self.metrics.log(self.step, {**stats, "epoch": self.step / self.steps_per_epoch})
            if bar is not None:
                bar.set_postfix(loss=f"{stats['loss']:.3f}", acc=f"{stats['train/accuracy']:.2f}", refresh=False)
                bar.update(1)
            end_of_epoch = self.step % self.steps_per_epoch == 0
            if self.eval_set and (self.step % cfg.eval_every == 0 if cfg.eval_every else end_of_epoch):
                summary["after"] = self.evaluate()
                last_eval = self.step
            if self.step % cfg.checkpoint_every == 0 if cfg.checkpoint_every else end_of_epoch:
                self._save_checkpoint()
        if bar is not None:
            bar.close()
        if self.eval_set and last_eval != self.step:
            summary["after"] = self.evaluate()
        self._finish(summary)
        return summary

    def update(self, batch: list[EncodedPair]) -> dict[str, float]:
        """One optimizer step over ``batch`` (micro-batches accumulate gradients)."""
        cfg = self.cfg
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        n, sums = len(batch), {"loss": 0.0, "accuracy": 0.0, "margin": 0.0}
        for start in range(0, n, cfg.micro_batch_size):
            part = batch[start:start + cfg.micro_batch_size]
            m = len(part)
            rewards = forward_rewards(self.model, [p.chosen for p in part] + [p.rejected for p in part])  # (2m,)
            margins = torch.tensor([p.margin for p in part], device=rewards.device)  # (m,)
            out = bradley_terry_loss(rewards[:m], rewards[m:], margins, cfg.center_rewards)
            if not torch.isfinite(out.loss):
                raise UserError(f"reward model training diverged (non-finite loss at step {self.step + 1}); lower lr")
            (out.loss * m / n).backward()
            sums["loss"] += out.loss.item() * m / n
            sums["accuracy"] += out.accuracy * m / n
            sums["margin"] += out.margin * m / n
        grad_norm = clip_gradients([p for p in self.model.parameters() if p.requires_grad], cfg.max_grad_norm)
        if not math.isfinite(grad_norm):
            raise UserError(f"reward model training diverged (non-finite gradient at step {self.step + 1}); lower lr")
        self.optimizer.step()
        lr = self.optimizer.param_groups[0]["lr"]  # this step's, not the scheduler's next one
        self.scheduler.step()
        return {"loss": sums["loss"], "train/accuracy": sums["accuracy"], "train/margin": sums["margin"],
                "grad_norm": grad_norm, "lr": lr}

    def evaluate(self) -> dict[str, float]:
        """Held-out pair accuracy (± binomial stderr), mean margin and loss; logged and printed."""
        pairs = self.eval_set
        self.model.eval()
        scores = score_sequences(self.model, [p.chosen for p in pairs] + [p.rejected for p in pairs],
                                 self.cfg.eval_batch_size)
        n = len(pairs)
        chosen, rejected = torch.tensor(scores[:n]), torch.tensor(scores[n:])
        out = bradley_terry_loss(chosen, rejected, torch.tensor([p.margin for p in pairs]))
        acc = out.accuracy
        m = {"heldout/accuracy": acc, "heldout/accuracy_stderr": math.sqrt(acc * (1 - acc) / n),
             "heldout/margin": out.margin, "heldout/loss": float(out.loss),
             "heldout/reward_mean": float(torch.cat([chosen, rejected]).mean())}
        self.metrics.log(self.step, m)
        epoch = self.step / self.steps_per_epoch
        print(f"[rm step {self.step}, epoch {epoch:.2f}] held-out pairs ({n}): accuracy {acc:.3f} ± "
              f"{m['heldout/accuracy_stderr']:.3f}, mean margin {out.margin:+.3f}, loss {m['heldout/loss']:.3f}",
              file=sys.stderr, flush=True)
        return m

    # --------------------------------------------------------------- checkpoints
    def _save_checkpoint(self) -> Path:
        return save_training(self.run_dir, self.step, self.model, self.optimizer, self.scheduler,
                             to_dict(self.cfg), self.cfg.keep_checkpoints)

    def _finish(self, summary: dict[str, Any]) -> None:
        latest = checkpoint.latest(self.run_dir)
        if latest is None or latest.name != f"{checkpoint.PREFIX}{self.step:06d}":
            self._save_checkpoint()  # the final state is always resumable
        info = {"base_model": self.cfg.model.name, "base_path": self.base_path,
                "system_prompt": self.cfg.model.system_prompt, "max_length": self.cfg.max_length,
                "data": self.cfg.data, "eval_data": self.cfg.eval_data, "steps": self.step,
                "heldout": summary.get("after", {})}
        summary["model_dir"] = str(save_reward_model(self.model, self.tokenizer, self.run_dir / "model", info))
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))

    def cleanup(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if self.run_lock is not None:
            self.run_lock.release()


def run(cfg: RMConfig, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    trainer = RewardModelTrainer(cfg, resume=resume, progress=progress)
    try:
        trainer.setup()
        return trainer.train()
    finally:
        trainer.cleanup()
