"""`grpo export RUN_DIR OUT`: a merged model that generates what base + adapter generates."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from grpo.cli import main


def _fake_run(model_dir, run_dir, targets=("q_proj", "v_proj", "down_proj")):
    """A run directory as `grpo train` leaves it: config.yaml + adapter/ with non-zero LoRA B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets)))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_" in name:  # (an embedding LoRA starts with A = 0)
                p.normal_(0, 0.5)  # a trained-looking adapter that changes the greedy tokens
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"model": {"name": str(model_dir)}}))
    model.save_pretrained(run_dir / "adapter")
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(run_dir / "adapter")
    return model


def _greedy(model, ids, n=12):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()


def test_export_generates_the_same_greedy_tokens(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    peft_model = _fake_run(tiny_model_dir, tmp_path / "run").eval()
    out = tmp_path / "merged"
    assert main(["export", str(tmp_path / "run"), str(out)]) == 0
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer_config.json",
                 "export.json"):
        assert (out / name).is_file(), name
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not [k for k in merged.state_dict() if "lora" in k]
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template  # the chat template travels with the model
    text = tok.apply_chat_template([{"role": "user", "content": "2+3?"}], add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    want = _greedy(peft_model, ids)
    assert _greedy(merged, ids) == want
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert _greedy(base, ids) != want  # the adapter matters, so the equality above tests the merge
    assert json.loads((out / "export.json").read_text())["base_model"] == str(tiny_model_dir)


def test_export_errors_are_one_line(tiny_model_dir, tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "run directory not found" in capsys.readouterr().err
    (tmp_path / "empty_run").mkdir()
    assert main(["export", str(tmp_path / "empty_run"), str(tmp_path / "out")]) == 2
    assert "no LoRA adapter" in capsys.readouterr().err
    _fake_run(tiny_model_dir, tmp_path / "run")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "taken")]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "o2"), "--checkpoint", "latest"]) == 2
    assert "no checkpoints to export" in capsys.readouterr().err


def test_export_refuses_a_reward_models_adapter_and_notes_the_system_prompt(tiny_model_dir, tmp_path, capsys):
    _fake_run(tiny_model_dir, tmp_path / "run")
    config = tmp_path / "run" / "adapter" / "adapter_config.json"
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(
        {"model": {"name": str(tiny_model_dir), "system_prompt": "Answer with a number."}}))
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "export.json").read_text())["system_prompt"] == "Answer with a number."
    assert "note: the policy trained with model.system_prompt 'Answer with a number.'" in capsys.readouterr().err
    config.write_text(json.dumps({**json.loads(config.read_text()), "task_type": "SEQ_CLS"}))
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out2")]) == 2
    assert "a SEQ_CLS adapter (a grpo rm train run?)" in capsys.readouterr().err


def test_auto_dtype_is_the_bases_own(tiny_model_dir, tmp_path):
    from transformers import AutoConfig

    from grpo.export import _target_dtype

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.dtype = torch.bfloat16
    config.save_pretrained(tmp_path / "bf16")
    assert _target_dtype("auto", str(tmp_path / "bf16")) == torch.bfloat16
    assert _target_dtype("auto", str(tmp_path / "no-such-model")) == torch.float32


@pytest.mark.parametrize("tied", ["lm_head", "embed_tokens"])
def test_export_of_lora_on_a_tied_embedding_is_exact(tiny_model_dir, tmp_path, tied):
    """The tiny model ties its head to the embeddings (as SmolLM2 does): merging a LoRA on one
    added its delta to the shared matrix, so it reached both (logits off by 0.8-15, exit 0)."""
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tiny_model_dir).config.tie_word_embeddings
    peft_model = _fake_run(tiny_model_dir, tmp_path / "run", targets=(tied, "q_proj")).eval()
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.tensor([[1, 10, 11, 40, 50, 60]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, peft_model(ids).logits, atol=1e-5)


def test_export_config_reads_right_under_transformers_4(tiny_model_dir, tmp_path):
    """transformers 5 writes RoPE only as rope_parameters; transformers 4 (many vLLM builds)
    ignored it and used its default theta. The legacy keys are written too."""
    _fake_run(tiny_model_dir, tmp_path / "run")
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "merged")]) == 0
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]
    assert config["torch_dtype"] == config["dtype"]


