"""While decoding on CPU: sibling LoRA layers that read the same input as one product.

A Llama-style block multiplies one normalized hidden state by q, k and v, and another by gate
and up. Decoding through packed base weights (``rollout.packed_weights``), each of those five
layers costs three kernels (the base product, the LoRA A side, the B side's ``addmm``) whose
fixed cost dominates at a decode step's 8-64 rows. ``SharedInputGroup`` computes a group's
layers together, with the same three kernels for all of them:

    out = x [W_q; W_k; W_v]^T + (x [A_q; A_k; A_v]^T) blockdiag(s B_q, s B_k, s B_v)^T

then hands each layer its column slice. Each output column is the same dot products as
before (the block-diagonal B adds exact zeros); at a decode step's 32-64 rows oneDNN sums them
in the same order, so the layers return the same numbers bit for bit (tests/test_fused_lora.py,
``benchmarks/decode_limits.py``), while at 252 rows (a large evaluation batch) it blocked the
wider q/k/v product differently: the same function, other float rounding. The concatenated base is a packed copy kept like
``packed_linear``'s, in place of the members' own (the same bytes); A and B are concatenated
and cast once per generation. On SmolLM2 at 32 rows in bf16 (a CPU with AMX, 1 thread) a
block's q/k/v took 130 instead of 224 us and gate/up 325 instead of 371 us
(docs/benchmarks.md, "Session 11").

The first member called computes the group's outputs and keeps them with the input they were
computed from; a sibling called with that same tensor (same object, storage and version) takes
its slice, anything else computes afresh, so a model that feeds the siblings different inputs
gets correct, only slower, results.
"""

from __future__ import annotations

import torch

from grpo.prepared_linear import prepared_linear, weights_stamp

SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # sibling names per group


class SharedInputGroup:
    """The layers ``members`` (peft ``lora.Linear``s with adapter ``name``, base weights frozen
    CPU float32/bf16 of one dtype, all with a bias or none) decoded as one product."""

    def __init__(self, members: list, name: str):
        self.members, self.name = members, name
        self.index = {id(layer): i for i, layer in enumerate(members)}
        bases = [layer.base_layer for layer in members]
        self.stamp = self._base_stamp()
        with torch.no_grad():
            weight = torch.cat([b.weight.detach() for b in bases])
            bias = None if bases[0].bias is None else torch.cat([b.bias.detach() for b in bases])
        self.base = prepared_linear(weight, bias)
        self.sizes = [b.weight.shape[0] for b in bases]
        self._casts: tuple | None = None  # (stamp of the adapters and dtypes, A concatenated, block-diagonal s B)
        self._memo: tuple | None = None  # (x, its storage and version, the members' outputs)

    def _base_stamp(self) -> tuple:
        return weights_stamp(*[t for layer in self.members for t in (layer.base_layer.weight, layer.base_layer.bias)])

    def current(self) -> bool:
        """The members' base weights are the ones the packed copy was made from."""
        return self.stamp == self._base_stamp()

    def forget(self) -> None:
        """Drop what one generation kept (its last input and outputs, the cast adapters)."""
        self._memo = self._casts = None

    def __call__(self, layer, x: torch.Tensor) -> torch.Tensor:
        memo = self._memo
        if memo is None or memo[0] is not x or memo[1] != (x.data_ptr(), x._version):
            memo = self._memo = (x, (x.data_ptr(), x._version), self._compute(x))
        return memo[2][self.index[id(layer)]]

    def _compute(self, x: torch.Tensor) -> tuple:
        out = self.base(x)
        a, b = self._adapter_casts(x.dtype, out.dtype)
        h = torch.nn.functional.linear(x, a)  # (..., members x rank)
        flat = torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), b.t())
        return flat.view(out.shape).split(self.sizes, dim=-1)

    def _adapter_casts(self, a_dtype, b_dtype) -> tuple:
        lora = [(layer.lora_A[self.name].weight, layer.lora_B[self.name].weight, layer.scaling[self.name])
                for layer in self.members]
        stamp = (weights_stamp(*[w for a, b, _ in lora for w in (a, b)]), tuple(s for *_, s in lora), a_dtype, b_dtype)
        if self._casts is None or self._casts[0] != stamp:
            with torch.no_grad():
                a = torch.cat([a for a, _, _ in lora]).to(a_dtype)
                b = torch.block_diag(*[b * s for _, b, s in lora]).to(b_dtype)
            self._casts = (stamp, a, b)
        return self._casts[1], self._casts[2]
