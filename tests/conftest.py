"""Shared fixtures: a tiny random-weight causal LM with a character-level tokenizer.

Everything is built locally in a temporary directory (no hub, no downloads), so the
end-to-end tests run offline in seconds.
"""

from __future__ import annotations

import os
import string
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# CPU `model.dtype: auto` would pick bf16 wherever the matmul probe measures it faster; the
# suite's numeric tolerances are for float32, so pin it (tests/test_precision.py covers the probe).
os.environ.setdefault("GRPO_CPU_AUTO_DTYPE", "float32")

REPO = Path(__file__).resolve().parents[1]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tiny_model(path: Path, seed: int = 0, layers: int = 2, hidden: int = 64) -> Path:
    """A 2-layer Llama with a character vocabulary, saved as a normal HF directory."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
    chars = list(string.printable)
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|end|>", pad_token="<pad>",
                                   additional_special_tokens=specials[3:])
    fast.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = 2
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


TOY_PLUGIN = '''
"""A test plugin: a toy task and a reward with variance even for a random model."""
from grpo.registry import TASKS, VERIFIERS
from tasks.base import Task
from verifiers.base import Score, Verifier


@VERIFIERS.register("digit_share")
class DigitShare(Verifier):
    """Share of characters that are digits (a dense reward a random model can climb)."""
    fields = ()

    def score(self, completions):
        return [Score(sum(ch.isdigit() for ch in c) / max(1, len(c)), "digit share") for c in completions]


@TASKS.register("toy_digits")
class ToyDigits(Task):
    """Prompts asking for digits."""

    def __init__(self, n=16):
        self.n = n

    def rows(self, split):
        start = 0 if split == "train" else 1000
        return [{"id": f"{split}-{i}", "prompt": [{"role": "user", "content": f"say digits {start + i}"}],
                 "verifiers": {"digit_share": 1.0}} for i in range(self.n)]
'''


@pytest.fixture(scope="session")
def toy_plugin(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plugin") / "toy_plugin.py"
    path.write_text(TOY_PLUGIN)
    return path


def tiny_run_config(model_dir: Path, out_dir: Path, plugin: Path, **overrides) -> list[str]:
    """Overrides for a two-step run of the toy task on the tiny model."""
    base = {
        "model.name": str(model_dir), "model.device": "cpu", "model.lora_rank": 4, "model.lora_alpha": 8,
        "model.lora_target_modules": "[q_proj, v_proj]",
        "task.name": "toy_digits", "plugins": f"[{plugin}]", "output_dir": str(out_dir),
        "steps": 2, "rollout.prompts_per_step": 2, "rollout.num_generations": 4, "rollout.max_new_tokens": 8,
        "optim.lr": 0.05, "optim.micro_batch_size": 4, "eval.num_problems": 2, "eval.num_samples": 2,
        "checkpoint_every": 1, "verifier_workers": 1, "threads": 1,
    }
    base.update(overrides)
    return [f"{k}={v}" for k, v in base.items()]
