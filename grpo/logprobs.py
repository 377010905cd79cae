"""Sampled-token log-probabilities from a causal LM, without a full [B, T, V] float32 tensor.

The backbone gives hidden states (b, L, H); only the completion positions go through
the LM head, a chunk of ``chunk_tokens`` positions at a time (on CUDA under activation
checkpointing, so a chunk's (chunk, V) logits are not kept for backward). No
[batch, seq, vocab] float32 tensor is ever formed for the whole batch.

The head runs in float32 whatever the model's dtype (a bf16 model's hidden states and
head weight are upcast), so the log-softmax sees unrounded logits. This fast head is
only right when the model's logits are exactly ``lm_head(hidden)``: some models scale
or cap them (Granite divides by ``logits_scaling``, Gemma 2 soft-caps). The trainer
checks the fast head against the model's own forward at setup (``fast_head_agrees``)
and passes ``fast_head=False`` on any mismatch, which routes every pass through the
model's forward; a LoRA adapter on the head itself also takes that route.

Every pass that builds a graph can run its decoder layers under activation checkpointing
(``checkpoint_layers=True``, ``optim.activation_checkpointing``): each layer keeps only its
input for backward and recomputes the rest there. The shared-prompt path stays correct under
it through ``grpo.prompt_cache.SharedPromptCache``, whose ``update`` a recomputed layer may
call again without appending its keys and values twice.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Callable, NamedTuple

import torch
from torch.utils.checkpoint import checkpoint

from grpo.errors import UserError
from grpo.prepared_linear import float32_linear


@dataclass
class PackedBatch:
    """Prompts left-padded to a common length, completions right-padded after them.

    Completion token j of row i sits at column ``prompt_len + j``, so completion
    log-probs come out as a (b, T) tensor aligned with ``completion_mask``.
    """

    input_ids: torch.Tensor  # (b, Lp + T)
    attention_mask: torch.Tensor  # (b, Lp + T)
    position_ids: torch.Tensor  # (b, Lp + T)
    prompt_len: int  # Lp
    completion_ids: torch.Tensor  # (b, T)
    completion_mask: torch.Tensor  # (b, T) 1 for real completion tokens


def pack(prompts: list[list[int]], completions: list[list[int]], pad_id: int,
         device: torch.device | str = "cpu") -> PackedBatch:
    b = len(prompts)
    lp = max(len(p) for p in prompts)
    t = max(1, max(len(c) for c in completions))
    ids = torch.full((b, lp + t), pad_id, dtype=torch.long)
    attn = torch.zeros((b, lp + t), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, lp - len(p):lp] = torch.tensor(p, dtype=torch.long)
        attn[i, lp - len(p):lp] = 1
        if c:
            ids[i, lp:lp + len(c)] = torch.tensor(c, dtype=torch.long)
            attn[i, lp:lp + len(c)] = 1
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    ids, attn, positions = ids.to(device), attn.to(device), positions.to(device)
    return PackedBatch(ids, attn, positions, lp, ids[:, lp:], attn[:, lp:])


class TokenLogProbs(NamedTuple):
    """Per-token log-probs (differentiable) and, when asked for, the policy's entropy (no grad)."""

    logprobs: torch.Tensor  # (b, T), 0 where masked
    entropy: torch.Tensor | None  # (b, T) nats, 0 where masked; None unless with_entropy


def split_head(model, fast_head: bool = True):
    """(backbone, lm_head) of a (peft-wrapped) causal LM, or None when logits need the model's forward."""
    if not fast_head:
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None  # the head does more than a linear map: use the model's own forward
    try:
        backbone, head = base.get_decoder(), base.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if backbone is None or head is None or backbone is base:
        return None
    if hasattr(head, "base_layer"):  # a LoRA adapter sits on the head: only its own forward applies it
        return None
    return backbone, head


