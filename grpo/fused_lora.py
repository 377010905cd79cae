"""``model.lora_kernel: fused``: one LoRA forward per linear layer instead of peft's five ops.

peft's ``lora.Linear`` computes ``(base(x) + B(A(dropout(x.float()))) * s).to(dtype)``: under a
bf16 base that is a float32 copy of ``x``, two float32 matmuls, a float32 ``(tokens, out)``
product with the scale, a float32 sum and a cast back, i.e. four full-size temporaries per
layer and as many again in backward. ``fused_lora_forward`` computes the same function as

    base(x) + (dropout(x) @ A^T) @ (s * B)^T         one ``addmm``: the add is in the GEMM

in the base layer's compute dtype, as ``torch.autocast`` would: the LoRA weights (and AdamW's
state) stay float32 masters, cast to the base dtype for the matmul (a few KB per layer), and
their gradients flow back through those casts in float32. Under a float32 base it is peft's
arithmetic with the scale folded into B (equal to rounding). On this project's CPU it cut the
policy forward+backward of a 4 x 8 x 64 GRPO step by 14 % and its peak RSS by 38 %
(docs/benchmarks.md, "Session 3"). With gradients, the same ops run inside
``grpo.lora_grad.FusedLoRALinear``, whose backward makes fewer passes over the (tokens, width)
tensors than autograd's.

Anything but plain single-adapter LoRA (adapters disabled or merged, several active adapters,
DoRA or another variant, a LoRA bias, extra call arguments) takes peft's own forward, so
``disable_adapter()`` (the reference pass), ``merge_and_unload`` (export) and multi-adapter
evaluation behave exactly as with peft.

While generating (``cached_lora_casts``, entered by the HF engine around ``generate``) the
weights cannot change, so each layer casts A and ``s B`` once per generation instead of once
per decode step: 210 layers x 2 casts per token on SmolLM2 otherwise. The cache exists only
inside the context and only serves calls that record no gradient; each entry is also keyed by
the weights' ``_version`` and storage, so an in-place update inside the context (an optimizer
step, ``load_state_dict``) is never served a stale cast.

Two CPU decode paths go further (``rollout.packed_weights``, ``rollout.merged_weights``): the
base product through a oneDNN-packed copy of the base weight (float32 or bf16), or, for a
float32 base, the whole layer through one copy of W + s B A (``merged_linear``), made again only
when the adapter changes, so once per optimizer step. Both serve only calls that record no
gradient; training never sees them.
"""

from __future__ import annotations

import contextlib
import types

from grpo.decode_groups import SHARED_INPUT, SharedInputGroup
from grpo.lora_grad import FusedLoRALinear, applies
from grpo.prepared_linear import packed_linear, prepared_linear, weights_stamp

LORA_KERNELS = ("fused", "peft")


def fused_lora_forward(self, x, *args, **kwargs):
    """``forward`` of a peft ``lora.Linear`` (bound to the instance by ``use_fused_lora``)."""
    import torch

    name = None if args or kwargs else plain_adapter(self)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    lora_a, lora_b = self.lora_A[name], self.lora_B[name]
    cache = self.__dict__.get(_CAST_CACHE)
    if cache is not None and not torch.is_grad_enabled():
        dropout_off = not self.training or isinstance(self.lora_dropout[name], torch.nn.Identity)
        if _MERGED in cache and x.dtype == torch.float32 and dropout_off:
            return merged_linear(self, packed=cache[_MERGED], name=name)(x)
        group = cache.get(_GROUP)
        if group is not None and group.name == name and dropout_off and x.dtype == self.base_layer.weight.dtype:
            return group(self, x)
    if applies(x, self.base_layer, self.lora_dropout[name]):  # with gradients: the same ops, a leaner backward
        with torch.no_grad():
            out = self.base_layer(x)
        return FusedLoRALinear.apply(x, out, self.base_layer.weight, lora_a.weight, lora_b.weight, self.scaling[name])
    packed = None if cache is None or torch.is_grad_enabled() else cache.get(_PACKED_BASE)
    out = packed(x) if packed is not None and x.dtype == self.base_layer.weight.dtype else self.base_layer(x)
    if cache is not None and not torch.is_grad_enabled():
        a, b = _cached_casts(cache, name, lora_a.weight, lora_b.weight, self.scaling[name], x.dtype, out.dtype)
    else:
        a = lora_a.weight.to(x.dtype)  # (r, in)
        b = (lora_b.weight * self.scaling[name]).to(out.dtype)  # (out, r), the scale folded in
    h = torch.nn.functional.linear(self.lora_dropout[name](x), a)  # (..., r)
    flat = torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), b.t())
    return flat.view(out.shape)


