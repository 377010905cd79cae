"""Padding-free update batches: each group's prompt and completions packed into one row.

``GroupedBatch`` (grpo/logprobs.py) already encodes a group's prompt once and shares its
KV cache, but pads every completion of a micro-batch to the longest one; with mixed
lengths (a 5-token answer beside a 64-token one) most completion positions are padding
that the whole network still computes. ``TreeBatch`` removes it: row r holds group r's
prompt followed by its completions back to back::

    [ p p p p | a a a | b b b b b b | c ]      positions: 0 1 2 3 | 4 5 6 | 4 5 6 7 8 9 | 4

Each completion restarts its position ids after the prompt and attends only to the
prompt and to its own earlier tokens (a block mask: no attention across sequences),
so every log-prob equals the unpacked one. Rows are right-padded to the longest group,
and padding attends only to padding. It composes with the shared prompt (still encoded
once per group) and replaces the KV-cache indexing by the mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from grpo.logprobs import SampledLogProb, TokenLogProbs, checkpointed_layers, head_logprobs, split_head

PAD_SEGMENT = -1
AUTO_MAX_POSITIONS = 1024  # optim.packing=auto: a group's completions (G x max_new_tokens) at most this long
AUTO_MIN_PADDING = 1.25  # optim.packing=auto: pack a micro-batch whose padded completions are this much larger


def use_packing(setting: bool | str, device: str, tools: bool, group: int, max_new_tokens: int,
                config, sharded: bool = False) -> bool | str:
    """How the update passes run (``optim.packing``): True (every micro-batch packed), False (none),
    or ``"auto"``: each micro-batch packed when ``packs`` says so. ``auto`` applies on CPU, as long
    as a packed row stays short (its (L, L) block mask and attention grow with the square of
    G x max_new_tokens), the run has no tool episodes (their loss masks need the unpacked path)
    and the model has no sliding-window attention (a block mask given to the model replaces its
    window); elsewhere it is False (on CUDA the mask rules out flash attention; other devices were
    not measured). ``sharded``
    (FSDP2 across ranks): False too, since the two paths run the decoder layers a different number
    of times and every rank's per-layer collectives must line up."""
    if setting != "auto":
        return bool(setting)
    if (not str(device).startswith("cpu") or tools or sharded or group * max_new_tokens > AUTO_MAX_POSITIONS
            or _sliding_window(config)):
        return False
    return "auto"


def packs(setting: bool | str, completion_lengths: list[int]) -> bool:
    """Whether a micro-batch with these completion lengths runs packed under ``use_packing``'s
    ``setting``. ``auto``: when padding every completion to the longest would run at least
    ``AUTO_MIN_PADDING`` times the real completion positions. Both paths give the same
    log-probs; in the trainer's passes on CPU (fused LoRA, SmolLM2, AVX2 EPYC) packing measured
    1.22x (reference) and 1.48x (policy) faster for lengths 4-31 (padding 1.86x), and 0.95x and
    0.92x, i.e. slower, for equal lengths of 64 (attention over the packed row costs more than
    indexing the prompt's KV cache out to each sequence): docs/algorithms.md."""
    if setting != "auto":
        return bool(setting)
    real = sum(completion_lengths)
    return real > 0 and len(completion_lengths) * max(completion_lengths) >= AUTO_MIN_PADDING * real


def _sliding_window(config) -> bool:
    if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        return True
    return bool(getattr(config, "sliding_window", None)) and getattr(config, "use_sliding_window", True) is not False


@dataclass
class TreeBatch:
    input_ids: torch.Tensor  # (p, L) group rows: prompt, then its completions, right-padded
    position_ids: torch.Tensor  # (p, L)
    segment: torch.Tensor  # (p, L) 0 prompt, k + 1 the row's k-th completion, -1 padding
    source: torch.Tensor  # (b, T) flat index (row * L + column) of the state that predicts completion token j
    completion_ids: torch.Tensor  # (b, T) right-padded, sequences in the caller's order
    completion_mask: torch.Tensor  # (b, T)

    @property
    def loss_mask(self) -> torch.Tensor:
        """Tokens in the loss: all completion tokens (tool episodes, whose observations are masked,
        use pack_grouped; config validation refuses optim.packing with tools)."""
        return self.completion_mask

    @property
    def num_tokens(self) -> int:
        """Tokens the network runs over (each distinct prompt once, completions without padding)."""
        return int((self.segment != PAD_SEGMENT).sum())

    def attention_bias(self, dtype: torch.dtype) -> torch.Tensor:
        """(p, 1, L, L) additive mask: 0 where query q may see key k, the dtype's minimum elsewhere."""
        col = torch.arange(self.segment.shape[1], device=self.segment.device)
        seg_q, seg_k = self.segment[:, :, None], self.segment[:, None, :]
        causal = col[None, None, :] <= col[None, :, None]
        visible = causal & ((seg_k == seg_q) | ((seg_k == 0) & (seg_q != PAD_SEGMENT)))
        bias = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
        return bias.masked_fill(~visible, torch.finfo(dtype).min)[:, None]