def _chunk_logprobs(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None, temperature: float, with_entropy: bool = False,
                    linear32: Callable[[torch.Tensor], torch.Tensor] | None = None):
    """(log pi(target), entropy or None) for n positions; float32 logits from float32 inputs.

    ``linear32``: the head as a float32 map of the hidden states as they are (float32 or bf16),
    prepared once for all chunks (CPU, ``float32_linear``); else the weight is cast here, per chunk, so no float32 copy of it
    outlives the chunk (CUDA, where memory is the limit)."""
    # float32 head (a no-op for float32 models): a bf16 model's logits would otherwise be rounded before
    # the log-softmax
    bias32 = None if bias is None else bias.float()
    frozen = not (weight.requires_grad or (bias is not None and bias.requires_grad))
    if not frozen:  # a trained head (e.g. modules_to_save): autograd through the float32 copy
        logits = torch.nn.functional.linear(hidden.float(), weight.float(), bias32)
    else:
        if linear32 is None:
            linear32 = partial(_upcast_linear, weight=weight.float(), bias=bias32)
        logits = Float32Head.apply(hidden, linear32, weight) if torch.is_grad_enabled() else linear32(hidden)
    return SampledLogProb.apply(logits, targets, temperature, with_entropy)


def _upcast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.nn.functional.linear(x.float(), weight, bias)


class Float32Head(torch.autograd.Function):
    """The float32 logits ``linear32(hidden)`` of a frozen head of weight ``weight``, differentiable
    in ``hidden``.

    Forward in float32 (``float32_linear``: exact for a bf16 weight, since a bf16 number is a
    float32 one), so the log-softmax sees unrounded logits. Backward ``d hidden = d logits @ W``
    runs in the weight's own dtype: under a 16-bit base the precision of every other matmul in
    the backbone's backward (and the one ``torch.autocast`` gives this one); on this project's
    CPU a (512, 49152) x (49152, 576) product took 372 ms in float32 and 206 ms cast to bf16 and
    multiplied there (``docs/benchmarks.md``). Only the weight itself is kept for backward.
    """

    @staticmethod
    def forward(ctx, hidden, linear32, weight):
        ctx.save_for_backward(weight)
        ctx.hidden_dtype = hidden.dtype
        return linear32(hidden)  # float32 logits from the hidden states as they are

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return (grad.to(weight.dtype) @ weight).to(ctx.hidden_dtype), None, None


ENTROPY_BLOCK_ROWS = 32  # rows per block of the entropy's dot products (SampledLogProb)


class SampledLogProb(torch.autograd.Function):
    """``log softmax(z / T)[y]`` per row of (n, V) float32 logits ``z``, and (no gradient) the entropy.

    The same function as ``(z / T).log_softmax(-1).gather(y)``, in fewer passes over the (n, V)
    block, which on CPU cost as much as the head's matmul: the exponentials ``exp(z/T - max)``
    are computed once, summed for the normaliser, reused for the entropy (one row-wise dot
    product) and kept for backward in place of the logits (same memory),
    where ``d logp / d z = (onehot(y) - softmax) / T`` is one scaled copy and a scatter. At T = 1
    no division pass runs at all.
    """

    @staticmethod
    def forward(ctx, logits, targets, temperature: float, with_entropy: bool):
        z = logits if temperature == 1.0 else logits / temperature
        top = z.amax(-1, keepdim=True)
        e = (z - top).exp_()  # (n, V) unnormalised probabilities
        total = e.sum(-1)
        lse = top.squeeze(-1) + total.log()
        logp = z.gather(-1, targets[:, None]).squeeze(-1) - lse
        entropy = None
        if with_entropy:  # H = lse - sum_v p_v z_v
            # vecdot, not a batched (1, V) x (V, 1) bmm: at 512 x 49152 on one AMX core 25 vs 72 ms, and
            # 2e-7 vs 1.5e-4 relative error against float64 (``benchmarks/decode_limits.py``, "entropy");
            # in blocks of rows, so its (rows, V) product temporary is a few MB, not another chunk-sized
            # block alive at the policy pass's memory peak
            rows = ENTROPY_BLOCK_ROWS
            dots = torch.cat([torch.linalg.vecdot(e[i:i + rows], z[i:i + rows]) for i in range(0, len(e), rows)])
            entropy = lse - dots / total
            ctx.mark_non_differentiable(entropy)
        ctx.save_for_backward(e, total, targets)
        ctx.temperature = temperature
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        e, total, targets = ctx.saved_tensors
        grad = e * (-grad_logp / total)[:, None]
        grad.scatter_add_(-1, targets[:, None], grad_logp[:, None])
        if ctx.temperature != 1.0:
            grad.div_(ctx.temperature)
        return grad, None, None, None


