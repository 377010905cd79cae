"""Micro-batches sized to a memory budget (``optim.memory_budget_gb``): an estimate of the update's
activation memory, and the greedy split that keeps each micro-batch under the budget.

The estimate counts what autograd keeps for backward in one policy forward (LoRA on, grad on)
of a micro-batch, from the model's shape and the tokens the network actually runs (padded
widths included): each distinct prompt once per micro-batch on the shared-prompt path, one
row per group under packing, prompt + completion per sequence on the flat path. Per decoder
layer and token (no checkpointing), with ``s`` the base dtype's bytes, ``a`` attention's
(4 under ``model.attention_dtype`` float32), LoRA and norms in float32:

* the two RMSNorms: their float32 input and ``rsqrt`` (``2 (4H + 4)``; layer 0's first norm
  sees the frozen embedding and keeps nothing); under ``model.lora_kernel: fused``
  (grpo/rms_norm.py) their input in the base dtype instead (``2 (s H + 4)``);
* attention: the query and the output (``2 nh d a``), the log-sum-exp (``4 nh``); per key
  position the keys and values as SDPA receives them, repeated to ``nh`` heads
  (``2 nh d a``; ``2 nkv d a`` under float32 attention, whose SDPA reads grouped keys in place,
  grpo/attention.py); per (query, key) pair the mask (``a``); eager attention adds its
  probabilities (``nh (4 + a)``);
* the MLP: gate, up and act(gate) (``3 I s``);
* LoRA: each adapter's input (a float32 copy per target under a 16-bit base or LoRA
  dropout, plus dropout's float32 mask; one shared copy per input under float32) and its
  rank-r hidden (``4 r`` per target). Under ``model.lora_kernel: fused`` (grpo/fused_lora.py)
  the adapters keep their layer's own input in the base dtype, shared (plus the bf16 cast of
  attention's output for o_proj under float32 attention), the hidden in the base dtype, and per
  pass each adapter's scaled ``B^T``; with dropout the peft count above stays (exact in float32,
  an upper bound, about 1.35x, under bf16).

With activation checkpointing a layer keeps only its input (``H s`` per token) and, on the
shared-prompt path, the prompt's keys and values it reads (``2 p Lp nkv d s``); outside the
layers: the final norm, RoPE's cos/sin, and the LM head: on CPU the float32 logits of every
scored position (``4 V`` each); on CUDA the chunks are checkpointed, so only their inputs.
``transient`` adds what lives only for a while: one recomputed layer under checkpointing,
activation gradients in flight, one LM-head chunk's backward (its log-softmax and gather
gradients; on CUDA also its recomputed logits) and, on CPU, the float32 copy of a 16-bit head
weight the forward's chunks share (backward uses the 16-bit weight).

``tests/test_memory.py`` checks the saved part against the bytes autograd actually keeps on a
tiny random model (every path, checkpointing on and off, float32 and bf16, LoRA dropout;
within 5 %), and the total against the peak of live tensors the profiler sees during forward +
backward on CPU (never below it; at most 1.5x above with the chunked head). The CUDA head's
numbers are not measured here (no GPU): they follow the same count.

Every function here is pure except ``mem_available``, ``free_bytes``, ``budget_bytes``, ``make_plan``
and ``make_checkpoint_rule``: they read free memory for ``auto`` and the launcher's
``LOCAL_WORLD_SIZE``, once, at setup. ``CheckpointRule`` is ``optim.activation_checkpointing: auto``:
a micro-batch is checkpointed only when its estimate without checkpointing exceeds a quarter of it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Callable, Literal, NamedTuple, Sequence

from grpo.attention import sdpa_reads_grouped_kv
from grpo.errors import UserError

GIB = 2 ** 30
AUTO_FRACTION = 0.8  # of free memory, for ``auto``: headroom for the allocator and what the estimate leaves out
# activation_checkpointing=auto: a micro-batch estimated above this share of free memory without checkpointing
# is checkpointed (the rest of memory: generation's KV cache, the allocator, other processes)
CHECKPOINT_FRACTION = 0.25
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about the policy (``model_shape`` reads it from an HF config)."""

    layers: int
    hidden: int  # H
    intermediate: int  # I
    heads: int  # nh
    kv_heads: int  # nkv
    head_dim: int  # d
    vocab: int  # V
    base_bytes: int = 4  # s: bytes per element of the frozen base (2 for bf16/fp16)
    attention_bytes: int = 4  # a: bytes per element attention runs in (4 under float32 attention)
    eager_attention: bool = False  # the attention probabilities are kept (eager implementation)
    grouped_kv: bool = False  # SDPA keeps the nkv keys/values, not nh repeated copies (float32 attention's enable_gqa)
    lora_rank: int = 16
    lora_targets: tuple[str, ...] = PROJECTIONS  # the Llama-style projections that carry an adapter
    lora_dropout: bool = False
    lora_fused: bool = False  # model.lora_kernel=fused: LoRA in the base's dtype (grpo/fused_lora.py), norms keep their input in it (grpo/rms_norm.py)