def plain_adapter(layer) -> str | None:
    """The name of ``layer``'s one active adapter when it is plain LoRA (enabled, not merged, no
    variant such as DoRA, no LoRA bias): what the fused forward computes. None: peft's forward."""
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return None
    if layer.lora_A[name].bias is not None or layer.lora_B[name].bias is not None:
        return None
    return name


_CAST_CACHE = "_grpo_lora_cast_cache"  # instance attribute of a fused layer, set only by cached_lora_casts
_PACKED_BASE = "packed base"  # the cache's entry for the base layer's packed linear (its own dtype)
_MERGED = "merged"  # the cache's entry when decoding through the merged weight: whether that copy is packed
_GROUP = "shared input group"  # the cache's entry for a layer decoded with its siblings (grpo.decode_groups)
_GROUP_KEPT = "_grpo_shared_input_group"  # attribute of a group's first layer, kept: its SharedInputGroup
_MERGED_COPY = "_grpo_merged_linear"  # instance attribute of a fused layer, kept: (key, linear, (A, B) made from)


def _cached_casts(cache: dict, name: str, weight_a, weight_b, scaling: float, a_dtype, b_dtype):
    """(A in ``a_dtype``, s B in ``b_dtype``) from ``cache``, computed again whenever either
    weight was written in place or replaced since it was stored (``weights_stamp``)."""
    stamp = (weights_stamp(weight_a, weight_b), scaling)
    key = (name, a_dtype, b_dtype)
    hit = cache.get(key)
    if hit is None or hit[0] != stamp:
        hit = cache[key] = (stamp, weight_a.to(a_dtype), (weight_b * scaling).to(b_dtype))
    return hit[1], hit[2]


def fused_layers(model) -> list:
    """The layers of ``model`` running ``fused_lora_forward``."""
    return [m for m in model.modules() if getattr(m.__dict__.get("forward"), "__func__", None) is fused_lora_forward]


def packable_base(layer) -> bool:
    """A fused layer's base is a plain float32 or bfloat16 CPU weight (not a sharded DTensor, not
    quantized) that ``packed_linear`` can keep a packed copy of."""
    import torch

    weight = getattr(layer.base_layer, "weight", None)
    return (type(layer.base_layer) is torch.nn.Linear and isinstance(weight, torch.nn.Parameter)
            and type(weight.data) is torch.Tensor and weight.dtype in (torch.float32, torch.bfloat16)
            and weight.device.type == "cpu")


def mergeable_base(layer) -> bool:
    """A ``packable_base`` in float32: rounded to bf16, W + s B A would lose most of a small
    adapter's update, so only a float32 base takes ``merged_linear``."""
    import torch

    return packable_base(layer) and layer.base_layer.weight.dtype == torch.float32


def packable_layers(model) -> list:
    """The fused layers of ``model`` whose base ``packable_base`` accepts."""
    return [layer for layer in fused_layers(model) if packable_base(layer)]