def sampled_logprobs(model, batch: PackedBatch, temperature: float = 1.0,
                     chunk_tokens: int = 512, fast_head: bool = True, with_entropy: bool = False,
                     checkpoint_layers: bool = False):
    """log pi(completion token | prefix) at ``temperature``, shape (b, T); 0 where masked.

    Differentiable w.r.t. the model's trainable parameters when grad is enabled (with
    ``checkpoint_layers``, each decoder layer is recomputed in backward instead of kept).
    Returns a ``TokenLogProbs`` when ``with_entropy``, else the log-prob tensor.
    """
    t = batch.completion_ids.shape[1]
    lp = batch.prompt_len
    parts = split_head(model, fast_head)
    if parts is None:
        with checkpointed_layers(model, checkpoint_layers):
            out = _full_forward_logprobs(model, batch.input_ids, batch.attention_mask, batch.position_ids,
                                         batch.completion_ids, batch.completion_mask, lp, temperature, with_entropy)
        return out if with_entropy else out.logprobs
    backbone, head = parts
    with checkpointed_layers(model, checkpoint_layers):
        hidden = backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                          position_ids=batch.position_ids, use_cache=False).last_hidden_state
    hidden = hidden[:, lp - 1:lp - 1 + t]  # (b, T, H): the state that predicts each completion token
    out = head_logprobs(hidden, batch.completion_ids, batch.completion_mask, head, temperature, chunk_tokens,
                         with_entropy)
    return out if with_entropy else out.logprobs


@torch.no_grad()
def fast_head_agrees(model, token_ids: list[int], rtol: float | None = None) -> tuple[bool, float]:
    """Do ``lm_head(backbone(x))`` and the model's own forward give the same logits?

    Runs both on ``token_ids`` (a few tokens of a real prompt) and returns (agrees,
    largest difference relative to the largest logit). ``rtol`` defaults to 1e-3 in
    float32 and 2e-2 in 16-bit dtypes (their rounding of the model's logits). A model
    that scales, caps or otherwise post-processes its logits disagrees by far more.
    """
    parts = split_head(model)
    if parts is None:
        return False, float("nan")
    backbone, head = parts
    ids = torch.tensor([token_ids], device=next(model.parameters()).device)
    hidden = backbone(input_ids=ids, use_cache=False).last_hidden_state[0]  # (L, H)
    fast = torch.nn.functional.linear(hidden.float(), head.weight.float(),
                                      None if head.bias is None else head.bias.float())
    own = model(input_ids=ids, use_cache=False).logits[0].float()  # (L, V)
    dtype = next(model.parameters()).dtype
    if rtol is None:
        rtol = 1e-3 if dtype == torch.float32 else 2e-2
    rel = float((fast - own).abs().max() / own.abs().max().clamp(min=1.0))
    return rel <= rtol, rel


