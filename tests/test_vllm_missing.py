"""Without vLLM installed: `vllm` fails with one line naming the extra, `auto` falls back to hf.

These run in the default suite (no vLLM there); ``sys.modules["vllm"] = None`` makes
the tests mean the same where vLLM happens to be installed.
"""

from __future__ import annotations

import socket
import sys

import pytest

from grpo.cli import main
from grpo.config import load_config, vllm_options
from grpo.errors import UserError
from conftest import tiny_run_config


@pytest.fixture()
def no_vllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError; find_spec -> None


def _cfg(model_dir, tmp_path, plugin, **overrides):
    return load_config(None, tiny_run_config(model_dir, tmp_path / "run", plugin, **overrides))


def test_choosing_vllm_without_vllm_is_one_line_naming_the_extra(no_vllm, tiny_model_dir, toy_plugin, tmp_path):
    from grpo.build import build_engine, build_policy

    cfg = _cfg(tiny_model_dir, tmp_path, toy_plugin, **{"rollout.engine": "vllm"})
    model, tok = build_policy(cfg)
    with pytest.raises(UserError) as info:
        build_engine(model, tok, cfg.model, cfg.rollout, seed=cfg.seed, loss=cfg.loss)
    message = str(info.value)
    assert "\n" not in message
    assert "pip install 'grpo-lora[vllm]'" in message and "rollout.engine=hf" in message


def test_cli_train_with_vllm_missing_prints_error_and_exits_2(no_vllm, tiny_model_dir, toy_plugin, tmp_path, capsys):
    config = tmp_path / "empty.yaml"
    config.write_text("# overrides only\n")
    code = main(["train", "--no-progress", str(config),
                 *tiny_run_config(tiny_model_dir, tmp_path / "run", toy_plugin, **{"rollout.engine": "vllm"})])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("error: rollout.engine=vllm needs vLLM") and "grpo-lora[vllm]" in err[-1]


def test_auto_picks_hf_when_vllm_is_not_importable(no_vllm, tiny_model_dir, toy_plugin, tmp_path):
    from grpo.build import build_engine, build_policy
    from grpo.engines.hf import HFEngine

    cfg = _cfg(tiny_model_dir, tmp_path, toy_plugin, **{"rollout.engine": "auto"})
    model, tok = build_policy(cfg)
    assert isinstance(build_engine(model, tok, cfg.model, cfg.rollout, seed=cfg.seed, loss=cfg.loss), HFEngine)


def test_server_mode_needs_no_local_vllm_and_names_an_unreachable_server(no_vllm, tiny_model_dir, toy_plugin,
                                                                         tmp_path):
    from grpo.build import build_engine, build_policy

    with socket.socket() as s:  # a loopback port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    cfg = _cfg(tiny_model_dir, tmp_path, toy_plugin,
               **{"rollout.engine": "vllm", "rollout.vllm.mode": "server", "rollout.vllm.server_url": url})
    model, tok = build_policy(cfg)
    with pytest.raises(UserError, match=rf"cannot reach the vLLM server at {url} .*docs/vllm.md"):
        build_engine(model, tok, cfg.model, cfg.rollout, seed=cfg.seed, loss=cfg.loss)


def test_vllm_options_are_checked_with_suggestions():
    with pytest.raises(UserError, match=r"unknown config key 'rollout.vllm.gpu_memory'.*gpu_memory_utilization"):
        load_config(None, ["rollout.vllm.gpu_memory=0.5"])
    with pytest.raises(UserError, match=r"rollout.vllm.mode: expected one of 'colocate', 'server'"):
        load_config(None, ["rollout.vllm.mode=remote"])
    with pytest.raises(UserError, match=r"gpu_memory_utilization must be > 0 and <= 1, got 1.5"):
        load_config(None, ["rollout.vllm.gpu_memory_utilization=1.5"])
    with pytest.raises(UserError, match=r"sleep applies to mode colocate only"):
        load_config(None, ["rollout.vllm.mode=server", "rollout.vllm.sleep=true"])
    cfg = load_config(None, ["rollout.vllm.mode=server", "rollout.vllm.server_url=http://gpu-box:8000",
                             "rollout.vllm.kv_cache_gb=2"])
    opts = vllm_options(cfg.rollout)
    assert (opts.mode, opts.server_url, opts.kv_cache_gb, opts.gpu_memory_utilization) == \
           ("server", "http://gpu-box:8000", 2.0, 0.3)


def test_lora_rank_maps_to_a_rank_vllm_accepts():
    from grpo.engines.vllm import max_lora_rank

    assert [max_lora_rank(r) for r in (1, 4, 8, 9, 16, 48, 512)] == [1, 8, 8, 16, 16, 64, 512]
    with pytest.raises(UserError, match="largest LoRA rank"):
        max_lora_rank(1024)


def test_the_engine_states_how_the_loss_treats_vllm_logprobs():
    from grpo.engines.vllm import old_logprobs_choice

    def line(*overrides):
        return old_logprobs_choice(load_config(None, list(overrides)).loss)

    assert "from the trainer (loss.old_logprobs=auto: the current policy detached" in line()
    assert "not corrected (loss.tis_cap=0" in line()
    assert "truncated importance sampling min(pi_trainer / pi_vllm, 2)" in line("loss.tis_cap=2")
    assert "loss.old_logprobs=auto: recompute" in line("loss.update_passes=2")
    assert "old log-probs are vLLM's" in line("loss.old_logprobs=rollout")
    assert all("engine_logprob_diff is logged every step" in line(*o) for o in ([], ["loss.old_logprobs=rollout"]))


@pytest.mark.parametrize("sharded", [True, False])
def test_colocated_vllm_under_fsdp2_warns_that_each_rank_holds_the_whole_model(no_vllm, tiny_model_dir, toy_plugin,
                                                                               tmp_path, capsys, sharded):
    from grpo.build import build_engine, build_policy

    cfg = _cfg(tiny_model_dir, tmp_path, toy_plugin, **{"rollout.engine": "vllm"})
    model, tok = build_policy(cfg)
    with pytest.raises(UserError):  # no vLLM here: the engine stops at its import, after the check
        build_engine(model, tok, cfg.model, cfg.rollout, seed=cfg.seed, loss=cfg.loss, sharded=sharded)
    err = capsys.readouterr().err
    assert ("warning: a colocated vLLM loads the whole base model on every rank" in err) == sharded