def shared_input_groups(model) -> list[tuple[list, str]]:
    """Sibling fused layers that read the same input (``grpo.decode_groups.SHARED_INPUT``: a
    block's q/k/v, its gate/up) and can be decoded as one product: each a ``packable_base`` of one
    dtype and input width, one plain adapter of the same name, all with a bias or none.
    (members, adapter name) per group."""
    fused = {id(layer) for layer in fused_layers(model)}
    groups = []
    for parent in model.modules():
        for names in SHARED_INPUT:
            members = [getattr(parent, n, None) for n in names]
            if not all(m is not None and id(m) in fused and packable_base(m) for m in members):
                continue
            adapters = {plain_adapter(m) for m in members}
            bases = [m.base_layer for m in members]
            if (len(adapters) == 1 and None not in adapters and len({b.weight.dtype for b in bases}) == 1
                    and len({b.weight.shape[1] for b in bases}) == 1 and len({b.bias is None for b in bases}) == 1):
                groups.append((members, adapters.pop()))
    return groups


def shared_input_group(members: list, name: str) -> SharedInputGroup:
    """The kept ``SharedInputGroup`` of ``members`` (on the first one), made again when a base
    weight was replaced or written in place or the adapter name changed."""
    kept = members[0].__dict__.get(_GROUP_KEPT)
    if kept is None or kept.name != name or [id(m) for m in kept.members] != [id(m) for m in members] or not kept.current():
        members[0].__dict__.pop(_GROUP_KEPT, None)  # the stale copy is freed before the new one is made
        kept = members[0].__dict__[_GROUP_KEPT] = SharedInputGroup(members, name)
    return kept


def _decode_groups(model) -> list[SharedInputGroup]:
    """Each ``shared_input_groups`` group's kept ``SharedInputGroup`` (made where missing or stale)."""
    return [shared_input_group(members, name) for members, name in shared_input_groups(model)]


def decode_copy_bytes(layers) -> int:
    """Memory one decode copy (packed or merged) of these layers' base weights takes."""
    weights = [layer.base_layer.weight for layer in layers]
    return sum(w.numel() * w.element_size() for w in weights)


def mergeable_layers(model) -> list:
    """The fused layers of ``model`` whose adapter ``merged_linear`` can merge into a float32 copy:
    a ``mergeable_base`` and a plain single adapter."""
    return [layer for layer in fused_layers(model) if mergeable_base(layer) and plain_adapter(layer) is not None]


def merged_linear(layer, packed: bool, name: str | None = None):
    """``x -> x (W + s B A)^T + b`` for a layer of ``mergeable_layers``: a float32 copy of the base
    weight with the active adapter merged in (one product per decode step instead of the base's,
    A's, B's and the add), in oneDNN's packed layout where ``packed`` (``prepared_linear``).
    Kept on the layer and made again only when the base, A, B or the scale changed
    (``weights_stamp``; ``cached_lora_casts`` also compares A and B with the values the copy was
    made from, which catches a write through ``.data``): once per optimizer step, not per
    generation or decode step. Float32 only: rounded to bf16, W + s B A would lose most of a
    small adapter's update. ``name``: the layer's ``plain_adapter``, when the caller has it (the
    decode path, once per layer and token)."""
    import torch

    name = name or plain_adapter(layer)
    base, a, b = layer.base_layer, layer.lora_A[name].weight, layer.lora_B[name].weight
    key = (name, weights_stamp(base.weight, base.bias, a, b), layer.scaling[name], packed)
    kept = layer.__dict__.get(_MERGED_COPY)
    if kept is None or kept[0] != key:
        layer.__dict__.pop(_MERGED_COPY, None)  # the stale copy is freed before the new one is made
        kept = None
        with torch.no_grad():
            weight = torch.addmm(base.weight, b * layer.scaling[name], a)
            bias = None if base.bias is None else base.bias.detach()
            made_from = (a.detach().clone(), b.detach().clone())  # r x (in + out) floats
        kept = layer.__dict__[_MERGED_COPY] = (key, prepared_linear(weight, bias, packed), made_from)
    return kept[1]