@dataclass
class GroupedBatch:
    """Sequences that share prompts: each distinct prompt appears once.

    Sequence i continues prompt ``group_index[i]``; its completion is row i of
    ``completion_ids``. The prompt is encoded once and its KV cache is indexed out to
    its sequences, so a group of G completions pays for its prompt once, not G times
    (forward and backward: the indexing is differentiable; ``grpo.prompt_cache``).
    """

    prompt_ids: torch.Tensor  # (p, Lp) left-padded distinct prompts
    prompt_mask: torch.Tensor  # (p, Lp)
    group_index: torch.Tensor  # (b,) prompt row of each sequence
    completion_ids: torch.Tensor  # (b, T) right-padded
    completion_mask: torch.Tensor  # (b, T) 1 for real tokens (attended to)
    # (b, T) 1 for the tokens that get log-probs and gradient: the model's own tokens;
    # observation tokens of a multi-turn episode are 0 here but 1 in completion_mask.
    loss_mask: torch.Tensor | None = None

    def __post_init__(self):
        if self.loss_mask is None:
            self.loss_mask = self.completion_mask

    @property
    def num_tokens(self) -> int:
        """Tokens the network runs over (each distinct prompt once, completions without padding)."""
        return int(self.prompt_mask.sum()) + int(self.completion_mask.sum())

    def flat(self, pad_id: int) -> PackedBatch:
        prompts = [row[m.bool()].tolist() for row, m in zip(self.prompt_ids, self.prompt_mask)]
        seq_prompts = [prompts[g] for g in self.group_index.tolist()]
        completions = [row[m.bool()].tolist() for row, m in zip(self.completion_ids, self.completion_mask)]
        return pack(seq_prompts, completions, pad_id, self.prompt_ids.device)


def pack_grouped(prompts: list[list[int]], group_index: list[int], completions: list[list[int]], pad_id: int,
                 device: torch.device | str = "cpu",
                 loss_masks: list[list[int] | None] | None = None) -> GroupedBatch:
    """``loss_masks[i]`` (one 0/1 per token of completion i, None = all 1) marks the tokens that
    get log-probs and gradient; the others (tool observations) stay in the context."""
    lp = max(len(p) for p in prompts)
    t = max(1, max(len(c) for c in completions))
    p_ids = torch.full((len(prompts), lp), pad_id, dtype=torch.long)
    p_mask = torch.zeros((len(prompts), lp), dtype=torch.long)
    for i, p in enumerate(prompts):
        p_ids[i, lp - len(p):] = torch.tensor(p, dtype=torch.long)
        p_mask[i, lp - len(p):] = 1
    c_ids = torch.full((len(completions), t), pad_id, dtype=torch.long)
    c_mask = torch.zeros((len(completions), t), dtype=torch.long)
    l_mask = torch.zeros((len(completions), t), dtype=torch.long)
    for i, c in enumerate(completions):
        c_ids[i, :len(c)] = torch.tensor(c, dtype=torch.long)
        c_mask[i, :len(c)] = 1
        m = loss_masks[i] if loss_masks is not None else None
        if m is not None and len(m) != len(c):
            raise ValueError(f"loss mask of completion {i} has {len(m)} entries for {len(c)} tokens")
        l_mask[i, :len(c)] = torch.tensor(m, dtype=torch.long) if m is not None else 1
    return GroupedBatch(p_ids.to(device), p_mask.to(device), torch.tensor(group_index, device=device),
                        c_ids.to(device), c_mask.to(device), l_mask.to(device))


