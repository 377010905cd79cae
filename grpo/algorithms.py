"""The maths of a GRPO update, as pure functions of tensors.

No model, no config object: each function takes tensors and plain settings, has its
shapes in the docstring, and is tested against numbers worked out by hand
(tests/test_algorithms.py). Notation: P prompts, G completions per prompt,
B = P * G sequences, T completion tokens (padded).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

AdvantageScale = Literal["group", "batch", "none", "rloo", "reinforce_pp", "reinforce_pp_baseline"]
LossAggregation = Literal["seq_mean", "token_mean", "constant"]
RatioLevel = Literal["token", "sequence", "sequence_token"]

# verl's bounds: exp() of a log-ratio beyond +-20 (ratio 5e8) only ever overflows a step.
LOG_RATIO_CLAMP = 20.0
KL_CLAMP = 10.0  # the k3 estimate is clamped to [-10, 10] after its exponent (verl low_var_kl)


class Advantages(NamedTuple):
    advantages: torch.Tensor  # (B,)
    zero_variance: torch.Tensor  # (P,) bool: every completion of the prompt got the same reward


def group_advantages(rewards: torch.Tensor, group_size: int, scale: AdvantageScale = "group",
                     eps: float = 1e-4) -> Advantages:
    """Group-relative advantages.

    rewards: (B,) ordered prompt-major (the G completions of prompt 0, then prompt 1, ...).

    * ``group`` (GRPO, Shao et al. 2024): ``(r - mean_group) / (std_group + eps)``;
    * ``batch``: ``(r - mean_group) / (std_batch + eps)``, one std over all B rewards
      (REINFORCE++-style; less noise from small groups);
    * ``none`` (Dr. GRPO, Liu et al. 2025): ``r - mean_group``, no std scaling, which
      removes the bias towards low-variance (too easy / too hard) questions;
    * ``rloo`` (RLOO, Ahmadian et al. 2024): ``r_i - mean_{j != i} r_j``, the
      leave-one-out baseline, ``= G / (G - 1) * (r_i - mean_group)``;
    * ``reinforce_pp`` (REINFORCE++, Hu 2025): ``(r - mean_batch) / (std_batch + eps)``,
      global batch normalisation with no per-prompt baseline;
    * ``reinforce_pp_baseline`` (REINFORCE++-baseline, Hu 2025): ``a = r - mean_group``,
      then ``(a - mean_batch(a)) / (std_batch(a) + eps)``.

    std is the unbiased sample std (as in the GRPO reference code and TRL). A group
    with zero variance gets advantage 0 under every option except ``reinforce_pp``
    (whose baseline is the batch mean, not the group's).
    """
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D with a multiple of {group_size} entries, got {tuple(rewards.shape)}")
    grouped = rewards.view(-1, group_size).double()  # (P, G)
    mean = grouped.mean(-1, keepdim=True)
    centred = grouped - mean
    if group_size > 1:
        zero_var = (grouped.max(-1).values - grouped.min(-1).values) == 0
    else:
        zero_var = torch.ones(grouped.shape[0], dtype=torch.bool, device=rewards.device)
    if scale == "group":
        std = grouped.std(-1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
        adv = centred / (std + eps)
    elif scale == "batch":
        std = rewards.double().std() if rewards.numel() > 1 else rewards.new_zeros((), dtype=torch.float64)
        adv = centred / (std + eps)
    elif scale == "none":
        adv = centred
    elif scale == "rloo":
        adv = centred * (group_size / (group_size - 1)) if group_size > 1 else torch.zeros_like(centred)
    elif scale == "reinforce_pp":
        flat = grouped.reshape(-1)
        std = flat.std() if flat.numel() > 1 else flat.new_zeros(())
        adv = (grouped - flat.mean()) / (std + eps)
    elif scale == "reinforce_pp_baseline":
        flat = centred.reshape(-1)
        std = flat.std() if flat.numel() > 1 else flat.new_zeros(())
        adv = (centred - flat.mean()) / (std + eps)
    else:
        raise ValueError(f"unknown advantage scale {scale!r}")
    return Advantages(adv.reshape(-1).to(rewards.dtype), zero_var)


def truncated_importance_weights(trainer_logprobs: torch.Tensor, engine_logprobs: torch.Tensor,
                                 cap: float) -> torch.Tensor:
    """``min(exp(trainer - engine), cap)`` per token, no gradient. Shapes (b, T)."""
    return torch.exp(trainer_logprobs.detach() - engine_logprobs).clamp(max=cap)


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate, Schulman's k3: ``exp(d) - d - 1``, d = ref - logp.

    Unbiased for KL(pi || pi_ref) under samples from pi, always >= 0. Shapes (B, T).
    As in verl (``low_var_kl``), d is clamped to [-20, 20] before the exponent and the
    estimate to at most 10, so one token far from the reference cannot overflow the step.
    """
    d = (ref_logprobs - logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return (torch.exp(d) - d - 1).clamp(max=KL_CLAMP)


def importance_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor,
                     level: RatioLevel = "token") -> torch.Tensor:
    """The PPO importance ratio per token, (b, T), from log-probs (b, T) and mask (b, T).

    * ``token`` (PPO / GRPO): ``exp(logp_t - old_t)``;
    * ``sequence`` (GSPO, Zheng et al. 2025, eq. 7): the length-normalised sequence ratio
      ``s_i = exp(mean_t (logp_t - old_t))``, the same value at every token of sequence i
      (with ``seq_mean`` aggregation the loss is then GSPO's per-sequence objective);
    * ``sequence_token`` (GSPO-token, eq. 13): ``sg[s_i] * pi_t / sg[pi_t]``: the value
      is s_i but each token's gradient is its own, so per-token advantages can be used.

    The log-ratio is clamped to [-20, 20] before the exponent (verl), so a token the
    policy has moved far from cannot make the ratio inf and the loss NaN.
    """
    log_ratio = logprobs - old_logprobs
    if level == "token":
        return torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    m = mask.to(logprobs.dtype)
    seq_log = (log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)  # (b, 1)
    if level == "sequence":
        return torch.exp(seq_log.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)).expand_as(logprobs)
    if level == "sequence_token":
        combined = seq_log.detach() + logprobs - logprobs.detach()
        return torch.exp(combined.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    raise ValueError(f"unknown ratio level {level!r}")


def overlong_penalty(lengths: torch.Tensor, max_tokens: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), added to the reward. (B,) -> (B,).

    With L = ``max_tokens`` and the buffer L_c: 0 for ``len <= L - L_c``, then a linear ramp
    ``((L - L_c) - len) / L_c`` down to -1 at ``len = L`` (and -1 beyond), times ``factor``.
    ``buffer = 0`` switches it off.
    """
    if buffer <= 0:
        return torch.zeros_like(lengths, dtype=torch.float32)
    start = max_tokens - buffer
    penalty = ((start - lengths.float()) / buffer).clamp(min=-1.0, max=0.0)
    return penalty * factor


class PolicyLoss(NamedTuple):
    loss: torch.Tensor  # scalar, this micro-batch's share of the batch loss
    per_token: torch.Tensor  # (b, T) unreduced loss (0 where masked)
    clipped: torch.Tensor  # (b, T) bool, the clipped branch was taken
    kl: torch.Tensor  # (b, T) k3 estimate (0 when beta == 0)
    ratio: torch.Tensor  # (b, T)


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, *, epsilon_low: float = 0.2, epsilon_high: float = 0.2,
                beta: float = 0.0, ref_logprobs: torch.Tensor | None = None,
                aggregation: LossAggregation = "seq_mean", num_sequences: int | None = None,
                num_tokens: int | None = None, max_tokens: int | None = None,
                importance_weights: torch.Tensor | None = None, ratio_level: RatioLevel = "token") -> PolicyLoss:
    """PPO clipped surrogate with a KL penalty, aggregated as GRPO, DAPO or Dr. GRPO.

    logprobs, old_logprobs, ref_logprobs, mask: (b, T) for a micro-batch of b sequences;
    advantages: (b,). Per token::

        ratio = exp(logp - old_logp)
        surrogate = min(ratio * A, clip(ratio, 1 - epsilon_low, 1 + epsilon_high) * A)
        loss_t = -surrogate + beta * k3(logp, ref_logp)

    Separate ``epsilon_low`` / ``epsilon_high`` is DAPO's clip-higher. ``ratio_level``
    selects the token ratio (PPO/GRPO) or GSPO's sequence ratio (see ``importance_ratio``;
    GSPO clips it with much smaller epsilons, e.g. 3e-4 / 4e-4).
    ``importance_weights`` (b, T), if given, multiply the surrogate term per token: the
    truncated importance sampling correction ``min(pi_trainer / pi_engine, C)`` for
    samples drawn by an engine whose numerics differ from the trainer's (Yao et al.
    2025, "Your efficient RL framework secretly brings you off-policy RL training").
    Aggregation:

    * ``seq_mean`` (GRPO): mean over sequences of the per-sequence token mean;
    * ``token_mean`` (DAPO): sum over all tokens / number of tokens in the batch;
    * ``constant`` (Dr. GRPO): sum over all tokens / (sequences * max_tokens).

    Micro-batching: pass the *whole batch's* ``num_sequences`` (and ``num_tokens`` for
    token_mean, ``max_tokens`` for constant) so that summing the micro-batch losses
    gives exactly the full-batch loss. They default to this micro-batch's own counts.
    """
    mask = mask.to(logprobs.dtype)
    ratio = importance_ratio(logprobs, old_logprobs, mask, ratio_level)
    adv = advantages[:, None].to(logprobs.dtype)
    unclipped = ratio * adv
    clipped_ratio = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    surrogate = torch.min(unclipped, clipped_ratio * adv)
    clipped = (clipped_ratio * adv < unclipped) & (mask > 0)
    per_token = -surrogate if importance_weights is None else -surrogate * importance_weights.detach()
    if beta != 0.0:
        if ref_logprobs is None:
            raise ValueError("beta != 0 needs ref_logprobs")
        kl = kl_k3(logprobs, ref_logprobs)
        per_token = per_token + beta * kl
    else:
        kl = torch.zeros_like(logprobs)
    per_token = per_token * mask
    loss = aggregate(per_token, mask, aggregation, num_sequences=num_sequences,
                     num_tokens=num_tokens, max_tokens=max_tokens)
    return PolicyLoss(loss, per_token, clipped, kl * mask, ratio)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, aggregation: LossAggregation, *,
              num_sequences: int | None = None, num_tokens: int | None = None,
              max_tokens: int | None = None) -> torch.Tensor:
    """Reduce a masked (b, T) per-token loss to a scalar (see ``policy_loss``)."""
    mask = mask.to(per_token.dtype)
    n_seq = num_sequences if num_sequences is not None else per_token.shape[0]
    if aggregation == "seq_mean":
        lengths = mask.sum(-1).clamp(min=1.0)
        return (per_token.sum(-1) / lengths).sum() / n_seq
    if aggregation == "token_mean":
        n_tok = num_tokens if num_tokens is not None else int(mask.sum().item())
        return per_token.sum() / max(n_tok, 1)
    if aggregation == "constant":
        t_max = max_tokens if max_tokens is not None else per_token.shape[1]
        return per_token.sum() / (n_seq * t_max)
    raise ValueError(f"unknown loss aggregation {aggregation!r}")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of ``values`` where ``mask`` is set (0.0 when the mask is empty)."""
    mask = mask.to(values.dtype)
    total = mask.sum()
    return float((values * mask).sum() / total) if total > 0 else 0.0
