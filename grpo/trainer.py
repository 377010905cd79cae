"""The GRPO training loop: ``setup()``, ``train()``, ``cleanup()``.

One step reads as the algorithm (see ``train``): sample prompts, roll out G
completions each, score them with the rows' verifiers, turn rewards into
group-relative advantages, update the adapter with the clipped objective, sync the
engine, log, evaluate, checkpoint. The maths lives in ``grpo.algorithms``; this file
wires data between rooms.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from grpo import checkpoint, dist, memory
from grpo.allocator import keep_freed_memory
from grpo.algorithms import (group_advantages, masked_mean, overlong_penalty, policy_loss,
                             truncated_importance_weights)
from grpo.config import RunConfig, to_dict
from grpo.dynamic_sampling import Filled, fill_batch, sampling_metrics
from grpo.engines.base import Completion, SamplingParams, stream_seed
from grpo.errors import PeerFailed, UserError
from grpo.evaluate import EVAL_SEED_OFFSET, evaluate, metrics_from_samples
from grpo.logprobs import (fast_head_agrees, grouped_logprobs, pack_grouped, same_dropout, set_update_mode,
                           use_activation_checkpointing)
from grpo.metrics import MetricsLogger
from grpo.models import adapter_is_identity, model_fingerprint, resolve_model_path
from grpo.packing import TreeBatch, pack_tree, packs, tree_logprobs, use_packing
from grpo.parallel import (Policy, full_adapter_state, generation_mode, load_optimizer_state, optimizer_state,
                           reduce_update_stats, set_gradient_sync, wrap_policy)
from grpo.trackers import check_available as check_trackers
from grpo.prompts import cached_encoder, check_prompts, context_of
from grpo.resume import check_same_base
from grpo.rewards import RewardBatch, RewardRunner, add_logged
from grpo.training import (claim_run_dir, clip_gradients, make_optimizer, progress_bar, resume_training,
                           save_training, seed_everything)
from grpo.tools.episodes import episode_metrics, with_episode_terms


TIME_KEYS = ("time/generate", "time/score", "time/update", "time/step", "time/reference_and_old",
             "time/policy_forward_backward", "time/optimizer")  # reduced as the slowest rank's


class TrainingDiverged(RuntimeError):
    """Loss or gradients became NaN/inf; the last good checkpoint is kept."""


class Sampler:
    """Seeded, resumable order over the training rows: a fresh permutation per epoch."""

    def __init__(self, num_rows: int, seed: int):
        self.num_rows, self.seed = num_rows, seed
        self.epoch, self.index = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        order = list(range(self.num_rows))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def next(self, count: int) -> list[int]:
        out = []
        while len(out) < count:
            if self.index == self.num_rows:
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._permutation()
            out.append(self._order[self.index])
            self.index += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = self._permutation()


@dataclass
class ScoredGroup:
    """One prompt's G completions, scored."""

    prompt_ids: list[int]
    completions: list[Completion]  # (G,)
    rewards: list[float]  # (G,) what the advantages see: the verifiers' total + soft overlong penalty
    scores: RewardBatch  # the verifiers' view of this group (total, per verifier, correct)


@dataclass
class Rollout:
    """One step's data: B = P * G sequences, prompt-major (under torchrun: this rank's share of the groups)."""

    prompt_ids: list[list[int]]  # (B,) prompt token ids per sequence
    completions: list[Completion]  # (B,)
    rewards: torch.Tensor  # (B,)
    advantages: torch.Tensor  # (B,)
    keep: list[int]  # indices of sequences that enter the loss