def grouped_logprobs(model, batch: GroupedBatch, temperature: float = 1.0, chunk_tokens: int = 512,
                     pad_id: int = 0, fast_head: bool = True, with_entropy: bool = False,
                     checkpoint_layers: bool = False):
    """``sampled_logprobs`` for a ``GroupedBatch``, encoding each distinct prompt once. (b, T);
    0 outside ``batch.loss_mask`` (tool observations of an episode are context, not scored)."""
    # transformers at call time (grpo.prompt_cache subclasses its cache): importing the trainer stays light
    from grpo.prompt_cache import SharedPromptCache

    parts = split_head(model, fast_head)
    cache = SharedPromptCache(parts[0].config) if parts is not None else None
    if cache is None or not cache.readable:  # the model's own head, or a cache kind we cannot share: flat
        out = sampled_logprobs(model, batch.flat(pad_id), temperature, chunk_tokens, parts is not None,
                               with_entropy, checkpoint_layers)
        m = batch.loss_mask
        if not with_entropy:
            return out * m
        return TokenLogProbs(out.logprobs * m, out.entropy * m if out.entropy is not None else None)
    backbone, head = parts
    positions = (batch.prompt_mask.cumsum(-1) - 1).clamp(min=0)
    idx = batch.group_index
    t = batch.completion_ids.shape[1]
    mask = torch.cat([batch.prompt_mask[idx], batch.completion_mask], dim=1)  # (b, Lp + T)
    c_pos = batch.prompt_mask.sum(-1)[idx][:, None] + torch.arange(t, device=idx.device)  # (b, T)
    with checkpointed_layers(model, checkpoint_layers):
        last = backbone(input_ids=batch.prompt_ids, attention_mask=batch.prompt_mask, position_ids=positions,
                        past_key_values=cache, use_cache=True).last_hidden_state[:, -1]  # (p, H) predicts token 0
        hidden = backbone(input_ids=batch.completion_ids, attention_mask=mask, position_ids=c_pos,
                          past_key_values=cache.read_for(idx), use_cache=True).last_hidden_state  # (b, T, H)
    hidden = torch.cat([last[idx][:, None], hidden[:, :-1]], dim=1)  # state that predicts token j
    out = head_logprobs(hidden, batch.completion_ids, batch.loss_mask, head, temperature, chunk_tokens,
                        with_entropy)
    return out if with_entropy else out.logprobs


