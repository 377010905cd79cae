"""The data-parallel pieces of a training step: the wrapped policy, gathered state, reductions.

* ``Policy`` is the module the update differentiates: ``forward(compute)`` runs the
  trainer's log-prob computation on the model (shared-prompt KV path or packed). Under
  torchrun it is wrapped by DDP (adapters' gradients reduced across ranks, base
  replicated) or sharded by FSDP2 ``fully_shard`` (per decoder layer, so the frozen base
  weights are sharded too). Going through the wrapper's ``forward`` is what lets DDP and
  FSDP2 hook in; the peft model inside stays the one the engine samples from.
* Gradients are **summed** over ranks, not averaged: every rank's loss is already
  normalised by whole-batch counts (sequences, tokens), so the sum is exactly the
  gradient of the one-process loss.
* The trainer gathers every rank's scored groups (``grpo.dist.all_gather_concat``), so
  advantages (batch std included), dynamic-sampling decisions and step metrics are
  computed from the whole batch, identically on every rank and at any world size.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import torch

from grpo import dist
from grpo.errors import UserError
from grpo.logprobs import grouped_logprobs, pack_grouped


class Policy(torch.nn.Module):
    """The module DDP / FSDP2 wrap: ``forward(compute)`` returns ``compute(model)``.

    ``compute`` is the trainer's log-prob computation (grouped or packed, with or without
    entropy); running it inside this forward is what lets DDP prepare its gradient
    reduction and FSDP2 gather its root parameters, whatever path the computation takes
    through the model (the shared-prompt KV path calls the backbone twice).
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, compute: Callable[[torch.nn.Module], Any]) -> Any:
        out = compute(self.model)
        # fresh tensors, not views: FSDP2 hooks its backward onto the outputs
        return tuple(_fresh(o) for o in out) if isinstance(out, tuple) else _fresh(out)


def _fresh(x: Any) -> Any:
    return x.clone() if isinstance(x, torch.Tensor) else x


def _sum_allreduce_hook(state, bucket):  # no annotations: DDP checks them against its own types
    """DDP communication hook: all-reduce SUM (DDP's default divides by the world size)."""
    work = torch.distributed.all_reduce(bucket.buffer(), async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def wrap_policy(policy: Policy, strategy: str, me: dist.DistInfo) -> torch.nn.Module:
    """``policy`` itself at world size 1; DDP or FSDP2 around it under torchrun."""
    if not me.enabled:
        return policy
    if strategy == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        layers = _decoder_layers(policy.model)
        for layer in layers:
            fully_shard(layer)
        fully_shard(policy)  # the rest (embeddings, norm, head) as the root group
        for module in (*layers, policy):
            module.set_gradient_divide_factor(1.0)  # sum, see the module docstring
            module.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)
        with torch.no_grad():  # FSDP2 initialises from the first forward, which must enter at the root
            policy(lambda model: grouped_logprobs(model, pack_grouped([[0]], [0], [[0]], 0, _device(policy))))
        return policy
    from torch.nn.parallel import DistributedDataParallel

    device = _device(policy)
    ddp = DistributedDataParallel(policy, device_ids=[device.index] if device.type == "cuda" else None,
                                  forward_sync_buffers=False)  # no collective per forward: ranks may
    # run different numbers of no-grad forwards (reference, old log-probs); buffers are equal from init
    ddp.register_comm_hook(None, _sum_allreduce_hook)
    return ddp


def _device(module: torch.nn.Module) -> torch.device:
    p = next(module.parameters())
    return p.device if not hasattr(p, "to_local") else p.to_local().device


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(base, "model", None), "layers", None)
    if layers is None:
        raise UserError(f"distributed.strategy=fsdp2: cannot find the decoder layers (model.layers) of "
                        f"{type(base).__name__}; use distributed.strategy=ddp")
    return list(layers)


def set_gradient_sync(wrapped: torch.nn.Module, enabled: bool) -> None:
    """Whether the next forward/backward reduces gradients across ranks (else they accumulate
    locally): DDP's ``no_sync`` as a plain switch, FSDP2's ``set_requires_gradient_sync``."""
    if hasattr(wrapped, "require_backward_grad_sync"):  # DDP (read at its forward)
        wrapped.require_backward_grad_sync = enabled
    elif hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        wrapped.set_requires_gradient_sync(enabled)


@contextlib.contextmanager
def generation_mode(wrapped: torch.nn.Module, engine: Any) -> Iterator[None]:
    """Full weights on every rank while the engine samples (FSDP2), resharded afterwards.

    Each rank decodes its own prompts for its own number of steps, so no collective may run
    inside the decode loop: the layers are all-gathered once here and kept unsharded.
    """
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in wrapped.modules() if isinstance(m, FSDPModule)]
    if not modules or not getattr(engine, "samples_from_trainer_module", False):  # vLLM has its own weights
        yield
        return
    for m in modules:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in modules:
            m.set_reshard_after_forward(True, recurse=False)
            m.reshard()


def is_sharded(model: torch.nn.Module) -> bool:
    return any(hasattr(p, "full_tensor") for p in model.parameters())


def full_adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """Collective under FSDP2: the trainable (adapter) weights as full CPU tensors, for
    ``save_pretrained(state_dict=...)``; None when the weights are not sharded (nothing to gather)."""
    if not is_sharded(model):
        return None
    return {name: p.full_tensor().detach().cpu() for name, p in model.named_parameters() if p.requires_grad}


def optimizer_state(wrapped: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state dict; collective under FSDP2, where it is gathered to full tensors."""
    if not is_sharded(wrapped):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(wrapped, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(wrapped: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """The inverse of ``optimizer_state``: under FSDP2 every rank takes its shards of the full state."""
    if not is_sharded(wrapped):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(wrapped, optimizer, keyed_by_name(wrapped, optimizer, state),
                             options=StateDictOptions(full_state_dict=True))


def keyed_by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state dict keyed as FSDP2's loader wants it, by parameter name: a checkpoint
    written by one process or under DDP (``optimizer.state_dict()``) numbers the parameters in the
    optimizer's order, which is the same order here (the same trainable parameters, the same model)."""
    groups = state.get("param_groups", [])
    if not any(isinstance(i, int) for g in groups for i in g["params"]):
        return state
    names = {id(p): n for n, p in model.named_parameters()}
    ordered = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    numbered = [i for g in groups for i in g["params"]]
    if sorted(numbered) != list(range(len(ordered))):
        raise UserError(f"checkpoint: its optimizer state holds {len(numbered)} parameters, this model trains "
                        f"{len(ordered)}")
    return {"state": {ordered[i]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [ordered[i] for i in g["params"]]} for g in groups]}


def full_value(x: Any) -> float:
    """A float from a tensor that may be an FSDP2 DTensor."""
    if hasattr(x, "full_tensor"):
        x = x.full_tensor()
    return float(x)


def reduce_update_stats(stats: dict[str, float], summed: Sequence[str], maxed: Sequence[str]) -> dict[str, float]:
    """Collective: ``summed`` keys added over ranks (shares of a whole-batch mean), ``maxed`` keys
    (wall times) the slowest rank's; the rest are equal on every rank already."""
    out = dict(stats)
    s = [k for k in summed if k in stats]
    m = [k for k in maxed if k in stats]
    out.update(zip(s, dist.all_reduce_sum([stats[k] for k in s])))
    out.update(zip(m, dist.all_reduce_max([stats[k] for k in m])))
    return out
