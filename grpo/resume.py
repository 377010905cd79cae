"""``--resume`` against the checkpoint's own config: what may change, what may not.

A resumed run continues the saved one, so its config is compared with the config
stored in the checkpoint (``state["config"]``), key by key:

* keys in ``FIXED_ON_RESUME`` (and everything under them) cannot change: the adapter's
  shapes (``model.lora_*``), the model, the task and its rewards, the seed, the group
  size, the engine (its sampling stream is checkpointed), the update passes per step (the
  learning-rate schedule counts optimizer steps, ``steps x loss.update_passes``). A change is a one-line error
  naming every such key with its saved and new values;
* any other change (``optim.lr``, ``steps``, ``eval.*``, sampling settings, loss
  coefficients ...) applies from the next step and is printed, one line per key.

Optimizer hyperparameters live in the optimizer's saved state, so the trainer calls
``apply_optimizer_settings`` after loading it; otherwise the saved lr would win.
"""

from __future__ import annotations

import sys
from typing import Any

from grpo.errors import UserError

FIXED_ON_RESUME = (
    "seed", "model.name", "model.lora_rank", "model.lora_alpha", "model.lora_dropout", "model.lora_target_modules",
    "model.system_prompt", "task", "rollout.num_generations", "rollout.engine", "loss.update_passes",
)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _fixed(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in FIXED_ON_RESUME)


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (saved, current) for every key whose value differs (keys one side lacks
    count when they sit under a fixed key: e.g. a task argument added or removed)."""
    old, new = flatten(saved), flatten(current)
    changes = {}
    for key in sorted(old.keys() | new.keys()):
        if key in old and key in new:
            if old[key] != new[key]:
                changes[key] = (old[key], new[key])
        elif _fixed(key):
            changes[key] = (old.get(key, "(unset)"), new.get(key, "(unset)"))
    return changes


def reconcile(saved: dict[str, Any] | None, current: dict[str, Any], checkpoint_name: str) -> list[str]:
    """Refuse changes to fixed keys (UserError naming them); return the applied changes' lines."""
    if not isinstance(saved, dict):
        print(f"warning: checkpoint {checkpoint_name} holds no config; the current one is used unchecked",
              file=sys.stderr)
        return []
    changes = config_changes(saved, current)
    refused = {k: v for k, v in changes.items() if _fixed(k)}
    if refused:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
        raise UserError(f"--resume: the config changes settings a resumed run cannot change ({listed}); "
                        f"restore them, or start a new run in another output_dir")
    lines = [f"resume: {k} changed {a!r} -> {b!r} (applied from the next step)" for k, (a, b) in changes.items()]
    for line in lines:
        print(line, file=sys.stderr)
    return lines


def check_same_base(resumed: tuple[Any, dict[str, Any]], fingerprint: str | None, name: str) -> None:
    """Refuse a base model that changed under the same ``model.name`` (a rewritten local directory,
    a new GGUF file): the name alone matched, and the adapter went onto other weights silently."""
    saved = resumed[1].get("base_model")
    if saved and fingerprint and saved != fingerprint:
        raise UserError(f"--resume: the base model {name!r} is not the one checkpoint {resumed[0].name} trained "
                        f"on (its config or weights changed: fingerprint {saved} -> {fingerprint}); resume with "
                        "that model, or start a new run in another output_dir")


def apply_optimizer_settings(optimizer, scheduler, lr: float, weight_decay: float, betas: tuple[float, float]) -> None:
    """Put the config's lr / weight decay / betas into a just-loaded optimizer and its LambdaLR."""
    for group in optimizer.param_groups:
        group["initial_lr"], group["weight_decay"], group["betas"] = lr, weight_decay, tuple(betas)
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    factors = [fn(scheduler.last_epoch) for fn in scheduler.lr_lambdas]
    for group, factor in zip(optimizer.param_groups, factors):
        group["lr"] = lr * factor
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
