"""Atomic, resumable checkpoints in a plain format (no pickle).

``run_dir/checkpoints/step-000010/`` holds the adapter (PEFT format),
``state.safetensors`` (every tensor of the training state: optimizer moments, RNG
states, ...) and ``state.json`` (everything else: step, sampler position, optimizer
param groups, Python/NumPy RNG states, the run's config, and the SHA-256 of both
weight files). Loading runs no code from the checkpoint: JSON and safetensors hold
data only, and a file that does not parse, does not match its recorded hash or
holds an unknown structure is a one-line ``CheckpointError``.

A checkpoint is written into ``checkpoints/.tmp-*`` and renamed into place, so a run
killed mid-write leaves the previous checkpoint intact and never a half one; leftover
``.tmp-*`` directories are removed when the next run starts (``remove_partial``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from grpo.errors import UserError, state_dict_error_line

PREFIX = "step-"
TMP_PREFIX = ".tmp-"
STATE_JSON, STATE_TENSORS = "state.json", "state.safetensors"
ADAPTER_WEIGHTS = "adapter/adapter_model.safetensors"
FORMAT, VERSION = "grpo-lora-training-state", 1


class CheckpointError(UserError):
    """A checkpoint that cannot be loaded: missing files, corrupt, foreign or tampered."""


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
        # one state per GPU the saving process saw; a machine that shows fewer (or more) restores
        # those it has (set_rng_state_all would fail on an index): sampling and dropout take
        # explicit seeds, so these states only matter to code outside the trainer
        for index, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


# --------------------------------------------------------------------- encoding
def encode_state(obj: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a training state into JSON-able data and named tensors.

    Tensors become ``{"__tensor__": name}``, tuples ``{"__tuple__": [...]}``, NumPy
    arrays ``{"__ndarray__": [...], "dtype": ...}``, dicts with non-string keys (the
    optimizer's per-parameter state) ``{"__items__": [[key, value], ...]}``.
    """
    tensors: dict[str, torch.Tensor] = {}

    def enc(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            name = f"t{len(tensors)}"
            tensors[name] = x.detach().to("cpu", copy=True).contiguous()
            return {"__tensor__": name}
        if isinstance(x, np.ndarray):
            return {"__ndarray__": x.tolist(), "dtype": str(x.dtype)}
        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, tuple):
            return {"__tuple__": [enc(v) for v in x]}
        if isinstance(x, list):
            return [enc(v) for v in x]
        if isinstance(x, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in x):
                return {k: enc(v) for k, v in x.items()}
            return {"__items__": [[enc(k), enc(v)] for k, v in x.items()]}
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"cannot store {type(x).__name__} in a checkpoint (plain data and tensors only)")

    return enc(obj), tensors


_NDARRAY_DTYPES = {"uint32", "int64", "float64", "float32", "int32", "uint8"}


def decode_state(data: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of ``encode_state``; unknown markers or missing tensors raise ValueError."""

    def dec(x: Any) -> Any:
        if isinstance(x, list):
            return [dec(v) for v in x]
        if not isinstance(x, dict):
            return x
        if "__tensor__" in x:
            if x["__tensor__"] not in tensors:
                raise ValueError(f"tensor {x['__tensor__']!r} missing from {STATE_TENSORS}")
            return tensors[x["__tensor__"]]
        if "__tuple__" in x:
            return tuple(dec(v) for v in x["__tuple__"])
        if "__ndarray__" in x:
            if x.get("dtype") not in _NDARRAY_DTYPES:
                raise ValueError(f"unsupported array dtype {x.get('dtype')!r}")
            return np.asarray(x["__ndarray__"], dtype=x["dtype"])
        if "__items__" in x:
            return {_hashable(dec(k)): dec(v) for k, v in x["__items__"]}
        bad = [k for k in x if k.startswith("__")]
        if bad:
            raise ValueError(f"unknown marker {bad[0]!r}")
        return {k: dec(v) for k, v in x.items()}

    return dec(data)


def _hashable(key: Any) -> Any:
    if isinstance(key, (str, int, float, bool, tuple)) or key is None:
        return key
    raise ValueError(f"invalid mapping key {key!r}")


# ------------------------------------------------------------------------ save
def save(run_dir: Path, step: int, model, state: dict[str, Any], keep: int,
         adapter_state: dict[str, Any] | None = None) -> Path:
    """``adapter_state``: the adapter weights when the model's own are sharded (FSDP2), else None."""
    from safetensors.torch import save_file

    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=root))
    try:
        with safetensors_os_errors():
            model.save_pretrained(tmp / "adapter", state_dict=adapter_state)
            data, tensors = encode_state(state)
            save_file(tensors, str(tmp / STATE_TENSORS))
        record = {"format": FORMAT, "version": VERSION, "state": data,
                  "sha256": {name: _sha256(tmp / name) for name in (STATE_TENSORS, ADAPTER_WEIGHTS)
                             if (tmp / name).is_file()}}
        (tmp / STATE_JSON).write_text(json.dumps(record))
        for path in tmp.rglob("*"):  # the files' contents on disk before the rename makes them the checkpoint
            _fsync(path)
        _fsync(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_partial(run_dir: Path) -> list[Path]:
    """Delete ``checkpoints/.tmp-*`` left by a run killed mid-write; return what was removed.

    Call it only while holding the run directory's lock (no live writer)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    partial = [p for p in root.iterdir() if p.name.startswith(TMP_PREFIX)]
    for p in partial:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return partial


# ------------------------------------------------------------------------ find
def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint directories (``step-N`` with a state file), oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()
             and ((p / STATE_JSON).is_file() or (p / "state.pt").is_file())]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def find_resumable(run_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The newest checkpoint that reads back intact, with its training state.

    A corrupt newest checkpoint is skipped with a warning naming it and the one used
    instead; none intact (or none at all) is a ``CheckpointError``. Reads files only:
    call it before loading any model.
    """
    found = list_checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}; start without --resume")
    problems = []
    for path in reversed(found):
        try:
            state = read_state(path)
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        for problem in problems:
            print(f"warning: {problem}; using the previous checkpoint {path.name} instead", file=sys.stderr)
        return path, state
    raise CheckpointError(f"no intact checkpoint in {run_dir / 'checkpoints'}: {problems[0]}"
                          + (f" (and {len(problems) - 1} older ones unreadable)" if len(problems) > 1 else ""))