class Trainer:
    _warned_memory = False  # the update's estimate beyond free memory was said once (_micro_batches)

    def __init__(self, cfg: RunConfig, resume: bool = False, progress: bool = True):
        self.cfg, self.resume, self.progress = cfg, resume, progress
        self.run_dir = cfg.run_dir
        self.step = 0
        self.started = False  # setup finished: a run that fails before leaves no directory it made

    # ------------------------------------------------------------------- setup
    def setup(self) -> None:
        from grpo.build import build_task_rows, build_policy, build_engine

        cfg = self.cfg
        self.dist = dist.info()
        dist.check_divisible(cfg.rollout.prompts_per_step, "rollout.prompts_per_step", self.dist)
        seed_everything(cfg.seed, cfg.threads)
        keep_freed_memory()  # megabyte temporaries reuse pages instead of faulting fresh ones (grpo/allocator.py)
        check_trackers(cfg.report_to)  # a missing tracker library fails before any model work
        # before any model is loaded or file written; on --resume also reads and checks the checkpoint
        self.run_lock, resumed = self._claim_run_dir()
        # watched in _draw_groups, over what every rank scored: every rank stops alike
        self.rewards = RewardRunner(cfg.task.verifier_args, cfg.task.verifier_weights, cfg.verifier_workers,
                                    watch=False)
        self.train_rows, self.heldout_rows = build_task_rows(cfg, self.rewards)
        self._adapter_moved = False  # the LoRA B weights left zero (then the reference pass always runs)
        self.model, self.tokenizer = build_policy(cfg)
        self.base_fingerprint = model_fingerprint(resolve_model_path(cfg.model.name))
        if resumed is not None:
            check_same_base(resumed, self.base_fingerprint, cfg.model.name)
        self.device = next(self.model.parameters()).device
        sharded = self.dist.enabled and cfg.distributed.strategy == "fsdp2"
        self.engine = build_engine(self.model, self.tokenizer, cfg.model, cfg.rollout, seed=cfg.seed, loss=cfg.loss,
                                   tools=cfg.tools, sharded=sharded)
        self._encode = cached_encoder(self.tokenizer, cfg.model.system_prompt, self.engine)
        self.longest_prompt = self._check_prompts()  # after the engine: prompts may carry its tool definitions
        self.fast_head = self._check_fast_head()
        r = cfg.rollout
        self.packing = use_packing(cfg.optim.packing, str(self.device), cfg.tools.enabled, r.num_generations,
                                   r.max_new_tokens, self.model.config, sharded=sharded)
        self.checkpoint_layers = use_activation_checkpointing(cfg.optim.activation_checkpointing, self.model)
        self.memory_plan = self._memory_plan()  # None: fixed optim.micro_batch_size
        self.checkpoint_rule = self._checkpoint_rule()  # None: every micro-batch as checkpoint_layers says
        if resumed is not None:  # the adapter goes in before DDP/FSDP2 wrap the model
            checkpoint.load_adapter(resumed[0], self.model)
        self.policy = wrap_policy(Policy(self.model), cfg.distributed.strategy, self.dist)
        o = cfg.optim
        self.optimizer, self.scheduler = make_optimizer(
            (p for p in self.model.parameters() if p.requires_grad), lr=o.lr, betas=o.betas,
            weight_decay=o.weight_decay, warmup_steps=o.warmup_steps, schedule=o.schedule,
            total_steps=max(1, cfg.steps * cfg.loss.update_passes))
        self.sampler = Sampler(len(self.train_rows), cfg.seed)
        resume_step = 0
        if resumed is not None:
            resume_step = self._load_checkpoint(resumed)
        self.resume_step = resume_step  # its checkpoint is on disk: the run need not write that step again
        self.metrics = None  # rank 0 alone writes metrics, trackers and plots
        if self.dist.is_main:
            self.metrics = MetricsLogger(self.run_dir, resume_step, cfg.report_to, cfg.name, cfg.tracker_project,
                                         to_dict(cfg))
        self.started = True

    def _claim_run_dir(self):
        """Rank 0 claims the run directory (lock, checks, config.yaml); the other ranks then read
        the checkpoint it checked. Returns (lock or None, resumed or None)."""
        lock = resumed = None
        if self.dist.is_main:
            lock, resumed = claim_run_dir(self.run_dir, to_dict(self.cfg), self.resume)
        dist.barrier()
        if self.resume and not self.dist.is_main:
            resumed = checkpoint.find_resumable(self.run_dir)
        return lock, resumed

    def _log(self, step: int, metrics: dict[str, Any]) -> None:
        if self.metrics is not None:  # rank 0
            self.metrics.log(step, metrics)

    def _check_prompts(self) -> int:
        """Every prompt the run will use, encoded now (a bad one is a one-line error before training);
        the longest prompt's length (``grpo.prompts.check_prompts``)."""
        e = self.cfg.eval
        heldout = self.heldout_rows[:e.num_problems] if e.num_problems else self.heldout_rows
        context, name = context_of(self.model, self.engine)
        return check_prompts({"train": self.train_rows, "heldout": heldout}, self._encode, self.cfg.task.name,
                             context, self._max_completion_tokens(), name)

    def _check_fast_head(self) -> bool:
        """Use the chunked LM head only if it reproduces the model's own logits (scaled/capped heads do not)."""
        tokens = self._encode(self.train_rows[0]["prompt"])[:16] if self.train_rows else [0, 1]
        self.model.eval()
        agrees, diff = fast_head_agrees(self.model, tokens)
        if not agrees and diff == diff:  # NaN: the model has no separable head; its forward is used anyway
            print(f"log-probs: the chunked LM head differs from the model's own logits (relative {diff:.2e}; "
                  "scaled or capped logits?): using the model's forward for every log-prob pass", file=sys.stderr)
        return agrees

    # ------------------------------------------------------------------- train
    def train(self) -> dict[str, Any]:
        cfg = self.cfg
        sampling = self.sampling_params()
        summary: dict[str, Any] = {}
        if cfg.eval.at_start and self.heldout_rows:
            if self.step == 0:
                summary["before"] = self._evaluate(0)
            elif (before := self._logged_eval(0)) is not None:
                summary["before"] = before  # resumed: the evaluation logged before step 1
        bar = progress_bar(self.progress and self.dist.is_main, cfg.steps, self.step, "grpo")
        while self.step < cfg.steps:
            metrics = self.train_step(sampling)
            self._log(self.step, metrics)                                              # log
            self._show(bar, metrics)
            if (cfg.eval.every_n_steps and self.step % cfg.eval.every_n_steps == 0 and self.heldout_rows
                    and (self.step < cfg.steps or not cfg.eval.at_end)):  # at_end evaluates the last step
                self._evaluate(self.step)                                              # eval
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self._save_checkpoint()                                                # checkpoint
        if bar is not None:
            bar.close()
        if cfg.eval.at_end and self.heldout_rows:
            # a finished run resumed (or one killed in _finish): the evaluation it logged, not a second record
            logged = self._logged_eval(self.step) if self.step == self.resume_step else None
            logged = dist.broadcast_object(logged)  # rank 0 reads metrics.jsonl; the eval is collective
            summary["after"] = logged if logged is not None else self._evaluate(self.step)
        self._finish(summary)
        return summary

    def sampling_params(self) -> SamplingParams:
        r = self.cfg.rollout
        return SamplingParams(n=r.num_generations, max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                              top_p=r.top_p, top_k=r.top_k, ignore_eos=r.ignore_eos)

    def train_step(self, sampling: SamplingParams) -> dict[str, float]:
        """One GRPO step; returns its metrics."""
        t0 = time.perf_counter()
        self._times, self._drawn = {"generate": 0.0, "score": 0.0}, 0
        filled = self._collect(sampling)                                               # prompts, rollout, verify
        t_rollout = self._now()
        rollout = self._advantages(filled.kept)                                        # advantages
        stats = self._update(rollout)                                                  # policy update
        self.engine.sync_weights()                                                     # engine sync
        self.step += 1
        t_end = self._now()
        times = reduce_update_stats({"time/generate": self._times["generate"], "time/score": self._times["score"],
                                     "time/update": t_end - t_rollout, "time/step": t_end - t0}, (), TIME_KEYS)
        return {**self._rollout_metrics(filled), **stats, **times, "lr": self.lr_used,
                "tokens/generated": sum(len(c.token_ids) for g in filled.drawn for c in g.completions)}

    # ------------------------------------------------------------- the pieces
    def _now(self) -> float:
        """``time.perf_counter()`` once the device has run what was queued: CUDA kernels run
        asynchronously, so without the wait a phase's tail would be timed in the next phase (or,
        at a step's end, in no phase). On CPU it is the clock alone."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _collect(self, sampling: SamplingParams) -> Filled:
        """P scored groups; with dynamic sampling, further rounds until P of them have differing rewards."""
        r = self.cfg.rollout
        if not r.dynamic_sampling:
            return fill_batch(lambda: self._draw_groups(r.prompts_per_step, sampling), r.prompts_per_step, 1)
        return fill_batch(lambda: self._draw_groups(r.prompts_per_step, sampling), r.prompts_per_step,
                          r.max_sampling_rounds, informative=_rewards_differ)

    def _draw_groups(self, count: int, sampling: SamplingParams) -> list[ScoredGroup]:
        """Sample ``count`` prompts, roll out G completions each, score them.

        Under torchrun each rank rolls out and scores its contiguous share of the ``count``
        prompts; the scored groups of every rank are gathered (a collective), so every rank
        returns the same ``count`` groups, in prompt order."""
        G, t0 = sampling.n, time.perf_counter()
        mine = self.dist.slice(count)
        rows = [self.train_rows[i] for i in self.sampler.next(count)][mine.start:mine.stop]
        prompt_ids = [self._encode(r["prompt"]) for r in rows]
        seeds = [stream_seed(self.cfg.seed, self.step, self._drawn + i) for i in mine]  # a stream per prompt
        self._drawn += count
        with generation_mode(self.policy, self.engine):
            groups = self.engine.generate(prompt_ids, sampling, prompt_seeds=seeds)
        t1 = self._now()
        completions = [c for g in groups for c in g]
        scored = self.rewards.score([r for r in rows for _ in range(G)], [c.text for c in completions],
                                    completion_ids=[c.token_ids for c in completions], progress=self._progress())
        self._times["generate"] += t1 - t0
        self._times["score"] += time.perf_counter() - t1
        loss = self.cfg.loss
        penalty = overlong_penalty(torch.tensor([len(c.token_ids) for c in completions]),
                                   self._max_completion_tokens(), loss.overlong_buffer, loss.overlong_penalty)
        total = (torch.tensor(scored.total, dtype=torch.float32) + penalty).tolist()
        total = with_episode_terms(total, completions)  # + per-episode terms (tool-error penalty)
        gathered = dist.all_gather_concat(
            [ScoredGroup(prompt_ids[p], groups[p], total[p * G:(p + 1) * G], slice_scores(scored, p * G, G))
             for p in range(len(rows))])
        self.rewards.watch_failures(concat_scores([g.scores for g in gathered]))  # the same on every rank
        return gathered

    def _advantages(self, groups: list[ScoredGroup]) -> Rollout:
        """Advantages over the whole batch (every rank's groups: batch std etc. as in one process);
        the Rollout of this rank's share of the groups."""
        cfg, G = self.cfg, self.cfg.rollout.num_generations
        rewards = torch.tensor([x for g in groups for x in g.rewards], dtype=torch.float32)
        adv = group_advantages(rewards, G, cfg.loss.advantage_scale, cfg.loss.advantage_eps)
        share = self.dist.share(len(groups))  # the update's split: whole groups, as even as possible
        live = share.stop > share.start
        if not live:  # fewer kept groups than ranks: hold one group with no sequence in the loss
            share = range(0, min(1, len(groups)))
        groups, zero_variance = groups[share.start:share.stop], adv.zero_variance[share.start:share.stop]
        rewards, advantages = rewards[share.start * G:share.stop * G], adv.advantages[share.start * G:share.stop * G]
        completions = [c for g in groups for c in g.completions]
        prompt_ids = [g.prompt_ids for g in groups]
        keep = []
        for i, c in enumerate(completions):
            if not live:
                continue
            if cfg.loss.drop_zero_variance and bool(zero_variance[i // G]):
                continue
            if cfg.loss.mask_truncated and c.finish_reason == "length":
                continue
            if not c.token_ids:
                continue
            keep.append(i)
        seq_prompts = [p for p in prompt_ids for _ in range(G)]
        return Rollout(seq_prompts, completions, rewards, advantages, keep)

    def _memory_plan(self) -> memory.Plan | None:
        """``optim.memory_budget_gb`` for this model and update path; checks one longest sequence fits."""
        cfg = self.cfg
        plan = memory.make_plan(
            cfg.optim.memory_budget_gb, self.model.config, self.model.get_input_embeddings().weight.element_size(),
            cfg.model.lora_rank, cfg.model.lora_target_modules, cfg.model.lora_dropout > 0, self.packing,
            self.fast_head, self.checkpoint_layers, str(self.device), cfg.optim.logprob_chunk_tokens,
            lora_fused=cfg.model.lora_kernel == "fused")
        if plan is not None:
            plan.check(self.longest_prompt, self._max_completion_tokens())
        return plan

    def _checkpoint_rule(self) -> memory.CheckpointRule | None:
        """``optim.activation_checkpointing: auto`` without a memory budget: checkpoint only the
        micro-batches whose activations would otherwise take over a quarter of free memory."""
        cfg = self.cfg
        if cfg.optim.activation_checkpointing != "auto" or not self.checkpoint_layers or self.memory_plan:
            return None  # true / false as configured; with a budget, checkpointing sizes the micro-batches
        return memory.make_checkpoint_rule(
            self.model.config, self.model.get_input_embeddings().weight.element_size(), cfg.model.lora_rank,
            cfg.model.lora_target_modules, cfg.model.lora_dropout > 0, self.packing, self.fast_head,
            str(self.device), cfg.optim.logprob_chunk_tokens, lora_fused=cfg.model.lora_kernel == "fused")

    def _micro_batches(self, rollout: Rollout) -> tuple[list[list[int]], list[bool], dict[str, float]]:
        """Sequence indices per micro-batch, whether each runs under activation checkpointing, and
        metrics of the split.

        Keep a group's sequences together (its prompt is encoded once per micro-batch),
        shortest completions first inside a group; the order is deterministic. Cut every
        ``optim.micro_batch_size`` sequences or, with ``optim.memory_budget_gb``, where the
        next sequence would take the micro-batch's estimated memory over the budget."""
        G = self.cfg.rollout.num_generations
        order = sorted(rollout.keep, key=lambda i: (i // G, len(rollout.completions[i].token_ids), i))
        seqs = [memory.Seq(i // G, len(rollout.prompt_ids[i]), len(c.token_ids),
                           len(c.token_ids) if c.loss_mask is None else sum(c.loss_mask))
                for i, c in ((i, rollout.completions[i]) for i in order)]
        metrics = {}
        if self.memory_plan is None:
            mb = self.cfg.optim.micro_batch_size
            parts = [list(range(s, min(s + mb, len(order)))) for s in range(0, len(order), mb)]
        else:
            parts, largest = self.memory_plan.split(seqs)
            metrics["update/estimated_gb"] = largest / memory.GIB
        rule = self.checkpoint_rule
        checkpointed = [self.checkpoint_layers and (rule is None or rule.needed([seqs[j] for j in part]))
                        for part in parts]
        if rule is not None and not self._warned_memory:  # no budget set: say so before memory runs out
            # only a micro-batch the rule checkpoints can be past free memory (the others fit a quarter of it)
            need = max((rule.beyond_free([seqs[j] for j in part]) for part, c in zip(parts, checkpointed) if c),
                       default=0)
            if need:
                self._warned_memory = True
                print(f"warning: a micro-batch of this update needs an estimated {need / memory.GIB:.3g} GiB even with "
                      f"activation checkpointing, more than the {rule.free / memory.GIB:.3g} GiB free at start: set "
                      "optim.memory_budget_gb=auto (or lower optim.micro_batch_size)",
                      file=sys.stderr)
        metrics["update/checkpointed_micro_batches"] = sum(checkpointed)
        return [[order[j] for j in part] for part in parts], checkpointed, metrics

    def _pack(self, rollout: Rollout, idx: list[int]):
        G = self.cfg.rollout.num_generations
        groups = sorted({i // G for i in idx})
        row_of = {g: r for r, g in enumerate(groups)}
        if packs(self.packing, [len(rollout.completions[i].token_ids) for i in idx]):
            return pack_tree([rollout.prompt_ids[g * G] for g in groups], [row_of[i // G] for i in idx],
                             [rollout.completions[i].token_ids for i in idx], self.tokenizer.pad_token_id, self.device)
        return pack_grouped([rollout.prompt_ids[g * G] for g in groups], [row_of[i // G] for i in idx],
                            [rollout.completions[i].token_ids for i in idx], self.tokenizer.pad_token_id, self.device,
                            [rollout.completions[i].loss_mask for i in idx])  # tool episodes: model tokens only

    def _logprobs(self, batch, grad: bool, adapters: bool = True, entropy: bool = False,
                  dropout_seed: int | None = None, checkpointed: bool = False):
        T, chunk, pad = self.cfg.rollout.temperature, self.cfg.optim.logprob_chunk_tokens, self.tokenizer.pad_token_id
        adapters_off = nullcontext() if adapters else self.model.disable_adapter()

        def compute(model):  # runs inside the policy's forward, where DDP / FSDP2 hook in
            if isinstance(batch, TreeBatch):
                return tree_logprobs(model, batch, T, chunk, self.fast_head, entropy, checkpointed)
            return grouped_logprobs(model, batch, T, chunk, pad, self.fast_head, entropy, checkpointed)

        with torch.set_grad_enabled(grad), adapters_off, same_dropout(dropout_seed, self.device):
            return self.policy(compute)

    def _dropout_seeds(self, count: int) -> list[int | None]:
        """One LoRA-dropout seed per micro-batch, shared by its old and policy passes (None: no dropout);
        each rank its own (the same seeds on every rank drew the same masks). Masks are drawn per
        micro-batch, so with dropout the result depends on the micro-batching and the world size."""
        if self.cfg.model.lora_dropout == 0:
            return [None] * count
        rank = self.dist.rank * 1_000_000_007
        return [(self.cfg.seed * 1_000_003 + self.step) * 4099 + i + rank for i in range(count)]

    def _update(self, rollout: Rollout) -> dict[str, float]:
        cfg = self.cfg
        self.lr_used = self.optimizer.param_groups[0]["lr"]  # logged as "lr" (no update: what it would be)
        micro, checkpointed, split_metrics = self._micro_batches(rollout)
        packed = [self._pack(rollout, idx) for idx in micro]
        # whole-batch normalisers (all ranks): the sum of the ranks' micro-batch losses is the batch loss
        n_seq, n_tok = map(int, dist.all_reduce_sum([len(rollout.keep),
                                                     sum(int(b.loss_mask.sum()) for b in packed)]))
        if not n_seq:  # every group was dropped (e.g. all zero-variance): nothing to learn from
            return {"loss": 0.0, "sequences_in_loss": 0}
        micro, packed, live = self._balance_micro_batches(rollout, micro, packed)
        checkpointed += [False] * (len(micro) - len(checkpointed))  # a rank's padding micro-batch: one sequence
        old_mode = cfg.loss.old_logprobs
        if old_mode == "auto":
            old_mode = "detached" if cfg.loss.update_passes == 1 else "recompute"
        t0 = time.perf_counter()
        set_update_mode(self.model)  # every pass alike: no base-model dropout, LoRA dropout with replayed masks
        seeds = self._dropout_seeds(len(packed))
        # a fresh adapter (every LoRA B zero) computes the base model: the first policy pass's
        # log-probs are the reference's, so the reference pass is skipped (a run's first step)
        ref_from_policy = bool(cfg.loss.beta) and self._adapter_is_identity()
        ref = [None] * len(packed)
        if cfg.loss.beta and not ref_from_policy:
            ref = [self._logprobs(b, grad=False, adapters=False) for b in packed]
        if old_mode == "recompute":
            old = [self._logprobs(b, grad=False, dropout_seed=s) for b, s in zip(packed, seeds)]
        elif old_mode == "rollout":
            old = [self._rollout_logprobs(rollout, idx, b) for idx, b in zip(micro, packed)]
        else:
            old = [None] * len(packed)
        t_ref = self._now()
        t_policy = t_opt = 0.0
        sums = {"loss": 0.0, "kl": 0.0, "clip": 0.0, "ratio": 0.0, "entropy": 0.0}
        grad_norm = 0.0
        engine_diff = 0.0  # the engine's log-probs against the policy that sampled: the first pass's
        for pass_index in range(cfg.loss.update_passes):
            self.optimizer.zero_grad(set_to_none=True)
            sums = dict.fromkeys(sums, 0.0)
            t_pass = time.perf_counter()
            for n, (idx, batch, ref_lp, old_lp, seed) in enumerate(zip(micro, packed, ref, old, seeds)):
                set_gradient_sync(self.policy, n == len(micro) - 1)  # reduce across ranks in the last backward
                logp, entropy = self._logprobs(batch, grad=True, entropy=True, dropout_seed=seed,
                                               checkpointed=checkpointed[n])
                # model-written tokens only (tool observations are context); a rank's padding micro-batch: none
                mask = batch.loss_mask * live[n]
                old_lp = logp.detach() if old_lp is None else old_lp
                if ref_from_policy and ref_lp is None:  # first pass: the adapter has not moved yet
                    ref_lp = ref[n] = logp.detach()
                engine_lp = self._rollout_logprobs(rollout, idx, batch)
                tis = None
                if cfg.loss.tis_cap:  # samples came from the engine's numerics, not the trainer's
                    # (config validation forbids tis_cap with old_logprobs=rollout: old_lp is the trainer's)
                    tis = truncated_importance_weights(old_lp, engine_lp, cfg.loss.tis_cap)
                out = policy_loss(logp, old_lp,
                                  rollout.advantages[idx].to(self.device), mask,
                                  epsilon_low=cfg.loss.epsilon_low, epsilon_high=cfg.loss.epsilon_high,
                                  beta=cfg.loss.beta, ref_logprobs=ref_lp, aggregation=cfg.loss.aggregation,
                                  num_sequences=n_seq, num_tokens=n_tok, max_tokens=self._max_completion_tokens(),
                                  importance_weights=tis, ratio_level=cfg.loss.ratio_level)
                if not torch.isfinite(out.loss):
                    raise TrainingDiverged(f"non-finite loss at step {self.step + 1}")
                out.loss.backward()
                weight = float(mask.sum()) / max(1, n_tok)
                sums["loss"] += out.loss.item()
                sums["kl"] += masked_mean(out.kl.detach(), mask) * weight
                sums["clip"] += masked_mean(out.clipped.float(), mask) * weight
                sums["ratio"] += masked_mean(out.ratio.detach(), mask) * weight
                if pass_index == 0:  # later passes' policy has taken optimizer steps since the rollout
                    engine_diff += masked_mean((engine_lp - logp.detach()).abs(), mask) * weight
                sums["entropy"] += masked_mean(entropy, mask) * weight
            t1 = time.perf_counter()
            params = [p for p in self.model.parameters() if p.requires_grad]
            grad_norm = clip_gradients(params, cfg.optim.max_grad_norm)
            if not math.isfinite(grad_norm):
                raise TrainingDiverged(f"non-finite gradient norm at step {self.step + 1}")
            self.optimizer.step()
            self.lr_used = self.optimizer.param_groups[0]["lr"]  # this step's, not the scheduler's next one
            self.scheduler.step()
            t2 = self._now()
            t_policy, t_opt = t_policy + (t1 - t_pass), t_opt + (t2 - t1)
        stats = {"time/reference_and_old": t_ref - t0, "time/policy_forward_backward": t_policy,
                 "time/optimizer": t_opt, "tokens/trained": sum(b.num_tokens for b, w in zip(packed, live) if w),
                 "loss": sums["loss"], "kl": sums["kl"], "clip_fraction": sums["clip"], "ratio": sums["ratio"],
                 "grad_norm": grad_norm, "engine_logprob_diff": engine_diff, "entropy": sums["entropy"],
                 "sequences_in_loss": n_seq, "tokens_in_loss": n_tok, "update/micro_batches": len(micro),
                 "update/packed_micro_batches": sum(isinstance(b, TreeBatch) for b in packed),
                 **split_metrics}
        return reduce_update_stats(stats, summed=("loss", "kl", "clip_fraction", "ratio", "engine_logprob_diff",
                                                  "entropy", "tokens/trained"),
                                   maxed=(*TIME_KEYS, "update/micro_batches", "update/packed_micro_batches",
                                          "update/estimated_gb", "update/checkpointed_micro_batches"))

    def _adapter_is_identity(self) -> bool:
        """Every rank's adapter shards are a fresh LoRA's (``grpo.models.adapter_is_identity``).
        Once the adapter has moved it is not checked again (no scan, no collective per step)."""
        if self._adapter_moved:
            return False
        self._adapter_moved = dist.all_reduce_max([0.0 if adapter_is_identity(self.model) else 1.0])[0] > 0.0
        return not self._adapter_moved

    def _balance_micro_batches(self, rollout: Rollout, micro: list[list[int]], packed: list):
        """Give every rank the same number of micro-batches (at least one): a rank with fewer
        repeats its first sequence with weight 0 (``live`` = 0), so the gradient reduction and
        FSDP2's per-layer collectives line up across ranks."""
        live = [1] * len(micro)
        count = len(micro)
        if self.dist.enabled:
            count = int(dist.all_reduce_max([len(micro)])[0])
            if self.cfg.distributed.strategy == "ddp":
                count = max(1, len(micro))  # DDP only needs one synchronised backward per rank
        while len(micro) < count:
            pad = [rollout.keep[0] if rollout.keep else 0]
            micro, packed, live = micro + [pad], packed + [self._pack(rollout, pad)], live + [0]
        return micro, packed, live

    def _progress(self) -> dict[str, Any]:
        """Where the run is, for reward functions that read TRL's ``trainer_state``."""
        s = self.sampler
        return {"global_step": self.step, "max_steps": self.cfg.steps, "epoch": s.epoch + s.index / max(1, s.num_rows),
                "is_world_process_zero": self.dist.is_main}

    def _max_completion_tokens(self) -> int:
        """Longest possible completion: the constant normaliser of `constant` aggregation (Dr. GRPO)."""
        tools = self.cfg.tools
        return tools.max_episode_tokens if tools.enabled else self.cfg.rollout.max_new_tokens

    def _rollout_logprobs(self, rollout: Rollout, idx: list[int], batch) -> torch.Tensor:
        out = torch.zeros_like(batch.completion_mask, dtype=torch.float32)
        for row, i in enumerate(idx):
            lps = rollout.completions[i].logprobs
            out[row, :len(lps)] = torch.tensor(lps, dtype=torch.float32)
        return out

    def _rollout_metrics(self, filled: Filled) -> dict[str, float]:
        """Over every group rolled out this step (with dynamic sampling: also those left out of the batch)."""
        groups = filled.drawn
        scored = concat_scores([g.scores for g in groups])
        completions = [c for g in groups for c in g.completions]
        lengths = [len(c.token_ids) for c in completions]
        truncated = [c.finish_reason == "length" for c in completions]
        rewards = torch.tensor(scored.total)
        out = {"reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()),
               "train/accuracy": sum(scored.correct) / len(scored.correct),
               "completion_length": sum(lengths) / len(lengths),
               "truncated_fraction": sum(truncated) / len(truncated),
               "zero_variance_groups": sum(not _rewards_differ(g) for g in groups) / len(groups), **scored.metrics()}
        # the training reward = verifiers' total + the overlong penalty + each episode's own terms
        terms = torch.tensor([sum(c.extra.get("reward_terms", {}).values()) for c in completions], dtype=torch.float32)
        if self.cfg.loss.overlong_buffer:
            shaped = torch.tensor([x for g in groups for x in g.rewards])
            out["reward/overlong_penalty"] = float((shaped - rewards - terms).mean())
        if self.cfg.tools.enabled and self.cfg.tools.error_penalty:
            out["reward/tool_error_penalty"] = float(terms.mean())
        if self.cfg.rollout.dynamic_sampling:
            out.update(sampling_metrics(filled, self.cfg.rollout.num_generations, self.cfg.rollout.prompts_per_step))
        return {**out, **episode_metrics(completions)}

    def _evaluate(self, step: int) -> dict[str, float]:
        cfg = self.cfg
        rows = self.heldout_rows[:cfg.eval.num_problems] if cfg.eval.num_problems else self.heldout_rows
        share = self.dist.share(len(rows))  # the problems this rank evaluates (all of them in one process)
        samples = []
        # every rank enters, with problems or without: under FSDP2 it all-gathers the layers (a collective)
        with generation_mode(self.policy, self.engine):
            if share:
                samples = evaluate(self.engine, self._encode, rows[share.start:share.stop], self.rewards,
                                   n=cfg.eval.num_samples, temperature=cfg.rollout.temperature,
                                   max_new_tokens=cfg.rollout.max_new_tokens, ks=cfg.eval.k, greedy=cfg.eval.greedy,
                                   seed=cfg.seed + EVAL_SEED_OFFSET, top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k,
                                   first_index=share.start).samples
        samples = dist.all_gather_concat(samples)  # every rank's samples (collective)
        # the file as one process writes it: sampled rows, then greedy ones, each in problem order
        samples.sort(key=lambda s: (s["mode"] != "sampled", s["problem"], s.get("sample", 0)))
        m = metrics_from_samples(samples, cfg.eval.k)
        self._write_eval(step, m, samples)
        return m

    def _write_eval(self, step: int, m: dict[str, float], samples: list[dict[str, Any]]) -> None:
        """Rank 0: the metrics line, the samples file and the console summary of one evaluation."""
        if not self.dist.is_main:
            return
        cfg = self.cfg
        self._log(step, m)
        eval_dir = self.run_dir / "eval"
        eval_dir.mkdir(exist_ok=True)
        with (eval_dir / f"samples-step{step:06d}.jsonl").open("w") as f:
            for s in samples:
                f.write(json.dumps(s) + "\n")
        problems = len({s["problem"] for s in samples})
        line = (f"[eval step {step}] held-out accuracy (T={cfg.rollout.temperature:g}, "
                f"{cfg.eval.num_samples} samples x {problems} problems): "
                f"{m['heldout/accuracy']:.3f} ± {m['heldout/accuracy_stderr']:.3f}")
        line += "".join(f", pass@{k}: {m[f'heldout/pass@{k}']:.3f}" for k in cfg.eval.k if k > 1)
        if "heldout/greedy_accuracy" in m:
            line += f", greedy: {m['heldout/greedy_accuracy']:.3f}"
        print(line, file=sys.stderr, flush=True)

    def _logged_eval(self, step: int) -> dict[str, float] | None:
        """The held-out metrics logged at ``step`` (metrics.jsonl), if any."""
        for record in self.metrics.records() if self.metrics is not None else []:  # rank 0
            if record.get("step") == step and "heldout/accuracy" in record:
                return {k: v for k, v in record.items() if k != "step"}
        return None

    # -------------------------------------------------------------- progress
    def _show(self, bar, m: dict[str, float]) -> None:
        if bar is None:
            return
        bar.set_postfix(reward=f"{m['reward/mean']:.3f}", acc=f"{m['train/accuracy']:.2f}", kl=f"{m.get('kl', 0):.4f}",
                        s_per_step=f"{m['time/step']:.1f}", refresh=False)
        bar.update(1)

    # ------------------------------------------------------------ checkpoints
    def _save_checkpoint(self) -> Path | None:
        """Rank 0 writes the checkpoint (every rank holds the same adapter and optimizer state; under
        FSDP2 they are gathered first, a collective)."""
        adapter, optimizer = full_adapter_state(self.model), optimizer_state(self.policy, self.optimizer)
        if not self.dist.is_main:
            return None
        extra = {"sampler": self.sampler.state_dict(), "engine": self.engine.state_dict(),
                 "base_model": self.base_fingerprint}
        return save_training(self.run_dir, self.step, self.model, self.optimizer, self.scheduler,
                             to_dict(self.cfg), self.cfg.keep_checkpoints, extra,
                             optimizer_state=optimizer, adapter_state=adapter)

    def _load_checkpoint(self, resumed: tuple[Path, dict[str, Any]]) -> int:
        """Every rank, once the optimizer exists (the adapter went in before the wrap, in setup)."""
        o = self.cfg.optim
        state = resume_training(resumed, self.model, self.optimizer, self.scheduler, lr=o.lr,
                                weight_decay=o.weight_decay, betas=o.betas, adapter_loaded=True,
                                load_optimizer=lambda saved: load_optimizer_state(self.policy, self.optimizer, saved))
        self.sampler.load_state_dict(state["sampler"])
        self.engine.load_state_dict(state["engine"])
        self.step = state["step"]
        return self.step

    def _finish(self, summary: dict[str, Any]) -> None:
        """Rank 0: the final checkpoint, adapter, plot, summary and before/after report."""
        if (self.cfg.checkpoint_every == 0 or self.step % self.cfg.checkpoint_every) and self.step != self.resume_step:
            self._save_checkpoint()  # the final state is always resumable
        adapter = full_adapter_state(self.model)  # collective under FSDP2
        if not self.dist.is_main:
            return
        self.model.save_pretrained(self.run_dir / "adapter", state_dict=adapter)
        self.tokenizer.save_pretrained(self.run_dir / "adapter")
        self.metrics.plot()
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if "before" in summary and "after" in summary:
            e, r = self.cfg.eval, self.cfg.rollout
            setting = {"steps": self.step, "num_problems": e.num_problems, "num_samples": e.num_samples, "k": e.k,
                       "temperature": r.temperature, "top_p": r.top_p, "max_new_tokens": r.max_new_tokens,
                       "greedy": e.greedy, "seed": self.cfg.seed + EVAL_SEED_OFFSET, "split": "heldout"}
            (self.run_dir / "before_after.md").write_text(
                f"Held-out evaluation before and after {self.step} steps ({e.num_samples} samples per problem at "
                f"T={r.temperature:g}; ± is the standard error over problems).\n\n"
                + before_after_table(summary["before"], summary["after"]))
            (self.run_dir / "before_after.json").write_text(
                json.dumps({"eval": setting, "before": summary["before"], "after": summary["after"]}, indent=2))

    def cleanup(self, failed: bool = False) -> None:
        """Close what the run opened. When the run ``failed``, a close that fails too (a tracker
        flushing to the full disk that stopped the run) is a warning, so the run's own error stands."""
        try:
            for name in ("metrics", "rewards", "engine"):
                obj = getattr(self, name, None)
                if obj is None:
                    continue
                try:
                    obj.close(failed) if name == "metrics" else obj.close()
                except Exception as exc:
                    if not failed:  # the run succeeded: the failure to close is the error
                        raise
                    print(f"warning: closing the run's {name} failed too: {type(exc).__name__}: {exc}",
                          file=sys.stderr)
        finally:
            lock = getattr(self, "run_lock", None)
            if lock is not None:
                lock.release()
                if failed and not self.started and lock.created is not None:  # bad input: nothing written
                    lock.remove_created()


def _rewards_differ(group: ScoredGroup) -> bool:
    """A group teaches something only if its completions' rewards differ (else every advantage is 0)."""
    return max(group.rewards) > min(group.rewards)


def slice_scores(scores: RewardBatch, start: int, count: int) -> RewardBatch:
    """Rows ``start:start + count`` of a RewardBatch (error and call counts and logged metrics stay with
    the first slice, so that concatenating the slices again counts them once)."""
    end, first = start + count, start == 0
    return RewardBatch(scores.total[start:end], {k: v[start:end] for k, v in scores.per_verifier.items()},
                       {k: v[start:end] for k, v in scores.reasons.items()}, scores.correct[start:end],
                       dict(scores.errors) if first else {}, list(scores.pairs),
                       dict(scores.logged) if first else {}, dict(scores.calls) if first else {})


def concat_scores(parts: list[RewardBatch]) -> RewardBatch:
    """RewardBatches one after another (every rank's, every draw's); a verifier missing from a part reads
    None there. Counts and logged sums add up; correlations are over the whole (as in one process)."""
    names = list(dict.fromkeys(k for p in parts for k in p.per_verifier))
    per_verifier = {k: [v for p in parts for v in p.per_verifier.get(k, [None] * len(p.total))] for k in names}
    reasons = {k: [v for p in parts for v in p.reasons.get(k, [""] * len(p.total))] for k in names}
    errors: dict[str, int] = {}
    calls: dict[str, int] = {}
    logged: dict[str, tuple[float, int]] = {}
    for p in parts:
        for k, n in p.errors.items():
            errors[k] = errors.get(k, 0) + n
        for k, n in p.calls.items():
            calls[k] = calls.get(k, 0) + n
        for k, (total, n) in p.logged.items():
            add_logged(logged, k, total, n)
    pairs = list(dict.fromkeys(pair for p in parts for pair in p.pairs))
    return RewardBatch([x for p in parts for x in p.total], per_verifier, reasons,
                       [x for p in parts for x in p.correct], errors, pairs, logged, calls)


def before_after_table(before: dict[str, float], after: dict[str, float]) -> str:
    """Markdown: each held-out metric before and after training, ± its standard error where known."""
    def cell(m: dict[str, float], k: str) -> str:
        return f"{m[k]:.3f} ± {m[k + '_stderr']:.3f}" if k + "_stderr" in m else f"{m[k]:.3f}"

    keys = [k for k in before if k in after and not k.endswith("_stderr")]
    lines = ["| metric | before | after | change |", "|---|---|---|---|"]
    for k in keys:
        change = after[k] - before[k]
        lines.append(f"| {k.removeprefix('heldout/')} | {cell(before, k)} | {cell(after, k)} | {change:+.3f} |")
    return "\n".join(lines) + "\n"


def run(cfg: RunConfig, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train; under torchrun this process is one rank (joined here, left at the end or on failure)."""
    dist.init(cfg.distributed.timeout_s, cfg.model.device)
    trainer = Trainer(cfg, resume=resume, progress=progress)
    failed = True
    try:
        try:
            trainer.setup()
            summary = trainer.train()
            failed = False
            return summary
        except TrainingDiverged as exc:
            last = checkpoint.latest(cfg.run_dir)
            raise UserError(f"training diverged: {exc}; last good checkpoint: {last or 'none'} "
                            "(lower optim.lr or raise loss.beta, then --resume)") from exc
        except OSError as exc:  # writing the run directory failed midway: disk full, read-only, ...
            from grpo.rundir import WRITE_ERRNOS, describe_os_error

            if exc.errno not in WRITE_ERRNOS:
                raise
            raise UserError(describe_os_error(exc, f"run {cfg.run_dir} stopped, a file could not be written")) from exc
    except BaseException as exc:
        if dist.fail(exc):  # no hang: leave the group now; torchrun stops the other ranks
            raise PeerFailed() from None  # another rank's failure: its error is the one to read
        raise
    finally:
        trainer.cleanup(failed)
        dist.teardown()