def decoder_layers(model) -> list[torch.nn.Module]:
    """The decoder layers of a (peft-wrapped) causal LM (``get_decoder().layers``); [] if it has none."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        decoder = base.get_decoder()
    except (AttributeError, NotImplementedError):
        decoder = getattr(base, "model", None)
    layers = getattr(decoder, "layers", None)
    return list(layers) if isinstance(layers, torch.nn.ModuleList) else []


def use_activation_checkpointing(setting: bool | str, model) -> bool:
    """Whether ``optim.activation_checkpointing`` can checkpoint this model's micro-batches.

    ``auto`` is possible wherever the model's decoder layers can be wrapped; which micro-batches
    it checkpoints is the trainer's ``grpo.memory.CheckpointRule`` (those that would not fit a
    quarter of free memory without it): on SmolLM2-135M (4 prompts x G=8, 64 and 128 tokens,
    2-core CPU) checkpointing lowered the step's peak RSS by 39-51 % for 7-9 % more step time
    (the policy forward+backward 19-23 % slower; docs/benchmarks.md). ``true`` on a model
    without decoder layers is a UserError.
    """
    layers = decoder_layers(model)
    if setting == "auto":
        return bool(layers)
    if setting and not layers:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        raise UserError(f"optim.activation_checkpointing=true: cannot find the decoder layers (get_decoder().layers) "
                        f"of {type(base).__name__}; set optim.activation_checkpointing=false")
    return bool(setting)


@contextmanager
def checkpointed_layers(model, enabled: bool = True):
    """Inside, each decoder layer runs under ``torch.utils.checkpoint`` (non-reentrant) when grad is on.

    A layer then keeps only its inputs for backward and runs its forward again there. The
    layer's own ``forward`` is wrapped, inside the module's ``__call__``: FSDP2's all-gather
    hooks and DDP stay outside the recomputed region (torch's FSDP2 + checkpointing
    composition), and peft's LoRA layers inside it. The RNG state is replayed, so LoRA dropout
    draws the same masks on recomputation. A layer that writes to a KV cache needs a
    ``SharedPromptCache``: a ``DynamicCache`` would be appended to a second time.
    """
    layers = decoder_layers(model) if enabled and torch.is_grad_enabled() else []
    saved = [layer.__dict__.get("forward") for layer in layers]  # an instance-level forward (hooks) is kept
    for layer in layers:
        layer.forward = partial(checkpoint, layer.forward, use_reentrant=False)
    try:
        yield
    finally:
        for layer, own in zip(layers, saved):
            if own is None:
                del layer.forward
            else:
                layer.forward = own


def _full_forward_logprobs(model, input_ids, attention_mask, position_ids, completion_ids, completion_mask,
                           lp: int, temperature: float, with_entropy: bool = False) -> TokenLogProbs:
    t = completion_ids.shape[1]
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    logits = out.logits[:, lp - 1:lp - 1 + t].float()  # (b, T, V)
    b = logits.shape[0]
    logp, entropy = SampledLogProb.apply(logits.reshape(b * t, -1), completion_ids.reshape(b * t), temperature,
                                         with_entropy)
    return TokenLogProbs(logp.view(b, t) * completion_mask,
                         entropy.view(b, t) * completion_mask if with_entropy else None)


def head_logprobs(hidden: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, head,
                   temperature: float, chunk_tokens: int, with_entropy: bool = False) -> TokenLogProbs:
    """Chunked LM head over the unmasked positions only. hidden: (b, T, H) -> (b, T).

    On CUDA each chunk runs under activation checkpointing, so its (chunk, V) logits
    are recomputed in backward instead of kept (memory is the limit there), and a 16-bit
    head weight is cast to float32 per chunk. On CPU, where memory is plentiful and
    arithmetic is the limit, the logits of a chunk are kept and the recomputation (about
    a fifth of a small model's update) is skipped, and the float32 head is prepared once
    per weight (``float32_linear``: a cast per chunk cost about 100 ms of SmolLM2's 49k x
    576 head); backward keeps only the weight itself (``Float32Head``).
    """
    b, t = targets.shape
    flat_h = hidden.reshape(b * t, -1)
    flat_y = targets.reshape(b * t)
    keep = mask.reshape(b * t).nonzero().squeeze(-1)  # skip padding entirely
    out_flat = hidden.new_zeros(b * t, dtype=torch.float32)
    ent_flat = hidden.new_zeros(b * t, dtype=torch.float32)
    weight, bias = head.weight, getattr(head, "bias", None)
    linear32 = None if hidden.is_cuda or not keep.numel() else float32_linear(head)
    pieces, entropies = [], []
    for start in range(0, keep.numel(), chunk_tokens):
        idx = keep[start:start + chunk_tokens]
        h, y = flat_h.index_select(0, idx), flat_y.index_select(0, idx)
        if torch.is_grad_enabled() and h.is_cuda:
            logp, ent = checkpoint(_chunk_logprobs, h, y, weight, bias, temperature, with_entropy,
                                   use_reentrant=False)
        else:
            logp, ent = _chunk_logprobs(h, y, weight, bias, temperature, with_entropy, linear32)
        pieces.append(logp)
        entropies.append(ent)
    if pieces:
        out_flat = out_flat.index_put((keep,), torch.cat(pieces))
        if with_entropy:
            ent_flat = ent_flat.index_put((keep,), torch.cat(entropies))
    return TokenLogProbs(out_flat.view(b, t), ent_flat.view(b, t) if with_entropy else None)


def set_update_mode(model) -> None:
    """The mode of every log-prob pass in the update (reference, old and policy alike).

    The base model runs in eval mode (its dropout is never wanted: it would make the
    KL to the reference nonzero at policy == reference); only LoRA dropout is active,
    and ``same_dropout`` replays its masks so the old and policy passes of a micro-batch
    see the same ones (ratio exactly 1 before the first optimizer step).
    """
    model.eval()
    for name, module in model.named_modules():
        if name.endswith("lora_dropout"):
            module.train()


@contextmanager
def same_dropout(seed: int | None, device: torch.device):
    """Draw dropout masks from ``seed`` inside, then restore the RNG state (None: do nothing)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield
