"""model.dtype auto: the measured bf16 choice, its cache, and fp32 where it matters under bf16 weights."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from grpo import precision
from grpo.engines.base import SamplingParams
from grpo.engines.hf import HFEngine
from grpo.errors import UserError
from grpo.logprobs import pack, sampled_logprobs
from grpo.models import add_lora, load_causal_lm


def _probe(speedup, calls):
    def probe(threads):
        calls.append(threads)
        return {"fp32_gflops": 100.0, "bf16_gflops": 100.0 * speedup, "bf16_speedup": speedup}
    return probe


@pytest.fixture()
def probing(monkeypatch):
    monkeypatch.setenv(precision.CPU_AUTO_ENV, "probe")


@pytest.mark.parametrize("speedup,expected", [(3.0, torch.bfloat16), (1.2, torch.bfloat16),
                                              (1.19, torch.float32), (0.5, torch.float32)])
def test_cpu_auto_follows_the_probe_threshold(tmp_path, probing, speedup, expected):
    calls = []
    assert precision.auto_dtype("cpu", 1, _probe(speedup, calls), tmp_path / "p.json") == expected
    assert calls == [1]


def test_probe_result_is_cached_per_machine_and_thread_count(tmp_path, probing):
    path, calls = tmp_path / "cache" / "precision.json", []
    probe = _probe(2.0, calls)
    assert precision.auto_dtype("cpu", 2, probe, path) == torch.bfloat16
    assert precision.auto_dtype("cpu", 2, probe, path) == torch.bfloat16  # cached: no second probe
    assert calls == [2]
    precision.auto_dtype("cpu", 1, probe, path)  # another thread count is another measurement
    assert calls == [2, 1]
    saved = json.loads(path.read_text())
    assert saved[precision.machine_key(2)]["bf16_speedup"] == 2.0
    # A corrupt cache is re-measured, not an error.
    path.write_text("{not json")
    assert precision.auto_dtype("cpu", 2, _probe(0.5, calls), path) == torch.float32


def test_a_cached_value_that_is_not_a_number_is_measured_again(tmp_path, probing):
    path, calls = tmp_path / "precision.json", []
    for bad in (float("nan"), True, "2"):
        path.write_text(json.dumps({precision.machine_key(1): {"bf16_speedup": bad}}))
        assert precision.auto_dtype("cpu", 1, _probe(2.0, calls), path) == torch.bfloat16
    assert calls == [1, 1, 1]


def test_arm_cpus_with_other_parts_get_other_keys(tmp_path, monkeypatch):
    from pathlib import Path

    def key(cpuinfo):
        real = Path.read_text
        monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: cpuinfo if str(self) == "/proc/cpuinfo"
                            else real(self, *a, **k))
        return precision.machine_key(1)

    graviton = "processor\t: 0\nFeatures\t: fp asimd sve\nCPU implementer\t: 0x41\nCPU part\t: 0xd40\n"
    altra = "processor\t: 0\nFeatures\t: fp asimd\nCPU implementer\t: 0x41\nCPU part\t: 0xd0c\n"
    assert key(graviton) != key(altra) and key(graviton) == key(graviton + "processor\t: 1\n")


def test_no_home_directory_means_no_cache_not_a_crash(monkeypatch, probing):
    from pathlib import Path

    monkeypatch.delenv("GRPO_LORA_CACHE", raising=False)
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: (_ for _ in ()).throw(RuntimeError("no home"))))
    assert precision.cache_path() is None
    calls = []
    assert precision.auto_dtype("cpu", 1, _probe(2.0, calls)) == torch.bfloat16 and calls == [1]


def test_env_pins_cpu_auto_without_probing(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setenv(precision.CPU_AUTO_ENV, "bfloat16")
    assert precision.auto_dtype("cpu", 1, _probe(0.1, calls), tmp_path / "p.json") == torch.bfloat16
    monkeypatch.setenv(precision.CPU_AUTO_ENV, "float32")
    assert precision.auto_dtype("cpu", 1, _probe(9.0, calls), tmp_path / "p.json") == torch.float32
    assert calls == []
    monkeypatch.setenv(precision.CPU_AUTO_ENV, "fp8")
    with pytest.raises(UserError, match="GRPO_CPU_AUTO_DTYPE"):
        precision.auto_dtype("cpu", 1, _probe(1.0, calls), tmp_path / "p.json")


def test_explicit_dtype_is_never_probed(tiny_model_dir, monkeypatch, probing):
    def boom(*a, **k):
        raise AssertionError("probed")
    monkeypatch.setattr(precision, "probe_bf16_speedup", boom)
    monkeypatch.setattr(precision, "cached_probe", boom)
    assert next(load_causal_lm(str(tiny_model_dir), "float32").parameters()).dtype == torch.float32


def test_matmul_rate_is_measured():
    rate = precision.matmul_gflops(torch.float32, 1, shape=(64, 64, 64), seconds=0.01)
    assert 0.01 < rate < 1e5


def test_bf16_base_keeps_lora_optimizer_and_logprobs_in_float32(tiny_model_dir, monkeypatch):
    """Under bf16 base weights: LoRA weights and AdamW state fp32, log-probs fp32, and the
    engine's rollout log-probs equal the trainer's on the same tokens (the ratio starts at 1)."""
    monkeypatch.setenv(precision.CPU_AUTO_ENV, "bfloat16")
    torch.manual_seed(0)
    model = add_lora(load_causal_lm(str(tiny_model_dir), "auto"), 4, 8, 0.0, ["q_proj", "v_proj"])
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    base = [p for n, p in model.named_parameters() if "lora_" not in n]
    lora = [p for n, p in model.named_parameters() if p.requires_grad]
    assert base and all(p.dtype == torch.bfloat16 for p in base)
    assert lora and all(p.dtype == torch.float32 for p in lora)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [[1, 10, 11, 12], [1, 20, 21]]
    out = HFEngine(model, tok, seed=0).generate(prompts, SamplingParams(n=2, max_new_tokens=5, ignore_eos=True))
    comps = [c for g in out for c in g]
    batch = pack([prompts[i // 2] for i in range(4)], [c.token_ids for c in comps], tok.pad_token_id)
    lp = sampled_logprobs(model, batch)
    assert lp.dtype == torch.float32
    engine_lp = torch.tensor([c.logprobs for c in comps])
    assert (lp.detach() - engine_lp).abs().max() < 1e-2  # same bf16 forward both sides, fp32 log-softmax
    opt = torch.optim.AdamW(lora, lr=1e-3)
    (-lp.sum()).backward()
    opt.step()
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())


def test_auto_loads_bf16_where_float32_weights_would_not_fit(tmp_path, capsys):
    from grpo.build import _fitting
    from grpo.memory import mem_available

    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    with open(tmp_path / "model.safetensors", "wb") as f:  # sparse: the size of a model that would not fit
        f.truncate(mem_available() // 2)
    assert _fitting(str(tmp_path), "float32", "cpu") == "bfloat16"  # fp32 = 2x the bf16 file > free
    assert "float32 weights would take" in capsys.readouterr().err
    with open(tmp_path / "model.safetensors", "wb") as f:
        f.truncate(1 << 20)
    assert _fitting(str(tmp_path), "float32", "cpu") == "float32"
    assert _fitting(str(tmp_path), "bfloat16", "cpu") == "bfloat16"
    assert _fitting("HuggingFaceTB/SmolLM2-135M", "float32", "cpu") == "float32"  # a hub id: unknown, kept