def pack_tree(prompts: list[list[int]], group_index: list[int], completions: list[list[int]], pad_id: int,
              device: torch.device | str = "cpu") -> TreeBatch:
    """Sequence i continues ``prompts[group_index[i]]`` with ``completions[i]`` (same inputs as ``pack_grouped``)."""
    rows: list[list[int]] = [list(p) for p in prompts]
    positions: list[list[int]] = [list(range(len(p))) for p in prompts]
    segments: list[list[int]] = [[0] * len(p) for p in prompts]
    starts = []
    for g, c in zip(group_index, completions):
        lp = len(prompts[g])
        starts.append(len(rows[g]))
        segments[g] += [max(segments[g]) + 1] * len(c)
        rows[g] += c
        positions[g] += range(lp, lp + len(c))
    width = max(len(r) for r in rows)
    t = max(1, max(len(c) for c in completions))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    seg = torch.full((len(rows), width), PAD_SEGMENT, dtype=torch.long)
    for r, (row, p, s) in enumerate(zip(rows, positions, segments)):
        ids[r, :len(row)], pos[r, :len(row)], seg[r, :len(row)] = torch.tensor(row), torch.tensor(p), torch.tensor(s)
    source = torch.zeros((len(completions), t), dtype=torch.long)
    c_ids = torch.full((len(completions), t), pad_id, dtype=torch.long)
    c_mask = torch.zeros((len(completions), t), dtype=torch.long)
    for i, (g, c, start) in enumerate(zip(group_index, completions, starts)):
        n = len(c)
        if n:
            # token 0 is predicted by the prompt's last state, token j by completion token j - 1
            prev = [len(prompts[g]) - 1] + list(range(start, start + n - 1))
            source[i, :n] = torch.tensor(prev) + g * width
            c_ids[i, :n] = torch.tensor(c)
            c_mask[i, :n] = 1
    return TreeBatch(ids.to(device), pos.to(device), seg.to(device), source.to(device), c_ids.to(device),
                     c_mask.to(device))


def tree_logprobs(model, batch: TreeBatch, temperature: float = 1.0, chunk_tokens: int = 512,
                  fast_head: bool = True, with_entropy: bool = False, checkpoint_layers: bool = False):
    """``grouped_logprobs`` for a ``TreeBatch``: the same (b, T) log-probs, without completion padding.
    No KV cache is involved, so ``checkpoint_layers`` simply recomputes each layer in backward."""
    dtype = next(model.parameters()).dtype
    bias = batch.attention_bias(dtype)
    parts = split_head(model, fast_head)
    b, t = batch.completion_ids.shape
    if parts is None:  # the model's own head: full logits over the packed rows
        with checkpointed_layers(model, checkpoint_layers):
            logits = model(input_ids=batch.input_ids, attention_mask=bias, position_ids=batch.position_ids,
                           use_cache=False).logits.float()  # (p, L, V)
        picked = logits.reshape(-1, logits.shape[-1])[batch.source.reshape(-1)]  # (b * T, V)
        logp, entropy = SampledLogProb.apply(picked, batch.completion_ids.reshape(-1), temperature, with_entropy)
        out = TokenLogProbs(logp.view(b, t) * batch.completion_mask,
                            entropy.view(b, t) * batch.completion_mask if with_entropy else None)
    else:
        backbone, head = parts
        with checkpointed_layers(model, checkpoint_layers):
            hidden = backbone(input_ids=batch.input_ids, attention_mask=bias, position_ids=batch.position_ids,
                              use_cache=False).last_hidden_state  # (p, L, H)
        hidden = hidden.reshape(-1, hidden.shape[-1])[batch.source.reshape(-1)].view(b, t, -1)  # (b, T, H)
        out = head_logprobs(hidden, batch.completion_ids, batch.completion_mask, head, temperature, chunk_tokens,
                             with_entropy)
    return out if with_entropy else out.logprobs
