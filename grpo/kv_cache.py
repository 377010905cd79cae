"""The HF engine's KV cache: reserved once per generation, stored in the precision attention reads.

transformers' ``DynamicLayer`` appends each decode step's keys and values with ``torch.cat``,
a copy of the whole cache per layer and token, and stores them in the model's dtype. Under a
16-bit base on CPU the attention runs in float32 (``grpo.attention``), so every decode step
also upcast every layer's whole cache to float32 before SDPA: two more full copies per layer
and token. ``reserved_cache``'s layers remove both: they allocate buffers in the dtype the
attention computes in, for the prompt plus up to ``RESERVE_TOKENS`` new tokens (doubling, up
to the prompt plus ``max_new_tokens``, when a generation runs longer: a long ``max_new_tokens``
does not reserve memory its answers never use), write each step's new keys and values into
the next free positions (cast there, a few KB) and hand attention views of the filled part. A bf16 key upcast to float32 is exact, so attention reads the same numbers as
before (tests/test_kv_cache.py: the engine samples the same tokens with the same log-probs).

One decode step of SmolLM2 at 32 rows and a 75-token cache, bf16 base on a CPU with AMX:
docs/benchmarks.md, "Session 11".

Only models whose every layer is a plain full-attention ``DynamicLayer`` take it (sliding
windows, linear attention, indexers and other layer kinds keep transformers' own cache).
"""

from __future__ import annotations

import functools

import torch

RESERVE_TOKENS = 128  # new tokens the engine reserves room for up front (then doubling)


class _ReservedMixin:
    """Mixed into transformers' ``DynamicLayer`` by ``reserved_layer_class``: a layer
    (keys/values ``(batch, kv_heads, length, head_dim)``) whose storage is reserved up front for
    ``capacity`` positions in ``dtype`` (None: the keys' own); ``keys``/``values`` are views of the
    first ``length`` positions. A write past ``capacity`` moves the filled part into buffers twice
    as long (at most ``limit`` positions, when given, unless the write needs more)."""

    def __init__(self, capacity: int, dtype: torch.dtype | None, limit: int | None = None):
        super().__init__()
        self.capacity, self.storage_dtype, self.limit = max(1, int(capacity)), dtype, limit
        self.length = 0
        self._k = self._v = None  # (batch, kv_heads, capacity, head_dim) buffers

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = self.storage_dtype or key_states.dtype, key_states.device
        self._k = key_states.new_empty((*key_states.shape[:2], self.capacity, key_states.shape[-1]), dtype=self.dtype)
        self._v = value_states.new_empty((*value_states.shape[:2], self.capacity, value_states.shape[-1]),
                                         dtype=self.dtype)
        self._views()
        self.is_initialized = True

    def _views(self) -> None:
        self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            grown = 2 * self.capacity if self.limit is None else min(2 * self.capacity, self.limit)
            self._reserve(max(end, grown))
        self._k[:, :, self.length:end].copy_(key_states)
        self._v[:, :, self.length:end].copy_(value_states)
        self.length = end
        self._views()
        return self.keys, self.values

    def _reserve(self, capacity: int, rows: torch.Tensor | None = None, repeats: int = 1) -> None:
        """Move the filled part into fresh buffers of ``capacity`` positions, keeping batch ``rows``
        (all when None), each row ``repeats`` times."""
        def moved(buf):
            used = buf[:, :, :self.length] if rows is None else buf[rows, :, :self.length]
            if repeats > 1:
                used = used.repeat_interleave(repeats, dim=0)
            out = buf.new_empty((used.shape[0], buf.shape[1], capacity, buf.shape[3]))
            out[:, :, :self.length] = used
            return out
        self.capacity = capacity
        self._k, self._v = moved(self._k), moved(self._v)
        self._views()

    def get_seq_length(self) -> int:
        return self.length

    def reset(self) -> None:
        self.length = 0
        if self.is_initialized:
            self._views()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:  # transformers' legacy form: the length to keep
            self.length = min(self.length, tokens_to_remove)
        else:
            self.length = max(0, self.length + tokens_to_remove)
        if self.is_initialized:
            self._views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._reserve(self.capacity, repeats=repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._reserve(self.capacity, rows=indices)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx.to(self.device))


@functools.cache
def reserved_layer_class() -> type:
    """``ReservedLayer``: ``_ReservedMixin`` over transformers' ``DynamicLayer`` (imported here,
    not at module import)."""
    from transformers.cache_utils import DynamicLayer

    return type("ReservedLayer", (_ReservedMixin, DynamicLayer), {"__module__": __name__})


def reserved_cache(model, capacity: int, limit: int | None = None):
    """A ``DynamicCache`` for ``model`` whose layers are ``ReservedLayer``s of ``capacity``
    positions (growing by doubling up to ``limit``), stored in float32 when the model computes attention in float32 over 16-bit
    weights (``grpo.attention``), else in the keys' own dtype. None where the model's cache is not
    all plain full-attention layers: the caller then lets the model make its own."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    from grpo.attention import FLOAT32_ATTENTION

    config = getattr(model, "config", None)
    if config is None:
        return None
    try:
        cache = DynamicCache(config=config)
    except Exception:  # a config transformers cannot read layer types from: its own cache
        return None
    if not cache.layers or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    text = config.get_text_config(decoder=True)
    dtype = torch.float32 if getattr(text, "_attn_implementation", None) == FLOAT32_ATTENTION else None
    layer = reserved_layer_class()
    cache.layers = [layer(capacity, dtype, limit) for _ in cache.layers]
    return cache
