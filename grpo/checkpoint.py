"""Atomic, resumable checkpoints.

``run_dir/checkpoints/step-000010/`` holds the adapter (PEFT format) and
``state.pt`` (optimizer, scheduler, RNG states, data position, engine state). A
checkpoint is written into a temporary directory and renamed into place, so a run
killed mid-write leaves the previous checkpoint intact and never a half one.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from grpo.errors import UserError

PREFIX = "step-"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(run_dir: Path, step: int, model, state: dict[str, Any], keep: int) -> Path:
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        model.save_pretrained(tmp / "adapter")
        torch.save(state, tmp / "state.pt")
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / "state.pt").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load(path: Path, model) -> dict[str, Any]:
    """Load adapter weights into ``model`` (in place); return the saved training state."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = path / "adapter" / "adapter_model.safetensors"
    if not weights.is_file():
        raise UserError(f"checkpoint {path} has no adapter weights ({weights.name} missing)")
    result = set_peft_model_state_dict(model, load_file(str(weights), device=str(next(model.parameters()).device)))
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise UserError(f"checkpoint {path} does not match the model's adapters (unexpected keys: {unexpected[:3]})")
    return torch.load(path / "state.pt", weights_only=False)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
