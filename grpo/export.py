"""``grpo export RUN_DIR OUT``: merge a run's LoRA adapter into a standalone Hugging Face model.

The output directory holds ``config.json``, ``model.safetensors`` (merged weights, no
LoRA tensors), the tokenizer (with its chat template) and ``generation_config.json``:
what ``AutoModelForCausalLM.from_pretrained(OUT)`` and ``vllm serve OUT`` load.
``export.json`` records where it came from. See docs/export.md (also: serving the
unmerged adapter with vLLM's LoRA support).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from grpo.errors import UserError

DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="merge a run's adapter into a standalone HF model directory (vllm serve OUT)")
    p.add_argument("run_dir", help="a grpo train run directory (config.yaml + adapter/), or an adapter directory")
    p.add_argument("out", help="output directory (must not exist, or be empty)")
    p.add_argument("--model", help="base model spec (default: model.name from RUN_DIR/config.yaml, "
                                   "else the adapter's base_model_name_or_path)")
    p.add_argument("--checkpoint", help="export this checkpoint's adapter instead of the final one: a path, a "
                                        "name or step number in RUN_DIR/checkpoints (step-000020, 20), or "
                                        "'latest' for the newest that reads back intact")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="saved weight dtype (auto: the base model's own dtype, float32 when unknown)")


def find_adapter(run_dir: Path, checkpoint: str | None) -> Path:
    """The adapter directory to merge (holding adapter_config.json, checked as ``grpo eval`` checks it)."""
    from grpo import checkpoint as ckpt
    from grpo.evaluate_cli import resolve_adapter

    if checkpoint == "latest":
        if not ckpt.list_checkpoints(run_dir):
            raise UserError(f"{run_dir}: no checkpoints to export (run directory without checkpoints/)")
        try:  # the newest that reads back intact (hashes checked), as --resume picks it
            path, _ = ckpt.find_resumable(run_dir)
        except ckpt.CheckpointError as exc:
            raise UserError(str(exc)) from exc
        return resolve_adapter(str(path / "adapter"), "--checkpoint latest:")
    if checkpoint:  # a path, or a checkpoint of RUN_DIR by name or step number
        named = [Path(checkpoint), run_dir / "checkpoints" / checkpoint]
        if checkpoint.isdigit():
            named.append(run_dir / "checkpoints" / f"step-{int(checkpoint):06d}")
        for c in named:
            for candidate in (c / "adapter", c):
                if (candidate / "adapter_config.json").is_file():
                    if (c / ckpt.STATE_JSON).is_file():  # a checkpoint: its recorded hashes must hold
                        try:
                            ckpt.read_state(c)
                        except ckpt.CheckpointError as exc:
                            raise UserError(f"--checkpoint {checkpoint}: {exc}") from exc
                    return resolve_adapter(str(candidate), "--checkpoint")
        raise UserError(f"--checkpoint {checkpoint}: no checkpoint with an adapter there or in "
                        f"{run_dir / 'checkpoints'} (give a path, a name like step-000002, a step number or 'latest')")
    for c in (run_dir / "adapter", run_dir):
        if (c / "adapter_config.json").is_file():
            return resolve_adapter(str(c), "adapter")
    raise UserError(f"{run_dir / 'adapter'}: no LoRA adapter (adapter_config.json) found; give a grpo train run "
                    "directory that finished (it writes adapter/), or --checkpoint latest")


def base_model_spec(run_dir: Path, adapter: Path, override: str | None) -> str:
    if override:
        return override
    config = run_dir / "config.yaml"
    if config.is_file():
        try:
            loaded = yaml.safe_load(config.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"{config}: not valid YAML ({exc})") from exc
        if not isinstance(loaded, dict) or not isinstance(loaded.get("model", {}), dict):
            raise UserError(f"{config}: not a run config (a mapping with model.name); pass --model")
        name = loaded.get("model", {}).get("name")
        if name:
            return str(name)
    base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise UserError(f"{adapter}: cannot tell the base model; pass --model")
    return str(base)


def export(run_dir: str | Path, out: str | Path, model_spec: str | None = None, checkpoint: str | None = None,
           dtype: str = "auto") -> Path:
    """Merge and save; returns the output directory. Written into a sibling ``.tmp-*`` directory
    and renamed into place, so a failed export (a full disk) leaves no half model behind."""
    import os
    import shutil
    import tempfile

    from peft import PeftModel
    from safetensors import SafetensorError

    from grpo.checkpoint import safetensors_os_errors
    from grpo.errors import state_dict_error_line
    from grpo.models import add_legacy_config_keys, load_causal_lm, load_tokenizer, make_readable, resolve_model_path
    from grpo.rundir import os_errors

    run_dir, out = Path(run_dir), Path(out)
    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output {out} already exists and is not empty; choose a new directory")
    adapter = find_adapter(run_dir, checkpoint)
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    task_type = adapter_config.get("task_type")
    if task_type not in (None, "CAUSAL_LM"):  # a reward model's adapter: its score head is not a causal LM's
        raise UserError(f"{adapter}: a {task_type} adapter (a grpo rm train run?), not a policy's; a reward model "
                        f"run writes its merged model to RUN/model/ already")
    spec = base_model_spec(run_dir, adapter, model_spec)
    with os_errors(f"cannot write the export {out}"):  # before the merge: a read-only place fails fast
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        base_path = resolve_model_path(spec)
        model = load_causal_lm(base_path, "float32", "cpu")  # merge in float32, cast once at the end
        _untie_targeted_embeddings(model, adapter_config)
        try:
            merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        except SafetensorError as exc:
            raise UserError(f"adapter {adapter}: the adapter weights are corrupt or truncated ({exc})") from exc
        except (ValueError, RuntimeError, KeyError, OSError) as exc:
            raise UserError(f"adapter {adapter} does not fit base model {spec!r}: "
                            f"{state_dict_error_line(exc)}") from exc
        target = _target_dtype(dtype, base_path)
        merged = merged.to(target)
        leftover = [k for k in merged.state_dict() if "lora_" in k]
        if leftover:  # merge_and_unload left LoRA layers behind: not a standalone model
            raise RuntimeError(f"merge left LoRA tensors in the model: {leftover[:3]}")
        tokenizer_dir = adapter if (adapter / "tokenizer_config.json").is_file() else Path(base_path)
        tokenizer = load_tokenizer(str(tokenizer_dir))
        system_prompt = _run_setting(run_dir, "system_prompt")
        with os_errors(f"cannot write the export {out}"), safetensors_os_errors():
            merged.save_pretrained(tmp, safe_serialization=True)
            add_legacy_config_keys(tmp / "config.json")
            tokenizer.save_pretrained(tmp)
            if not (tmp / "generation_config.json").is_file():
                merged.generation_config.save_pretrained(tmp)
            (tmp / "export.json").write_text(json.dumps({
                "base_model": spec, "base_path": str(base_path), "adapter": str(adapter.resolve()),
                "dtype": str(target).replace("torch.", ""), "merged_with": "peft merge_and_unload",
                "system_prompt": system_prompt,
            }, indent=2) + "\n")
            make_readable(tmp)  # mkdtemp and save_pretrained made it private; the export is for serving
            if out.exists():
                out.rmdir()  # empty (checked above)
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if system_prompt:  # the chat template saved is the tokenizer's own: it does not add it
        print(f"note: the policy trained with model.system_prompt {system_prompt!r} (in export.json); send it as "
              "the system message when serving the merged model", file=sys.stderr)
    return out


def _untie_targeted_embeddings(model, adapter_config: dict) -> None:
    """A base that ties its LM head to the input embeddings, with LoRA on either: merging adds
    the delta to the one shared matrix, so it would reach both (wrong logits, silently). Give
    the head its own copy first; the export then saves both, untied."""
    import torch

    if not getattr(model.config, "tie_word_embeddings", False):
        return
    targets = adapter_config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    targets += list(adapter_config.get("modules_to_save") or [])
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if module is embed or module is head}
    if head is None or not names & set(targets):
        return
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False
    head.weight = torch.nn.Parameter(embed.weight.detach().clone())


def _run_setting(run_dir: Path, key: str):
    """``model.<key>`` of the run's config.yaml, None when absent."""
    config = run_dir / "config.yaml"
    try:
        return ((yaml.safe_load(config.read_text()) or {}).get("model") or {}).get(key) if config.is_file() else None
    except yaml.YAMLError:
        return None


def _target_dtype(dtype: str, base_path: str):
    import torch

    if dtype == "auto":  # the base's own dtype, from its config (a local directory or a hub id)
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(str(base_path))
            name = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "").replace("torch.", "")
        except (OSError, ValueError):
            name = None
        dtype = name if name in DTYPES[1:] else "float32"
    return getattr(torch, dtype)


def run_export(args) -> int:
    out = export(args.run_dir, args.out, args.model, args.checkpoint, args.dtype)
    print(f"merged model written to {out} (load with AutoModelForCausalLM.from_pretrained, or `vllm serve {out}`)")
    return 0