def test_export_bad_adapters_and_checkpoints_are_one_line(tiny_model_dir, tmp_path, capsys):
    run = tmp_path / "run"
    _fake_run(tiny_model_dir, run)
    weights = run / "adapter" / "adapter_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:100])
    assert main(["export", str(run), str(tmp_path / "o1")]) == 2
    assert "the adapter weights are corrupt or truncated" in capsys.readouterr().err
    assert not (tmp_path / "o1").exists() and not list(tmp_path.glob(".tmp-*"))  # nothing half-written
    weights.write_bytes(good)
    config = run / "adapter" / "adapter_config.json"
    text = config.read_text()
    config.write_text("{bad")
    assert main(["export", str(run), str(tmp_path / "o2")]) == 2
    assert "is not valid JSON" in capsys.readouterr().err
    config.write_text(text)
    (run / "config.yaml").write_text("- a list\n")
    assert main(["export", str(run), str(tmp_path / "o3")]) == 2
    assert "not a run config" in capsys.readouterr().err
    # a checkpoint by step number, from RUN_DIR/checkpoints
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"name": str(tiny_model_dir)}}))
    import shutil

    shutil.copytree(run / "adapter", run / "checkpoints" / "step-000002" / "adapter")
    assert main(["export", str(run), str(tmp_path / "o4"), "--checkpoint", "2"]) == 0
    assert main(["export", str(run), str(tmp_path / "o5"), "--checkpoint", "7"]) == 2
    assert "no checkpoint with an adapter" in capsys.readouterr().err
    # a named checkpoint whose files fail their recorded hashes is refused (it exported silently)
    from grpo import checkpoint as ckpt

    ckpt_dir = run / "checkpoints" / "step-000002"
    (ckpt_dir / ckpt.STATE_JSON).write_text(json.dumps({"format": ckpt.FORMAT, "version": ckpt.VERSION,
                                                         "sha256": {}, "state": {}}))
    assert main(["export", str(run), str(tmp_path / "o6"), "--checkpoint", "step-000002"]) == 2
    assert "--checkpoint step-000002: checkpoint" in capsys.readouterr().err


def test_export_to_a_read_only_place_is_one_line_before_the_merge(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import tempfile

    _fake_run(tiny_model_dir, tmp_path / "run")

    def read_only(*a, **k):
        raise OSError(30, "Read-only file system", str(tmp_path))

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "cannot write the export" in err and "read-only" in err and "Traceback" not in err


def test_legacy_config_keys_for_per_layer_rope_and_a_read_only_cache(tmp_path, monkeypatch):
    import os

    from grpo.models import add_legacy_config_keys

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"rope_parameters": {  # Gemma 3's layout
        "full_attention": {"rope_theta": 1e6, "rope_type": "linear", "factor": 8.0},
        "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"}}, "dtype": "bfloat16"}))
    add_legacy_config_keys(config)
    got = json.loads(config.read_text())
    assert (got["rope_theta"], got["rope_local_base_freq"]) == (1e6, 1e4)
    assert got["rope_scaling"] == {"rope_type": "linear", "factor": 8.0} and got["torch_dtype"] == "bfloat16"
    config.write_text(json.dumps({"rope_parameters": {"rope_theta": 5e5}}))

    def read_only(*a):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(os, "replace", read_only)
    add_legacy_config_keys(config)  # a shared, read-only cache: left as it is, no error
    assert "rope_theta" not in json.loads(config.read_text())


def test_exported_weights_are_readable_by_other_users(tiny_model_dir, tmp_path):
    import os
    import stat

    _fake_run(tiny_model_dir, tmp_path / "run")
    old = os.umask(0o022)
    try:
        assert main(["export", str(tmp_path / "run"), str(tmp_path / "merged")]) == 0
    finally:
        os.umask(old)
    for path in [tmp_path / "merged", *(tmp_path / "merged").iterdir()]:
        assert os.stat(path).st_mode & stat.S_IROTH, path  # save_pretrained wrote the weights 0600