@dataclass(frozen=True)
class UpdateSettings:
    """How the update runs a micro-batch (see ``grpo.trainer.Trainer._logprobs``)."""

    path: Literal["grouped", "packed", "flat"] = "grouped"
    full_head: bool = False  # the model's own LM head over every position (no chunked fast head)
    checkpointing: bool = False
    cuda: bool = False  # LM-head chunks checkpointed (CUDA) or their logits kept (CPU)
    chunk_tokens: int = 512


@dataclass(frozen=True)
class Batch:
    """The dimensions of one micro-batch that its memory depends on."""

    prompts: int = 0  # p distinct prompts
    sequences: int = 0  # b
    prompt_len: int = 0  # Lp: longest prompt (prompts are left-padded to it)
    completion_len: int = 0  # T: longest completion (completions are right-padded to it)
    packed_len: int = 0  # W: longest packed row (a prompt and its completions in this batch)
    loss_tokens: int = 0  # positions whose log-prob is computed (the loss mask)


class Estimate(NamedTuple):
    """Bytes of one micro-batch's policy forward + backward."""

    layers: int  # kept for backward by the decoder layers
    outside: int  # kept for backward outside the layers (final norm, RoPE, LM head)
    transient: int  # alive only for a while: one recomputed layer, activation gradients, a head chunk

    @property
    def saved(self) -> int:
        return self.layers + self.outside

    @property
    def total(self) -> int:
        return self.layers + self.outside + self.transient


class Seq(NamedTuple):
    """One sequence of the update, as the split sees it."""

    group: int
    prompt_len: int
    completion_len: int
    loss_tokens: int