# ------------------------------------------------------------------------ load
def read_state(path: Path) -> dict[str, Any]:
    """The training state of checkpoint ``path``, checked (hashes, structure); no code runs."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not (path / STATE_JSON).is_file():
        if (path / "state.pt").is_file():
            raise CheckpointError(f"checkpoint {path} is in the old pickle format (state.pt), which is not loaded "
                                  "because unpickling can run code; continue it with the version that wrote it")
        raise CheckpointError(f"checkpoint {path} has no {STATE_JSON}")
    try:
        record = json.loads((path / STATE_JSON).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt ({STATE_JSON} is not valid JSON: {exc})") from exc
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} was not written by grpo train ({STATE_JSON} has no "
                              f"format {FORMAT!r})")
    if record.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has state format version {record.get('version')!r}; "
                              f"this version reads {VERSION}")
    hashes = record.get("sha256")
    if not isinstance(hashes, dict):
        raise CheckpointError(f"checkpoint {path} is corrupt ({STATE_JSON} lacks file hashes)")
    for name in (STATE_TENSORS, ADAPTER_WEIGHTS):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete ({name} missing)")
        if hashes.get(name) != _sha256(path / name):
            raise CheckpointError(f"checkpoint {path} is corrupt ({name} does not match its recorded SHA-256)")
    try:
        tensors = load_file(str(path / STATE_TENSORS))
        state = decode_state(record.get("state"), tensors)
    except (SafetensorError, ValueError, TypeError, OSError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt ({exc})") from exc
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"checkpoint {path} is corrupt (its state has no step)")
    missing = [key for key in ("optimizer", "scheduler", "rng") if not isinstance(state.get(key), dict)]
    if missing:  # state.json parses but lost a part (its hashes cover the tensor files only)
        raise CheckpointError(f"checkpoint {path} is corrupt (its state has no {', '.join(missing)})")
    return state


def load_adapter(path: Path, model) -> None:
    """Load checkpoint ``path``'s adapter weights into ``model`` (in place)."""
    from peft import set_peft_model_state_dict
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"checkpoint {path} has no adapter weights ({weights.name} missing)")
    try:
        tensors = load_file(str(weights), device=str(next(model.parameters()).device))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"checkpoint {path}: adapter weights unreadable ({exc})") from exc
    try:
        result = set_peft_model_state_dict(model, tensors)
    except RuntimeError as exc:  # shape mismatch: a different lora_rank or model
        raise CheckpointError(f"checkpoint {path} does not match the model's adapters: "
                              f"{state_dict_error_line(exc)}") from exc
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise CheckpointError(f"checkpoint {path} does not match the model's adapters "
                              f"(unexpected keys: {unexpected[:3]})")


def load(path: Path, model) -> dict[str, Any]:
    """Load adapter weights into ``model`` (in place); return the saved training state."""
    state = read_state(path)
    load_adapter(path, model)
    return state


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def safetensors_os_errors():
    """safetensors reports a failed write (disk full, quota) as ``SafetensorError`` "... (os error N)":
    raised here as the ``OSError`` it is, so the trainer's one-line write error names it."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as exc:
        found = re.search(r"os error (\d+)", str(exc))
        if not found:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code)) from exc


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
