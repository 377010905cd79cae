"""FLOPs a GRPO step must do, per phase, for a decoder-only transformer (Llama/Qwen shape).

Counts only the arithmetic the algorithm cannot avoid, 2 FLOPs per multiply-add:

* generation: each prompt prefilled once (its last position through the LM head), then
  every completion token of every row through the layers (attention over the prompt and
  the tokens before it) and the head;
* reference pass (LoRA off, no grad): each distinct prompt once, every completion token
  through the layers and the head;
* policy forward + backward (LoRA on): the same forward plus the LoRA matmuls, and a
  backward that computes gradients of activations only (the base is frozen: no weight
  gradients, about 1x the forward's linear FLOPs instead of 2x) plus the LoRA weight
  gradients; attention's backward is 2x its forward.

Element-wise work (norms, activations, softmax, sampling) is left out: it is memory traffic,
not matmul arithmetic, and is part of what the achieved fraction measures.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, c) -> "Shape":
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return cls(c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
                   getattr(c, "num_key_value_heads", None) or c.num_attention_heads, head_dim, c.vocab_size)

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of each linear layer in one decoder layer: q, k, v, o, gate, up, down."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]

    def layer_linear_flops(self) -> int:
        """Forward FLOPs of one token through one layer's linears."""
        return sum(2 * a * b for a, b in self.linears())

    def lora_flops(self, rank: int) -> int:
        """Forward FLOPs of one token through one layer's LoRA pairs (x A then (xA) B)."""
        return sum(2 * rank * (a + b) for a, b in self.linears())

    def attention_flops(self, context: int) -> int:
        """Forward FLOPs of one query token attending over ``context`` keys, one layer
        (scores q.k and the weighted sum of values, each 2 * context * heads * head_dim)."""
        return 4 * context * self.heads * self.head_dim

    def head_flops(self) -> int:
        return 2 * self.hidden * self.vocab


def _forward_tokens(s: Shape, start: int, count: int) -> int:
    """Layer FLOPs (no head) of ``count`` consecutive tokens whose first sits at position
    ``start`` (attends over start+1 keys), causal."""
    attn = sum(s.attention_flops(start + j + 1) for j in range(count))
    return s.layers * (count * s.layer_linear_flops() + attn)


def phase_flops(s: Shape, prompt_lens: list[int], group: int, tokens: int, rank: int) -> dict[str, float]:
    """FLOPs of one step's phases: P prompts (``prompt_lens``), G completions of ``tokens`` each."""
    prompts = sum(_forward_tokens(s, 0, p) for p in prompt_lens)
    completions = group * sum(_forward_tokens(s, p, tokens) for p in prompt_lens)
    head = len(prompt_lens) * group * tokens * s.head_flops()
    # Generation: prefill + head at the last prompt position; the last sampled token is never fed back.
    gen_decode = group * sum(_forward_tokens(s, p, tokens - 1) for p in prompt_lens)
    generate = prompts + len(prompt_lens) * s.head_flops() + gen_decode + (head - len(prompt_lens) * group * s.head_flops())
    reference = prompts + completions + head
    all_tokens = sum(prompt_lens) + len(prompt_lens) * group * tokens
    attn = (prompts + completions) - s.layers * all_tokens * s.layer_linear_flops()
    lora = s.layers * all_tokens * s.lora_flops(rank)
    forward = reference + lora
    # Backward: activation grads through the frozen linears (1x) and the head (1x), attention 2x,
    # LoRA: input grads (1x) and weight grads (1x).
    backward = s.layers * all_tokens * s.layer_linear_flops() + head + 2 * attn + 2 * lora
    return {"generate": float(generate), "reference": float(reference), "policy": float(forward + backward)}


def decode_flops(s: Shape, prompt_lens: list[int], group: int, tokens: int) -> float:
    """The decode steps' share of ``phase_flops(...)["generate"]``: everything after the prefill
    (each token of each row through the layers and the head, one row per completion)."""
    prefill = sum(_forward_tokens(s, 0, p) for p in prompt_lens) + len(prompt_lens) * s.head_flops()
    return phase_flops(s, prompt_lens, group, tokens, 0)["generate"] - prefill


def float32_head_flops(s: Shape, prompt_lens: list[int], group: int, tokens: int, cuda: bool = False) -> float:
    """The LM-head forwards that run in float32 whatever the base's dtype (log-probs from float32
    logits; their backward runs in the base's dtype): on CPU the update's two (reference and
    policy passes); on CUDA also the policy's recomputation in backward (its head chunks are
    checkpointed) and generation's, one per new token of each row (the engine's float32 head)."""
    forwards = 4 if cuda else 2  # CUDA: reference, policy, its recomputation, generation
    return float(forwards * len(prompt_lens) * group * tokens * s.head_flops())


def decode_gflops(s: Shape, rows: int, dtype, threads: int = 1, seconds: float = 0.5) -> float:
    """Sustained GFLOP/s of a decode step's linear layers on CPU: ``(rows, in) @ W`` for every linear
    of every layer, each W its own tensor, so the sweep streams the backbone's weights from memory
    as decoding does (a single small matrix would stay in cache and overstate the rate). Best of
    three windows of about ``seconds``, after one warm-up sweep."""
    import time

    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        weights = [torch.randn(a, b, generator=gen).to(dtype) for _ in range(s.layers) for a, b in s.linears()]
        inputs = {a: torch.randn(rows, a, generator=gen).to(dtype) for a, _ in s.linears()}
        flops = 2 * rows * sum(w.shape[0] * w.shape[1] for w in weights)

        def sweep():
            for w in weights:
                inputs[w.shape[0]] @ w

        sweep()
        best = 0.0
        for _ in range(3):
            reps, t0 = 0, time.perf_counter()
            while True:
                sweep()
                reps += 1
                dt = time.perf_counter() - t0
                if dt >= seconds:
                    break
            best = max(best, flops * reps / dt / 1e9)
        return best
    finally:
        torch.set_num_threads(old)
