"""``model.attention_dtype``: attention computed in float32 under a bf16/fp16 base.

(Under a float32 base on CPU the same function is installed for its grouped-query path:
``wants_float32``.)

torch's CPU SDPA kernel is slow in bf16 on CPUs without AMX (docs/benchmarks.md, "Generation:
where one decode step goes": 70.7 ms of a 190 ms decode step in bf16, 15.7 ms in float32), and
float32 softmax is also the more exact one. ``sdpa_float32_forward`` upcasts q, k, v (and a
float mask) to float32, runs SDPA as transformers' stock function does (but grouped-query
attention without copying the keys and values) and casts the output back to the query's dtype.
It is installed on the loaded model itself, so the HF engine (rollout), the reference pass
(the same module with adapters off) and the update all run it: the rollout's and the
trainer's log-probs keep the same precision. Autograd flows through the casts.
"""

from __future__ import annotations

import functools

from grpo.errors import UserError

ATTENTION_DTYPES = ("auto", "float32", "model")
FLOAT32_ATTENTION = "sdpa_float32"  # the name registered with transformers' AttentionInterface
_REPLACEABLE = ("sdpa", "eager")  # flash / flex / paged kernels are left as they are


def sdpa_float32_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                         is_causal=None, **kwargs):
    """transformers' ``sdpa_attention_forward`` on float32 q, k, v; output in ``query.dtype``.

    Grouped-query attention (fewer key/value heads than query heads) goes to SDPA as it is,
    with ``enable_gqa`` (torch >= 2.5), instead of transformers' ``repeat_kv``, which copies
    every cached key and value ``heads / kv_heads`` times per layer and per decode step
    whenever a mask is passed (in the HF engine: whenever the prompts differ in length). The kernel reads the same numbers
    either way: outputs are bit-identical, gradients equal to float rounding
    (tests/test_attention.py). Calls this does not cover (a position bias, a paged cache,
    attention weights requested) take transformers' function on the upcast tensors.
    """
    import torch

    dtype = query.dtype
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()  # a packed 4-D bias: SDPA wants the query's dtype
    groups = getattr(module, "num_key_value_groups", 1)
    special = kwargs.get("position_bias") is not None or kwargs.get("cache") is not None or kwargs.get("output_attentions")
    if special or (groups > 1 and not sdpa_reads_grouped_kv()):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                              dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
        return out.to(dtype) if dtype != torch.float32 else out, weights
    q_length = query.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = q_length > 1 and attention_mask is None and causal  # transformers' rule: decode steps attend to all
    if causal and key.shape[2] > q_length:  # an empty static cache's prefill (as transformers does)
        key, value = key[:, :, :q_length], value[:, :, :q_length]
    gqa = {"enable_gqa": True} if groups > 1 else {}
    out = torch.nn.functional.scaled_dot_product_attention(
        query.float(), key.float(), value.float(), attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
        is_causal=causal, **gqa)  # (B, heads, q, head_dim)
    out = out.transpose(1, 2).contiguous()
    return out.to(dtype) if dtype != torch.float32 else out, None


@functools.cache
def sdpa_reads_grouped_kv() -> bool:
    """Whether ``sdpa_float32_forward`` hands SDPA the kv_heads keys/values as they are
    (``enable_gqa``, torch >= 2.5) rather than repeated to every head; ``grpo.memory`` counts
    what SDPA keeps for backward by it."""
    import torch

    return tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def register() -> None:
    """Register ``sdpa_float32`` (attention and mask functions) with transformers; idempotent."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ALL_ATTENTION_FUNCTIONS.register(FLOAT32_ATTENTION, sdpa_float32_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(FLOAT32_ATTENTION, sdpa_mask)


def wants_float32(setting: str, device: str, weight_dtype) -> bool:
    """Whether ``model.attention_dtype: setting`` computes attention in float32.

    ``auto``: on CPU when the base weights are bf16/fp16 (torch's CPU SDPA is slow there); on
    CUDA never (bf16 flash/SDPA kernels are fast there). ``model``: never. ``float32``: always
    under 16-bit weights. Float32 weights on CPU (``auto`` or ``float32``): attention is float32
    already, and the function is installed for its grouped-query path alone: transformers'
    own copies the keys and values per head whenever a mask is passed, and one float32 decode
    step of SmolLM2 (32 rows) took 339 ms with those copies against 313 without
    (``benchmarks/decode_profile.py --dtype float32``, AVX2-only EPYC). Outputs bit-identical."""
    import torch

    if setting not in ATTENTION_DTYPES:
        raise UserError(f"model.attention_dtype: {setting!r} is not one of {', '.join(ATTENTION_DTYPES)}")
    cuda = str(device).startswith("cuda")
    if setting == "model" or (weight_dtype == torch.float32 and cuda):
        return False
    return weight_dtype == torch.float32 or setting == "float32" or not cuda


def apply_attention_dtype(model, setting: str, device: str) -> str:
    """Switch ``model``'s sdpa/eager attention to ``sdpa_float32`` when ``wants_float32``;
    return the attention implementation in use afterwards."""
    config = model.config
    current = getattr(config, "_attn_implementation", None)
    if not wants_float32(setting, device, model.dtype) or current not in _REPLACEABLE:
        return current
    register()
    config._attn_implementation = FLOAT32_ATTENTION
    return FLOAT32_ATTENTION
