"""The reward model: a language model with a scalar head, trained through LoRA.

It is a standard ``AutoModelForSequenceClassification`` with ``num_labels=1`` (the
layout TRL's ``RewardTrainer`` produces): the backbone's last hidden state at the last
non-padding token goes through a linear ``score`` head, so the trained model loads
anywhere with ``from_pretrained`` and scores ``model(input_ids, attention_mask).logits[:, 0]``.
Training wraps it with peft LoRA on the backbone (the policy's ``model.lora_*``
settings) and trains the head fully (peft ``modules_to_save``); the saved model has
the adapters merged in. ``reward_model.json`` beside the weights records how texts
were formatted (system prompt, length limit) so the verifier reads them the same way.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

from grpo.errors import UserError

INFO_FILE = "reward_model.json"


@contextlib.contextmanager
def _quiet_transformers():
    """The new head's 'newly initialized weights' notice is expected here; hide it."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def load_sequence_scorer(path: str, dtype: str, device: str):
    """``path`` (a local HF directory or hub id) as a one-output sequence classifier."""
    from transformers import AutoModelForSequenceClassification

    from grpo.models import resolve_dtype

    try:
        with _quiet_transformers():
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1,
                                                                       dtype=resolve_dtype(dtype, device))
    except OSError as exc:
        raise UserError(f"cannot load model {path!r}: {str(exc).strip().splitlines()[0]}") from exc
    except ValueError as exc:  # architecture without a sequence-classification head
        raise UserError(f"model {path!r} cannot carry a reward head: {str(exc).strip().splitlines()[0]}") from exc
    return model.to(device)


def build_for_training(model_cfg) -> tuple[Any, Any, str]:
    """(peft model with LoRA + trainable head, tokenizer, resolved base path) from a ``ModelConfig``."""
    from grpo.models import load_tokenizer, resolve_device, resolve_model_path

    device = resolve_device(model_cfg.device)
    path = resolve_model_path(model_cfg.name)
    tokenizer = load_tokenizer(path)
    model = load_sequence_scorer(path, model_cfg.dtype, device)
    model.config.pad_token_id = tokenizer.pad_token_id  # the head reads the last non-pad token
    model.config.use_cache = False
    targets: Any = model_cfg.lora_target_modules
    if targets == ["all-linear"]:
        targets = "all-linear"
    model = add_lora_with_head(model, model_cfg.lora_rank, model_cfg.lora_alpha, model_cfg.lora_dropout, targets)
    return model, tokenizer, path


def add_lora_with_head(model, rank: int, alpha: float, dropout: float, target_modules: list[str] | str):
    """LoRA on the backbone (as ``grpo.models.add_lora``) plus a fully trained score head."""
    from grpo.models import add_lora

    model = add_lora(model, rank, alpha, dropout, target_modules, task_type="SEQ_CLS")
    if not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n):
        raise UserError("the reward head is not trainable: peft found no 'score' or 'classifier' module")
    _float32_head(model)
    return model


def _float32_head(model) -> None:
    """The fully trained head in float32 under a 16-bit base, its input upcast: in bf16, AdamW
    steps smaller than half a weight's rounding step would be lost (with lr 1e-4, 12.5 % of a
    tiny model's head never moved in 3 epochs), as the LoRA weights, float32 already, are not."""
    def upcast(_module, args):
        return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    for module in model.modules():
        own = [p for n, p in module.named_parameters(recurse=False) if p.requires_grad and "lora_" not in n]
        if own and any(p.dtype in (torch.bfloat16, torch.float16) for p in own):
            module.float()
            module.register_forward_pre_hook(upcast)


def collate(sequences: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask), both (B, T)."""
    T = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), T), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids.to(device), mask.to(device)


def forward_rewards(model, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
    """Scalar rewards (B,) in float32; differentiable when grad is enabled. Pads with the
    config's pad id, the one the head uses to find each sequence's last token."""
    device = next(model.parameters()).device
    ids, mask = collate(sequences, model.config.pad_token_id, device)
    return model(input_ids=ids, attention_mask=mask).logits[:, 0].float()


@torch.no_grad()
def score_sequences(model, sequences: Sequence[Sequence[int]], batch_size: int) -> list[float]:
    """Rewards of many sequences, ``batch_size`` at a time, similar lengths batched together."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out = [0.0] * len(sequences)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        for i, r in zip(idx, forward_rewards(model, [sequences[i] for i in idx]).tolist()):
            out[i] = r
    return out


# ------------------------------------------------------------------------ save / load
def save_reward_model(model, tokenizer, out_dir: Path, info: dict[str, Any]) -> Path:
    """Merge the adapters, save a standard model directory (atomically); returns it.
    The peft wrapper is consumed: call this after the last use of the training model."""
    merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-model-", dir=out_dir.parent))
    try:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def resolve_rm_path(spec: str) -> str:
    """A trained RM: its model directory, a ``grpo rm train`` run directory (uses ``model/``),
    or a hub id of a one-output sequence classifier."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return str(path)
        if (path / "model" / "config.json").is_file():
            return str(path / "model")
        raise UserError(f"reward model {spec}: no config.json there or in {spec}/model "
                        "(give the model/ directory written by grpo rm train)")
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise UserError(f"reward model not found: {spec}")
    return spec


def check_reward_model(spec: str) -> str:
    """Resolve ``spec`` and check (config only, no weights) that it is a one-output sequence
    classifier; returns the path to load. Fails early with a UserError otherwise."""
    from transformers import AutoConfig

    path = resolve_rm_path(spec)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load reward model {spec!r}: {str(exc).strip().splitlines()[0]}") from exc
    if getattr(config, "num_labels", None) != 1 or not any(a.endswith("ForSequenceClassification")
                                                           for a in (config.architectures or [])):
        raise UserError(f"{spec} is not a reward model (expected a *ForSequenceClassification with one "
                        f"output; found {config.architectures} with {config.num_labels} labels)")
    return path


def load_reward_model(spec: str, device: str = "auto", dtype: str = "auto"):
    """(model in eval mode, tokenizer, info dict) of a trained reward model."""
    from grpo.models import load_tokenizer, resolve_device

    path = check_reward_model(spec)
    device = resolve_device(device)
    tokenizer = load_tokenizer(path)
    model = load_sequence_scorer(path, dtype, device)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    info_path = Path(path) / INFO_FILE
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    return model, tokenizer, info
