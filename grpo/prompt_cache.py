"""The shared prompt's keys and values in the update, safe under activation checkpointing.

The update encodes each distinct prompt once and runs its G completions against the
prompt's per-layer K/V (``grpo.logprobs.grouped_logprobs``). With a plain ``DynamicCache``
each layer's ``update`` appends to the cache, so a layer recomputed in backward by
``torch.utils.checkpoint`` would append its keys and values a second time (and
transformers switches the cache off under its own gradient checkpointing for that
reason). ``SharedPromptCache`` makes ``update`` safe to call again:

* recording (the prompt pass, from an empty cache): a layer's first ``update`` stores its
  K/V as ``DynamicCache`` would; a later call for the same layer is the recomputation and
  returns its inputs unstored (from an empty cache the layer attends to exactly its own
  K/V, so that is what the first call returned too);
* reading (the view ``read_for(group_index)`` returns, the completion pass): ``update`` returns
  ``concat(prompt K/V of each sequence's prompt, new K/V)`` and stores nothing, so a
  recomputed completion layer reads the same prompt K/V again.

The prompt K/V keep their autograd history: the completions' gradient reaches the prompt
positions (and the LoRA weights applied there). The per-sequence selection happens inside
each layer, so only the (p, ...) prompt tensors live between the passes, not (b, ...)
copies of them.

transformers is imported at module level here; ``grpo.logprobs`` imports this module when
the update first runs, so importing the trainer stays light.
"""

from __future__ import annotations

import copy

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

# layer kinds whose update returns concat(stored, new): full attention, and sliding windows
# (which store the window's tail and return the full concatenation, as we do)
_SUPPORTED_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer)


class SharedPromptCache(DynamicCache):
    """A ``DynamicCache`` whose ``update`` never stores twice (see the module docstring)."""

    def __init__(self, config):
        super().__init__(config=config)
        self._recorded: set[int] = set()
        self._index: torch.Tensor | None = None

    @property
    def readable(self) -> bool:
        """Whether every layer of this model's cache is a kind we can read without mutating it
        (False for e.g. linear-attention layers: the caller then takes the flat path)."""
        return all(type(layer) in _SUPPORTED_LAYERS for layer in self.layers)

    def read_for(self, group_index: torch.Tensor) -> "SharedPromptCache":
        """A reading view of the recorded prompts (same layers): sequence i continues prompt
        ``group_index[i]``. A new object, not a mode switch: the prompt pass's layers, when
        recomputed in backward, still call the recording cache they were first run with."""
        view = copy.copy(self)
        view._index = group_index
        return view

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self._index is None:  # recording the prompt pass
            if layer_idx in self._recorded:  # the checkpoint's recomputation of this layer
                return key_states, value_states
            self._recorded.add(layer_idx)
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        layer = self.layers[layer_idx]  # (p, heads, Lp, d) -> (b, heads, Lp + T, d), nothing stored
        keys = torch.cat([layer.keys.index_select(0, self._index), key_states], dim=-2)
        values = torch.cat([layer.values.index_select(0, self._index), value_states], dim=-2)
        return keys, values