_SHAPE_ATTRIBUTES = ("num_attention_heads", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")


class ShapeUnknown(UserError):
    """The memory estimate cannot read this model's shape."""


def model_shape(config, base_bytes: int, lora_rank: int, lora_targets: Sequence[str],
                lora_dropout: bool, lora_fused: bool = False) -> ModelShape:
    """``ModelShape`` of an HF decoder config (Llama, Qwen, Mistral, ... attribute names).

    Targets are matched by their last name; an unknown name (``all-linear``, another
    family's projections) counts as every projection, so the estimate stays an upper bound.
    A config without those attribute names (OPT, GPT-2, Falcon) is a ``ShapeUnknown``."""
    missing = [a for a in _SHAPE_ATTRIBUTES if getattr(config, a, None) is None]
    if missing:
        raise ShapeUnknown(f"the model's config ({type(config).__name__}) has no {', '.join(missing)}")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    implementation = getattr(config, "_attn_implementation", None) or "sdpa"
    names = {t.rsplit(".", 1)[-1] for t in lora_targets}
    targets = PROJECTIONS if names - set(PROJECTIONS) else tuple(p for p in PROJECTIONS if p in names)
    return ModelShape(layers=config.num_hidden_layers, hidden=config.hidden_size,
                      intermediate=config.intermediate_size, heads=heads,
                      kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim,
                      vocab=config.vocab_size, base_bytes=base_bytes,
                      attention_bytes=4 if implementation == "sdpa_float32" else base_bytes,
                      eager_attention=implementation == "eager",
                      grouped_kv=implementation == "sdpa_float32" and sdpa_reads_grouped_kv(),
                      lora_rank=lora_rank, lora_targets=targets,
                      lora_dropout=lora_dropout, lora_fused=lora_fused)


def _lora_outputs(m: ModelShape) -> dict[str, int]:
    kv = m.kv_heads * m.head_dim
    return {"q_proj": m.heads * m.head_dim, "k_proj": kv, "v_proj": kv, "o_proj": m.hidden,
            "gate_proj": m.intermediate, "up_proj": m.intermediate, "down_proj": m.hidden}


def _lora_input_bytes(m: ModelShape) -> int:
    """Per token and layer: the inputs the LoRA adapters keep (float32 under peft's forward)."""
    inputs = {"q_proj": m.hidden, "k_proj": m.hidden, "v_proj": m.hidden, "o_proj": m.heads * m.head_dim,
              "gate_proj": m.hidden, "up_proj": m.hidden, "down_proj": m.intermediate}
    if m.lora_fused and not m.lora_dropout:  # in the base's dtype: the layer's own input, shared
        shared = m.base_bytes * (m.hidden * bool({"q_proj", "k_proj", "v_proj"} & set(m.lora_targets))
                                 + m.hidden * bool({"gate_proj", "up_proj"} & set(m.lora_targets))
                                 + m.intermediate * ("down_proj" in m.lora_targets))
        if "o_proj" in m.lora_targets and m.attention_bytes != m.base_bytes:  # attention's output cast back
            shared += m.base_bytes * inputs["o_proj"]
        return shared
    # each adapter casts (or drops out) its own copy; with dropout also an upper bound for the fused forward
    if m.base_bytes != 4 or m.lora_dropout:
        return sum(inputs[t] * (8 if m.lora_dropout else 4) for t in m.lora_targets)  # dropout: + its mask
    shared = 0  # float32, no dropout: adapters on the same input share it; o_proj's is the attention output
    if {"q_proj", "k_proj", "v_proj"} & set(m.lora_targets):
        shared += 4 * m.hidden
    if {"gate_proj", "up_proj"} & set(m.lora_targets):
        shared += 4 * m.hidden
    if "down_proj" in m.lora_targets:
        shared += 4 * m.intermediate
    return shared


def _norm_bytes(m: ModelShape) -> int:
    """Kept per token by one RMSNorm: its input (float32 in transformers' graph; the base dtype
    under the fused kernels' ``grpo.rms_norm``) and the row's ``rsqrt``."""
    return (m.base_bytes if m.lora_fused else 4) * m.hidden + 4


def _layer_bytes(m: ModelShape, rows: int, queries: int, keys: int) -> int:
    """Kept for backward by one decoder layer without checkpointing: ``rows`` x ``queries`` tokens
    attending to ``keys`` positions each."""
    a, qd = m.attention_bytes, m.heads * m.head_dim
    per_token = (2 * _norm_bytes(m)  # two RMSNorms: their input, rsqrt
                 + 2 * qd * a + 4 * m.heads  # query, output, log-sum-exp
                 + 3 * m.intermediate * m.base_bytes  # gate, up, act(gate)
                 + _lora_input_bytes(m) + (m.base_bytes if m.lora_fused else 4) * m.lora_rank * len(m.lora_targets))
    per_key = 2 * (m.kv_heads if m.grouped_kv else m.heads) * m.head_dim * a  # keys and values as SDPA reads them
    per_pair = a + (m.heads * (4 + a) if m.eager_attention else 0)  # mask (+ eager's probabilities)
    return rows * queries * per_token + rows * keys * per_key + rows * queries * keys * per_pair


def _passes(s: UpdateSettings, b: Batch) -> list[tuple[int, int, int]]:
    """(rows, queries, keys) of each backbone pass over the micro-batch."""
    if s.path == "packed":
        return [(b.prompts, b.packed_len, b.packed_len)]
    if s.path == "grouped" and not s.full_head:  # prompts once, then completions reading their K/V
        return [(b.prompts, b.prompt_len, b.prompt_len),
                (b.sequences, b.completion_len, b.prompt_len + b.completion_len)]
    length = b.prompt_len + b.completion_len  # flat: every sequence with its own prompt
    return [(b.sequences, length, length)]


def estimate(m: ModelShape, s: UpdateSettings, b: Batch) -> Estimate:
    """Memory of one micro-batch's policy forward + backward (see the module docstring)."""
    passes = _passes(s, b)
    tokens = sum(r * q for r, q, _ in passes)
    # layer 0's first norm reads the frozen embedding (no gradient there): it keeps nothing, nor do
    # the dropout masks of the adapters on that norm's output
    attention_in = len({"q_proj", "k_proj", "v_proj"} & set(m.lora_targets))
    norm0 = _norm_bytes(m) + (4 * m.hidden * attention_in if m.lora_dropout else 0)
    unrolled = [_layer_bytes(m, *p) for p in passes]
    if s.checkpointing:
        layers = m.layers * tokens * m.hidden * m.base_bytes  # each layer's input
        if s.path == "grouped" and not s.full_head:  # the prompt K/V the completion layers read
            layers += m.layers * 2 * b.prompts * b.prompt_len * m.kv_heads * m.head_dim * m.base_bytes
    else:
        layers = m.layers * sum(unrolled) - tokens * norm0
        if m.lora_fused:  # each pass keeps every adapter's scaled B^T, cast to the base dtype (r x out)
            layers += m.layers * len(passes) * m.base_bytes * m.lora_rank * sum(
                out for t, out in _lora_outputs(m).items() if t in m.lora_targets)
    outside = tokens * (_norm_bytes(m) + 2 * m.head_dim * m.base_bytes)  # final norm; RoPE cos, sin
    if s.checkpointing:  # the mask each layer is handed, once per pass
        outside += sum(r * q * k for r, q, k in passes) * m.base_bytes
    chunk = min(s.chunk_tokens, b.loss_tokens)
    if s.full_head:  # the model's logits over every position, float32 logits of the padded completions
        scored = b.sequences * b.completion_len
        outside += scored * (4 * m.vocab + 16)
        head_transient = tokens * m.vocab * (m.base_bytes + 4) + 4 * scored * m.vocab * 4
    elif s.cuda:  # each chunk checkpointed: only its inputs are kept, one chunk's logits at a time
        outside += b.loss_tokens * (m.hidden * m.base_bytes + 32)
        head_transient = 5 * chunk * m.vocab * 4  # a chunk's logits recomputed, and its backward
    else:  # CPU: every chunk's float32 logits kept; a 16-bit head weight's float32 copy lives through the forward
        outside += b.loss_tokens * (4 * m.vocab + 32)
        # a chunk's backward, measured at one chunk's float32 logits above what is kept (Qwen2.5-0.5B's 152k
        # vocabulary, 512-token chunks: 318 MiB, with and without checkpointing); counted twice for margin
        head_transient = 2 * chunk * m.vocab * 4
        head_transient += m.vocab * m.hidden * 4 if m.base_bytes != 4 else 0
    gradients = 2 * tokens * (m.intermediate + m.hidden) * 4  # activation gradients in flight in backward
    transient = (max(unrolled) if s.checkpointing else 0) + gradients + head_transient
    return Estimate(int(layers), int(outside), int(transient))


def add(b: Batch, seq: Seq, groups: dict[int, int]) -> Batch:
    """``b`` with ``seq`` added; ``groups`` maps each group in ``b`` to its packed row length so far."""
    row = groups.get(seq.group, seq.prompt_len) + seq.completion_len
    return replace(b, prompts=b.prompts + (seq.group not in groups), sequences=b.sequences + 1,
                   prompt_len=max(b.prompt_len, seq.prompt_len),
                   completion_len=max(b.completion_len, seq.completion_len), packed_len=max(b.packed_len, row),
                   loss_tokens=b.loss_tokens + seq.loss_tokens)


def batch_of(seqs: Sequence[Seq]) -> Batch:
    """The ``Batch`` of these sequences as one micro-batch."""
    batch, groups = Batch(), {}
    for seq in seqs:
        batch = add(batch, seq, groups)
        groups[seq.group] = groups.get(seq.group, seq.prompt_len) + seq.completion_len
    return batch


def split_by_budget(seqs: Sequence[Seq], cost: Callable[[Batch], int], budget: int) -> list[list[int]]:
    """Greedy: positions into ``seqs``, in their order, cut into micro-batches whose ``cost`` stays
    within ``budget``; a micro-batch closes when the next sequence would exceed it. The order is the
    caller's (a group's sequences next to each other keep its prompt in one micro-batch).
    A sequence that exceeds the budget alone raises ``ValueError(its cost)``."""
    out: list[list[int]] = []
    current: list[int] = []
    batch, groups = Batch(), {}
    for i, seq in enumerate(seqs):
        grown = add(batch, seq, groups)
        if current and cost(grown) > budget:
            out.append(current)
            current, batch, groups = [], Batch(), {}
            grown = add(batch, seq, groups)
        if not current and cost(grown) > budget:
            raise ValueError(cost(grown))
        current.append(i)
        groups[seq.group] = groups.get(seq.group, seq.prompt_len) + seq.completion_len
        batch = grown
    if current:
        out.append(current)
    return out


@dataclass(frozen=True)
class Plan:
    """A run's micro-batch sizing: the model, how the update runs, the budget in bytes."""

    shape: ModelShape
    settings: UpdateSettings
    budget: int
    setting: float | str  # optim.memory_budget_gb as configured, for messages
    alternatives: tuple[UpdateSettings, ...] = ()  # other paths a micro-batch may take (optim.packing=auto)

    def cost(self, b: Batch) -> int:
        return max(estimate(self.shape, s, b).total for s in (self.settings, *self.alternatives))

    def split(self, seqs: Sequence[Seq]) -> tuple[list[list[int]], int]:
        """(micro-batches as positions into ``seqs``, the largest micro-batch's estimate in bytes);
        a sequence over the budget alone is a ``UserError``."""
        try:
            parts = split_by_budget(seqs, self.cost, self.budget)
        except ValueError as exc:
            need = int(exc.args[0])
            raise too_small(self.setting, self.budget, need, "one sequence of this step",
                            self.settings.checkpointing) from None
        largest = max((self.cost(batch_of([seqs[i] for i in part])) for part in parts), default=0)
        return parts, largest

    def check(self, prompt_len: int, completion_len: int) -> None:
        """Fail before training when one sequence this long cannot fit the budget."""
        need = self.cost(batch_of([Seq(0, prompt_len, completion_len, completion_len)]))
        if need > self.budget:
            raise too_small(self.setting, self.budget, need,
                            f"one sequence ({prompt_len} prompt + {completion_len} completion tokens)",
                            self.settings.checkpointing)


@dataclass(frozen=True)
class CheckpointRule:
    """``optim.activation_checkpointing: auto`` (without a memory budget): checkpoint a micro-batch
    only when its update, run without checkpointing, is estimated above ``limit`` bytes
    (``CHECKPOINT_FRACTION`` of the free memory read at setup). Below it the recomputation
    (about a fifth of the policy pass) would buy memory nobody needs; the gradients are the same
    either way."""

    shape: ModelShape
    settings: UpdateSettings  # with checkpointing=False
    limit: int
    alternatives: tuple[UpdateSettings, ...] = ()  # other paths a micro-batch may take (optim.packing=auto)
    free: int = 0  # bytes free at setup (this rank's share); 0: unknown

    def needed(self, seqs: Sequence[Seq]) -> bool:
        batch = batch_of(seqs)
        return max(estimate(self.shape, s, batch).total for s in (self.settings, *self.alternatives)) > self.limit

    def beyond_free(self, seqs: Sequence[Seq]) -> int:
        """The micro-batch's estimated need even with checkpointing when that is more than the free
        memory read at setup (the update would likely be killed for memory), else 0."""
        batch = batch_of(seqs)
        need = max(estimate(self.shape, replace(s, checkpointing=True), batch).total
                   for s in (self.settings, *self.alternatives))
        return need if self.free and need > self.free else 0


def _update_model(config, base_bytes: int, lora_rank: int, lora_targets: Sequence[str], lora_dropout: bool,
                  packing: bool | str, fast_head: bool, checkpointing: bool, device: str, chunk_tokens: int,
                  lora_fused: bool) -> tuple[ModelShape, UpdateSettings, tuple[UpdateSettings, ...]]:
    """The model's shape, the update's settings and, with ``packing="auto"`` (each micro-batch
    packed or not by its lengths), the packed path's settings as the alternative."""
    path = "packed" if packing is True else ("grouped" if fast_head else "flat")
    settings = UpdateSettings(path, not fast_head, checkpointing, device.startswith("cuda"), chunk_tokens)
    alternatives = (replace(settings, path="packed"),) if packing == "auto" else ()
    return model_shape(config, base_bytes, lora_rank, lora_targets, lora_dropout, lora_fused), settings, alternatives


def make_plan(setting: float | str | None, config, base_bytes: int, lora_rank: int, lora_targets: Sequence[str],
              lora_dropout: bool, packing: bool | str, fast_head: bool, checkpointing: bool, device: str,
              chunk_tokens: int, local_ranks: int | None = None, lora_fused: bool = False) -> Plan | None:
    """The run's ``Plan`` (None without a budget: ``optim.micro_batch_size`` applies)."""
    if setting is None:
        return None
    try:
        shape, settings, alternatives = _update_model(config, base_bytes, lora_rank, lora_targets, lora_dropout,
                                                      packing, fast_head, checkpointing, device, chunk_tokens, lora_fused)
    except ShapeUnknown as exc:
        raise UserError(f"optim.memory_budget_gb: {exc}, so the update's memory cannot be estimated; size the "
                        "micro-batches with optim.micro_batch_size instead") from None
    return Plan(shape, settings, budget_bytes(setting, device, _local_ranks(local_ranks)), setting, alternatives)


def make_checkpoint_rule(config, base_bytes: int, lora_rank: int, lora_targets: Sequence[str], lora_dropout: bool,
                         packing: bool | str, fast_head: bool, device: str, chunk_tokens: int,
                         local_ranks: int | None = None, lora_fused: bool = False,
                         meminfo: str = "/proc/meminfo") -> CheckpointRule | None:
    """The ``CheckpointRule`` of ``activation_checkpointing: auto``; None where free memory cannot
    be read (not Linux, not CUDA) or the model's shape cannot (``ShapeUnknown``): every micro-batch
    is then checkpointed."""
    try:
        shape, settings, alternatives = _update_model(config, base_bytes, lora_rank, lora_targets, lora_dropout,
                                                      packing, fast_head, False, device, chunk_tokens, lora_fused)
    except ShapeUnknown:
        return None
    try:
        free = free_bytes(device, _local_ranks(local_ranks), meminfo)
    except UserError:
        return None
    return CheckpointRule(shape, settings, int(free * CHECKPOINT_FRACTION), alternatives, int(free))


def _local_ranks(local_ranks: int | None) -> int:
    """Processes sharing this machine's RAM (torchrun sets ``LOCAL_WORLD_SIZE``)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if local_ranks is None else local_ranks


def too_small(setting, budget: int, need: int, what: str, checkpointing: bool) -> UserError:
    """The one-line error for a budget below one sequence's estimated need."""
    fixes = "raise optim.memory_budget_gb, lower rollout.max_new_tokens"
    fixes += "" if checkpointing else ", or set optim.activation_checkpointing=true"
    return UserError(f"optim.memory_budget_gb={setting}: {what} needs an estimated {need / GIB:.3g} GiB for the "
                     f"update (budget {budget / GIB:.3g} GiB); {fixes}")


def mem_available(meminfo: str = "/proc/meminfo") -> int:
    """Bytes the kernel could give this process now without swapping (``MemAvailable``)."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    raise UserError(f"optim.memory_budget_gb=auto: cannot read MemAvailable from {meminfo} (not Linux?); "
                    "set a number of GiB instead")


def budget_bytes(setting: float | str, device: str, local_ranks: int = 1, meminfo: str = "/proc/meminfo") -> int:
    """``optim.memory_budget_gb`` in bytes: GiB as given, or ``auto``: ``AUTO_FRACTION`` of
    ``free_bytes``. Read once, after the model is loaded, so the budget is what is left for the update."""
    if setting != "auto":
        return int(float(setting) * GIB)
    return int(free_bytes(device, local_ranks, meminfo) * AUTO_FRACTION)


def free_bytes(device: str, local_ranks: int = 1, meminfo: str = "/proc/meminfo") -> int:
    """This process's share of free memory: the CUDA device's free memory, or ``MemAvailable``
    shared by the ``local_ranks`` processes of this machine (CPU); a ``UserError`` elsewhere."""
    if device.startswith("cuda"):
        import torch  # only here: the estimate itself needs no torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    if device != "cpu":
        raise UserError(f"optim.memory_budget_gb=auto: free memory is not known on {device}; set a number of GiB")
    return int(mem_available(meminfo) / max(1, local_ranks))