def _drop_changed_merged_copy(layer) -> None:
    """Forget ``layer``'s merged copy when its adapter's values differ from those it was made from
    (a write through ``.data`` keeps the version counter): a few ms per generation for SmolLM2."""
    import torch

    kept = layer.__dict__.get(_MERGED_COPY)
    name = plain_adapter(layer)
    if kept is None or name is None:
        return
    a, b = kept[2]
    if not (torch.equal(a, layer.lora_A[name].weight) and torch.equal(b, layer.lora_B[name].weight)):
        del layer.__dict__[_MERGED_COPY]


def prepare_decode_weights(model, packed: bool, merged: bool) -> int:
    """Make (and keep) the copies ``cached_lora_casts(model, packed, merged)`` decodes
    with: each mergeable layer's float32 merged weight where ``merged``, else each packable
    layer's base weight (float32 or bf16) in oneDNN's packed layout where ``packed``. Returns the bytes the copies take. Done up
    front so the first generation does not pay for it and a memory plan made afterwards sees it."""
    layers = mergeable_layers(model) if merged else packable_layers(model) if packed else []
    groups = _decode_groups(model) if packed and not merged else []
    grouped = {id(m) for group in groups for m in group.members}
    for layer in layers:
        if merged:
            merged_linear(layer, packed)
        elif id(layer) not in grouped:
            packed_linear(layer.base_layer)
    return decode_copy_bytes(layers)


@contextlib.contextmanager
def cached_lora_casts(model, packed_base: bool = False, merged: bool = False):
    """Inside: the fused LoRA layers of ``model`` cast their weights once, not per call, in
    calls that record no gradient (generation). Dropped on exit, so nothing is kept between
    generations and a training step never sees a cached cast. A no-op for a model without
    fused layers.

    ``packed_base``: those calls also take the frozen base layer's product through its packed
    copy (``packed_linear``, kept on the base layer across generations) where the base is a
    plain float32 or bf16 CPU weight. A decode step's small-batch products run faster in
    oneDNN's packed layout than through ``F.linear``, which repacks the weight on every call
    (docs/benchmarks.md, "Session 7"; bf16 on a CPU with AMX, "Session 10"). Siblings that read
    the same input (q/k/v, gate/up: ``shared_input_groups``) are computed together, base and
    adapters, through one packed concatenated copy (``grpo.decode_groups``; "Session 11").

    ``merged``: those calls instead take the whole layer's product through ``merged_linear`` (packed
    where ``packed_base``) where the base is a plain float32 CPU weight (``mergeable_base``): one product per layer
    instead of four ops (docs/benchmarks.md, "Session 8")."""
    layers = fused_layers(model)
    for layer in layers:
        layer.__dict__[_CAST_CACHE] = {}
    groups = _decode_groups(model) if packed_base and not merged else []
    for group in groups:
        for member in group.members:
            member.__dict__[_CAST_CACHE][_GROUP] = group
    for layer in layers:
        cache = layer.__dict__[_CAST_CACHE]
        if merged and mergeable_base(layer):
            cache[_MERGED] = packed_base
            _drop_changed_merged_copy(layer)
        elif packed_base and packable_base(layer) and _GROUP not in cache:
            cache[_PACKED_BASE] = packed_linear(layer.base_layer)
    try:
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop(_CAST_CACHE, None)
        for group in groups:
            group.forget()


def use_fused_lora(model, kernel: str = "fused") -> int:
    """Bind ``fused_lora_forward`` to every peft ``lora.Linear`` of ``model`` (``kernel="fused"``),
    or restore peft's forward (``"peft"``). Returns how many layers run the fused forward."""
    from peft.tuners.lora.layer import Linear

    from grpo.errors import UserError

    if kernel not in LORA_KERNELS:
        raise UserError(f"model.lora_kernel: {kernel!r} is not one of {', '.join(LORA_KERNELS)}")
    count = 0
    for module in model.modules():
        if not isinstance(module, Linear):
            continue
        if kernel == "fused":
            module.forward = types.MethodType(fused_lora_forward, module)
            count += 1
        elif "forward" in module.__dict__:
            del module.forward
    return count
