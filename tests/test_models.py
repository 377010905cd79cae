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
    tok, model = load_tokenizer(path), load_causal_lm(path)
    engine = HFEngine(model, tok)
    out = engine.generate([encode_prompt(tok, [{"role": "user", "content": "What is 2 + 2?"}])],
                          SamplingParams(n=1, max_new_tokens=12, temperature=0.0))
    assert "4" in out[0][0].text
    assert torch.isfinite(torch.tensor(out[0][0].logprobs)).all()
