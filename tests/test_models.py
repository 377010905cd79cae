"""Model specs: embedded default, GGUF, local directory, hub id; clear errors."""

import pytest

from grpo.errors import UserError
from grpo.models import EMBEDDED, embedded_gguf_path, resolve_model_path


def test_local_dir_without_config_is_an_error(tmp_path):
    with pytest.raises(UserError, match="has no config.json"):
        resolve_model_path(str(tmp_path))


def test_local_hf_dir_resolves_to_itself(tiny_model_dir):
    assert resolve_model_path(str(tiny_model_dir)) == str(tiny_model_dir)


def test_unreachable_hub_id_is_a_clear_error():
    # huggingface_hub reads HF_HUB_OFFLINE at import time: run in a fresh interpreter
    import os
    import subprocess
    import sys

    spec = "no-such-org-xyz/no-such-model"
    assert resolve_model_path(spec) == spec  # a hub id passes through
    code = ("from grpo.models import load_tokenizer\n"
            "from grpo.errors import UserError\n"
            f"try:\n    load_tokenizer({spec!r})\nexcept UserError as e:\n    print('USERERROR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert f"USERERROR cannot load tokenizer for {spec!r}" in out.stdout, out.stderr[-2000:]


def test_embedded_default_is_located_without_import():
    path = embedded_gguf_path("smollm2-135m")
    assert path.name == EMBEDDED["smollm2-135m"].filename and path.stat().st_size > 50_000_000


@pytest.mark.slow
def test_embedded_default_converts_once_and_generates(tmp_path, monkeypatch):
    import torch

    from grpo.engines.base import SamplingParams
    from grpo.engines.hf import HFEngine
    from grpo.models import load_causal_lm, load_tokenizer
    from grpo.prompts import encode_prompt

    monkeypatch.setenv("GRPO_CACHE", str(tmp_path))
    path = resolve_model_path("smollm2-135m")
    assert resolve_model_path("smollm2-135m") == path  # cached: the second call converts nothing
    import shutil

    from grpo.models import gguf_to_hf_dir

    copy = tmp_path / "elsewhere" / embedded_gguf_path("smollm2-135m").name
    copy.parent.mkdir()
    shutil.copy(embedded_gguf_path("smollm2-135m"), copy)  # another path and mtime (another venv, clone)
    assert str(gguf_to_hf_dir(copy)) == path  # the same content: the same conversion, not another 517 MB
    tok, model = load_tokenizer(path), load_causal_lm(path)
    engine = HFEngine(model, tok)
    out = engine.generate([encode_prompt(tok, [{"role": "user", "content": "What is 2 + 2?"}])],
                          SamplingParams(n=1, max_new_tokens=12, temperature=0.0))
    assert "4" in out[0][0].text
    assert torch.isfinite(torch.tensor(out[0][0].logprobs)).all()


def test_lora_init_depends_on_the_seed_alone(tiny_model_dir):
    """build_policy's LoRA weights are the same whatever drew random numbers before it (a first run
    that converts the embedded GGUF builds a randomly initialised model before the policy)."""
    import torch

    from grpo.build import build_policy
    from grpo.config import load_config

    def lora_weights(cfg):
        model, _ = build_policy(cfg)
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}

    cfg = load_config(None, [f"model.name={tiny_model_dir}", "model.device=cpu", "model.lora_rank=4", "seed=3"])
    torch.manual_seed(3)
    first = lora_weights(cfg)
    torch.manual_seed(3)
    torch.rand(10_000)  # what a GGUF conversion's random init does to the global stream
    second = lora_weights(cfg)
    assert first and all(torch.equal(first[n], second[n]) for n in first)
    other = lora_weights(load_config(None, [f"model.name={tiny_model_dir}", "model.device=cpu",
                                            "model.lora_rank=4", "seed=4"]))
    assert not all(torch.equal(first[n], other[n]) for n in first)
    state = torch.get_rng_state()
    lora_weights(cfg)
    assert torch.equal(torch.get_rng_state(), state)  # the global stream is left as it was


def test_target_modules_that_match_nothing_are_named(tiny_model_dir, capsys):
    """A default target list on an architecture with other names (Phi-3's fused qkv_proj) would
    otherwise put LoRA on fewer layers without a word; none matching at all stays an error."""
    from transformers import AutoModelForCausalLM

    from grpo.errors import UserError
    from grpo.models import add_lora

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    add_lora(model, 4, 8, 0.0, ["q_proj", "qkv_proj", "gate_up_proj"])
    err = capsys.readouterr().err
    assert "lora_target_modules qkv_proj, gate_up_proj match no module" in err and "on q_proj only" in err
    add_lora(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), 4, 8, 0.0, ["q_proj", "v_proj"])
    assert "warning" not in capsys.readouterr().err
    with pytest.raises(UserError, match="check model.lora_target_modules"):
        add_lora(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), 4, 8, 0.0, ["qkv_proj"])


def test_a_broken_model_file_or_directory_is_one_line(tmp_path):
    import json

    from grpo.models import load_causal_lm, load_tokenizer, resolve_device

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(16))
    with pytest.raises(UserError, match=r"cannot read .*bad.gguf as a GGUF model"):
        resolve_model_path(str(bad))
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"foo": 1}))
    with pytest.raises(UserError, match="cannot load model"):
        load_causal_lm(str(folder), "float32")
    with pytest.raises(UserError, match="cannot load tokenizer"):
        load_tokenizer(str(folder))
    with pytest.raises(UserError, match="unknown device 'gpu'"):
        resolve_device("gpu")
